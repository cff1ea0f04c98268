"""The bus against the real local RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import textwrap
import time

import aio_pika
import numpy as np
import pytest

from npcbus.bus import (
    Ack,
    Bus,
    BusNotConnected,
    BusTimeout,
    Defer,
    Overloaded,
    Reject,
    Retry,
    Unroutable,
)
from npcbus.chunks import Assembler, split
from npcbus.codec import decode, encode
from npcbus.messages import Cancel, Chunk, Delta, FinalResponse, GenerationRequest, ReplyBatch, TokenDelta
from npcbus.settings import BusSettings
from npcbus.topology import H_BATCH_REPLIES, H_CHUNK_STREAM, H_REJECT_CODE, H_REJECT_REASON, Topology

from .conftest import ROOT, delete_namespace, read_queue
from .tcp_proxy import TCPProxy

pytestmark = pytest.mark.broker


async def collect_dead(bus: Bus, n: int, timeout: float = 15.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Read n messages from the namespace's dead-letter queue."""
    return await read_queue(bus.settings.amqp_url, bus.topology.dead_queue.name, n, timeout)


async def test_use_before_connect_is_refused(bus_settings):
    b = Bus(bus_settings)
    with pytest.raises(BusNotConnected):
        await b.publish("x", "y", Cancel("r"))
    with pytest.raises(BusNotConnected):
        await b.declare_topology()


async def test_topology_declares_idempotently(bus, bus_settings):
    await bus.declare_topology()  # second time on the same connection
    other = Bus(bus_settings, name="other")
    await other.connect()
    try:
        await other.declare_topology()
        await other.declare_queue(other.topology.gen_queue("m1"))
        await other.declare_queue(other.topology.gen_queue("m1"))
    finally:
        await other.close()


async def test_publish_confirm_consume_ack(bus):
    topo = bus.topology
    got: list[str] = []
    done = asyncio.Event()

    async def handler(msg, d):
        got.append(msg.request_id)
        if len(got) == 20:
            done.set()
        return Ack()

    await bus.consume(topo.tasks_queue, handler, prefetch=5)
    await bus.publish_many(topo.train_exchange, "task", [Cancel(f"r{i}") for i in range(20)])
    await asyncio.wait_for(done.wait(), 10)
    assert sorted(got) == sorted(f"r{i}" for i in range(20))
    # acked: nothing left in the queue
    await asyncio.sleep(0.3)
    ch = await bus._conn.channel()
    q = await ch.declare_queue(topo.tasks_queue.name, passive=True)
    assert q.declaration_result.message_count == 0
    await ch.close()


async def test_rejected_message_lands_in_dead_letter_queue_with_reason(bus):
    topo = bus.topology

    async def handler(msg, d):
        return Reject("adapter 'nope' is unknown", "unknown_adapter")

    await bus.consume(topo.deltas_queue, handler)
    await bus.publish(topo.train_exchange, "delta", Cancel("bad-one"))
    dead = await collect_dead(bus, 1)
    assert len(dead) == 1
    assert dead[0].headers[H_REJECT_CODE] == "unknown_adapter"
    assert "unknown" in dead[0].headers[H_REJECT_REASON]
    assert decode(dead[0].body) == Cancel("bad-one")


async def test_malformed_message_dead_lettered_and_consumer_keeps_serving(bus):
    topo = bus.topology
    seen = []
    ok = asyncio.Event()

    async def handler(msg, d):
        seen.append(msg)
        ok.set()

    await bus.consume(topo.tasks_queue, handler)
    await bus.publish_bytes(topo.train_exchange, "task", b"\x00garbage that is not a message")
    await bus.publish(topo.train_exchange, "task", Cancel("after"))
    await asyncio.wait_for(ok.wait(), 10)
    dead = await collect_dead(bus, 1)
    assert dead and dead[0].headers[H_REJECT_CODE] == "malformed"
    assert "bad magic" in dead[0].headers[H_REJECT_REASON]
    assert seen == [Cancel("after")]


