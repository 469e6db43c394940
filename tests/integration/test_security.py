"""Client-facing abuse, against real daemons (docs/SECURITY.md, "Clients"): one test per
finding of the security review, each asserting the fixed behaviour."""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemon import ADMIN_HEADERS, ADMIN_TOKEN, REPO, Daemon
from tests.support.rawws import RawWS, open_fds, rss_mb
from tests.support.ws import PASSWORD, WS, new_user, signup

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    """Daemons a test starts; each is stopped by pid at the end."""
    nodes: list[Daemon] = []
    try:
        yield nodes
    finally:
        for d in nodes:
            d.stop()


def _start(started: list[Daemon], path: Path, *args: str, **kw: Any) -> Daemon:
    d = Daemon.start(path, args=list(args), **kw)
    started.append(d)
    return d


async def _post(
    http: aiohttp.ClientSession, url: str, body: object, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(url, data=json.dumps(body), headers={**JSON, **(headers or {})}) as r:
        return r.status, await r.json(), dict(r.headers)


# --------------------------------------------------------------------------- finding 2


async def test_never_reading_socket_cannot_grow_memory(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    """A logged-in socket that never reads asks for 150 history pages of ~3.2 MB within the
    rate limit: the node's RSS grows less than 30 MB, and another client is served
    throughout."""
    node = _start(started, tmp_path / "n")
    user = new_user()
    token = await signup(http, node, user)
    writers = [await WS.connect(http, node, token) for _ in range(6)]
    room = new_user("big")
    await writers[0].ok("rooms.create", room=room, visibility="public")
    body = "\U0001f600" * 4000  # 16,000 bytes of UTF-8
    await asyncio.gather(*(w.ok("send", room=room, id=f"m{i}-{j}", body=body)
                           for i, w in enumerate(writers) for j in range(35)))  # fmt: skip
    legit = writers[0]
    for _ in range(3):  # warm up: the node has built big pages before the baseline
        page = await legit.ok("history", room=room, limit=200)
        assert len(page["messages"]) == 200
    for w in writers[1:]:
        await w.close()
    gc.collect()
    await asyncio.sleep(0.5)
    base = rss_mb(node.pid)

    attacker = await RawWS.connect(node.host, node.port, rcvbuf=4096)
    await attacker.send("hello", token=token, ref=0)
    peak = base
    latencies: list[float] = []
    done = asyncio.Event()

    async def legit_client() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            await legit.ok("ping")
            latencies.append(time.monotonic() - t0)
            await asyncio.sleep(0.1)

    served = asyncio.get_running_loop().create_task(legit_client())
    try:
        for i in range(150):  # 40 at once (the burst), then 19 a second (under 20/s)
            await attacker.send("history", room=room, limit=200, ref=i + 1)
            if i >= 40:
                await asyncio.sleep(1 / 19)
            peak = max(peak, rss_mb(node.pid))
        for _ in range(20):
            await asyncio.sleep(0.1)
            peak = max(peak, rss_mb(node.pid))
        attacker.abort()
        for _ in range(10):
            await asyncio.sleep(0.1)
            peak = max(peak, rss_mb(node.pid))
        page = await legit.ok("history", room=room, limit=200)  # still served, in full
        assert len(page["messages"]) == 200
    finally:
        done.set()
        await served
    print(f"RSS base {base:.1f} MB, peak {peak:.1f} MB; {len(latencies)} pings, "
          f"max {max(latencies) * 1000:.0f} ms")  # fmt: skip
    assert peak - base < 30, (base, peak)
    assert len(latencies) >= 20 and max(latencies) < 5.0
    await legit.close()


async def test_output_over_the_byte_bound_closes_4008(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    """A subscriber that never reads is closed with 4008 once its unsent output passes
    --send-queue-bytes, long before the frame bound (--send-queue) would be reached."""
    node = _start(started, tmp_path / "n", "--send-queue-bytes", "65536", "--send-queue",
                  "1000000", "--rate-limit", "5000", "--rate-burst", "5000")  # fmt: skip
    token = await signup(http, node, new_user())
    fast = await WS.connect(http, node, token)
    room = new_user("r")
    await fast.ok("rooms.create", room=room, visibility="public")
    slow = await RawWS.connect(node.host, node.port, rcvbuf=4096)
    await slow.send("hello", token=token, ref=1)
    await slow.send("subscribe", room=room, ref=2)
    await asyncio.sleep(0.3)
    body = "x" * 4000
    n = 0
    while True:
        # a few MB fill the kernel's socket buffers first; then 64 KiB of backlog closes it
        await asyncio.gather(*(fast.ok("send", room=room, id=f"m{n + i}", body=body)
                               for i in range(50)))  # fmt: skip
        n += 50
        assert n < 20_000, "the slow client was never disconnected"
        await asyncio.sleep(0)
        async with http.get(node.url + "metrics", headers=ADMIN_HEADERS) as r:
            if "chatnode_slow_consumer_disconnects_total 1.0" in await r.text():
                break
    slow.abort()  # its close frame may sit behind its backlog: the metric says it was 4008
    async with http.get(node.url + "metrics", headers=ADMIN_HEADERS) as r:
        assert "chatnode_slow_consumer_disconnects_total 1.0" in await r.text()
    await fast.ok("ping")  # the writer was never slowed down
    await fast.close()


# --------------------------------------------------------------------------- finding 6


async def test_every_frame_counts_against_the_rate_limit(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    """An unauthenticated socket floods frames of 60 KB that do not parse: only the burst
    plus the refill rate is parsed (bad_json), everything else is rate_limited unread; a
    small frame over the limit keeps its ref."""
    node = _start(started, tmp_path / "n")  # 20/s, bursts of 40
    raw = await RawWS.connect(node.host, node.port, rcvbuf=1 << 20)
    junk = "{" + "x" * 60_000
    t0 = time.monotonic()
    for _ in range(200):
        await raw.send_raw(junk)
    await raw.send_raw('{"op":"ping","ref":"small-one"}')
    codes: list[str] = []
    refs: list[object] = []
    for _ in range(201):
        frame = await raw.read_json()
        codes.append(frame["code"])
        refs.append(frame["ref"])
    elapsed = time.monotonic() - t0
    parsed = codes.count("bad_json")
    assert parsed <= 40 + 20 * elapsed + 1, (parsed, elapsed)
    assert codes.count("rate_limited") >= 200 - parsed
    assert codes[-1] == "rate_limited" and refs[-1] == "small-one"
    raw.abort()


# --------------------------------------------------------------------------- findings 7, 16


def _connect(host: str, port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    s.setblocking(False)
    return s


def _answer(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    try:
        return s.recv(200)
    except (TimeoutError, ConnectionError):
        return b""


async def test_connection_limits_hello_deadline_and_quiet_logs(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    node = _start(started, tmp_path / "n", "--max-connections", "40",
                  "--max-connections-per-address", "10", "--hello-timeout", "1s")  # fmt: skip
    base_fds = open_fds(node.pid)
    # per address: 10 idle sockets from 127.0.0.1 are taken, the 11th gets a bare 503
    mine = [_connect(node.host, node.port) for _ in range(10)]
    await asyncio.sleep(0.2)
    extra = _connect(node.host, node.port)
    assert _answer(extra).startswith(b"HTTP/1.1 503")
    extra.close()
    # in all: 40, whatever the addresses
    others = [_connect(node.host, node.port, f"127.0.1.{i // 8 + 1}") for i in range(30)]
    await asyncio.sleep(0.2)
    over = _connect(node.host, node.port, "127.0.2.1")
    assert _answer(over).startswith(b"HTTP/1.1 503")
    over.close()
    assert open_fds(node.pid) <= base_fds + 40 + 2
    # sockets that send nothing are dropped after --hello-timeout
    await asyncio.sleep(1.5)
    assert _answer(mine[0], 2) == b""
    for s in mine + others:
        s.close()
    await asyncio.sleep(0.3)
    assert open_fds(node.pid) <= base_fds + 2
    # a WebSocket that does not say hello in time is closed with 4001
    raw = await RawWS.connect(node.host, node.port)
    t0 = time.monotonic()
    assert await raw.close_code(within=10) == 4001
    assert 0.8 <= time.monotonic() - t0 < 5
    # the node still serves, and a hello in time keeps the socket
    token = await signup(http, node, new_user())
    ws = await WS.connect(http, node, token)
    await asyncio.sleep(1.3)
    await ws.ok("ping")
    # clients that vanish mid-request: no traceback, a bounded number of log lines
    for _ in range(30):
        s = _connect(node.host, node.port)
        s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n{\"user\":")  # fmt: skip
        s.close()
        raw = await RawWS.connect(node.host, node.port)
        await raw.send_raw(b"\x00" * 10, opcode=0x2)
        raw.abort()
    for _ in range(60):  # and refusals, many
        s = _connect(node.host, node.port)
        s.close()
    await asyncio.sleep(0.5)  # the node has seen those go
    flood = [_connect(node.host, node.port) for _ in range(10)]  # held for --hello-timeout
    refused = 0
    for _ in range(50):
        x = _connect(node.host, node.port)
        refused += _answer(x, 0.2).startswith(b"HTTP/1.1 503")
        x.close()
    assert refused >= 40
    for s in flood:
        s.close()
    await asyncio.sleep(0.5)
    log = node.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("refusing connections") <= 3, log[-3000:]
    assert len(log.splitlines()) < 40, log[-3000:]
    await ws.close()


# --------------------------------------------------------------------------- finding 8


async def test_reactions_are_bounded(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    node = _start(started, tmp_path / "n", "--max-reactions-per-message", "3",
                  "--max-reactions-per-user", "2")  # fmt: skip
    users = [new_user() for _ in range(3)]
    socks = [await WS.connect(http, node, await signup(http, node, u)) for u in users]
    room = new_user("r")
    await socks[0].ok("rooms.create", room=room, visibility="public")
    for w in socks[1:]:
        await w.ok("rooms.join", room=room)
    await socks[0].ok("send", room=room, id="m", body="react to me")
    a, b, c = socks
    await a.ok("react", room=room, id="m", emoji="👍", on=True)
    await a.ok("react", room=room, id="m", emoji="🎉", on=True)
    err = await a.fails("limit_reached", "react", room=room, id="m", emoji="🚀", on=True)
    assert "at most 2" in err["message"]
    await a.ok("react", room=room, id="m", emoji="👍", on=True)  # already there: fine
    await b.ok("react", room=room, id="m", emoji="🚀", on=True)  # the third emoji
    err = await c.fails("limit_reached", "react", room=room, id="m", emoji="🦄", on=True)
    assert "at most 3 different" in err["message"]
    await c.ok("react", room=room, id="m", emoji="🎉", on=True)  # an existing one: fine
    await a.ok("react", room=room, id="m", emoji="👍", on=False)  # removing always works
    await a.ok("react", room=room, id="m", emoji="🚀", on=True)
    hist = await a.ok("history", room=room)
    reactions = hist["messages"][0]["reactions"]
    assert len(reactions) <= 3 and sum(u == users[0] for v in reactions.values() for u in v) <= 2
    for w in socks:
        await w.close()


# --------------------------------------------------------------------------- findings 9, 10


async def test_password_hashing_overload_answers_at_once(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    """60 logins at once from 60 addresses, each within its own limits: no one waits long;
    those past the bounded queue get 503 with Retry-After right away."""
    node = _start(started, tmp_path / "n", "--trusted-proxies", "127.0.0.0/8")
    user = new_user()
    await signup(http, node, user)

    async def attempt(i: int) -> tuple[int, float, str | None]:
        t0 = time.monotonic()
        status, _, headers = await _post(
            http, node.url + "v1/sessions", {"user": user, "password": "wrong password"},
            {"X-Forwarded-For": f"198.51.100.{i}"},
        )  # fmt: skip
        return status, time.monotonic() - t0, headers.get("Retry-After")

    results = await asyncio.gather(*(attempt(i) for i in range(60)))
    busy = [r for r in results if r[0] == 503]
    assert busy and all(r[2] == "1" for r in busy), results
    assert {r[0] for r in results} <= {401, 503}, results
    slowest = max(r[1] for r in results)
    assert slowest < 5.0, results  # was 15 s with an unbounded queue
    # once the burst is over, the owner logs in at once
    t0 = time.monotonic()
    status, body, _ = await _post(http, node.url + "v1/sessions",
                                  {"user": user, "password": PASSWORD})  # fmt: skip
    assert status == 200 and time.monotonic() - t0 < 2.0, body


async def test_a_stranger_cannot_lock_the_owner_out(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    node = _start(started, tmp_path / "n", "--trusted-proxies", "127.0.0.0/8")
    user = new_user()
    await signup(http, node, user)
    url = node.url + "v1/sessions"
    wrong = {"user": user, "password": "not the password"}

    async def from_(addr: str, body: dict[str, str]) -> tuple[int, str | None]:
        status, _, headers = await _post(http, url, body, {"X-Forwarded-For": addr})
        return status, headers.get("Retry-After")

    statuses = [await from_("203.0.113.9", wrong) for _ in range(15)]
    assert statuses[0] == (401, None) and statuses[-1][0] == 429
    assert int(statuses[-1][1] or 0) >= 1
    # the owner, elsewhere, logs in: the stranger used up only his own bucket
    assert (await from_("192.0.2.44", {"user": user, "password": PASSWORD}))[0] == 200
    # IPv6: one /64 is one client; the next /64 is another
    for _ in range(12):
        await from_("2001:db8:0:1::1", wrong)
    assert (await from_("2001:db8:0:1::ffff", wrong))[0] == 429
    assert (await from_("2001:db8:0:2::1", {"user": user, "password": PASSWORD}))[0] == 200
    # behind a proxy chain, the rightmost untrusted hop is the client; a client that puts
    # a fake address in the header does not escape its own limit
    assert (await from_("192.0.2.44, 203.0.113.9", wrong))[0] == 429


# --------------------------------------------------------------------------- finding 11


async def test_room_quota_and_a_small_paged_rooms_list(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    node = _start(started, tmp_path / "n", "--max-rooms-per-user", "30")
    spammers = [await WS.connect(http, node, await signup(http, node, new_user()))
                for _ in range(3)]  # fmt: skip
    created: list[str] = []
    for k, w in enumerate(spammers):
        for i in range(30):
            room = f"spam{k}-{i:02d}"
            await w.ok("rooms.create", room=room, visibility="public")
            created.append(room)
    await spammers[0].fails("limit_reached", "rooms.create", room="one-more", visibility="public")
    me = await WS.connect(http, node, await signup(http, node, new_user()))
    await me.ok("rooms.create", room="mine", visibility="private")
    first = await me.ok("rooms.list")
    assert first["rooms"][0]["room"] == "mine"
    assert len(first["rooms"]) == 1 + 50 and first["next"] is not None
    assert len(json.dumps(first)) < 10_000
    seen: list[str] = []
    after = None
    while True:
        page = await me.ok("rooms.list", limit=20, **({"after": after} if after else {}))
        assert page["rooms"][0]["room"] == "mine"
        seen += [r["room"] for r in page["rooms"][1:]]
        after = page["next"]
        if after is None:
            break
    assert seen == sorted(created)  # every public room once, in order
    for w in [*spammers, me]:
        await w.close()


# --------------------------------------------------------------------------- finding 3


async def test_operator_endpoints_need_the_admin_token(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    node = _start(started, tmp_path / "n")
    ws = await WS.connect(http, node, await signup(http, node, new_user()))
    await ws.ok("rooms.create", room="hidden-room", visibility="private")
    for path in ("metrics", "v1/cluster", "v1/registry"):
        async with http.get(node.url + path) as r:
            assert r.status == 401 and "hidden-room" not in await r.text()
        wrong = {"Authorization": "Bearer wrong-token-xx"}
        async with http.get(node.url + path, headers=wrong) as r:
            assert r.status == 401
        async with http.get(node.url + path, headers=ADMIN_HEADERS) as r:
            assert r.status == 200
    async with http.get(node.url + "v1/registry", headers=ADMIN_HEADERS) as r:
        assert "hidden-room" in await r.text()
    async with http.get(node.url + "healthz") as r:
        health = await r.json()
    assert r.status == 200 and set(health) == {"status", "node", "storage"}
    # the CLI passes the credential
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}

    def cli(*args: str, token: str | None) -> subprocess.CompletedProcess[str]:
        extra = {"CHATNODE_ADMIN_TOKEN": token} if token else {}
        return subprocess.run([sys.executable, "-m", "chatnode", *args, "--url", node.url],
                              capture_output=True, text=True, timeout=60, cwd=REPO,
                              env={**env, **extra}, check=False)  # fmt: skip

    assert cli("rooms", token=None).returncode == 1
    out = cli("rooms", token=ADMIN_TOKEN)
    assert out.returncode == 0 and "hidden-room" in out.stdout
    assert cli("members", token=ADMIN_TOKEN).returncode == 0
    await ws.close()
    # a node without --admin-token serves none of them
    bare = _start(started, tmp_path / "bare", env={"CHATNODE_ADMIN_TOKEN": ""})
    for path in ("metrics", "v1/cluster", "v1/registry"):
        async with http.get(bare.url + path, headers=ADMIN_HEADERS) as r:
            assert r.status == 403


# --------------------------------------------------------------------------- findings 12, 15


async def test_private_rooms_and_dms_are_not_found_and_read_rules(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    node = _start(started, tmp_path / "n")
    a, b, c = new_user(), new_user(), new_user()
    wa = await WS.connect(http, node, await signup(http, node, a))
    await signup(http, node, b)
    wc = await WS.connect(http, node, await signup(http, node, c))
    await wa.ok("rooms.create", room="secret", visibility="private")
    sent = await wa.ok("send", room="secret", id="s1", body="members only")
    dm = (await wa.ok("dm.open", user=b))["room"]["room"]
    probes: list[tuple[str, dict[str, Any]]] = [
        ("history", {}), ("subscribe", {}), ("presence", {}), ("typing", {}),
        ("send", {"id": "x", "body": "hi"}), ("rooms.join", {}), ("rooms.leave", {}),
        ("rooms.invite", {"user": a}), ("read", {"cursor": sent["cursor"]}),
        ("react", {"id": "s1", "emoji": "👍", "on": True}),
    ]  # fmt: skip
    for op, fields in probes:
        ghost = await wc.fails("not_found", op, room="no-such-room", **fields)
        for room in ("secret", dm):
            real = await wc.fails("not_found", op, room=room, **fields)
            assert real["message"] == ghost["message"].replace("no-such-room", room), op
    # read: members only, and only the cursor of a message of the room
    await wa.ok("rooms.create", room="open", visibility="public")
    msg = await wa.ok("send", room="open", id="o1", body="hello")
    await wc.ok("subscribe", room="open")
    await wc.fails("forbidden", "read", room="open", cursor=msg["cursor"])
    fake = msg["cursor"][:-2] + ("n9" if not msg["cursor"].endswith("n9") else "n8")
    await wa.fails("not_found", "read", room="open", cursor=fake)
    await wa.fails("not_found", "read", room="open", cursor=sent["cursor"])  # another room's
    await wa.ok("read", room="open", cursor=msg["cursor"])
    event = await wc.event(lambda f: f["op"] == "read")
    assert event["cursor"] == msg["cursor"] and event["user"] == a
    await wa.close()
    await wc.close()


# --------------------------------------------------------------------------- finding 13


async def test_origin_content_type_and_headers(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    node = _start(started, tmp_path / "n", "--allowed-origins", "https://chat.example.com")
    host = f"{node.host}:{node.port}"
    for origin in ("http://evil.example", "null", f"http://{node.host}:1"):
        with pytest.raises(ConnectionError, match="403"):
            await RawWS.connect(node.host, node.port, origin=origin)
    for origin in (f"http://{host}", "https://chat.example.com"):
        ok = await RawWS.connect(node.host, node.port, origin=origin)
        ok.abort()
    ok = await RawWS.connect(node.host, node.port)  # programs send no Origin
    ok.abort()
    # a cross-site form post (no JSON content type) creates nothing
    user = new_user()
    form = {"user": user, "password": PASSWORD}
    async with http.post(node.url + "v1/accounts", data=form) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_frame"
    async with http.post(node.url + "v1/accounts", data=json.dumps(form),
                         headers={"Content-Type": "text/plain"}) as r:  # fmt: skip
        assert r.status == 400
    async with http.post(node.url + "v1/sessions", json=form) as r:
        assert r.status == 401  # the account was never made
    for path in ("", "app.js", "healthz", "nope.js", "v1/sessions"):
        async with http.get(node.url + path) as r:
            csp = r.headers.get("Content-Security-Policy", "")
            assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, path
            assert r.headers.get("X-Content-Type-Options") == "nosniff", path
            assert r.headers.get("Referrer-Policy") == "no-referrer", path


# --------------------------------------------------------------------------- finding 14


async def test_failed_storage_refuses_logins_and_says_so(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    node = _start(started, tmp_path / "n")
    user = new_user()
    token = await signup(http, node, user)
    ws = await WS.connect(http, node, token)
    await ws.ok("rooms.create", room="r", visibility="public")
    # the disk "fills": every write past 1 byte of any file fails with EFBIG
    resource.prlimit(node.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
    await ws.fails("unavailable", "send", room="r", id="m1", body="lost?")
    async with http.get(node.url + "healthz") as r:
        health = await r.json()
    assert r.status == 503 and health["status"] == "failed" and health["storage"] == "failed"
    status, body, _ = await _post(http, node.url + "v1/sessions",
                                  {"user": user, "password": PASSWORD})  # fmt: skip
    assert status == 503 and body["error"]["code"] == "unavailable"
    status, body, _ = await _post(http, node.url + "v1/accounts",
                                  {"user": new_user(), "password": PASSWORD})  # fmt: skip
    assert status == 503
    await ws.close()
    resource.prlimit(node.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # fmt: skip
    node.kill()


# --------------------------------------------------------------------------- finding 17


async def test_titles_with_bidi_or_invisible_characters_are_refused(
    http: aiohttp.ClientSession, node: Daemon
) -> None:
    ws = await WS.connect(http, node, await signup(http, node, new_user()))
    for title in ("invoice\u202egnp.exe", "a\u200bb", "x\u2066y\u2069", "soft\u00adhyphen",
                  "line\u2028sep", "tab\there"):  # fmt: skip
        await ws.fails("invalid", "rooms.create", room=new_user("t"), visibility="public",
                       title=title)  # fmt: skip
    await ws.fails("invalid", "react", room="x", id="m", emoji="\u202e👍", on=True)
    ok = await ws.ok("rooms.create", room=new_user("t"), visibility="public", title="Café ☕ 日本")
    assert ok["room"]["title"] == "Café ☕ 日本"
    await ws.close()


async def test_garbage_after_a_request_is_answered_short_and_logged_once(
    http: aiohttp.ClientSession, tmp_path: Path, started: list[Daemon]
) -> None:
    """Bytes that are not HTTP after a valid request (found by the peer-link probes: aiohttp
    logged each as an error with a traceback and the bytes in full, and echoed them in its 400
    body; 8 s of it wrote 340 MB of log). Now a short 400, one quiet line per 10 s, and the
    node's memory and log stay flat while another client is served."""
    node = _start(started, tmp_path / "n")
    before = node.log_path.stat().st_size
    rss0 = rss_mb(node.pid)
    garbage = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + b"Z" * 200_000
    answers = []
    for _ in range(30):
        s = socket.create_connection((node.host, node.port), timeout=10)
        try:
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            answers.append(data)
        finally:
            s.close()
        async with http.get(node.url + "healthz") as r:
            assert r.status == 200
    assert all(b"400 Bad Request" in a and len(a) < 2_000 for a in answers), answers[0][:300]
    grown = node.log_path.stat().st_size - before
    assert grown < 5_000, node.log()[-2_000:]
    assert "unparseable HTTP request" in node.log()
    assert rss_mb(node.pid) - rss0 < 30
