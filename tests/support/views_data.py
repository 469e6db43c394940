"""A reproducible stream of forwarded messages for the views: edits, deletes, reactions and
at-least-once duplicates mixed in (tests/integration/test_views_*.py, scripts/bench_views.py).
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

from chatnode.history.forwarding import ForwardedMessage
from crdt.clock import Timestamp

__all__ = ["DAY_MS", "NOW_MS", "WORDS", "records"]

NOW_MS = int(time.time() * 1000)
DAY_MS = 86_400_000
WORDS = ["deploy", "friday", "lunch", "café", "rollback", "pager", "coffee", "release"]


def records(n: int, rooms: int = 3, seed: int = 1) -> list[ForwardedMessage]:
    """``n`` messages of one home with edits, deletes, reactions and duplicates mixed in,
    in the order a topic partition could hold them."""
    rng = random.Random(seed)
    out: list[ForwardedMessage] = []
    live: list[ForwardedMessage] = []
    seq = 0
    for i in range(n):
        seq += 1
        room = f"room-{i % rooms}"
        body = " ".join(rng.choice(WORDS) for _ in range(4)) + f" n{i}"
        m = ForwardedMessage(room=room, epoch=1, home="n1", id=f"m{i}",
                             author=f"user{rng.randrange(5)}", body=body,
                             ts=Timestamp(NOW_MS - rng.randrange(5) * DAY_MS + i, 0, "n1"),
                             edited=None, deleted=False, reactions=(), seq=seq)  # fmt: skip
        out.append(m)
        live.append(m)
        r = rng.random()
        if r < 0.1 and live:
            old = live.pop(rng.randrange(len(live)))
            seq += 1
            out.append(replace(old, deleted=True, body="", seq=seq))
        elif r < 0.2 and live:
            k = rng.randrange(len(live))
            seq += 1
            live[k] = replace(live[k], body=f"edited zebra{i}",
                              edited=Timestamp(NOW_MS + i, 1, "n1"), seq=seq)  # fmt: skip
            out.append(live[k])
        elif r < 0.3 and live:
            k = rng.randrange(len(live))
            seq += 1
            live[k] = replace(live[k], reactions=(("👍", ("ann",)),), seq=seq)
            out.append(live[k])
        elif r < 0.4:
            out.append(rng.choice(out))  # an at-least-once duplicate
    return out
