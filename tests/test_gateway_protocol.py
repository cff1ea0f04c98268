"""The gateway's WebSocket protocol, HTTP limits and auth, against the real RabbitMQ.

Generation is answered by a scripted stand-in for the inference consumer on the real broker
(tests/gateway_util.py); flows with real consumers are in test_gateway_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import WSMsgType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.limits import ConcurrencyCap, RateLimiter
from gateway.protocol import CLIENT_TYPES, ProtocolError, parse_frame, protocol_schema, validator
from gateway.settings import GatewaySettings
from gateway.ws import merge_context
from npcbus.bus import Bus
from npcbus.settings import SettingsError
from npcbus.topology import Topology

from .gateway_util import (
    AUTH,
    MODEL,
    OTHER_TOKEN,
    START,
    TOKEN,
    WS,
    FakeConsumer,
    check_server_message,
    cleanup_namespace,
    gateway_settings,
    running_gateway,
)

broker = pytest.mark.broker


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
    c = await FakeConsumer(bus_settings).start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def gw(gbus, consumer):
    async with running_gateway(gbus) as client:
        yield client


async def wait_for(cond, timeout: float = 5.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(step)
    return cond()


# ---------------------------------------------------------------------------------------------
# pure pieces (no broker)
# ---------------------------------------------------------------------------------------------


def test_schema_lists_every_message_and_close_code():
    schema = protocol_schema()
    defs = schema["$defs"]
    client = [r["$ref"].rsplit("/", 1)[1] for r in defs["client_message"]["oneOf"]]
    assert tuple(client) == CLIENT_TYPES
    for t in client:
        assert defs[t]["properties"]["type"]["const"] == t
    assert set(schema["x-close-codes"]) >= {"1000", "1001", "1009", "1011", "1013", "4400", "4404", "4408", "4409"}
    from gateway.protocol import CLOSING_ERRORS

    for code, close in CLOSING_ERRORS.items():
        assert code in schema["x-error-codes"] and str(close) in schema["x-close-codes"]


def test_parse_frame_error_paths():
    cases = [
        ("{", "bad_json", None),
        ("[1, 2]", "bad_json", None),
        ('"text"', "bad_json", None),
        ("{}", "unknown_type", "type"),
        ('{"type": "dance"}', "unknown_type", "type"),
        ('{"type": 7}', "unknown_type", "type"),
        ('{"type": "turn", "text": "hi"}', "invalid_message", "turn_id"),
        ('{"type": "turn", "turn_id": "t1"}', "invalid_message", "text"),
        ('{"type": "turn", "turn_id": "t1", "text": ""}', "invalid_message", "text"),
        ('{"type": "turn", "turn_id": "has space", "text": "x"}', "invalid_message", "turn_id"),
        ('{"type": "turn", "turn_id": "t1", "text": "x", "bogus": 1}', "invalid_message", "bogus"),
        ('{"type": "turn.cancel"}', "invalid_message", "turn_id"),
        ('{"type": "context.update"}', "invalid_message", "context"),
        ('{"type": "context.update", "context": {"weather": 1}}', "invalid_message", "context.weather"),
        ('{"type": "session.start", "player": {"id": "p"}}', "invalid_session", "persona"),
        ('{"type": "session.start", "persona_id": "innkeeper"}', "invalid_session", "player"),
        ('{"type": "session.start", "persona_id": "innkeeper", "player": {"name": "A"}}', "invalid_session", "player.id"),
        ('{"type": "session.start", "resume": "nope"}', "invalid_session", "resume"),
    ]
    for frame, code, field in cases:
        with pytest.raises(ProtocolError) as ei:
            parse_frame(frame)
        assert ei.value.code == code, frame
        assert ei.value.field == field, (frame, ei.value.field)
        check_server_message(ei.value.event())
    assert parse_frame('{"type": "ping"}') == {"type": "ping"}


def test_merge_context():
    cur = {"location": "inn", "world_state": {"rain": True, "bridge": "open"}, "quest_state": {"q": "active"}}
    out = merge_context(cur, {"world_state": {"rain": False}, "notes": "n"})
    assert out == {"location": "inn", "world_state": {"rain": False, "bridge": "open"},
                   "quest_state": {"q": "active"}, "notes": "n"}
    assert merge_context(cur, {"notes": "x"}, replace=True) == {"notes": "x"}
    assert cur["world_state"]["rain"] is True  # not changed in place


def test_rate_limiter_and_cap():
    now = [0.0]
    rl = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.take("a")
    assert wait == pytest.approx(0.5)
    assert rl.take("b") == 0.0  # per key
    now[0] += 0.5
    assert rl.take("a") == 0.0
    assert rl.take("a", cost=10) > 0  # more than the burst: refused
    assert RateLimiter(0, 1).take("a", 100) == 0.0  # off
    cap = ConcurrencyCap(2)
    assert cap.try_acquire() and cap.try_acquire() and not cap.try_acquire()
    cap.release()
    assert cap.try_acquire(1) and not cap.try_acquire(1)


def test_model_listing_takes_versions_from_consumer_heartbeats(tmp_path):
    """Without the adapter manifest (a gateway container has no checkpoints volume), /v1/models
    gives each adapter the newest version an inference consumer reports serving."""
    from gateway.models import ModelCatalog
    from npcbus.messages import ConsumerHeartbeat

    cat = ModelCatalog("npcbus-default", "npcbus-default", manifest_path=str(tmp_path / "absent.json"))
    hb = dict(base_model="npcbus-default", engine="hf", capacity=8, running=0)
    cat.note_heartbeat(ConsumerHeartbeat(worker_id="a", adapters={"npc": 3, "innkeeper": 0}, **hb))
    cat.note_heartbeat(ConsumerHeartbeat(worker_id="b", adapters={"npc": 2}, **hb))  # not swapped yet
    listed = {m["id"]: m["version"] for m in cat.listing()}
    assert listed == {"npcbus-default": None, "npc": 3, "innkeeper": 0}
    cat.note_heartbeat(ConsumerHeartbeat(worker_id="b", adapters={"npc": 4}, **hb))
    assert {m["id"]: m["version"] for m in cat.listing()}["npc"] == 4


def test_settings_refuse_open_gateway_by_default():
    with pytest.raises(SettingsError, match="API_TOKEN"):
        GatewaySettings.from_env({})
    assert GatewaySettings.from_env({"REQUIRE_API_TOKEN": "false"}).api_tokens == []
    with pytest.raises(SettingsError, match="API_TOKEN"):
        GatewaySettings.from_env({"API_TOKEN": "has space"})
    s = GatewaySettings.from_env({"API_TOKEN": "a,b"})
    assert s.api_tokens == ["a", "b"] and s.redacted()["api_tokens"] == "***"


# ---------------------------------------------------------------------------------------------
# sessions and turns
# ---------------------------------------------------------------------------------------------


@broker
async def test_session_turns_stream_and_carry_history(gw, consumer):
    ws = await WS.connect(gw)
    started = await ws.start()
    assert started["persona_id"] == "ferryman" and started["resumed"] is False and started["protocol"] == 1
    deltas, final = await ws.turn("t1", "Can you take me across?")
    assert [d["index"] for d in deltas] == [0, 1]
    assert "".join(d["text"] for d in deltas) == "Well met, friend."
    assert final["type"] == "turn.final" and final["response"]["dialogue"] == "Well met, friend."
    assert final["timings"]["ttft_ms"] <= final["timings"]["total_ms"]
    accepted = [e for e in ws.received if e["type"] == "turn.accepted"]
    assert accepted[0]["turn_id"] == "t1" and accepted[0]["request_id"] == final["request_id"]
    _, final2 = await ws.turn("t2", "And back again?")
    assert final2["type"] == "turn.final"
    req1, d1 = consumer.requests[0]
    req2, _ = consumer.requests[1]
    assert req1.mode == "npc" and req1.npc["persona"]["id"] == "ferryman" and req1.npc["history"] == []
    assert req2.npc["history"] == [{"role": "player", "text": "Can you take me across?"},
                                   {"role": "npc", "text": "Well met, friend."}]
    assert req1.npc["context"]["location"] == "the ferry landing" and req1.npc["player"]["name"] == "Ayla"
    # the deadline travels as the message expiry
    assert req1.deadline is not None and 0 < req1.deadline - time.time() <= 10
    assert d1.deadline == pytest.approx(req1.deadline)
    await ws.close()


@broker
async def test_history_is_bounded(gbus, consumer):
    async with running_gateway(gbus, gateway_settings(HISTORY_TURNS=1)) as client:
        ws = await WS.connect(client)
        await ws.start()
        for i in range(3):
            await ws.turn(f"t{i}", f"line {i}")
        last, _ = consumer.requests[-1]
        assert last.npc["history"] == [{"role": "player", "text": "line 1"}, {"role": "npc", "text": "Well met, friend."}]


@broker
async def test_persona_id_and_ping(gw, consumer):
    ws = await WS.connect(gw)
    await ws.send({"type": "ping", "id": "x1"})
    pong = await ws.expect("pong")
    assert pong["id"] == "x1"
    start = {k: v for k, v in START.items() if k != "persona"}
    await ws.send({**start, "persona_id": "innkeeper"})
    started = await ws.expect("session.started")
    assert started["persona_id"] == "innkeeper"
    _, final = await ws.turn("t1", "Hello")
    assert final["type"] == "turn.final"
    req, _ = consumer.requests[0]
    assert req.npc["persona"]["name"]  # the catalog persona was sent inline


@broker
async def test_context_update_applies_to_next_turn(gw, consumer):
    ws = await WS.connect(gw)
    await ws.start()
    await ws.send({"type": "context.update", "context": {"world_state": {"storm": True}, "notes": "late"}})
    upd = await ws.expect("context.updated")
    assert upd["context"]["world_state"] == {"storm": True} and upd["context"]["location"] == "the ferry landing"
    await ws.turn("t1", "Hi", context={"time_of_day": "noon"})
    req, _ = consumer.requests[-1]
    assert req.npc["context"]["world_state"] == {"storm": True}
    assert req.npc["context"]["time_of_day"] == "noon" and req.npc["context"]["notes"] == "late"
    await ws.send({"type": "context.update", "context": {"notes": "only"}, "replace": True})
    assert (await ws.expect("context.updated"))["context"] == {"notes": "only"}
    # a merge that breaks the context's limits is refused and changes nothing; the socket stays
    await ws.send({"type": "context.update", "context": {"world_state": {f"k{i}": i for i in range(40)}}})
    err = await ws.expect("error")
    assert err["code"] == "invalid_message" and err["field"].startswith("context")
    await ws.send({"type": "ping"})
    await ws.expect("pong")


@broker
async def test_cancel_aborts_generation(gw, consumer):
    ws = await WS.connect(gw)
    await ws.start()
    await ws.send({"type": "turn", "turn_id": "slow1", "text": "tell a slow story"})
    accepted = await ws.expect("turn.accepted")
    await ws.expect("turn.delta", turn_id="slow1")
    await ws.send({"type": "turn.cancel", "turn_id": "slow1"})
    await ws.expect("turn.cancelled", turn_id="slow1")
    assert await wait_for(lambda: any(c.request_id == accepted["request_id"] for c in consumer.cancels))
    # cancel of something not running
    await ws.send({"type": "turn.cancel", "turn_id": "slow1"})
    err = await ws.expect("error")
    assert err["code"] == "unknown_turn" and err["turn_id"] == "slow1" and "close_code" not in err
    # the socket still works, and a cancelled turn id may run again
    _, final = await ws.turn("slow1", "now quickly")
    assert final["type"] == "turn.final"


@broker
async def test_disconnect_aborts_generation_and_session_resumes(gw, consumer):
    ws = await WS.connect(gw)
    started = await ws.start()
    sid = started["session_id"]
    _, final = await ws.turn("t1", "first")
    await ws.send({"type": "turn", "turn_id": "t2", "text": "a slow one"})
    accepted = await ws.expect("turn.accepted", turn_id="t2")
    await ws.expect("turn.delta", turn_id="t2")
    await ws.close()
    assert await wait_for(lambda: any(c.request_id == accepted["request_id"] for c in consumer.cancels))
    # resume: same token, history kept; the finished turn is replayed, not run again
    ws2 = await WS.connect(gw)
    await ws2.send({"type": "session.start", "resume": sid})
    resumed = await ws2.expect("session.started")
    assert resumed["resumed"] is True and resumed["session_id"] == sid and resumed["turns_done"] == ["t1"]
    n = len(consumer.requests)
    _, replay = await ws2.turn("t1", "first")
    assert replay["replay"] is True and replay["request_id"] == final["request_id"]
    assert len(consumer.requests) == n
    _, final3 = await ws2.turn("t3", "next")
    req, _ = consumer.requests[-1]
    assert req.npc["history"][0] == {"role": "player", "text": "first"}
    assert final3["type"] == "turn.final"
    # another socket cannot take the session while it is attached
    ws3 = await WS.connect(gw)
    await ws3.send({"type": "session.start", "resume": sid})
    err = await ws3.expect("error")
    assert err["code"] == "session_in_use" and await ws3.closed() == 4409
    # another token cannot resume it at all
    ws4 = await WS.connect(gw, headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    await ws4.send({"type": "session.start", "resume": sid})
    assert (await ws4.expect("error"))["code"] == "unknown_session"
    assert await ws4.closed() == 4404


@broker
async def test_duplicate_turn_id(gw, consumer):
    ws = await WS.connect(gw)
    await ws.start()
    await ws.send({"type": "turn", "turn_id": "d1", "text": "slow please"})
    await ws.expect("turn.accepted", turn_id="d1")
    await ws.send({"type": "turn", "turn_id": "d1", "text": "slow please"})
    err = await ws.expect("error")
    assert err["code"] == "duplicate_turn" and err["turn_id"] == "d1" and "close_code" not in err
    await ws.send({"type": "turn.cancel", "turn_id": "d1"})
    await ws.expect("turn.cancelled")
    _, final = await ws.turn("d2", "quick")
    n = len(consumer.requests)
    _, again = await ws.turn("d2", "quick")
    assert again["type"] == "turn.final" and again["replay"] is True and again["response"] == final["response"]
    assert len(consumer.requests) == n


@broker
async def test_session_end(gw, consumer):
    ws = await WS.connect(gw)
    started = await ws.start()
    await ws.send({"type": "turn", "turn_id": "e1", "text": "slow"})
    await ws.expect("turn.accepted")
    await ws.send({"type": "session.end"})
    await ws.expect("turn.cancelled", turn_id="e1")
    ended = await ws.expect("session.ended")
    assert ended["session_id"] == started["session_id"]
    assert await ws.closed() == 1000
    ws2 = await WS.connect(gw)
    await ws2.send({"type": "session.start", "resume": started["session_id"]})
    assert (await ws2.expect("error"))["code"] == "unknown_session"
    assert await ws2.closed() == 4404


@broker
async def test_consumer_error_is_forwarded(gw, consumer):
    ws = await WS.connect(gw)
    await ws.start()
    _, err = await ws.turn("f1", "fail now")
    assert err["type"] == "turn.error" and err["code"] == "engine_error" and err["retryable"] is True
    _, ok = await ws.turn("f1", "fine now")  # a failed turn id may be sent again
    assert ok["type"] == "turn.final"


@broker
async def test_turn_timeout_within_deadline(gw, consumer):
    ws = await WS.connect(gw)
    await ws.start()
    t0 = time.monotonic()
    _, err = await ws.turn("s1", "silent", timeout_ms=800)
    took = time.monotonic() - t0
    assert err["type"] == "turn.error" and err["code"] == "timeout" and err["retryable"] is True
    assert 0.7 < took < 3.0
    assert await wait_for(lambda: any(c.request_id == consumer.requests[-1][0].request_id for c in consumer.cancels))


# ---------------------------------------------------------------------------------------------
# every protocol error path
# ---------------------------------------------------------------------------------------------


@broker
async def test_errors_that_keep_the_socket(gw):
    ws = await WS.connect(gw)
    await ws.start()
    for frame, code in [("{nope", "bad_json"), ("[]", "bad_json"), ('{"type": "dance"}', "unknown_type"),
                        ('{"no_type": 1}', "unknown_type"),
                        ('{"type": "turn", "turn_id": "x"}', "invalid_message"),
                        (json.dumps(START), "session_exists"),
                        ('{"type": "session.start", "persona_id": "innkeeper"}', "session_exists")]:
        await ws.send(frame)
        err = await ws.expect("error")
        assert err["code"] == code, frame
        assert "close_code" not in err
    await ws.ws.send_bytes(b"\x00\x01")
    assert (await ws.expect("error"))["code"] == "bad_frame"
    await ws.send({"type": "ping", "id": 5})
    assert (await ws.expect("pong"))["id"] == 5


@broker
async def test_message_before_session_closes_4400(gw):
    for msg in [{"type": "turn", "turn_id": "t", "text": "hi"}, {"type": "turn.cancel", "turn_id": "t"},
                {"type": "context.update", "context": {}}, {"type": "session.end"}]:
        ws = await WS.connect(gw)
        await ws.send(msg)
        err = await ws.expect("error")
        assert err["code"] == "no_session" and err["close_code"] == 4400
        assert await ws.closed() == 4400


@broker
async def test_bad_session_start_closes_4400(gw):
    bad = [
        {**START, "persona": {**START["persona"], "name": ""}},
        {"type": "session.start", "persona_id": "no-such-persona", "player": {"id": "p"}},
        {**START, "audience": "toddler"},
        {**START, "audience": "child", "safe_mode": False},
        {"type": "session.start", "persona_id": "innkeeper"},
        {**START, "adapter": "no-such-adapter"},
    ]
    for msg in bad:
        ws = await WS.connect(gw)
        await ws.send(msg)
        err = await ws.expect("error")
        assert err["code"] == "invalid_session" and err["field"], msg
        assert await ws.closed() == 4400


@broker
async def test_unknown_session(gw):
    ws = await WS.connect(gw)
    await ws.send({"type": "session.start", "resume": "s_" + "0" * 32})
    err = await ws.expect("error")
    assert err["code"] == "unknown_session" and await ws.closed() == 4404
    ws = await WS.connect(gw)
    await ws.start()
    await ws.send({"type": "turn", "turn_id": "t", "text": "hi", "session_id": "s_" + "1" * 32})
    assert (await ws.expect("error"))["code"] == "unknown_session"
    assert await ws.closed() == 4404


@broker
async def test_oversized_frame_closes_1009(gbus, consumer):
    async with running_gateway(gbus, gateway_settings(MAX_FRAME_BYTES=2048)) as client:
        ws = await WS.connect(client)
        await ws.start()
        await ws.send({"type": "turn", "turn_id": "big", "text": "x" * 4000})
        assert await ws.closed() == 1009


@broker
async def test_start_timeout_closes_4408(gbus, consumer):
    async with running_gateway(gbus, gateway_settings(WS_START_TIMEOUT_S=0.3)) as client:
        ws = await WS.connect(client)
        err = await ws.expect("error", timeout=5)
        assert err["code"] == "session_timeout" and await ws.closed() == 4408


@broker
async def test_session_cap_closes_1013(gbus, consumer):
    async with running_gateway(gbus, gateway_settings(MAX_WS_SESSIONS=1)) as client:
        ws1 = await WS.connect(client)
        await ws1.start()
        ws2 = await WS.connect(client)
        err = await ws2.expect("error")
        assert err["code"] == "overloaded" and err["retryable"] and err["retry_after_ms"] > 0
        assert await ws2.closed() == 1013
        await ws1.close()


@broker
async def test_busy_rate_limited_and_overloaded_turns(gbus, consumer):
    s = gateway_settings(MAX_PENDING_TURNS=1, GATEWAY_MAX_CONCURRENCY=1, RATE_LIMIT_RPS=0.1, RATE_LIMIT_BURST=5)
    async with running_gateway(gbus, s) as client:
        ws = await WS.connect(client)  # costs 1 of the burst
        await ws.start()
        await ws.send({"type": "turn", "turn_id": "a", "text": "slow"})
        await ws.send({"type": "turn", "turn_id": "b", "text": "queued"})
        await ws.send({"type": "turn", "turn_id": "c", "text": "too many"})
        busy = await ws.expect("turn.error", turn_id="c")
        assert busy["code"] == "busy" and busy["retryable"]
        # a second session hits the concurrency cap (one generation in flight)
        other = await WS.connect(client)
        await other.start()
        _, over = await other.turn("x", "hello")
        assert over["type"] == "turn.error" and over["code"] == "overloaded" and over["retry_after_ms"] > 0
        _, limited = await other.turn("y", "hello")
        assert limited["code"] == "rate_limited" and limited["retry_after_ms"] > 0
        await ws.send({"type": "turn.cancel", "turn_id": "a"})
        await ws.expect("turn.cancelled", turn_id="a")


@broker
async def test_full_generation_queue_answers_overloaded_at_once(gbus, bus_settings):
    """No consumer, a generation queue of length 1: the second request is refused at once."""
    topo = Topology(bus_settings.namespace, gen_max_length=1)
    await gbus.declare_topology(queues=[])
    await gbus.declare_queue(topo.gen_queue(MODEL.model_id))
    async with running_gateway(gbus, gateway_settings(REQUEST_TIMEOUT_S=5)) as client:
        ws = await WS.connect(client)
        await ws.start()
        await ws.send({"type": "turn", "turn_id": "q1", "text": "waits in the queue"})
        await ws.expect("turn.accepted")
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        other = await WS.connect(client)  # turns of one session run in order: use a second session
        await other.start()
        _, err = await other.turn("q3", "refused")
        assert err["type"] == "turn.error" and err["code"] == "overloaded", err
        assert time.monotonic() - t0 < 2.0
        r = await client.post("/generate", json={"persona": START["persona"], "player_input": "hi"}, headers=AUTH)
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert (await r.json())["error"]["code"] == "overloaded"


@broker
async def test_no_consumer_errors_within_deadline(gbus):
    """No queue bound at all: the client hears 'no_consumer' at once, and HTTP gets 503."""
    async with running_gateway(gbus, gateway_settings(REQUEST_TIMEOUT_S=3)) as client:
        ws = await WS.connect(client)
        await ws.start()
        t0 = time.monotonic()
        _, err = await ws.turn("n1", "anyone there?")
        assert err["type"] == "turn.error" and err["code"] == "no_consumer" and err["retryable"]
        assert time.monotonic() - t0 < 3.0


# ---------------------------------------------------------------------------------------------
# auth, limits, HTTP
# ---------------------------------------------------------------------------------------------

PROTECTED = [("GET", "/v1/ws"), ("POST", "/generate"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
             ("GET", "/v1/models"), ("GET", "/v1/models/x"), ("GET", "/v1/personas"), ("GET", "/metrics")]


@broker
async def test_auth_on_every_protected_route(gw):
    for method, path in PROTECTED:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            r = await gw.request(method, path, headers=headers, json={} if method == "POST" else None)
            assert r.status == 401, (method, path, headers, r.status)
            body = await r.json()
            assert body["error"]["type"] == "authentication_error"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = await gw.get("/health")
    assert r.status == 200
    for path in ("/", "/static/app.js", "/static/style.css"):
        r = await gw.get(path)
        assert r.status == 200, path
    # the WebSocket upgrade itself is refused without a token
    with pytest.raises(Exception) as ei:
        await gw.ws_connect("/v1/ws")
    assert "401" in str(ei.value)
    r = await gw.get("/v1/models", headers=AUTH)
    assert r.status == 200
    r = await gw.get("/metrics", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert r.status == 200 and b"npcbus_gateway_requests_total" in await r.read()


@broker
async def test_browser_style_subprotocol_token(gw):
    ws = await gw.ws_connect("/v1/ws", protocols=("npcbus.v1", f"bearer.{TOKEN}"))
    assert ws.protocol == "npcbus.v1"
    await ws.send_str('{"type": "ping"}')
    msg = await ws.receive(timeout=5)
    assert json.loads(msg.data)["type"] == "pong"
    await ws.close()
    with pytest.raises(Exception) as ei:
        await gw.ws_connect("/v1/ws", protocols=("npcbus.v1", "bearer.nope"))
    assert "401" in str(ei.value)


@broker
async def test_rate_limit_429_per_token(gbus, consumer):
    async with running_gateway(gbus, gateway_settings(RATE_LIMIT_RPS=0.5, RATE_LIMIT_BURST=3)) as client:
        codes = [(await client.get("/v1/models", headers=AUTH)).status for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = await client.get("/v1/models", headers=AUTH)
        body = await r.json()
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        assert body["error"]["code"] == "rate_limited" and body["error"]["type"] == "rate_limit_error"
        # another token has its own bucket
        assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})).status == 200
        # /health is never limited
        assert all([(await client.get("/health")).status == 200 for _ in range(5)])


@broker
async def test_request_size_limit(gbus, consumer):
    async with running_gateway(gbus, gateway_settings(MAX_REQUEST_BYTES=2048)) as client:
        r = await client.post("/generate", data=json.dumps({"player_input": "x" * 5000}), headers={
            **AUTH, "Content-Type": "application/json"})
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "request_too_large"


@broker
async def test_generate_single_batch_and_errors(gw, consumer):
    body = {"persona_id": "guard", "player_input": "Halt?", "state": {"gate": "closed"}, "temperature": 0.2,
            "max_new_tokens": 64, "audience": "teen", "context": {"location": "the north gate"}}
    r = await gw.post("/generate", json=body, headers=AUTH)
    assert r.status == 200, await r.text()
    out = await r.json()
    assert out["response"]["dialogue"] == "Well met, friend." and out["timings"]["total_ms"] > 0
    req, _ = consumer.requests[-1]
    assert req.npc["context"]["world_state"] == {"gate": "closed"}
    assert req.npc["generation"]["temperature"] == 0.2 and req.npc["generation"]["max_new_tokens"] == 64
    assert req.npc["audience"] == "teen" and req.npc["persona"]["id"] == "guard"
    r = await gw.post("/generate", json={"requests": [body, {**body, "player_input": ""}, {**body, "adapter": "x y"}]},
                      headers=AUTH)
    assert r.status == 200
    results = (await r.json())["results"]
    assert "response" in results[0]
    assert results[1]["error"]["code"] == "invalid_request" and results[1]["error"]["param"] == "requests[1].player_input"
    assert results[2]["error"]["code"] == "model_not_found"
    for bad, param in [({"player_input": "hi"}, "persona"), ({**body, "top_p": 0}, "generation.top_p"),
                       ({**body, "wat": 1}, "wat"), ({"requests": []}, "requests")]:
        r = await gw.post("/generate", json=bad, headers=AUTH)
        assert r.status == 400, bad
        assert (await r.json())["error"]["param"] == param
    r = await gw.post("/generate", data="{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["error"]["code"] == "bad_json"


@broker
async def test_health_reports_broker_and_consumers(gbus, bus_settings):
    c = FakeConsumer(bus_settings, heartbeat_every=0.2)
    await c.start()
    try:
        async with running_gateway(gbus) as client:
            r = await client.get("/health")
            body = await r.json()
            assert r.status == 200 and body["broker"]["connected"] is True
            assert await wait_for(lambda: False, 0.5) is False
            body = await (await client.get("/health")).json()
            assert body["consumers"]["recent"] is True and body["consumers"]["live"] == 1
            assert body["status"] == "ok"
            models = await (await client.get("/v1/models", headers=AUTH)).json()
            assert [m["id"] for m in models["data"]] == [MODEL.model_id, "fake-adapter"]
    finally:
        await c.stop()
    async with running_gateway(gbus) as client:
        body = await (await client.get("/health")).json()
        assert body["status"] == "degraded" and body["consumers"]["recent"] is False


# ---------------------------------------------------------------------------------------------
# fuzzing: no frame crashes the gateway
# ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
VALID = [
    {"type": "turn", "turn_id": "fz", "text": "hello"},
    {"type": "turn.cancel", "turn_id": "fz"},
    {"type": "context.update", "context": {"notes": "n"}},
    {"type": "ping", "id": "p"},
    dict(START),
]


@st.composite
def mutated(draw):
    msg = dict(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "set", "add"]))
        keys = list(msg)
        if op == "drop" and keys:
            msg.pop(draw(st.sampled_from(keys)))
        elif op == "set" and keys:
            msg[draw(st.sampled_from(keys))] = draw(json_values)
        else:
            msg[draw(st.text(max_size=12))] = draw(json_values)
    return json.dumps(msg)


frames = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.fixed_dictionaries({"type": st.sampled_from(CLIENT_TYPES) | st.text(max_size=12)},
                          optional={"turn_id": json_values | st.text(max_size=70), "text": json_values,
                                    "context": json_values, "session_id": json_values, "resume": json_values,
                                    "persona_id": json_values, "player": json_values}).map(json.dumps),
    mutated(),
)


class _Socket:
    def __init__(self, client):
        self.client = client
        self.ws: WS | None = None

    async def get(self) -> WS:
        if self.ws is None or self.ws.ws.closed:
            self.ws = await WS.connect(self.client)
            await self.ws.start()
        return self.ws


@broker
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(frame=frames)
async def test_fuzzed_frames_never_crash_the_gateway(fuzz_gateway, frame):
    client, holder = fuzz_gateway
    ws = await holder.get()
    await ws.send(frame)
    marker = f"m{time.monotonic_ns()}"
    try:
        await ws.send({"type": "ping", "id": marker})
    except ConnectionResetError:
        pass
    while True:
        msg = await ws.ws.receive(timeout=10)
        if msg.type == WSMsgType.TEXT:
            ev = check_server_message(json.loads(msg.data))
            assert not (ev["type"] == "error" and ev["code"] == "internal"), ev
            if ev["type"] == "pong" and ev.get("id") == marker:
                break
        else:
            code = ws.ws.close_code
            assert code in (1000, 4400, 4404, 4409), code  # documented closes only (session.end, bad session...)
            break
    r = await client.get("/health")
    assert r.status == 200


@pytest.fixture
async def fuzz_gateway(gw):
    yield gw, _Socket(gw)


def test_schema_examples_of_client_messages_validate():
    for msg in VALID:
        parse_frame(json.dumps(msg))
    assert not list(validator("client_message").iter_errors(VALID[0]))


@settings(max_examples=300, deadline=None)
@given(turn_id=st.text(max_size=70), text=st.text(max_size=510), extra=st.sampled_from([{}, {"session_id": "s_" + "a" * 32},
                                                                                       {"session_id": "bad"}]))
def test_fast_turn_check_agrees_with_the_schema(turn_id, text, extra):
    """Plain turns skip the schema validator; whatever it accepts, the schema accepts too."""
    from gateway.protocol import _plain_turn

    msg = {"type": "turn", "turn_id": turn_id, "text": text, **extra}
    if _plain_turn(msg):
        assert not list(validator("turn").iter_errors(msg))
    if not list(validator("turn").iter_errors(msg)):
        assert _plain_turn(msg)


@broker
async def test_cors_only_for_listed_origins(gbus, consumer):
    async with running_gateway(gbus, gateway_settings(CORS_ORIGINS="https://game.example")) as client:
        pre = await client.options("/v1/chat/completions", headers={
            "Origin": "https://game.example", "Access-Control-Request-Method": "POST"})
        assert pre.status == 204 and pre.headers["Access-Control-Allow-Origin"] == "https://game.example"
        r = await client.get("/v1/models", headers={**AUTH, "Origin": "https://game.example"})
        assert r.headers["Access-Control-Allow-Origin"] == "https://game.example"
        r = await client.get("/v1/models", headers={**AUTH, "Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in r.headers
        r = await client.get("/v1/models", headers={"Origin": "https://game.example"})
        assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "https://game.example"


async def _sse_events(resp) -> list:
    out = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@broker
async def test_openai_routes_with_stand_in_consumer(gbus, consumer, tmp_path):
    from npcbus.adapters import AdapterManifest

    manifest = tmp_path / "adapters.json"
    AdapterManifest(manifest).register("innkeeper-voice", persona_id="innkeeper", version=3)
    async with running_gateway(gbus, manifest_path=str(manifest)) as client:
        models = await (await client.get("/v1/models", headers=AUTH)).json()
        ids = [m["id"] for m in models["data"]]
        assert ids == [MODEL.model_id, "innkeeper-voice"]
        assert (await client.get("/v1/models/innkeeper-voice", headers=AUTH)).status == 200
        assert (await client.get("/v1/models/nope", headers=AUTH)).status == 404
        body = {"model": "innkeeper-voice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                "temperature": 0.5, "stop": ["\n"]}
        r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        out = await r.json()
        assert r.status == 200 and out["object"] == "chat.completion"
        assert out["choices"][0]["message"]["content"] == "Well met, friend."
        assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
        req, _ = consumer.requests[-1]
        assert req.mode == "chat" and req.adapter == "innkeeper-voice" and req.adapter_version is None
        assert req.params == {"max_new_tokens": 20, "temperature": 0.5, "stop": ["\n"]}
        r = await client.post("/v1/chat/completions", json={**body, "model": "innkeeper-voice@2"}, headers=AUTH)
        assert r.status == 200 and consumer.requests[-1][0].adapter_version == 2
        # streamed: role first, content deltas, finish, usage, [DONE]
        r = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}, headers=AUTH)
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = await _sse_events(r)
        assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
        assert text == "Well met, friend."
        assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "stop"
        assert events[-2]["usage"]["total_tokens"] == 17
        # a consumer error before any text is a plain HTTP error; after text, an error event
        r = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                                            "messages": [{"role": "user", "content": "fail"}]},
                              headers=AUTH)
        assert r.status == 503 and (await r.json())["error"]["code"] == "engine_error"
        r = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                                            "messages": [{"role": "user", "content": "midfail"}]},
                              headers=AUTH)
        events = await _sse_events(r)
        assert r.status == 200 and events[-2]["error"]["code"] == "engine_error" and events[-1] == "[DONE]"
        # errors in OpenAI's format
        for bad, status, param in [({**body, "model": "ghost"}, 404, "model"), ({**body, "n": 2}, 400, "n"),
                                   ({**body, "messages": []}, 400, "messages"),
                                   ({**body, "temperature": 3}, 400, "temperature"),
                                   ({**body, "tools": [{"type": "function"}]}, 400, "tools")]:
            r = await client.post("/v1/chat/completions", json=bad, headers=AUTH)
            err = (await r.json())["error"]
            assert r.status == status and err["param"] == param and err["message"], bad
        r = await client.post("/v1/completions", json={"model": MODEL.model_id, "prompt": "Once", "max_tokens": 5},
                              headers=AUTH)
        out = await r.json()
        assert out["object"] == "text_completion" and out["choices"][0]["text"] == "Well met, friend."
        assert consumer.requests[-1][0].mode == "text" and consumer.requests[-1][0].adapter is None
        # a session of the persona picks its adapter from the manifest
        ws = await WS.connect(client)
        await ws.send({**{k: v for k, v in START.items() if k != "persona"}, "persona_id": "innkeeper"})
        started = await ws.expect("session.started")
        assert started["adapter"] == "innkeeper-voice"
        _, final = await ws.turn("t1", "hello")
        assert final["adapter"] == "innkeeper-voice" and final["adapter_version"] == 3


@broker
async def test_sse_client_leaving_aborts_generation(gw, consumer):
    body = {"messages": [{"role": "user", "content": "slow story"}], "stream": True}
    resp = await gw.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status == 200
    await resp.content.readline()
    rid = consumer.requests[-1][0].request_id
    resp.close()
    assert await wait_for(lambda: any(c.request_id == rid for c in consumer.cancels))


@broker
async def test_internal_error_closes_1011(gw, monkeypatch):
    import gateway.ws

    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway.ws, "merge_context", broken)
    ws = await WS.connect(gw)
    await ws.start()
    await ws.send({"type": "context.update", "context": {"notes": "x"}})
    err = await ws.expect("error")
    assert err["code"] == "internal" and err["close_code"] == 1011 and err["retryable"]
    assert await ws.closed() == 1011
    assert (await gw.get("/health")).status == 200  # the gateway itself goes on
