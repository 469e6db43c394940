"""The ``chatnode`` command.

    chatnode run [--config FILE] [--host ADDR] [--port PORT] [--data-dir DIR] ...
    chatnode healthz [--config FILE] [--host ADDR] [--port PORT] [--timeout S]
    chatnode config [same flags as run]      print the resolved settings as JSON
    chatnode keygen                          print a new random cluster key
    chatnode members [--url URL] [--admin-token TOKEN]   the cluster members a node knows
    chatnode rooms [--url URL] [--admin-token TOKEN]     the rooms with their home node
    chatnode send ROOM TEXT [--url URL]...   send a message (through any of the nodes)
    chatnode tail ROOM [--url URL]...        print a room's new messages, across node failures
    chatnode search QUERY [--room ROOM] [--url URL]...   full-text search (docs/VIEWS.md)
    chatnode indexer [migrate] --views URL [--kafka-brokers HOSTS]   the views indexer

``send`` and ``tail`` use :mod:`chatnode.client.session`; credentials come from ``--user`` and
``--password`` or ``CHATNODE_USER`` and ``CHATNODE_PASSWORD``, nodes from ``--url``
(repeatable) or ``CHATNODE_URL`` (comma-separated).

Exit status: 0 success, 1 runtime failure (database locked, port taken, node unhealthy),
2 bad usage or configuration (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from chatnode.config import SETTINGS, Config, ConfigError, describe, load_config
from chatnode.errors import ChatnodeError

__all__ = ["main"]

log = logging.getLogger(__name__)

#: Garbage-collector thresholds of a running node. A full (generation-2) collection walks
#: every tracked object and stops the event loop meanwhile: 30-150 ms with a loaded node and
#: up to 0.5 s with 10,000 connections open (docs/BENCHMARKS.md), far above the 20 ms latency
#: target. Almost everything a message allocates dies by reference counting, so cycles are
#: rare: a generation-0 threshold of 20,000 (default 700) makes young collections ~30x less
#: frequent at ~the same cost per surviving object, and the older generations follow.
GC_THRESHOLDS = (20_000, 20, 20)


def _gc_tune() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


def _gc_freeze() -> None:
    """Once the node has loaded its state and listens: collect once, then move every
    surviving object (modules, configuration, room logs, indexes) to the permanent
    generation, which no later collection walks. Objects created afterwards are collected as
    usual; only what existed at start-up is never scanned again (it is still freed by
    reference counting)."""
    gc.collect()
    gc.freeze()
    log.debug("gc: froze %d start-up objects", gc.get_freeze_count())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"chatnode: error: {message}\n")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", default=None, help="TOML file of settings (CHATNODE_CONFIG)"
    )
    for s in SETTINGS:
        kwargs: dict[str, Any] = {
            "dest": s.name,
            "metavar": s.metavar,
            "default": None,
            "help": f"{s.help} [{s.env}]",
        }
        if s.repeat:
            kwargs["action"] = "append"
        if s.switch:
            del kwargs["metavar"]
            kwargs["action"] = "store_const"
            kwargs["const"] = "true"
        parser.add_argument(s.flag, **kwargs)


def _add_query_args(parser: argparse.ArgumentParser) -> None:
    """The options of the subcommands that query a running node's HTTP API."""
    parser.add_argument(
        "--url", default="http://127.0.0.1:8080", help="base URL of the node (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("CHATNODE_ADMIN_TOKEN"),
        metavar="TOKEN",
        help="the node's --admin-token (default: CHATNODE_ADMIN_TOKEN)",
    )


