"""Sessions between sockets (:mod:`gateway.sessions`) and several gateways sharing them.

- The session record: a round trip with history, finished turns and rated turns; the size bound.
- The memory store (the default): leases, owners, expiry after SESSION_RESUME_S, the cap.
- The Redis store, on the local Redis (keys under a namespace of the test's own, deleted after):
  the same, plus the TTLs it sets, a crashed holder's lease running out, fenced writes, and an
  unreachable Redis answering at once with StoreUnavailable.
- Two gateways (two aiohttp servers, each with its own bus) on one namespace of the real RabbitMQ,
  sharing the real Redis, with one inference consumer on the benchmark's instant engine: a session
  started on gateway A resumes on gateway B with its history, finished turns (replayed, not rerun)
  and rated turns; it cannot be resumed while A holds it, nor by another API key; each gateway's
  replies reach only its own reply queue.
- A gateway whose Redis is down answers session.start with a retryable error and says so in /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from urllib.parse import urlsplit

import pytest
from prometheus_client import REGISTRY

from gateway.sessions import (
    MemorySessionStore,
    RatedTurn,
    RedisSessionStore,
    SessionInUse,
    SessionRecord,
    SessionStore,
    SessionSync,
    SessionUnknown,
    StoreUnavailable,
    decode_record,
    encode_record,
    make_store,
)
from gateway.settings import GatewaySettings
from npcbus.bus import Bus
from npcbus.codec import decode
from npcbus.messages import Experience, FinalResponse, ReplyBatch
from npcbus.settings import SettingsError

from .conftest import delete_namespace, read_queue
from .gateway_util import AUTH, MODEL, OTHER_TOKEN, START, WS, cleanup_namespace, gateway_settings, running_gateway

REDIS_URL = os.environ.get("NPCBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(url: str) -> bool:
    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_redis = pytest.mark.skipif(not _reachable(REDIS_URL), reason=f"Redis is not reachable at {REDIS_URL}")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def final_response(request_id: str, line: str, version: int | None = 4) -> FinalResponse:
    response = {"dialogue": line, "emotion": "happy", "intent": "trade", "actions": [{"type": "rent_room"}],
                "relationship_change": 1, "end_conversation": False}
    return FinalResponse(request_id, 7, text=line, response=response, valid=True, adapter="innkeeper",
                         adapter_version=version, usage={"prompt_tokens": 40, "completion_tokens": 9},
                         timings={"engine_ms": 12.5}, worker_id="w-1")


def record(sid: str | None = None, owner: str = "key-1", turns: int = 2, notes: str = "") -> SessionRecord:
    sid = sid or f"s_{uuid.uuid4().hex}"
    rec = SessionRecord(
        id=sid, owner=owner, persona={"id": "innkeeper", "name": "Marta"}, player={"id": "p-1", "name": "Ayla"},
        audience="general", context={"location": "the inn", "world_state": {"storm": True}, "notes": notes},
        adapter="innkeeper", safe_mode=False, generation={"temperature": 0.7, "seed": 3})
    for i in range(turns):
        tid = f"t{i}"
        fin = final_response(f"r{i}", f"line {i}")
        rec.history += [{"role": "player", "text": f"question {i}"}, {"role": "npc", "text": f"line {i}"}]
        rec.done[tid] = {"type": "turn.final", "turn_id": tid, "request_id": f"r{i}", "response": fin.response,
                         "valid": True, "adapter": "innkeeper", "adapter_version": 4, "finish_reason": "stop",
                         "usage": fin.usage, "timings": {"queue_ms": 0.1, "ttft_ms": None, "total_ms": 3.5,
                                                         "engine": {"engine_ms": 12.5}}}
        npc = {"persona": rec.persona, "player_input": f"question {i}", "history": rec.history[:-2], "notes": notes}
        rec.rated[tid] = RatedTurn(npc, fin, given=(i == 0))
    return rec


async def _redis_keys(url: str, pattern: str) -> list[bytes]:
    import redis.asyncio as aioredis

    r = aioredis.from_url(url)
    try:
        return [k async for k in r.scan_iter(match=pattern)]
    finally:
        await r.aclose()


async def _delete_redis_keys(url: str, namespace: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.from_url(url)
    try:
        keys = [k async for k in r.scan_iter(match=f"{namespace}:*")]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@pytest.fixture
async def redis_stores():
    """make(**kw) -> a RedisSessionStore on a namespace of this test's own; keys deleted after."""
    namespace = f"test-sess-{uuid.uuid4().hex[:10]}"
    made: list[RedisSessionStore] = []

    def make(**kw) -> RedisSessionStore:
        kw.setdefault("resume_s", 60.0)
        kw.setdefault("lease_s", 5.0)
        store = RedisSessionStore(kw.pop("url", REDIS_URL), namespace=kw.pop("namespace", namespace), **kw)
        made.append(store)
        return store

    make.namespace = namespace
    try:
        yield make
    finally:
        for s in made:
            await s.close()
        await _delete_redis_keys(REDIS_URL, namespace)


