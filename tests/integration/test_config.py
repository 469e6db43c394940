"""chatnode.config: precedence (flag > env > file > default) and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatnode.config import DEFAULTS, ConfigError, load_config, parse_duration


def test_defaults() -> None:
    cfg = load_config({}, {})
    assert cfg == DEFAULTS
    assert (cfg.host, cfg.port, cfg.data_dir) == ("127.0.0.1", 8080, Path("data"))
    assert cfg.url == "http://127.0.0.1:8080/"
    assert cfg.db_path == Path("data/db")


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "chatnode.toml"
    toml.write_text('host = "10.1.1.1"\nport = 7000\nrate_limit = 3\ndata_dir = "/srv/c"\n')
    env = {"CHATNODE_PORT": "7100", "CHATNODE_RATE_LIMIT": "4.5"}
    cfg = load_config({"rate_limit": "9"}, env, toml)
    assert cfg.host == "10.1.1.1"  # file
    assert cfg.port == 7100  # env beats file
    assert cfg.rate_limit == 9.0  # flag beats env
    assert cfg.data_dir == Path("/srv/c")
    # CHATNODE_CONFIG names the file when --config is not given.
    cfg = load_config({}, {"CHATNODE_CONFIG": str(toml)})
    assert cfg.port == 7000


def test_durations_and_lists() -> None:
    assert parse_duration("500ms") == 500
    assert parse_duration("2") == 2000
    assert parse_duration("1.5m") == 90_000
    assert parse_duration("7d") == 7 * 86_400_000
    cfg = load_config({"token_ttl": "30m", "join": ["a.example:1", "10.0.0.2:2,10.0.0.3:3"]}, {})
    assert cfg.token_ttl_ms == 1_800_000
    assert cfg.join == ("a.example:1", "10.0.0.2:2", "10.0.0.3:3")
    cfg = load_config({}, {"CHATNODE_KAFKA_BROKERS": "k:9092", "CHATNODE_REPLICAS": "3"})
    assert cfg.kafka_brokers == "k:9092" and cfg.replicas == 3


@pytest.mark.parametrize(
    ("flags", "env", "fragment"),
    [
        ({"port": "http"}, {}, "--port: 'http' is not an integer"),
        ({"port": "-1"}, {}, "out of range"),
        ({}, {"CHATNODE_HOST": "not a host!"}, "CHATNODE_HOST"),
        ({"log_level": "loud"}, {}, "expected one of"),
        ({"token_ttl": "0s"}, {}, "--token-ttl"),
        ({"token_ttl": "forever"}, {}, "not a duration"),
        ({"rate_limit": "nan"}, {}, "--rate-limit"),
        ({"max_frame_bytes": "10"}, {}, "--max-frame-bytes"),
        ({"join": ["nohostport"]}, {}, "not host:port"),
        ({"replicas": "0"}, {}, "--replicas"),
        ({"colour": "blue"}, {}, "unknown setting"),
    ],
)
def test_validation(flags: dict[str, object], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(flags, env)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config({}, {}, bad)
    typed = tmp_path / "typed.toml"
    typed.write_text('port = "8080"\nrate_burst = true\n')
    with pytest.raises(ConfigError, match="rate_burst"):
        load_config({}, {}, typed)
    notdir = tmp_path / "file"
    notdir.write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        load_config({"data_dir": str(notdir)}, {})