def _operator_request(args: argparse.Namespace, url: str) -> urllib.request.Request:
    """A GET of an operator endpoint, with the operator's token when one is given."""
    token = args.admin_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return urllib.request.Request(url, headers=headers)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chatnode", description="A high-availability chat server node.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="run a node", description="Run a chatnode node.")
    _add_settings(run)
    health = sub.add_parser("healthz", help="ask a running node for its health")
    health.add_argument("--config", metavar="FILE", default=None)
    health.add_argument("--host", default=None, dest="host", metavar="ADDR")
    health.add_argument("--port", default=None, dest="port", metavar="PORT")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    cfg = sub.add_parser("config", help="print the resolved settings as JSON")
    _add_settings(cfg)
    sub.add_parser(
        "keygen",
        help="print a new random cluster key",
        description="Print a new random cluster key (base64 of 32 bytes) for --cluster-key.",
    )
    members = sub.add_parser(
        "members",
        help="print the cluster members a running node knows",
        description="Ask a running node (GET /v1/cluster) which members it knows.",
    )
    _add_query_args(members)
    rooms = sub.add_parser(
        "rooms",
        help="print the room registry of a running node (home and epoch of each room)",
        description="Ask a running node (GET /v1/registry) which node is home of each room.",
    )
    _add_query_args(rooms)
    send = sub.add_parser(
        "send",
        help="send a message to a room",
        description="Send one message and wait for its acknowledgement (it is durable then); "
        "prints '<id> <cursor>'. The message is resent with the same id through another node "
        "if its node fails, so it is stored once.",
    )
    send.add_argument("room", metavar="ROOM")
    send.add_argument("text", metavar="TEXT")
    send.add_argument("--id", default=None, help="message id (default: a random one); "
                      "the same id again stores nothing new")  # fmt: skip
    send.add_argument("--no-join", action="store_true", help="do not join the room first")
    _add_client_args(send, "give up after this many seconds without an acknowledgement")
    tail = sub.add_parser(
        "tail",
        help="print the new messages of a room as they come",
        description="Follow a room and print its messages as they come, one a line, until "
        "interrupted; when the node fails, reconnects to another and resumes without a gap "
        "or a repeat.",
    )
    tail.add_argument("room", metavar="ROOM")
    tail.add_argument("--json", action="store_true", help="one JSON object a line (messages "
                      "and updates)")  # fmt: skip
    tail.add_argument("--count", type=int, default=None, metavar="N",
                      help="exit after N messages")  # fmt: skip
    tail.add_argument(
        "--after", default=None, metavar="CURSOR",
        help="start after this cursor (default: after the newest message)",
    )  # fmt: skip
    _add_client_args(tail, "give up when the room cannot be followed within this many seconds")
    search = sub.add_parser(
        "search",
        help="search the messages of the rooms you may read",
        description="Full-text search (the node needs --index or --views, docs/VIEWS.md); "
        "prints one result a line: room, cursor, author, the snippet with [matches].",
    )
    search.add_argument("query", metavar="QUERY")
    search.add_argument("--room", default=None, help="only this room")
    search.add_argument("--limit", type=int, default=None, metavar="N", help="results (1-50)")
    search.add_argument("--after", default=None, metavar="CURSOR",
                        help="the next page (the cursor printed after a full page)")  # fmt: skip
    search.add_argument("--json", action="store_true", help="print the raw reply")
    _add_client_args(search, "give up after this many seconds")
    indexer = sub.add_parser(
        "indexer",
        help="run the views indexer (or 'migrate' its database)",
        description="Consume the history topic into the views database and keep it current "
        "(docs/VIEWS.md). 'chatnode indexer migrate' applies the schema migrations and exits.",
    )
    indexer.add_argument("action", nargs="?", choices=("run", "migrate"), default="run")
    indexer.add_argument("--config", metavar="FILE", default=None)
    for name in ("views", "kafka_brokers", "kafka_topic", "log_level"):
        setting = next(s for s in SETTINGS if s.name == name)
        indexer.add_argument(setting.flag, dest=name, metavar=setting.metavar, default=None,
                             help=f"{setting.help} [{setting.env}]")  # fmt: skip
    return parser


def _add_client_args(parser: argparse.ArgumentParser, timeout_help: str) -> None:
    parser.add_argument(
        "--url", action="append", default=None, metavar="URL",
        help="a node of the cluster (repeatable: the first is tried first, the others when "
        "it fails) [CHATNODE_URL, comma-separated; default http://127.0.0.1:8080]",
    )  # fmt: skip
    parser.add_argument("--user", default=None, help="user name [CHATNODE_USER]")
    parser.add_argument("--password", default=None, help="password [CHATNODE_PASSWORD]")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help=f"{timeout_help} (default: %(default)s)")  # fmt: skip