# ------------------------------------------------------------------------------------------------
# the record
# ------------------------------------------------------------------------------------------------


def test_record_round_trip_keeps_history_done_and_rated_turns():
    rec = record(turns=3)
    back = decode_record(encode_record(rec))
    assert back == rec
    assert list(back.done) == ["t0", "t1", "t2"] and list(back.rated) == ["t0", "t1", "t2"]
    assert isinstance(back.rated["t1"].final, FinalResponse)
    assert back.rated["t1"].final.response["actions"] == [{"type": "rent_room"}]
    assert back.rated["t0"].given is True and back.rated["t2"].given is False
    assert back.done["t2"]["timings"]["ttft_ms"] is None
    with pytest.raises(ValueError, match="not a session record"):
        decode_record(b"\x93\x01\x02\x03")
    with pytest.raises(ValueError):
        decode_record(b"not msgpack at all \xc1")


def test_record_size_bound_drops_the_oldest_turns_first():
    rec = record(turns=12, notes="x" * 1500)
    full = encode_record(rec)
    assert len(full) > 16384
    small = encode_record(rec, max_bytes=16384)
    assert len(small) <= 16384
    back = decode_record(small)
    assert back.history == rec.history and back.context == rec.context
    assert "t11" in back.rated and "t0" not in back.rated  # the newest rated turns are kept
    assert back.done == rec.done or "t11" in back.done
    assert encode_record(rec, max_bytes=len(full)) == full  # under the bound: untouched


# ------------------------------------------------------------------------------------------------
# the memory store
# ------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_memory_store_lease_owner_and_expiry():
    clock = Clock()
    store = MemorySessionStore(resume_s=30, clock=clock, max_sessions=3)
    rec = record()
    await store.create(rec, "h1")
    with pytest.raises(SessionInUse):
        await store.claim(rec.id, "key-1", "h2")
    with pytest.raises(SessionUnknown):
        await store.claim(rec.id, "key-2", "h2")  # another API key: as if it did not exist
    assert await store.save(record(rec.id, turns=3), "h2") is False  # not the holder: nothing written
    assert await store.save(record(rec.id, turns=3), "h1") is True
    assert await store.refresh([(rec.id, "h1"), ("s_gone", "h1")]) == {"s_gone": "missing"}
    clock.t += 3600  # held sessions never expire
    assert await store.sweep() == 0
    assert await store.release(record(rec.id, turns=4), "h1") is True
    got = await store.claim(rec.id, "key-1", "h2")
    assert list(got.done) == ["t0", "t1", "t2", "t3"]
    assert await store.refresh([(rec.id, "h1")]) == {rec.id: "lost"}
    await store.release(got, "h2")
    clock.t += 29
    assert (await store.claim(rec.id, "key-1", "h3")).id == rec.id
    await store.release(got, "h3")
    clock.t += 31  # SESSION_RESUME_S after the detach: gone
    with pytest.raises(SessionUnknown):
        await store.claim(rec.id, "key-1", "h3")
    # the cap: the sessions detached first go first
    for i in range(5):
        r = record(f"s_{i:032x}")
        await store.create(r, f"h{i}")
        await store.release(r, f"h{i}")
        clock.t += 1
    assert await store.sweep() == 2 and sorted(store.entries) == [f"s_{i:032x}" for i in (2, 3, 4)]
    # SESSION_RESUME_S=0: a session ends with its socket
    now = MemorySessionStore(resume_s=0)
    await now.create(rec, "h1")
    await now.release(rec, "h1")
    with pytest.raises(SessionUnknown):
        await now.claim(rec.id, "key-1", "h1")
    # session.end
    await store.create(rec, "h9")
    await store.delete(rec.id, "h9")
    with pytest.raises(SessionUnknown):
        await store.claim(rec.id, "key-1", "h9")
    assert (await store.health())["ok"] is True


