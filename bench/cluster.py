"""The generation queue on a three-node RabbitMQ cluster: quorum against classic, same run.

    python -m bench.cluster [--quick] [--keep-cluster]

Starts the local cluster of ``scripts/rabbitmq-cluster.sh`` (or uses it where it runs), then times
request/reply round trips (``Bus.request``: an NPC generation request, one short final reply)
through a generation queue of each type, one call of each in turn on the same event loop: the
requester connected to node 1, the responder to node 2, the queue declared from node 3. Figure:
``cluster.gen_quorum_rtt_p50_ms`` against the classic queue's p50 (the baseline). What the
replication costs per request; README ("A RabbitMQ cluster") says why the cluster pays it. The
cluster is stopped at the end unless it was already running or ``--keep-cluster`` is given.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.common import figure, parser, percentile
from npcbus.bus import Ack, Bus
from npcbus.messages import FinalResponse, GenerationRequest
from npcbus.settings import BusSettings
from npcbus.topology import Topology

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq-cluster.sh"


def _cluster(*args: str) -> str:
    return subprocess.run([str(SCRIPT), *args], check=True, capture_output=True, text=True, timeout=300).stdout


def _running() -> bool:
    status = _cluster("status")
    return " up" in status and " down" not in status


async def _pair(urls: list[str], ns: str, qtype: str, model: str):
    """(requester, responder, queue spec) for one generation-queue type."""
    def bus(first: int, name: str) -> Bus:
        order = urls[first:] + urls[:first]
        return Bus(BusSettings.from_env({"AMQP_URL": ",".join(order), "NPCBUS_NAMESPACE": ns,
                                         "GEN_QUEUE_TYPE": qtype}), name=name)

    req, resp, admin = bus(0, f"req-{qtype}"), bus(1, f"resp-{qtype}"), bus(2, f"admin-{qtype}")
    for b in (req, resp, admin):
        await b.connect()
    await admin.declare_topology()
    spec = Topology(ns, gen_queue_type=qtype).gen_queue(model)
    await admin.declare_queue(spec)
    await admin.close()

    async def answer(msg, d):
        await resp.reply(d, FinalResponse(msg.request_id, 0, "Aye.", response={"dialogue": "Aye."}))
        return Ack()

    await resp.consume(spec, answer, prefetch=16)
    return req, resp, spec


async def run(n: int) -> None:
    urls = _cluster("urls").strip().split(",")
    ns = f"bench-cluster-{uuid.uuid4().hex[:8]}"
    pairs = {}
    for qtype, model in (("classic", "bench-classic"), ("quorum", "bench-quorum")):
        pairs[qtype] = (*await _pair(urls, ns, qtype, model), model)
    prompt = "You are Brenna, the innkeeper. " * 20
    rtt: dict[str, list[float]] = {"classic": [], "quorum": []}
    try:
        for i in range(n + 20):
            for qtype in ("classic", "quorum") if i % 2 == 0 else ("quorum", "classic"):
                req, _resp, _spec, model = pairs[qtype]
                msg = GenerationRequest(uuid.uuid4().hex, model, prompt=prompt, params={"max_new_tokens": 64})
                t0 = time.perf_counter()
                await req.request(req.topology.gen_exchange, model, msg, timeout=30)
                if i >= 20:  # warm-up
                    rtt[qtype].append((time.perf_counter() - t0) * 1000)
    finally:
        for req, resp, _spec, _m in pairs.values():
            await req.close()
            await resp.close()
        cleanup = Bus(BusSettings.from_env({"AMQP_URL": ",".join(urls), "NPCBUS_NAMESPACE": ns}), name="cleanup")
        await cleanup.connect()
        ch = await cleanup._conn.channel()
        for name in [q.name for q in Topology(ns).shared_queues()] + [p[2].name for p in pairs.values()]:
            try:
                await ch.queue_delete(name)
            except Exception:  # noqa: BLE001 - best effort
                ch = await cleanup._conn.channel()
        for ex in Topology(ns).exchanges():
            try:
                await ch.exchange_delete(ex.name)
            except Exception:  # noqa: BLE001
                ch = await cleanup._conn.channel()
        await cleanup.close()
    c50, q50 = percentile(rtt["classic"], 0.5), percentile(rtt["quorum"], 0.5)
    figure("cluster.gen_quorum_rtt_p50_ms", round(q50, 3), round(c50, 3), "report", n=n,
           quorum_p99_ms=round(percentile(rtt["quorum"], 0.99), 3),
           classic_p99_ms=round(percentile(rtt["classic"], 0.99), 3))


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--keep-cluster", action="store_true", help="leave the cluster running at the end")
    args = p.parse_args()
    try:
        was_running = _running()
    except (subprocess.SubprocessError, OSError):
        was_running = False
    try:
        _cluster("start")
    except (subprocess.SubprocessError, OSError) as e:
        print(f"SKIPPED: the local RabbitMQ cluster could not start: {e}", file=sys.stderr)
        return
    try:
        asyncio.run(run(100 if args.quick else 1000))
    finally:
        if not (was_running or args.keep_cluster):
            _cluster("stop")


if __name__ == "__main__":
    main()