def _resolve(args: argparse.Namespace, names: Sequence[str]) -> Config:
    flags = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return load_config(flags, os.environ, args.config)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _run(cfg: Config) -> int:
    from chatnode.node import Node  # noqa: PLC0415  (aiohttp, pycrdt, rocksdict: only to run)

    _setup_logging(cfg.log_level)
    _gc_tune()

    def listening(node: Node) -> None:
        _gc_freeze()
        sys.stdout.write(f"chatnode {node.node_id} listening on {node.url}\n")
        sys.stdout.flush()

    async def main() -> None:
        node = Node(cfg, on_listening=listening)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.stop)
        await node.run()

    try:
        asyncio.run(main())
    except (ChatnodeError, OSError, ExceptionGroup) as exc:
        errors = _leaves(exc)
        if not all(isinstance(e, ChatnodeError | OSError) for e in errors):
            raise
        for e in errors:
            sys.stderr.write(f"chatnode: error: {e}\n")
        return 1
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _healthz(args: argparse.Namespace) -> int:
    cfg = _resolve(args, ["host", "port"])
    host = cfg.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{cfg.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            body = resp.read().decode("utf-8", "replace")
            status = resp.status
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"chatnode: error: {url}: {getattr(exc, 'reason', exc)}\n")
        return 1
    sys.stdout.write(body.rstrip() + "\n")
    return 0 if status == 200 else 1


def _keygen() -> int:
    from chatnode.cluster.keyring import generate_key  # noqa: PLC0415  (cryptography: only here)

    sys.stdout.write(generate_key() + "\n")
    return 0


def format_members(view: dict[str, Any]) -> str:
    """The ``GET /v1/cluster`` answer as a text table, this node marked with ``*``."""
    me = view.get("self")
    rows = [("", "ID", "ADDRESS", "STATE", "INCARNATION")]
    members = view.get("members")
    for m in members if isinstance(members, list) else []:
        if isinstance(m, dict):
            mark = "*" if m.get("id") == me else ""
            rows.append(
                (mark, str(m.get("id")), str(m.get("address")), str(m.get("state")),
                 str(m.get("incarnation")))
            )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    head = f"node {me}" + (" (standalone: no cluster key)" if view.get("standalone") else "")
    return "\n".join([head, *lines]) + "\n"


