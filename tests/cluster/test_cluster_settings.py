"""Cluster settings: keys (flag, environment, TOML, file), discovery flags, the key never
printed, session-token keys following key rotation, and the ``chatnode members`` table."""

from __future__ import annotations

import base64
import io
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from chatnode.chat.auth import TokenSigner
from chatnode.cli import _parser, format_members, main
from chatnode.cluster.keyring import generate_key, parse_key
from chatnode.config import ConfigError, describe, load_config
from chatnode.node import Identity, token_keys


def test_keys_from_flag_env_and_toml(tmp_path: Path) -> None:
    k1, k2, k3 = generate_key(), os.urandom(32).hex(), generate_key()
    cfg = load_config({"cluster_key": [k1, f"{k2}"]}, {"CHATNODE_CLUSTER_KEY": k3})
    assert cfg.cluster_keys == (k1, k2) and cfg.cluster_key == k1
    cfg = load_config({}, {"CHATNODE_CLUSTER_KEY": f" {k3} , {k1} "})
    assert cfg.cluster_keys == (k3, k1)
    toml = tmp_path / "c.toml"
    toml.write_text(f'cluster_key = ["{k2}"]\nmdns = true\ndns_name = "svc.ns:9000"\n')
    cfg = load_config({}, {}, toml)
    assert cfg.cluster_keys == (k2,) and cfg.mdns and cfg.dns_name == "svc.ns:9000"
    assert load_config({}, {}).cluster_keys == ()
    assert load_config({}, {}).cluster_key is None


def test_key_file_is_read_when_no_key_is_given(tmp_path: Path) -> None:
    k1, k2 = generate_key(), generate_key()
    f = tmp_path / "keys"
    f.write_text(f"# new key first\n{k1}\n\n{k2}  # old\n")
    assert load_config({"cluster_key_file": str(f)}, {}).cluster_keys == (k1, k2)
    assert load_config({"cluster_key_file": str(f), "cluster_key": k2}, {}).cluster_keys == (k2,)
    f.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no key"):
        load_config({"cluster_key_file": str(f)}, {})
    with pytest.raises(ConfigError, match="cluster-key-file"):
        load_config({"cluster_key_file": str(tmp_path / "missing")}, {})


@pytest.mark.parametrize(
    "bad",
    ["secret", "00" * 31, "zz" * 32, "c2hvcnQ=", generate_key()[:-4]],
)
def test_malformed_keys_are_refused_with_the_flag_named(bad: str) -> None:
    with pytest.raises(ConfigError, match="--cluster-key"):
        load_config({"cluster_key": [bad]}, {})
    with pytest.raises(ConfigError, match="CHATNODE_CLUSTER_KEY"):
        load_config({}, {"CHATNODE_CLUSTER_KEY": bad})


def test_urlsafe_base64_and_hex_keys_are_accepted() -> None:
    raw = bytes(range(250, 256)) + os.urandom(26)
    for text in (raw.hex(), base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        cfg = load_config({"cluster_key": [text]}, {})
        assert parse_key(cfg.cluster_keys[0]) == raw


def test_discovery_flags() -> None:
    args = _parser().parse_args(
        ["run", "--mdns", "--mdns-interface", "127.0.0.7", "--dns-name", "chat.svc",
         "--dns-interval", "2s", "--advertise", "10.1.2.3:9000", "--gossip-port", "7000"]
    )  # fmt: skip
    assert args.mdns == "true"
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("command",)}
    flags.pop("config", None)
    cfg = load_config(flags, {})
    assert cfg.mdns and cfg.mdns_interface == "127.0.0.7"
    assert cfg.dns_name == "chat.svc" and cfg.dns_interval_ms == 2000
    assert cfg.advertise == "10.1.2.3:9000" and cfg.gossip_port_number == 7000
    assert load_config({}, {"CHATNODE_MDNS": "off"}).mdns is False
    assert load_config({"port": 9100}, {}).gossip_port_number == 9100  # same number as HTTP
    with pytest.raises(ConfigError, match="CHATNODE_MDNS"):
        load_config({}, {"CHATNODE_MDNS": "maybe"})
    with pytest.raises(ConfigError, match="--advertise"):
        load_config({"advertise": "10.1.2.3:99999"}, {})


def test_describe_and_config_command_never_print_keys() -> None:
    key = generate_key()
    cfg = load_config({"cluster_key": [key, generate_key()]}, {})
    assert describe(cfg)["cluster_keys"] == "<2 set>"
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["config", "--cluster-key", key]) == 0
    assert key not in out.getvalue() and "<1 set>" in out.getvalue()


def test_keygen_prints_a_fresh_valid_key() -> None:
    outs = []
    for _ in range(2):
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["keygen"]) == 0
        outs.append(out.getvalue().strip())
    assert outs[0] != outs[1]
    assert all(len(parse_key(k)) == 32 for k in outs)


def test_session_tokens_follow_cluster_key_rotation() -> None:
    ident = Identity("n1", os.urandom(32))
    old, new = generate_key(), generate_key()
    before = TokenSigner(token_keys(load_config({"cluster_key": [old]}, {}), ident))
    during = TokenSigner(token_keys(load_config({"cluster_key": [new, old]}, {}), ident))
    token, _ = before.issue("alice", "t" * 16, 1_000, 60_000)
    assert during.verify(token, 2_000).user == "alice"  # old tokens still accepted
    fresh, _ = during.issue("bob", "u" * 16, 1_000, 60_000)
    assert (
        TokenSigner(token_keys(load_config({"cluster_key": [new]}, {}), ident))
        .verify(fresh, 2_000)
        .user
        == "bob"
    )
    # the same key written in hex derives the same token key
    hexed = parse_key(new).hex()
    assert token_keys(load_config({"cluster_key": [hexed]}, {}), ident) == token_keys(
        load_config({"cluster_key": [new]}, {}), ident
    )
    # standalone: the node's own secret
    assert token_keys(load_config({}, {}), ident) == [ident.token_key]


def test_members_table() -> None:
    view = {
        "self": "n2",
        "standalone": False,
        "members": [
            {"id": "n1", "address": "127.0.0.5:8080", "state": "dead", "incarnation": 7},
            {"id": "n2", "address": "127.0.0.6:8080", "state": "alive", "incarnation": 12},
        ],
    }
    lines = format_members(view).splitlines()
    assert lines[0] == "node n2"
    assert lines[1].split() == ["ID", "ADDRESS", "STATE", "INCARNATION"]
    assert lines[2].split() == ["n1", "127.0.0.5:8080", "dead", "7"]
    assert lines[3].split() == ["*", "n2", "127.0.0.6:8080", "alive", "12"]
    alone = format_members({"self": "n9", "standalone": True, "members": []})
    assert alone.startswith("node n9 (standalone")


def test_members_command_reports_an_unreachable_node() -> None:
    assert main(["members", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