def test_make_store_follows_the_settings():
    base = {"REQUIRE_API_TOKEN": "false"}
    mem = make_store(GatewaySettings.from_env(base), "ns1")
    assert isinstance(mem, MemorySessionStore) and mem.resume_s == 300 and mem.max_sessions == 4000
    red = make_store(GatewaySettings.from_env({**base, "SESSION_STORE_URL": "redis://127.0.0.1:6399/2",
                                               "SESSION_STORE_PASSWORD": "s3cret", "SESSION_LEASE_S": "6"}), "ns1")
    assert isinstance(red, RedisSessionStore) and red.lease_s == 6 and red.key("s_1") == "ns1:session:{s_1}"
    assert red.redis.connection_pool.connection_kwargs["password"] == "s3cret"
    assert red.where == "127.0.0.1:6399/2"
    in_url = make_store(GatewaySettings.from_env({**base, "SESSION_STORE_URL": "redis://:frm-url@h:1/0",
                                                  "SESSION_STORE_PASSWORD": "other"}), "ns1")
    assert in_url.redis.connection_pool.connection_kwargs["password"] == "frm-url"
    assert "frm-url" not in in_url.where
    with pytest.raises(SettingsError, match="SESSION_STORE_URL"):
        GatewaySettings.from_env({**base, "SESSION_STORE_URL": "http://127.0.0.1:6379"})
    redacted = GatewaySettings.from_env({**base, "SESSION_STORE_URL": "redis://u:pw@h:1/0",
                                         "SESSION_STORE_PASSWORD": "pw2"}).redacted()
    assert "pw" not in str(redacted["session_store_url"]) and redacted["session_store_password"] == "***"


class SlowStore(SessionStore):
    """A store whose writes take a while, for SessionSync."""

    kind = "slow"

    def __init__(self) -> None:
        super().__init__(resume_s=10, lease_s=5)
        self.saved: list[SessionRecord] = []
        self.fail = False
        self.holder = "h1"

    async def save(self, rec: SessionRecord, holder: str) -> bool:
        await asyncio.sleep(0.05)
        if self.fail:
            raise StoreUnavailable("down")
        self.saved.append(rec)
        return holder == self.holder


async def test_session_sync_coalesces_writes_and_retries():
    store = SlowStore()
    state = {"n": 0}
    lost = []
    sync = SessionSync(store, "h1", lambda: record("s_x", turns=state["n"]), lambda: lost.append(1))
    state["n"] = 1
    sync.changed()  # returns at once
    await asyncio.sleep(0)  # the write starts, with the state of now
    for n in range(2, 6):
        state["n"] = n
        sync.changed()
    await asyncio.sleep(0.3)
    # one write started with the first state, one more with the newest: never one per change
    assert [len(r.done) for r in store.saved] == [1, 5]
    store.fail = True
    state["n"] = 6
    sync.changed()
    await asyncio.sleep(0.1)
    assert sync.dirty and len(store.saved) == 2
    store.fail = False
    sync.retry()
    await asyncio.sleep(0.1)
    await sync.close()  # stops writing (the final state goes with the release)
    state["n"] = 7
    sync.changed()
    await asyncio.sleep(0.1)
    assert [len(r.done) for r in store.saved] == [1, 5, 6] and not lost
    other = SessionSync(store, "h2", lambda: record("s_y"), lambda: lost.append(1))  # not the holder
    other.changed()
    await asyncio.sleep(0.1)
    await other.close()
    assert lost == [1] and other.closed