def _members(args: argparse.Namespace) -> int:
    url = str(args.url).rstrip("/") + "/v1/cluster"
    try:
        with urllib.request.urlopen(_operator_request(args, url), timeout=args.timeout) as resp:
            view = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        sys.stderr.write(f"chatnode: error: {url}: {getattr(exc, 'reason', exc)}\n")
        return 1
    if not isinstance(view, dict):
        sys.stderr.write(f"chatnode: error: {url}: unexpected answer\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps(view, indent=2) + "\n")
    else:
        sys.stdout.write(format_members(view))
    return 0


def _rooms(args: argparse.Namespace) -> int:
    url = str(args.url).rstrip("/") + "/v1/registry"
    try:
        with urllib.request.urlopen(_operator_request(args, url), timeout=args.timeout) as resp:
            view = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        sys.stderr.write(f"chatnode: error: {url}: {getattr(exc, 'reason', exc)}\n")
        return 1
    if not isinstance(view, dict) or not isinstance(view.get("rooms"), list):
        sys.stderr.write(f"chatnode: error: {url}: unexpected answer\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps(view, indent=2) + "\n")
        return 0
    lines = [f"{'ROOM':<32} {'HOME':<16} EPOCH"]
    for r in view["rooms"]:
        if isinstance(r, dict):
            lines.append(f"{r.get('room')!s:<32} {r.get('home') or '-'!s:<16} {r.get('epoch')}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


class _Usage(Exception):
    """A client command lacks something (exit status 2)."""


def _client_settings(args: argparse.Namespace) -> tuple[list[str], str, str]:
    """The node URLs, user and password of ``send``/``tail`` (flags, then environment)."""
    urls = list(args.url or [])
    if not urls:
        env = os.environ.get("CHATNODE_URL", "")
        urls = [u.strip() for u in env.split(",") if u.strip()] or ["http://127.0.0.1:8080"]
    user = args.user or os.environ.get("CHATNODE_USER", "")
    password = args.password or os.environ.get("CHATNODE_PASSWORD", "")
    if not user or not password:
        raise _Usage("give --user and --password (or CHATNODE_USER and CHATNODE_PASSWORD)")
    from chatnode.client.state import normalize_url  # noqa: PLC0415

    try:
        urls = [normalize_url(u) for u in urls]
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    return urls, user, password


def _send(args: argparse.Namespace) -> int:
    from chatnode.client.session import ChatError, Client  # noqa: PLC0415  (aiohttp: only here)

    urls, user, password = _client_settings(args)

    async def go() -> int:
        async with Client(urls, user=user, password=password) as chat:
            try:
                async with asyncio.timeout(args.timeout):
                    if not args.no_join:
                        await chat.join(args.room)
                    sent = await chat.send(args.room, args.text, id=args.id)
            except TimeoutError:
                sys.stderr.write(f"chatnode: error: no acknowledgement within {args.timeout:g}s "
                                 f"(nodes tried: {', '.join(chat.nodes)})\n")  # fmt: skip
                return 1
            except ChatError as exc:
                sys.stderr.write(f"chatnode: error: {exc}\n")
                return 1
        sys.stdout.write(f"{sent.id} {sent.cursor}\n")
        return 0

    return asyncio.run(go())


def _tail(args: argparse.Namespace) -> int:
    from chatnode.client import session as c  # noqa: PLC0415  (aiohttp: only here)

    urls, user, password = _client_settings(args)
    if args.count is not None and args.count < 1:
        raise _Usage("--count must be at least 1")

    def show(event: c.Message | c.Update) -> str:
        if args.json:
            op = "message" if isinstance(event, c.Message) else "update"
            fields = dataclasses.asdict(event)
            fields.pop("resume", None)
            return json.dumps({"op": op, **fields}, ensure_ascii=False)
        when = time.strftime("%H:%M:%S", time.localtime(event.ts / 1000))
        what = ""
        if isinstance(event, c.Update):
            what = " (deleted)" if event.deleted else " (edited)" if event.edited else " (changed)"
        elif event.late:
            what = " (late)"
        return f"{when} {event.author}{what}: {event.body}"

    async def follow(chat: c.Client) -> int:
        shown = 0
        async with asyncio.timeout(args.timeout):
            await chat.subscribe(args.room, after=args.after)
        sys.stderr.write(f"chatnode: following {args.room} through {chat.url}\n")
        sys.stderr.flush()
        async for event in chat.events():
            if isinstance(event, c.Connected):
                sys.stderr.write(f"chatnode: connected to {event.url} (node {event.node})\n")
            elif isinstance(event, c.Disconnected):
                sys.stderr.write(f"chatnode: lost {event.url}: {event.reason}\n")
            elif isinstance(event, c.SubscriptionLost):
                sys.stderr.write(f"chatnode: error: {event.room}: {event.code} {event.message}\n")
                return 1
            elif isinstance(event, c.Message | c.Update):
                sys.stdout.write(show(event) + "\n")
                sys.stdout.flush()
                shown += isinstance(event, c.Message)
                if args.count is not None and shown >= args.count:
                    return 0
            sys.stderr.flush()
        return 0

    async def go() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with c.Client(urls, user=user, password=password) as chat:
            following = asyncio.create_task(follow(chat), name="tail")
            stopping = asyncio.create_task(stop.wait(), name="tail-stop")
            try:
                await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (following, stopping):
                    t.cancel()
                await asyncio.wait({following, stopping})
            if not following.cancelled():
                try:
                    return following.result()
                except TimeoutError:
                    sys.stderr.write(f"chatnode: error: could not follow {args.room} within "
                                     f"{args.timeout:g}s\n")  # fmt: skip
                    return 1
                except c.ChatError as exc:
                    sys.stderr.write(f"chatnode: error: {exc}\n")
                    return 1
        return 0

    return asyncio.run(go())


def _search(args: argparse.Namespace) -> int:
    from chatnode.client.session import ChatError, Client  # noqa: PLC0415  (aiohttp: only here)

    urls, user, password = _client_settings(args)
    fields: dict[str, Any] = {"query": args.query}
    for key in ("room", "limit", "after"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)

    async def go() -> int:
        async with Client(urls, user=user, password=password) as chat:
            try:
                async with asyncio.timeout(args.timeout):
                    reply = await chat.call("search", **fields)
            except TimeoutError:
                sys.stderr.write(f"chatnode: error: no answer within {args.timeout:g}s\n")
                return 1
            except ChatError as exc:
                sys.stderr.write(f"chatnode: error: {exc}\n")
                return 1
        if args.json:
            reply.pop("ref", None)
            sys.stdout.write(json.dumps(reply, ensure_ascii=False) + "\n")
            return 0
        for r in reply.get("results") or []:
            text = str(r.get("snippet", ""))
            for start, end in reversed(r.get("highlights") or []):
                text = f"{text[:start]}[{text[start:end]}]{text[end:]}"
            sys.stdout.write(f"{r.get('room')} {r.get('cursor')} {r.get('author')}: {text}\n")
        if reply.get("next"):
            sys.stderr.write(f"chatnode: more: --after {reply['next']}\n")
        return 0

    return asyncio.run(go())


def _indexer(args: argparse.Namespace) -> int:
    cfg = _resolve(args, ["views", "kafka_brokers", "kafka_topic", "log_level"])
    if cfg.views is None:
        raise _Usage("give --views sqlite:///PATH (or CHATNODE_VIEWS)")
    from chatnode.history.indexer import open_store  # noqa: PLC0415
    from chatnode.history.views import ViewsError, parse_views_url  # noqa: PLC0415

    target = parse_views_url(cfg.views)
    _setup_logging(cfg.log_level)
    if args.action == "migrate":
        try:
            db = open_store(target)
        except ViewsError as exc:
            sys.stderr.write(f"chatnode: error: {exc}\n")
            return 1
        version = db.guard(lambda d: d.version())
        db.close()
        done = ", ".join(map(str, db.applied)) or "none"
        sys.stdout.write(f"{target}: schema version {version} (applied: {done})\n")
        return 0
    if not cfg.kafka_brokers:
        raise _Usage("give --kafka-brokers (a node without a broker indexes itself: "
                     "chatnode run --index)")  # fmt: skip
    from chatnode.history.indexer import Indexer, KafkaSource, Views  # noqa: PLC0415

    async def go() -> int:
        views = Views(target)
        try:
            applied = await views.open_writer()
        except ViewsError as exc:
            sys.stderr.write(f"chatnode: error: {exc}\n")
            await views.close()
            return 1
        if applied:
            log.info("views %s: applied migrations %s", target, applied)
        assert cfg.kafka_brokers is not None
        indexer = Indexer(views, KafkaSource(cfg.kafka_brokers, cfg.kafka_topic))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, indexer.stop)
        try:
            await indexer.run()
        finally:
            await views.close()
        log.info("indexer stopped: %s", indexer.stats)
        return 0

    return asyncio.run(go())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chatnode`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    names = [s.name for s in SETTINGS]
    try:
        if args.command == "run":
            return _run(_resolve(args, names))
        if args.command == "config":
            sys.stdout.write(json.dumps(describe(_resolve(args, names)), indent=2) + "\n")
            return 0
        if args.command == "healthz":
            return _healthz(args)
        if args.command == "keygen":
            return _keygen()
        if args.command == "members":
            return _members(args)
        if args.command == "rooms":
            return _rooms(args)
        if args.command == "send":
            return _send(args)
        if args.command == "tail":
            return _tail(args)
        if args.command == "search":
            return _search(args)
        if args.command == "indexer":
            return _indexer(args)
    except _Usage as exc:
        sys.stderr.write(f"chatnode: error: {exc}\n")
        return 2
    except ConfigError as exc:
        sys.stderr.write(f"chatnode: error: {exc}\n")
        return 2
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
