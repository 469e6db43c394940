"""Background tasks, run one way: named, logged, counted, and restarted or failed by policy.

Every long-lived loop of a node (replication heartbeats, anti-entropy, metadata shipping, the
registry, name claims, forwarding ownership, gossip ticks, discovery, peer dialing, the Kafka
forwarder's pump/poller/saver, the indexer, presence flushes, revocation expiry) is started
with :meth:`Supervisor.spawn`, through the one :class:`Supervisor` the node creates and hands
to each component's constructor. When the loop raises, the supervisor

* logs the exception with the task's name,
* counts it in ``chatnode_task_failures_total{task=...}`` on the node's :class:`Metrics`,
* and then, by the task's :class:`Policy`:

  - ``RESTART``: runs the loop again after a backoff (doubling from ``backoff_min`` up to
    ``backoff_max``; back to ``backoff_min`` once a run lasted ``healthy_after`` seconds),
    counted in ``chatnode_task_restarts_total{task=...}``;
  - ``FAIL``: does not run it again and marks the node failed: :meth:`Supervisor.failures`
    names the task, ``GET /healthz`` answers 503 with it, and
    ``chatnode_tasks_failed`` is above zero.

A loop that returns ends quietly (it decided to). Cancellation is never a failure.

Tasks scoped to one connection or one exchange (a peer link's writer, a WebSocket's writer and
requests, a push-pull exchange, a drain after a peer left, an mDNS lookup) are not loops of
the node: their owner starts, cancels and awaits them with the connection.

Each component keeps the :class:`Task` handles it spawned and closes them in its own
idempotent ``aclose()`` (:meth:`Task.aclose` cancels and awaits and never raises: a failure
was handled when it happened, so shutdown cannot be cut short by a stored exception). The
node closes the supervisor last, which cancels whatever is left.

Testing: a test kills a loop by making something the loop calls raise (for example with
``pytest.MonkeyPatch`` on a running node's component) and reads the counters, the log and
``/healthz`` (tests/unit/test_supervise.py; a real node in
tests/integration/test_supervise_node.py); ``Supervisor(clock=...)`` and the backoff
arguments are there for such tests. A component built without a supervisor (a test, a tool)
gets its own, counting on a private :class:`~chatnode.metrics.Metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from chatnode.metrics import LabeledCounter, Metrics

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "HEALTHY_AFTER", "Policy", "Supervisor", "Task"]

log = logging.getLogger(__name__)

BACKOFF_MIN: Final = 0.5
BACKOFF_MAX: Final = 30.0
HEALTHY_AFTER: Final = 60.0  # a run this long resets the backoff

Loop = Callable[[], Coroutine[Any, Any, None]]


class Policy(enum.Enum):
    """What happens when a supervised loop raises."""

    RESTART = "restart"  # log, count, run it again after a backoff
    FAIL = "fail"  # log, count, stop it, and report the node failed (/healthz 503)


@dataclass(frozen=True, slots=True)
class Failure:
    """A ``FAIL`` task that died: its name and the exception, as ``repr``."""

    task: str
    error: str


class Task:
    """The handle of one supervised loop."""

    __slots__ = ("_task", "name", "policy")

    def __init__(self, name: str, policy: Policy, task: asyncio.Task[None]) -> None:
        self.name = name
        self.policy = policy
        self._task = task

    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> None:
        self._task.cancel()

    async def wait(self, seconds: float | None = None) -> bool:
        """Wait (up to ``seconds``) for the loop to end by itself, without cancelling it;
        True if it ended."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.shield(self._task)
        return self._task.done()

    async def aclose(self) -> None:
        """Cancel the loop and wait until it has ended. Idempotent; never raises (except the
        caller's own cancellation)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Supervisor:
    """Runs the background loops of one node (or of one component used on its own, e.g. in a
    test or a tool: then with its own registry)."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        healthy_after: float = HEALTHY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        m = self._metrics = metrics if metrics is not None else Metrics()
        self._failures_total = LabeledCounter(
            "chatnode_task_failures_total",
            "background task runs that ended with an exception, by task",
            "task",
            m.registry,
        )
        self._restarts_total = LabeledCounter(
            "chatnode_task_restarts_total",
            "background tasks run again after a failure, by task",
            "task",
            m.registry,
        )
        m.value("chatnode_tasks_running", "supervised background tasks running",
                lambda: float(sum(not t.done() for t in self._tasks)))  # fmt: skip
        m.value("chatnode_tasks_failed",
                "background tasks stopped for good by a failure (the node is unhealthy)",
                lambda: float(len(self._failures)))  # fmt: skip
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._healthy_after = healthy_after
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures: dict[str, Failure] = {}
        self._closed = False

    def spawn(self, name: str, loop: Loop, *, policy: Policy = Policy.RESTART) -> Task:
        """Start ``loop()`` as the task ``name`` (``loop`` is called again for each restart)."""
        if self._closed:
            raise RuntimeError(f"supervisor closed: cannot start {name}")
        task = asyncio.create_task(self._run(name, loop, policy), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Task(name, policy, task)

    def failures(self) -> list[Failure]:
        """The ``FAIL`` tasks that died, in the order they did (empty: healthy)."""
        return list(self._failures.values())

    def failure_count(self, task: str) -> float:
        """How many runs of ``task`` ended with an exception (for tests and tools)."""
        value = self._metrics.sample("chatnode_task_failures_total", {"task": task})
        return 0.0 if value is None else value

    async def _run(self, name: str, loop: Loop, policy: Policy) -> None:
        delay = self._backoff_min
        while True:
            started = self._clock()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures_total.inc(name)
                if policy is Policy.FAIL:
                    self._failures.setdefault(name, Failure(name, repr(exc)))
                    log.exception("task %s failed; not restarted: the node reports failed", name)
                    return
                if self._clock() - started >= self._healthy_after:
                    delay = self._backoff_min
                log.exception("task %s failed; restarting in %.1f s", name, delay)
            await asyncio.sleep(delay)
            delay = min(self._backoff_max, delay * 2)
            self._restarts_total.inc(name)
            log.info("task %s restarted", name)

    async def aclose(self) -> None:
        """Cancel every task still running and wait for them. Idempotent."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