# ------------------------------------------------------------------------------------------------
# the Redis store
# ------------------------------------------------------------------------------------------------


@needs_redis
async def test_redis_store_round_trip_ttls_lease_and_namespace(redis_stores):
    store = redis_stores(resume_s=60, lease_s=5)
    rec = record(turns=1)
    await store.create(rec, "h1")
    r = store.redis
    assert 59_000 < await r.pttl(store.key(rec.id)) <= 65_000  # attached: SESSION_LEASE_S + SESSION_RESUME_S
    assert 4_000 < await r.pttl(store.lease_key(rec.id)) <= 5_000
    assert await r.get(store.lease_key(rec.id)) == b"h1"
    keys = sorted(await _redis_keys(REDIS_URL, f"{redis_stores.namespace}:*"))
    assert keys == sorted([store.key(rec.id).encode(), store.lease_key(rec.id).encode()])
    with pytest.raises(SessionInUse):
        await store.claim(rec.id, "key-1", "h2")
    with pytest.raises(SessionUnknown):
        await store.claim(rec.id, "key-2", "h2")
    assert await r.get(store.lease_key(rec.id)) == b"h1"  # a refused claim takes nothing
    with pytest.raises(SessionUnknown):  # another namespace sees nothing
        await redis_stores(namespace=redis_stores.namespace + "-other").claim(rec.id, "key-1", "h2")
    assert await store.save(record(rec.id, turns=3), "h2") is False
    full = record(rec.id, turns=3)
    assert await store.save(full, "h1") is True
    assert await store.release(full, "h1") is True
    assert await r.exists(store.lease_key(rec.id)) == 0
    assert 55_000 < await r.pttl(store.key(rec.id)) <= 60_000  # detached: SESSION_RESUME_S
    got = await store.claim(rec.id, "key-1", "h2")
    assert got == full
    assert await store.refresh([(rec.id, "h2"), (rec.id, "h1")]) == {rec.id: "lost"}
    await store.delete(rec.id, "h2")
    assert await _redis_keys(REDIS_URL, f"{redis_stores.namespace}:*") == []
    with pytest.raises(SessionUnknown):
        await store.claim(rec.id, "key-1", "h2")
    state = await store.health()
    assert state["ok"] is True and state["kind"] == "redis" and state["latency_ms"] >= 0


@needs_redis
async def test_redis_store_lease_expiry_fencing_and_resume_expiry(redis_stores):
    store = redis_stores(resume_s=0.8, lease_s=0.4)
    rec = record(turns=1)
    await store.create(rec, "h1")
    # renewed, the lease holds past its own length
    for _ in range(4):
        await asyncio.sleep(0.15)
        assert await store.refresh([(rec.id, "h1")]) == {}
    with pytest.raises(SessionInUse):
        await store.claim(rec.id, "key-1", "h2")
    # a holder that stops renewing (its gateway crashed) loses it once it runs out...
    await asyncio.sleep(0.55)
    # ...and takes it back if nobody else came meanwhile
    assert await store.refresh([(rec.id, "h1")]) == {}
    await asyncio.sleep(0.55)
    got = await store.claim(rec.id, "key-1", "h2")
    assert got.id == rec.id
    # the old holder is fenced off: it cannot write, renew or release any more
    assert await store.save(record(rec.id, turns=5), "h1") is False
    assert await store.refresh([(rec.id, "h1")]) == {rec.id: "lost"}
    assert await store.release(record(rec.id, turns=5), "h1") is False
    assert len((await store.claim(rec.id, "key-1", "h2")).done) == 1
    # a crashed holder's session stays resumable for SESSION_RESUME_S after its lease, then goes
    await asyncio.sleep(0.45)
    assert (await store.claim(rec.id, "key-1", "h3")).id == rec.id
    await store.release(got, "h3")
    await asyncio.sleep(1.0)
    with pytest.raises(SessionUnknown):
        await store.claim(rec.id, "key-1", "h4")