async def test_retry_requeues_until_the_delivery_limit_then_dead_letters(bus):
    topo = bus.topology
    attempts = []

    async def handler(msg, d):
        attempts.append(d.delivery_count)
        return Retry("transient")

    await bus.consume(topo.tasks_queue, handler)
    await bus.publish(topo.train_exchange, "task", Cancel("poison"))
    dead = await collect_dead(bus, 1, timeout=20)
    assert len(dead) == 1
    assert len(attempts) >= topo.delivery_limit  # tried, then the broker gave up
    assert len(attempts) <= topo.delivery_limit + 1


CONSUMER_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from npcbus.bus import Bus, Defer
    from npcbus.settings import BusSettings

    async def main():
        bus = Bus(BusSettings.from_env(), name="dying")
        await bus.connect()
        async def handler(msg, d):
            print("GOT", msg.request_id, flush=True)
            return Defer()   # never acked: we are about to die
        await bus.consume(bus.topology.tasks_queue, handler, prefetch=1)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_message_of_a_consumer_killed_unacked_is_redelivered(bus, bus_settings):
    topo = bus.topology
    env = dict(os.environ, AMQP_URL=bus_settings.amqp_url, NPCBUS_NAMESPACE=bus_settings.namespace,
               PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CONSUMER_SCRIPT, env=env,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        await bus.publish(topo.train_exchange, "task", Cancel("precious"))
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"GOT precious"
    finally:
        proc.kill()  # SIGKILL: no goodbye to the broker
        await proc.wait()
    got = asyncio.get_running_loop().create_future()

    async def handler(msg, d):
        if not got.done():
            got.set_result((msg.request_id, d.redelivered, d.delivery_count))

    await bus.consume(topo.tasks_queue, handler)
    rid, redelivered, count = await asyncio.wait_for(got, 30)
    assert rid == "precious" and redelivered


async def test_consumer_resumes_after_connection_cut_and_nothing_acked_is_lost(bus_settings):
    proxy = await TCPProxy().start()
    via_proxy = BusSettings.from_env({"AMQP_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
                                      "NPCBUS_NAMESPACE": bus_settings.namespace, "AMQP_HEARTBEAT_S": "5"})
    publisher = Bus(bus_settings, name="publisher")
    consumer = Bus(via_proxy, name="consumer")
    await publisher.connect()
    await publisher.declare_topology()
    await consumer.connect()
    topo = publisher.topology
    processed: set[str] = set()
    n = 200
    try:
        async def handler(msg, d):
            await asyncio.sleep(0.005)
            processed.add(msg.request_id)
            return Ack()

        await consumer.consume(topo.tasks_queue, handler, prefetch=10)
        await publisher.publish_many(topo.train_exchange, "task", [Cancel(f"m{i}") for i in range(n // 2)])
        while len(processed) < 20:
            await asyncio.sleep(0.02)
        assert proxy.cut() >= 1  # network drop while messages are in flight
        await publisher.publish_many(topo.train_exchange, "task", [Cancel(f"m{i}") for i in range(n // 2, n)])
        end = time.monotonic() + 60
        while len(processed) < n and time.monotonic() < end:
            await asyncio.sleep(0.1)
        assert consumer.reconnects >= 1
        assert processed == {f"m{i}" for i in range(n)}
        # and nothing is left behind unacked
        await asyncio.sleep(1)
        ch = await publisher._conn.channel()
        q = await ch.declare_queue(topo.tasks_queue.name, passive=True)
        assert q.declaration_result.message_count == 0
        await ch.close()
    finally:
        await consumer.close()
        await publisher.close()
        await proxy.close()
        await delete_namespace(bus_settings)


def _drop_like_a_surviving_node(queue: str, vhost: str = "/") -> None:
    """What RabbitMQ 3.10 does on each surviving node of a cluster when a node dies
    (``rabbit_amqqueue:on_node_down``): it lists the dead node's transient queues by name, then
    deletes the queue record and the bindings of each *name*, in later transactions and once per
    surviving node. A queue declared again under that name in between (a requester that failed over
    and re-declared its reply queue) loses its record and bindings while its process and consumer
    live on: replies to it are returned unroutable, and nothing tells the requester."""
    expr = (f'R = rabbit_misc:r(<<"{vhost}">>, queue, <<"{queue}">>), '
            "rabbit_misc:execute_mnesia_transaction(fun () -> ok = mnesia:delete({rabbit_queue, R}), "
            "rabbit_binding:remove_transient_for_destination(R) end).")
    out = subprocess.run(["rabbitmqctl", "-q", "eval", expr], capture_output=True, text=True, timeout=60)
    if out.returncode != 0 or re.search(r"\bundef\b", out.stdout):
        pytest.skip(f"this broker does not keep queues in Mnesia (RabbitMQ 3.x): {out.stdout.strip()} {out.stderr.strip()}")


async def _reconnected(b: Bus, before: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not (b.connected and b.reconnects > before):
        assert time.monotonic() < end, "the bus did not reconnect"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _server_and_proxied_client(bus_settings):
    """A server bus, and a client bus whose connection runs through a TCP proxy that can cut it
    (reconnecting every 0.2 s); the ping queue is deleted after."""
    proxy = await TCPProxy().start()
    via_proxy = BusSettings.from_env({"AMQP_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
                                      "NPCBUS_NAMESPACE": bus_settings.namespace, "AMQP_RECONNECT_S": "0.2"})
    server = Bus(bus_settings, name="server")
    client = Bus(via_proxy, name="client")
    try:
        await server.connect()
        await server.declare_topology()
        await client.connect()
        yield proxy, server, client, server.topology
    finally:
        await client.close()
        await server.close()
        await proxy.close()
        await delete_namespace(bus_settings, [server.topology.gen_queue("ping").name])


@pytest.mark.timeout(120)
async def test_reply_queue_survives_the_stale_cleanup_of_a_dead_node_after_a_reconnect(bus_settings):
    """The kill -9 cluster test's flake: after a failover, the requester's reply queue was declared
    again under its old name, and the stale cleanup of the dead node (run by another surviving node)
    then deleted it by that name: the inference consumer's replies came back unroutable for as long
    as the gateway stayed connected. Now each connection gets a reply queue of its own name, declared
    before any request names it, so the stale cleanup cannot reach it; so do the per-process
    listener queues (here the events one)."""
    async with _server_and_proxied_client(bus_settings) as (proxy, server, client, topo):
        unroutable: list[str] = []
        events: list[str] = []

        async def answer(msg, d):
            try:
                await server.reply(d, Cancel("pong:" + msg.request_id))
            except Unroutable:
                unroutable.append(d.reply_to or "")
            return Ack()

        async def on_event(msg, _d):
            events.append(msg.request_id)
            return Ack()

        await server.consume(topo.gen_queue("ping"), answer)
        listener = await client.consume(topo.listener_queue("events", client.client_id, topo.events_exchange),
                                        on_event, no_ack=True, exclusive=True)
        old, old_listener = await client.reply_queue(), listener.name
        assert (await client.request(topo.gen_exchange, "ping", Cancel("1"), timeout=10)).request_id == "pong:1"

        before = client.reconnects
        assert proxy.cut() >= 1
        await _reconnected(client, before)
        for name in (old, old_listener):
            _drop_like_a_surviving_node(name)  # lands after the reconnect, as in the race

        t0 = time.monotonic()
        reply = await client.request(topo.gen_exchange, "ping", Cancel("2"), timeout=5)
        assert reply.request_id == "pong:2" and time.monotonic() - t0 < 2
        assert not unroutable
        assert await client.reply_queue() != old and listener.name != old_listener
        await server.publish(topo.events_exchange, "", Cancel("heard"), persistent=False)
        end = time.monotonic() + 5
        while "heard" not in events:
            assert time.monotonic() < end, "the listener queue lost its binding"
            await asyncio.sleep(0.02)


@pytest.mark.timeout(120)
async def test_request_caught_by_a_reconnect_is_sent_again_with_the_new_reply_queue(bus_settings):
    """A request whose publish is caught by a lost connection is not published after the reconnect
    naming the reply queue that went with the old connection (its replies could never arrive): it
    is sent again naming the new connection's reply queue, and answered."""
    async with _server_and_proxied_client(bus_settings) as (proxy, server, client, topo):
        seen: list[str] = []

        async def answer(msg, d):
            seen.append(d.reply_to or "")
            with contextlib.suppress(Unroutable):
                await server.reply(d, Cancel("pong:" + msg.request_id))
            return Ack()

        await server.consume(topo.gen_queue("ping"), answer)
        old = await client.reply_queue()
        before = client.reconnects
        assert proxy.cut() >= 1  # the client has not noticed yet: it publishes into the dead socket
        t0 = time.monotonic()
        reply = await client.request(topo.gen_exchange, "ping", Cancel("caught"), timeout=20)
        assert reply.request_id == "pong:caught" and time.monotonic() - t0 < 10
        assert client.reconnects > before
        assert seen and old not in seen, seen


async def test_64_mib_payload_travels_chunked_and_verified(bus):
    topo = bus.topology
    rng = np.random.default_rng(1)
    tensors = {f"layer{i}": rng.standard_normal((1024, 1024), dtype=np.float32).astype(np.float16)
               for i in range(32)}  # 32 x 2 MiB = 64 MiB
    msg = Delta("big", "t", "npc", 0, "w", 10, tensors=tensors)
    got = asyncio.get_running_loop().create_future()

    async def handler(m, d):
        got.set_result((m, d.body_size, len(d.raw)))

    await bus.consume(topo.deltas_queue, handler, prefetch=64)
    await bus.publish(topo.train_exchange, "delta", msg)
    m, size, pieces = await asyncio.wait_for(got, 120)
    assert size > 64 * 1024 * 1024
    assert pieces == -(-size // bus.settings.chunk_bytes) > 1
    for k, v in tensors.items():
        assert m.tensors[k].tobytes() == v.tobytes()


async def test_corrupted_chunk_is_rejected(bus):
    topo = bus.topology
    payload = encode(Delta("c", "t", "npc", 0, "w", 1,
                           tensors={"x": np.arange(300_000, dtype=np.float32)}))
    chunks = split(payload, 256 * 1024)
    assert len(chunks) >= 4
    bad = chunks[2]
    chunks[2] = Chunk(bad.stream_id, bad.index, bad.count, bad.total_size, bad.sha256, bad.total_sha256,
                      bytes([bad.data[0] ^ 1]) + bad.data[1:])
    handled = []

    async def handler(m, d):
        handled.append(m)

    await bus.consume(topo.deltas_queue, handler, prefetch=64)
    for c in chunks:
        await bus.publish_bytes(topo.train_exchange, "delta", encode(c), headers={H_CHUNK_STREAM: c.stream_id})
    dead = await collect_dead(bus, len(chunks), timeout=20)
    assert len(dead) == len(chunks)
    assert {d.headers[H_REJECT_CODE] for d in dead} == {"chunk_corrupt"}
    assert handled == []


def test_assembler_detects_missing_duplicate_and_corrupt_chunks():
    payload = os.urandom(10_000)
    chunks = split(payload, 1000)
    a = Assembler(timeout_s=5)
    for c in chunks[:-1]:
        assert a.add(c, c.index).status == "partial"
    dup = a.add(chunks[3], "again")
    assert dup.status == "duplicate" and dup.replaced == 3
    assert a.expire(time.monotonic() + 10)[0].status == "missing"
    # complete and verified
    b = Assembler()
    res = [b.add(c) for c in reversed(chunks)]
    assert res[-1].status == "complete" and res[-1].payload == payload
    # a piece whose bytes do not match its hash
    c2 = Assembler()
    x = chunks[0]
    forged = Chunk(x.stream_id, 0, x.count, x.total_size, x.sha256, x.total_sha256, b"\0" * len(x.data))
    assert c2.add(forged).status == "corrupt"
    # consistent hashes, but the whole does not match its total hash
    c3 = Assembler()
    import hashlib

    parts = split(payload, 1000)
    swapped = parts[1]
    other = os.urandom(len(swapped.data))
    parts[1] = Chunk(swapped.stream_id, 1, swapped.count, swapped.total_size, hashlib.sha256(other).hexdigest(),
                     swapped.total_sha256, other)
    results = [c3.add(p) for p in parts]
    assert results[-1].status == "corrupt" and "hash mismatch" in results[-1].reason


async def test_request_stream_orders_by_sequence_and_times_out(bus):
    topo = bus.topology
    server = Bus(bus.settings, name="server")
    await server.connect()
    spec = topo.gen_queue("tiny")
    try:
        async def handler(req, d):
            # send out of order: the client re-orders by seq
            n = int(req.prompt)
            events = [TokenDelta(req.request_id, i, f"t{i}") for i in range(n)]
            events.append(FinalResponse(req.request_id, n, "".join(e.text for e in events)))
            for e in reversed(events):
                await server.reply(d, e)

        await server.consume(spec, handler)
        got = [e async for e in bus.request_stream(topo.gen_exchange, "tiny",
                                                    GenerationRequest("r1", "tiny", prompt="5"), timeout=10)]
        assert [e.seq for e in got] == list(range(6))
        assert got[-1].TYPE == "final_response" and got[-1].text == "t0t1t2t3t4"
        # nobody answers on this route: the deadline ends the stream with BusTimeout
        await bus.declare_queue(topo.gen_queue("silent"))
        t0 = time.monotonic()
        with pytest.raises(BusTimeout):
            async for _ in bus.request_stream(topo.gen_exchange, "silent",
                                              GenerationRequest("r2", "silent"), timeout=1.0):
                pass
        assert time.monotonic() - t0 < 3
    finally:
        await server.close()


def _count_publishes(b: Bus) -> list[str]:
    """Record the message type of every broker message ``b`` publishes."""
    sent: list[str] = []
    orig = b.publish_bytes

    async def counting(exchange, routing_key, body, **kw):
        sent.append(decode(body).TYPE if not kw.get("headers") or H_CHUNK_STREAM not in kw["headers"] else "chunk")
        return await orig(exchange, routing_key, body, **kw)

    b.publish_bytes = counting
    return sent


async def test_coalesced_replies_travel_as_one_batch_and_arrive_in_order(bus):
    topo = bus.topology
    server = Bus(bus.settings, name="server")
    await server.connect()
    sent = _count_publishes(server)
    spec = topo.gen_queue("batchy")
    try:
        async def handler(req, d):
            n = int(req.prompt)
            # three streams' worth of events ready in one loop turn: one broker message
            await asyncio.gather(*(server.reply(d, TokenDelta(req.request_id, i, f"t{i}"), coalesce=True)
                                   for i in range(n)))
            await server.reply(d, FinalResponse(req.request_id, n, "done"), coalesce=True)

        await server.consume(spec, handler)
        streams = await asyncio.gather(*(
            _collect(bus.request_stream(topo.gen_exchange, "batchy", GenerationRequest(f"r{k}", "batchy", prompt="6"),
                                        timeout=10)) for k in range(3)))
        for got in streams:
            assert [e.seq for e in got] == list(range(7))
            assert [e.text for e in got[:-1]] == [f"t{i}" for i in range(6)] and got[-1].text == "done"
        # 3 x 7 events; every delta of a request left together (a single final goes out alone)
        assert "reply_batch" in sent
        assert len(sent) <= 3 * 2, sent
    finally:
        await server.close()


async def _collect(agen) -> list:
    return [e async for e in agen]


async def test_requester_without_batch_header_gets_plain_replies(bus):
    """A requester that does not declare ``x-npcbus-batch-replies`` never receives a reply_batch."""
    topo = bus.topology
    server = Bus(bus.settings, name="server")
    await server.connect()
    spec = topo.gen_queue("plain")
    conn = await aio_pika.connect(bus.settings.amqp_url)
    try:
        async def handler(req, d):
            await asyncio.gather(*(server.reply(d, TokenDelta(req.request_id, i, "x"), coalesce=True)
                                   for i in range(4)))

        await server.consume(spec, handler)
        ch = await conn.channel()
        q = await ch.declare_queue(exclusive=True)
        await q.bind(topo.replies_exchange, q.name)  # the reply-queue contract: bound under its own name
        ex = await ch.get_exchange(topo.gen_exchange)
        await ex.publish(aio_pika.Message(encode(GenerationRequest("raw", "plain")), reply_to=q.name,
                                          correlation_id="c1", user_id="guest"), routing_key="plain")
        types = []
        async with q.iterator(timeout=10) as it:
            async for m in it:
                await m.ack()
                types.append(decode(m.body).TYPE)
                if len(types) == 4:
                    break
        assert types == ["token_delta"] * 4
    finally:
        await conn.close()
        await server.close()


async def test_coalesced_reply_to_a_gone_requester_raises_unroutable(bus):
    topo = bus.topology
    server = Bus(bus.settings, name="server")
    await server.connect()
    spec = topo.gen_queue("gone")
    errors: list = []
    done = asyncio.Event()
    try:
        async def handler(req, d):
            d.reply_to = f"{bus.settings.namespace}.reply.nobody-here"
            res = await asyncio.gather(*(server.reply(d, TokenDelta(req.request_id, i, "x"), coalesce=True)
                                         for i in range(3)), return_exceptions=True)
            errors.extend(res)
            done.set()

        await server.consume(spec, handler)
        await bus.publish(topo.gen_exchange, "gone", GenerationRequest("g", "gone"), reply_to="anything",
                          headers={H_BATCH_REPLIES: 1}, persistent=False)
        await asyncio.wait_for(done.wait(), 10)
        assert len(errors) == 3 and all(isinstance(e, Unroutable) for e in errors)
    finally:
        await server.close()


async def test_malformed_item_in_a_reply_batch_is_skipped(bus):
    topo = bus.topology
    server = Bus(bus.settings, name="server")
    await server.connect()
    spec = topo.gen_queue("badbatch")
    try:
        async def handler(req, d):
            batch = ReplyBatch([[d.correlation_id, b"garbage"], ["not", "a", "pair"],
                                [d.correlation_id, encode(FinalResponse(req.request_id, 0, "ok"))]])
            await server.publish(topo.replies_exchange, d.reply_to, batch, correlation_id=d.correlation_id,
                                 persistent=False)

        await server.consume(spec, handler)
        reply = await bus.request(topo.gen_exchange, "badbatch", GenerationRequest("b", "badbatch"), timeout=10)
        assert reply.TYPE == "final_response" and reply.text == "ok"
    finally:
        await server.close()


async def test_full_generation_queue_answers_overloaded_at_once(bus_settings):
    b = Bus(bus_settings)
    await b.connect()
    try:
        await b.declare_topology()
        topo = Topology(bus_settings.namespace, gen_max_length=3)
        b.topology = topo
        await b.declare_queue(topo.gen_queue("small"))
        for i in range(3):
            await b.publish(topo.gen_exchange, "small", GenerationRequest(f"r{i}", "small"))
        t0 = time.monotonic()
        with pytest.raises(Overloaded):
            await b.publish(topo.gen_exchange, "small", GenerationRequest("r-over", "small"))
        assert time.monotonic() - t0 < 2
    finally:
        await b.close()
        await delete_namespace(bus_settings, [Topology(bus_settings.namespace).gen_queue("small").name])


async def test_deferred_ack_settles_later(bus):
    topo = bus.topology
    held = []
    got = asyncio.Event()

    async def handler(msg, d):
        held.append(d)
        got.set()
        return Defer()

    await bus.consume(topo.deltas_queue, handler)
    await bus.publish(topo.train_exchange, "delta", Cancel("later"))
    await asyncio.wait_for(got.wait(), 10)
    assert await bus.settle(held[0], Ack())
