"""Bus overhead against bare aio-pika, same broker, same run.

    python -m bench.bus [--quick]

1. Request/reply round trip: ``Bus.request`` (codec, headers, deadline/expiry, sequence handling)
   against a bare aio-pika RPC written here (exclusive callback queue, futures by correlation
   id, raw bytes), one call of each in turn on the same event loop. Goal: npcbus p50 at most
   1.3x the bare p50.
2. Confirmed publish throughput: ``Bus.publish_many`` (pipelined confirms) against bare aio-pika
   publishing the same bodies with all confirms in flight at once. Goal: at least 0.8x.

Runs against the RabbitMQ at ``AMQP_URL`` (default 127.0.0.1:5672) under a throwaway namespace.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import aio_pika

from bench.common import figure, parser, percentile
from npcbus.bus import Bus
from npcbus.codec import encode
from npcbus.messages import Cancel, FinalResponse, GenerationRequest
from npcbus.settings import BusSettings
from npcbus.topology import QueueSpec

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


class NpcbusRpc:
    """Requester and responder on two npcbus clients (two connections), one event loop."""

    async def start(self, ns: str) -> NpcbusRpc:
        settings = BusSettings.from_env({"AMQP_URL": URL, "NPCBUS_NAMESPACE": ns})
        self.server = await Bus(settings, name="bench-server").connect()
        self.client = await Bus(settings, name="bench-client").connect()
        await self.server.declare_topology(queues=[])
        spec = self.server.topology.gen_queue("bench")

        async def handler(req, d):
            await self.server.reply(d, FinalResponse(req.request_id, 0, "ok"))

        await self.server.consume(spec, handler, prefetch=10)
        await self.client.reply_queue()
        self.exchange = self.client.topology.gen_exchange
        self.n = 0
        return self

    async def call(self) -> float:
        self.n += 1
        req = GenerationRequest(f"r{self.n}", "bench", prompt="hello")
        t0 = time.perf_counter()
        await self.client.request(self.exchange, "bench", req, timeout=10)
        return time.perf_counter() - t0

    async def stop(self) -> None:
        await self.client.close()
        await self.server.close()


class BareRpc:
    """The same round trip in bare aio-pika: requester and responder on two connections, channels
    with aio-pika's defaults (publisher confirms on), exclusive callback queue, futures by
    correlation id, raw bytes."""

    async def start(self, ns: str, prefetch: int = 10) -> BareRpc:
        self.conn = await aio_pika.connect_robust(URL)
        self.cconn = await aio_pika.connect_robust(URL)
        sch = await self.conn.channel()
        await sch.set_qos(prefetch_count=prefetch)
        ex = await sch.declare_exchange(f"{ns}.bare", "direct", auto_delete=True)
        q = await sch.declare_queue(f"{ns}.bare.rpc", auto_delete=True)
        await q.bind(ex, "rpc")
        body = encode(FinalResponse("x", 0, "ok"))

        async def on_request(m: aio_pika.abc.AbstractIncomingMessage):
            await sch.default_exchange.publish(
                aio_pika.Message(body, correlation_id=m.correlation_id), routing_key=m.reply_to)
            await m.ack()

        await q.consume(on_request)
        cch = await self.cconn.channel()
        self.cq = await cch.declare_queue(exclusive=True)
        self.futures: dict[str, asyncio.Future] = {}

        async def on_reply(m: aio_pika.abc.AbstractIncomingMessage):
            f = self.futures.pop(m.correlation_id, None)
            if f:
                f.set_result(m.body)

        await self.cq.consume(on_reply, no_ack=True)
        self.cex = await cch.get_exchange(ex.name)
        self.req_body = encode(GenerationRequest("r", "bench", prompt="hello"))
        return self

    async def call(self) -> float:
        cid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self.futures[cid] = fut
        t0 = time.perf_counter()
        await self.cex.publish(aio_pika.Message(self.req_body, correlation_id=cid, reply_to=self.cq.name),
                               routing_key="rpc")
        await fut
        return time.perf_counter() - t0

    async def stop(self) -> None:
        await self.cconn.close()
        await self.conn.close()


async def rpc_latencies(ns: str, n: int) -> tuple[list[float], list[float]]:
    """Paired measurement: one npcbus call and one bare call in turn (the order alternating), so
    that machine noise falls on both sides alike."""
    ours, bare = await NpcbusRpc().start(ns), await BareRpc().start(ns)
    try:
        for _ in range(50):  # warm-up
            await ours.call()
            await bare.call()
        lo, lb = [], []
        for i in range(n):
            if i % 2:
                lo.append(await ours.call())
                lb.append(await bare.call())
            else:
                lb.append(await bare.call())
                lo.append(await ours.call())
        return lo, lb
    finally:
        await ours.stop()
        await bare.stop()


async def npcbus_throughput(ns: str, n: int) -> float:
    settings = BusSettings.from_env({"AMQP_URL": URL, "NPCBUS_NAMESPACE": ns})
    bus = await Bus(settings, name="bench-pub").connect()
    await bus.declare_topology(queues=[])
    spec = QueueSpec(f"{ns}.tp.npcbus", auto_delete=False, bindings=((bus.topology.train_exchange, "tp"),))
    await bus.declare_queue(spec)
    msgs = [Cancel(f"m{i}") for i in range(n)]
    t0 = time.perf_counter()
    await bus.publish_many(bus.topology.train_exchange, "tp", msgs)
    dt = time.perf_counter() - t0
    ch = await bus._conn.channel()
    await ch.queue_delete(spec.name)
    for ex in bus.topology.exchanges():
        await ch.exchange_delete(ex.name)
    await bus.close()
    return n / dt


async def bare_throughput(ns: str, n: int) -> float:
    conn = await aio_pika.connect(URL)
    ch = await conn.channel(publisher_confirms=True)
    ex = await ch.declare_exchange(f"{ns}.bare.tp", "direct", auto_delete=True)
    q = await ch.declare_queue(f"{ns}.tp.bare", durable=True)
    await q.bind(ex, "tp")
    bodies = [encode(Cancel(f"m{i}")) for i in range(n)]
    t0 = time.perf_counter()
    await asyncio.gather(*(ex.publish(aio_pika.Message(b, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                      routing_key="tp") for b in bodies))
    dt = time.perf_counter() - t0
    await q.delete(if_unused=False, if_empty=False)
    await conn.close()
    return n / dt


async def run(quick: bool) -> None:
    n_rpc = 200 if quick else 2000
    n_pub = 2000 if quick else 20000
    rounds = 2 if quick else 3
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    ours_lat: list[float] = []
    bare_lat: list[float] = []
    ours_tp: list[float] = []
    bare_tp: list[float] = []
    # interleave the two sides so that machine noise hits both alike
    for r in range(rounds):
        lo, lb = await rpc_latencies(f"{ns}-{r}", n_rpc // rounds)
        ours_lat += lo
        bare_lat += lb
        bare_tp.append(await bare_throughput(f"{ns}-{r}", n_pub // rounds))
        ours_tp.append(await npcbus_throughput(f"{ns}-{r}", n_pub // rounds))
    p50o, p50b = percentile(ours_lat, 0.5) * 1000, percentile(bare_lat, 0.5) * 1000
    print(f"# rpc p50: npcbus {p50o:.3f} ms, bare aio-pika {p50b:.3f} ms; "
          f"p99: {percentile(ours_lat, 0.99) * 1000:.3f} / {percentile(bare_lat, 0.99) * 1000:.3f} ms")
    tpo, tpb = max(ours_tp), max(bare_tp)
    print(f"# confirmed publish: npcbus {tpo:.0f} msg/s, bare aio-pika {tpb:.0f} msg/s")
    figure("bus.rpc_p50_ms", p50o, p50b, "<=1.3", unit="ms")
    figure("bus.confirmed_publish_per_s", tpo, tpb, ">=0.8", unit="msg/s")


def main() -> None:
    args = parser(__doc__).parse_args()
    asyncio.run(run(args.quick))


if __name__ == "__main__":
    main()