@needs_redis
async def test_redis_store_resume_zero_deletes_at_detach(redis_stores):
    store = redis_stores(resume_s=0, lease_s=2)
    rec = record()
    await store.create(rec, "h1")
    assert await store.release(rec, "h1") is True
    assert await _redis_keys(REDIS_URL, f"{redis_stores.namespace}:*") == []


async def test_redis_store_unreachable_answers_at_once(redis_stores):
    store = redis_stores(url=f"redis://127.0.0.1:{_free_port()}/0")
    before = REGISTRY.get_sample_value("npcbus_gateway_session_store_operations_total",
                                       {"store": "redis", "op": "claim", "outcome": "error"}) or 0
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="did not answer"):
        await store.claim("s_" + "0" * 32, "key-1", "h1")
    with pytest.raises(StoreUnavailable):
        await store.create(record(), "h1")
    assert time.monotonic() - t0 < 5
    state = await store.health()
    assert state["ok"] is False and state["error"]
    after = REGISTRY.get_sample_value("npcbus_gateway_session_store_operations_total",
                                      {"store": "redis", "op": "claim", "outcome": "error"})
    assert after == before + 1
    assert REGISTRY.get_sample_value("npcbus_gateway_session_store_up", {"store": "redis"}) == 0


# ------------------------------------------------------------------------------------------------
# two gateways on one namespace, one Redis
# ------------------------------------------------------------------------------------------------


