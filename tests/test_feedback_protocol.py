"""The WebSocket protocol's ``turn.feedback``: validation, answers, and the experience it publishes
(real RabbitMQ; generation answered by the scripted stand-in consumer of tests/gateway_util.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.protocol import ProtocolError, parse_frame, protocol_schema
from npcbus.bus import Bus
from npcbus.codec import decode
from npcbus.messages import Experience

from .conftest import read_queue
from .gateway_util import WS, FakeConsumer, cleanup_namespace, gateway_settings, running_gateway


def test_feedback_messages_in_the_schema():
    defs = protocol_schema()["$defs"]
    assert {"turn.feedback", "turn.feedback.accepted"} <= set(defs)
    assert parse_frame('{"type": "turn.feedback", "turn_id": "t1", "thumbs": "up"}')["thumbs"] == "up"
    assert parse_frame('{"type": "turn.feedback", "turn_id": "t1", "score": -0.25}')["score"] == -0.25
    for bad in ('{"type": "turn.feedback", "turn_id": "t1"}',
                '{"type": "turn.feedback", "turn_id": "t1", "score": 2}',
                '{"type": "turn.feedback", "turn_id": "t1", "thumbs": "sideways"}',
                '{"type": "turn.feedback", "turn_id": "t1", "thumbs": "up", "score": 1}',
                '{"type": "turn.feedback", "turn_id": "t1", "thumbs": "up", "comment": "x"}'):
        with pytest.raises(ProtocolError) as e:
            parse_frame(bad)
        assert e.value.code == "invalid_message", bad


@pytest.fixture
async def gbus(bus_settings):
    b = Bus(bus_settings, name="gateway-test")
    await b.connect()
    try:
        yield b
    finally:
        await b.close()
        await cleanup_namespace(bus_settings)


@pytest.fixture
async def consumer(bus_settings, gbus):
    c = await FakeConsumer(bus_settings, heartbeat_every=0.1).start()
    try:
        yield c
    finally:
        await c.stop()


async def _experiences(url: str, queue: str, n: int, timeout: float = 10.0) -> list[Experience]:
    return [decode(m.body) for m in await read_queue(url, queue, n, timeout)]


@pytest.mark.broker
async def test_feedback_is_published_as_scored_experience(gbus, consumer, bus_settings):
    async with running_gateway(gbus, gateway_settings(PUBLISH_EXPERIENCE="true")) as client:
        await asyncio.sleep(0.5)  # the consumer's heartbeat names its adapter
        ws = await WS.connect(client)
        started = await ws.start(adapter="fake-adapter")
        _d, final = await ws.turn("t1", "hello there")
        assert final["type"] == "turn.final" and final["adapter_version"] == 3
        await ws.send({"type": "turn.feedback", "turn_id": "t1", "thumbs": "up"})
        ack = await ws.expect("turn.feedback.accepted", turn_id="t1")
        assert ack["score"] == 1.0 and ack["adapter"] == "fake-adapter" and ack["adapter_version"] == 3
        await ws.send({"type": "turn.feedback", "turn_id": "t1", "score": 0.5})
        err = await ws.expect("error")
        assert err["code"] == "duplicate_feedback" and err["turn_id"] == "t1" and not err["retryable"]
        await ws.send({"type": "turn.feedback", "turn_id": "t9", "thumbs": "down"})
        assert (await ws.expect("error"))["code"] == "unknown_turn"
        _d, final2 = await ws.turn("t2", "and again")
        await ws.send({"type": "turn.feedback", "turn_id": "t2", "score": -0.5})
        ack2 = await ws.expect("turn.feedback.accepted", turn_id="t2")
        assert ack2["score"] == -0.5
        await ws.close()
    got = await _experiences(bus_settings.amqp_url, gbus.topology.experience_queue.name, 4)
    assert len(got) == 4
    unscored = [e for e in got if e.score is None]
    scored = {e.turn_id: e for e in got if e.score is not None}
    assert {e.turn_id for e in unscored} == {"t1", "t2"}
    assert set(scored) == {"t1", "t2"}
    up = scored["t1"]
    assert up.score == 1.0 and up.thumbs == "up" and up.experience_id == ack["experience_id"]
    assert up.session_id == started["session_id"] and up.request_id == final["request_id"]
    assert up.adapter == "fake-adapter" and up.adapter_version == 3 and up.valid
    assert up.npc["player_input"] == "hello there" and up.response == final["response"]
    assert scored["t2"].score == -0.5 and scored["t2"].thumbs == ""


@pytest.mark.broker
async def test_feedback_without_experience_publishing_is_refused(gbus, consumer):
    async with running_gateway(gbus, gateway_settings(PUBLISH_EXPERIENCE="false")) as client:
        ws = await WS.connect(client)
        await ws.start()
        await ws.turn("t1", "hello")
        await ws.send({"type": "turn.feedback", "turn_id": "t1", "thumbs": "up"})
        err = await ws.expect("error")
        assert err["code"] == "feedback_disabled"
        # the socket stays open
        _d, final = await ws.turn("t2", "still there?")
        assert final["type"] == "turn.final"
        await ws.close()
