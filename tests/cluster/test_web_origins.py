"""The web client may move between the nodes of a cluster (docs/WEB_CLIENT.md, "Failover"):
each node's page lists the cluster's public URLs in its ``connect-src`` (header and
``<meta>``), and each node lets pages served by the other members open ``/v1/ws``, also
after the member that served the page died; any other origin is still refused.

Real processes: two nodes on 127.0.0.x with one cluster key.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from chatnode.web.app import connect_src, url_origin
from tests.support.harness import Harness
from tests.support.net import loopback_host

pytestmark = pytest.mark.timeout(120)


def directive(policy: str, name: str) -> list[str]:
    """The sources of directive ``name`` in a CSP ``policy``."""
    for part in policy.split(";"):
        words = part.split()
        if words and words[0] == name:
            return words[1:]
    raise AssertionError(f"no {name} in {policy!r}")


async def upgrade_status(http: aiohttp.ClientSession, url: str, origin: str) -> int:
    """The HTTP status of a WebSocket upgrade to ``url`` sent with ``Origin: origin``."""
    try:
        async with http.ws_connect(url + "v1/ws", headers={"Origin": origin}):
            return 101
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status


def origin_of(url: str) -> str:
    origin = url_origin(url)
    assert origin is not None, url
    return origin


async def test_pages_of_every_member_may_move_between_nodes(tmp_path: Path) -> None:
    h = await Harness.open(tmp_path, 2)
    try:
        a, b = h.nodes
        oa, ob = origin_of(a.url), origin_of(b.url)
        async with aiohttp.ClientSession() as http:
            for path in ("", "index.html"):
                async with http.get(a.url + path) as r:
                    assert r.status == 200
                    header = r.headers["Content-Security-Policy"]
                    html = await r.text()
                ws_a, ws_b = oa.replace("http:", "ws:"), ob.replace("http:", "ws:")
                expected = {"'self'", oa, ws_a, ob, ws_b}
                assert set(directive(header, "connect-src")) == expected, header
                assert "frame-ancestors 'none'" in header and "script-src 'self'" in header
                meta = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]*)"', html)
                assert meta is not None, html[:600]
                assert set(directive(meta.group(1), "connect-src")) == expected, meta.group(1)
            # other responses keep the plain policy
            async with http.get(a.url + "app.js") as r:
                assert directive(r.headers["Content-Security-Policy"], "connect-src") == ["'self'"]

            stranger = f"http://{loopback_host()}:{b.port}"
            assert await upgrade_status(http, b.url, oa) == 101  # a page served by a member
            assert await upgrade_status(http, b.url, ob) == 101  # its own page
            assert await upgrade_status(http, b.url, stranger) == 403
            assert await upgrade_status(http, b.url, oa.replace("http:", "https:")) == 403
            assert await upgrade_status(http, b.url, "null") == 403

            # a's page stays welcome on b after a died and left b's list of alive nodes
            h.kill(0)

            async def listed() -> list[str]:
                async with http.get(b.url + "v1/nodes") as r:
                    nodes: list[str] = (await r.json())["nodes"]
                    return nodes

            gone = False
            for _ in range(60):
                if a.url.rstrip("/") not in await listed():
                    gone = True
                    break
                await asyncio.sleep(0.5)
            assert gone, await listed()
            assert await upgrade_status(http, b.url, oa) == 101
            assert await upgrade_status(http, b.url, stranger) == 403
    finally:
        h.stop()


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://127.0.0.2:8080", "http://127.0.0.2:8080"),
        ("HTTPS://Chat.Example.com/", "https://chat.example.com"),
        ("https://chat.example.com:443/chat", "https://chat.example.com"),
        ("http://chat.example.com:80", "http://chat.example.com"),
        ("https://chat.example.com:8443", "https://chat.example.com:8443"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("ftp://chat.example.com", None),
        ("http://user:pw@chat.example.com", None),
        ("http://chat.example.com:99999", None),
        ("http://a b.example.com", None),
        ("http://x;script-src*", None),
        ("", None),
    ],
)
def test_url_origin(url: str, origin: str | None) -> None:
    assert url_origin(url) == origin


def test_connect_src_names_http_and_websocket_forms() -> None:
    assert connect_src([]) == "connect-src 'self'"
    assert connect_src(["http://10.0.0.1:8080", "https://chat.example.com"]) == (
        "connect-src 'self' http://10.0.0.1:8080 ws://10.0.0.1:8080 "
        "https://chat.example.com wss://chat.example.com"
    )