class ReplyWatchingBus(Bus):
    """A gateway's bus that notes the correlation id of every reply its reply queue delivers."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reply_ids: set[str] = set()

    async def _on_reply(self, msg, d):
        if type(msg) is ReplyBatch:
            self.reply_ids.update(item[0] for item in msg.items if isinstance(item, (list, tuple)) and item)
        elif d.correlation_id:
            self.reply_ids.add(d.correlation_id)
        return await super()._on_reply(msg, d)


async def _start_consumer(bus_settings, tmp_path):
    """The inference consumer on the instant engine, noting each request it takes and its reply-to."""
    from bench.instant_engine import InstantEngine
    from workers.infer_worker import InferenceWorker, InferSettings

    class Watching(InferenceWorker):
        seen: list = []

        async def _on_request(self, msg, d):
            self.seen.append((msg, d.reply_to))
            return await super()._on_request(msg, d)

    bus = Bus(bus_settings, name="sessions-consumer")
    await bus.connect()
    settings = InferSettings.from_env({}, engine="bench.instant_engine:InstantEngine", max_concurrency=8,
                                      adapter_cache_dir=str(tmp_path / "adapter-cache"), heartbeat_interval_s=0.5)
    worker = Watching(bus, InstantEngine(settings), settings, model_id=MODEL.model_id, worker_id="sessions-instant")
    worker.seen = []
    await worker.start()
    return bus, worker


async def _resume(client, sid: str, headers=None, timeout: float = 10.0) -> tuple[WS, dict]:
    """Resume ``sid``, retrying while the old socket is still being let go (session_in_use)."""
    end = time.monotonic() + timeout
    while True:
        ws = await WS.connect(client, headers=headers)
        await ws.send({"type": "session.start", "resume": sid})
        ev = await ws.recv()
        if ev["type"] == "error" and ev["code"] == "session_in_use" and time.monotonic() < end:
            await ws.closed()
            await asyncio.sleep(0.05)
            continue
        return ws, ev


async def _health(client) -> dict:
    resp = await client.get("/health")
    return await resp.json()


@pytest.mark.broker
@needs_redis
async def test_a_session_resumes_on_another_gateway(bus_settings, tmp_path):
    namespace = bus_settings.namespace
    env = {"SESSION_STORE_URL": REDIS_URL, "SESSION_LEASE_S": "1", "SESSION_RESUME_S": "60",
           "PUBLISH_EXPERIENCE": "true"}
    bus_a = ReplyWatchingBus(bus_settings, name="gateway-a")
    bus_b = ReplyWatchingBus(bus_settings, name="gateway-b")
    cbus = worker = None
    try:
        await bus_a.connect()
        await bus_b.connect()
        async with contextlib.AsyncExitStack() as stack:
            gw_a = await stack.enter_async_context(running_gateway(bus_a, gateway_settings(**env)))
            gw_b = await stack.enter_async_context(running_gateway(bus_b, gateway_settings(**env)))
            cbus, worker = await _start_consumer(bus_settings, tmp_path)
            for client in (gw_a, gw_b):
                h = await _health(client)
                assert h["session_store"]["kind"] == "redis" and h["session_store"]["ok"] is True

            # gateway A: a session and a turn
            ws_a = await WS.connect(gw_a)
            started = await ws_a.start(adapter=None)
            sid = started["session_id"]
            _, final1 = await ws_a.turn("t1", "Any rooms left?")
            assert final1["type"] == "turn.final" and final1["response"]["dialogue"]
            rid1 = final1["request_id"]

            # while A holds it (past several lease lengths: A renews its lease), B refuses to resume it
            await asyncio.sleep(2.5)
            ws_x, err = await _resume(gw_b, sid, timeout=0)
            assert err["type"] == "error" and err["code"] == "session_in_use" and err["retryable"] is True
            assert await ws_x.closed() == 4409
            # another API key cannot resume it at all
            ws_y, err = await _resume(gw_b, sid, headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
            assert err["code"] == "unknown_session" and await ws_y.closed() == 4404

            # drop the socket on A; resume on B
            await ws_a.close()
            ws_b, resumed = await _resume(gw_b, sid)
            assert resumed["type"] == "session.started", resumed
            assert resumed["resumed"] is True and resumed["session_id"] == sid and resumed["turns_done"] == ["t1"]
            assert resumed["persona_id"] == START["persona"]["id"] and resumed["adapter"] is None

            # a retried turn id is replayed from the store, not run again
            n = len(worker.seen)
            _, replay = await ws_b.turn("t1", "Any rooms left?")
            assert replay["type"] == "turn.final" and replay["replay"] is True
            assert replay["request_id"] == rid1 and replay["response"] == final1["response"]
            assert len(worker.seen) == n

            # a new turn on B carries A's history in its prompt
            _, final2 = await ws_b.turn("t2", "And a hot meal?")
            assert final2["type"] == "turn.final"
            req2, reply_to2 = next((m, r) for m, r in worker.seen if m.request_id == final2["request_id"])
            assert req2.npc["history"][:2] == [{"role": "player", "text": "Any rooms left?"},
                                               {"role": "npc", "text": final1["response"]["dialogue"]}]
            assert req2.npc["context"].items() >= START["context"].items() and req2.npc["player"]["id"] == "p-1"

            # feedback on A's turn, given on B, is published with A's turn
            await ws_b.send({"type": "turn.feedback", "turn_id": "t1", "thumbs": "up"})
            ack = await ws_b.expect("turn.feedback.accepted", turn_id="t1")
            assert ack["score"] == 1.0
            exps = [decode(m.body) for m in await read_queue(bus_settings.amqp_url,
                                                             bus_b.topology.experience_queue.name, 3, 5.0)]
            rated = [e for e in exps if isinstance(e, Experience) and e.score is not None]
            assert [(e.turn_id, e.session_id, e.request_id, e.score) for e in rated] == [("t1", sid, rid1, 1.0)]
            assert rated[0].npc["player_input"] == "Any rooms left?"

            # a context change on B, then back to A: everything B did is there, feedback included
            await ws_b.send({"type": "context.update", "context": {"time_of_day": "night"}})
            await ws_b.expect("context.updated")
            await ws_b.close()
            ws_a2, back = await _resume(gw_a, sid)
            assert back["resumed"] is True and back["turns_done"] == ["t1", "t2"]
            await ws_a2.send({"type": "turn.feedback", "turn_id": "t1", "thumbs": "down"})
            assert (await ws_a2.expect("error"))["code"] == "duplicate_feedback"
            _, final3 = await ws_a2.turn("t3", "Goodnight.")
            req3, reply_to3 = next((m, r) for m, r in worker.seen if m.request_id == final3["request_id"])
            assert [h["text"] for h in req3.npc["history"]][2] == "And a hot meal?"
            assert req3.npc["context"]["time_of_day"] == "night"

            # each gateway's replies reached its own reply queue and no other
            queue_a, queue_b = await bus_a.reply_queue(), await bus_b.reply_queue()
            assert queue_a != queue_b and namespace in queue_a and namespace in queue_b
            reply_to1 = next(r for m, r in worker.seen if m.request_id == rid1)
            assert (reply_to1, reply_to2, reply_to3) == (queue_a, queue_b, queue_a)
            assert bus_a.reply_ids == {rid1, final3["request_id"]}
            assert bus_b.reply_ids == {final2["request_id"]}

            # session.end on A: gone from the store, for every gateway
            await ws_a2.send({"type": "session.end"})
            await ws_a2.expect("session.ended")
            ws_z, err = await _resume(gw_b, sid)
            assert err["code"] == "unknown_session"
            assert await _redis_keys(REDIS_URL, f"{namespace}:*") == []
    finally:
        if worker is not None:
            with contextlib.suppress(Exception):
                await worker.stop(drain_timeout_s=1)
        for b in (cbus, bus_a, bus_b):
            if b is not None:
                with contextlib.suppress(Exception):
                    await b.close()
        await _delete_redis_keys(REDIS_URL, namespace)
        await delete_namespace(bus_settings)


@pytest.mark.broker
async def test_session_store_down_is_a_retryable_error_and_shows_in_health(bus_settings):
    bus = Bus(bus_settings, name="gateway-nostore")
    await bus.connect()
    try:
        settings = gateway_settings(SESSION_STORE_URL=f"redis://127.0.0.1:{_free_port()}/0")
        async with running_gateway(bus, settings) as client:
            ws = await WS.connect(client)
            t0 = time.monotonic()
            await ws.send(START)
            err = await ws.expect("error")
            assert err["code"] == "unavailable" and err["retryable"] is True and err["retry_after_ms"] > 0
            assert "session store" in err["message"] and "close_code" not in err
            assert time.monotonic() - t0 < 5
            await ws.send({"type": "session.start", "resume": "s_" + "0" * 32})
            assert (await ws.expect("error"))["code"] == "unavailable"
            await ws.send({"type": "ping", "id": "still-open"})
            assert (await ws.expect("pong"))["id"] == "still-open"
            await ws.close()
            resp = await client.get("/health")
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "degraded"
            assert body["session_store"]["kind"] == "redis" and body["session_store"]["ok"] is False
            assert body["session_store"]["error"]
            metrics = await (await client.get("/metrics", headers=AUTH)).text()
            assert 'npcbus_gateway_session_store_operations_total{op="create",outcome="error",store="redis"}' in metrics
    finally:
        await bus.close()
        await cleanup_namespace(bus_settings)


@pytest.mark.broker
@needs_redis
async def test_a_socket_whose_session_was_taken_over_gives_it_up(bus_settings):
    """A gateway that finds another holder on its session's lease (it lost touch with Redis for
    longer than the lease, and another socket resumed the session meanwhile) closes its socket."""
    bus = Bus(bus_settings, name="gateway-takeover")
    await bus.connect()
    store = RedisSessionStore(REDIS_URL, namespace=bus_settings.namespace, resume_s=60, lease_s=5)
    try:
        settings = gateway_settings(SESSION_STORE_URL=REDIS_URL, SESSION_LEASE_S="0.6")
        async with running_gateway(bus, settings) as client:
            ws = await WS.connect(client)
            sid = (await ws.start(adapter=None))["session_id"]
            await asyncio.sleep(1.0)
            assert await store.redis.get(store.lease_key(sid)) not in (None, b"intruder")  # still renewed
            await store.redis.hset(store.key(sid), "holder", "intruder")
            await store.redis.set(store.lease_key(sid), "intruder", px=5000)
            err = await ws.expect("error", timeout=5)
            assert err["code"] == "session_in_use" and await ws.closed() == 4409
            await asyncio.sleep(0.3)
            assert await store.redis.get(store.lease_key(sid)) == b"intruder"  # left to its new holder
    finally:
        await store.close()
        await _delete_redis_keys(REDIS_URL, bus_settings.namespace)
        await bus.close()
        await cleanup_namespace(bus_settings)
