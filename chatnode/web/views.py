"""The views as the clients see them: the ``search`` operation and ``GET /v1/stats``
(docs/VIEWS.md, docs/PROTOCOL.md).

Who may read what is decided by the service at query time (its membership, not the
indexer's): ``search`` runs over the rooms :meth:`Service.readable_rooms` gives for the user
now; ``/v1/stats`` answers a room's statistics to whoever may read the room, and the
cluster-wide statistics to the operator only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web

from chatnode.chat import protocol as p
from chatnode.chat.service import Service, ServiceHooks
from chatnode.errors import ClientError, ErrorCode
from chatnode.history.indexer import Views
from chatnode.history.views import CursorError, QueryError, ViewsError, days_back, decode_cursor

__all__ = ["ViewsAPI"]

log = logging.getLogger(__name__)

DEFAULT_DAYS = 30
MAX_DAYS = 366
DEFAULT_TOP = 10
MAX_TOP = 100
#: Searches and statistics queries running or waiting at once on a node; more are refused
#: at once (``rate_limited``) rather than queued behind the others.
MAX_QUEUED = 32


def _now_ms() -> int:
    return int(time.time() * 1000)


class ViewsAPI:
    """Answers ``search`` (through ``Service.search``) and serves ``GET /v1/stats``."""

    def __init__(
        self, views: Views, service: Service, is_operator: Callable[[web.Request], bool],
        now_ms: Callable[[], int] = _now_ms, max_queued: int = MAX_QUEUED, *,
        hooks: ServiceHooks,
    ) -> None:  # fmt: skip
        """``hooks``: :meth:`install` binds :meth:`search` there as the service's search."""
        self.views = views
        self.service = service
        self.hooks = hooks
        self.is_operator = is_operator
        self.now_ms = now_ms
        self.max_queued = max_queued
        self.queued = 0  # searches and stats running or waiting for a reader thread

    def install(self, app: web.Application) -> None:
        """Route ``/v1/stats`` and answer the service's ``search`` requests."""
        app.router.add_get("/v1/stats", self._stats)
        self.hooks.search.bind(self.search)

    def _admit(self, ref: p.Ref = None) -> None:
        if self.queued >= self.max_queued:
            raise ClientError(
                ErrorCode.RATE_LIMITED, "too many searches in progress; retry shortly", ref
            )

    async def search(self, req: p.Search, rooms: set[str]) -> dict[str, object]:
        """One page of results for ``req`` among ``rooms`` (those the user may read)."""
        self._admit(req.ref)
        self.queued += 1
        try:
            return await self._search(req, rooms)
        finally:
            self.queued -= 1

    async def _search(self, req: p.Search, rooms: set[str]) -> dict[str, object]:
        after: tuple[float, int] | None = None
        if req.after is not None:
            try:
                after = decode_cursor(req.after)
            except CursorError:
                raise ClientError(
                    ErrorCode.INVALID, "search: field 'after' is not a search cursor", req.ref
                ) from None
        try:
            results, nxt = await self.views.read(
                lambda db: db.search(req.query, rooms, after, req.limit)
            )
        except QueryError as exc:
            raise ClientError(ErrorCode.INVALID, f"search: {exc}", req.ref) from None
        except ViewsError as exc:
            log.warning("search failed: %s", exc)  # the details for the operator only
            raise ClientError(ErrorCode.UNAVAILABLE, "search is unavailable now; retry later",
                              req.ref) from None  # fmt: skip
        return p.ok(req.ref, results=results, next=nxt)

    # ------------------------------------------------------------------ GET /v1/stats

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._stats_answer(request)
        except ClientError as exc:
            return web.json_response(p.http_error(exc.code, exc.message), status=exc.http_status)

    async def _stats_answer(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        room = q.get("room")
        if room is not None and not p.valid_room(room):
            raise ClientError(ErrorCode.INVALID, "stats: 'room' must be a room id")
        days = _int_param(q.get("days"), "days", DEFAULT_DAYS, MAX_DAYS)
        top = _int_param(q.get("top"), "top", DEFAULT_TOP, MAX_TOP)
        if not self.is_operator(request):
            user = self._user(request)
            if room is None:
                raise ClientError(
                    ErrorCode.FORBIDDEN, "stats: give ?room=ROOM (every room: operator only)"
                )
            self._check_readable(user, room)
        since = days_back(self.now_ms(), days)
        now = self.now_ms()
        self._admit()
        self.queued += 1
        try:
            if room is None:
                body = await self.views.read(lambda db: db.cluster_stats(since, top))
            else:
                body = await self.views.read(lambda db: db.room_stats(room, since, top))
            body["lag"] = await self.views.read(lambda db: db.lag(now))
        except ViewsError as exc:
            log.warning("statistics failed: %s", exc)
            raise ClientError(
                ErrorCode.UNAVAILABLE, "statistics are unavailable now; retry later"
            ) from None
        finally:
            self.queued -= 1
        body["since"] = since
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    def _user(self, request: web.Request) -> str:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ClientError(ErrorCode.UNAUTHENTICATED, "send 'Authorization: Bearer <token>'")
        if len(token.strip()) > p.MAX_TOKEN:
            raise ClientError(ErrorCode.BAD_TOKEN, "malformed, forged or revoked token")
        return self.service.accounts.authenticate(token.strip()).user

    def _check_readable(self, user: str, room: str) -> None:
        """As ``history``: a room one may not see is ``not_found``; a private room one is
        invited to but not in is ``forbidden``."""
        if room in self.service.readable_rooms(user):
            return
        info = self.service.room_info.get(room)
        if info is not None and room in self.service.invites.get(user, ()):
            raise ClientError(ErrorCode.FORBIDDEN, f"not a member of {room}: join it first")
        raise ClientError(ErrorCode.NOT_FOUND, f"no room {room}")


def _int_param(raw: str | None, name: str, default: int, hi: int) -> int:
    if raw is None:
        return default
    if not (raw.isdigit() and len(raw) <= 6 and 1 <= int(raw) <= hi):
        raise ClientError(ErrorCode.INVALID, f"stats: '{name}' must be an integer in 1-{hi}")
    return int(raw)
