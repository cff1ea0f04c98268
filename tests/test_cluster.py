"""Several brokers: AMQP_URL lists, failover with every consumer restored, and a three-node RabbitMQ
cluster (``scripts/rabbitmq-cluster.sh``) whose work queues are quorum queues on all three nodes.

The unit tests need no broker; the failover tests use the local RabbitMQ behind two TCP proxies
(two "nodes" in front of one broker, so that one can die for good); the cluster tests start three
real ``rabbitmq-server`` nodes on this machine (ports 5681-5683) and kill them with ``kill -9``.
The fault test of the whole system on the cluster is in ``tests/test_cluster_faults.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from npcbus.settings import BusSettings, SettingsError, resolve_gen_queue_type
from npcbus.topology import Topology

from . import cluster_util
from .conftest import AMQP_URL, broker_up, delete_namespace
from .tcp_proxy import TCPProxy

# ------------------------------------------------------------------------------------------------
# settings and topology (no broker)
# ------------------------------------------------------------------------------------------------


def test_amqp_url_takes_a_list_of_nodes():
    s = BusSettings.from_env({"AMQP_URL": "amqp://u:p@h1:5672/v, amqp://u:p@h2:5673/v ,amqp://u:p@h3/v"})
    assert s.amqp_urls == ["amqp://u:p@h1:5672/v", "amqp://u:p@h2:5673/v", "amqp://u:p@h3/v"]
    assert BusSettings.from_env({"AMQP_URL": "amqp://u:p@h1/"}).amqp_urls == ["amqp://u:p@h1/"]
    # a failover must stay the same user (the broker checks every message's user id) in the same vhost
    with pytest.raises(SettingsError, match="AMQP_URL"):
        BusSettings.from_env({"AMQP_URL": "amqp://u:p@h1/v,amqp://other:p@h2/v"})
    with pytest.raises(SettingsError, match="AMQP_URL"):
        BusSettings.from_env({"AMQP_URL": "amqp://u:p@h1/v,amqp://u:p@h2/w"})
    with pytest.raises(SettingsError, match="AMQP_URL"):
        BusSettings.from_env({"AMQP_URL": "amqp://u:p@h1/v,http://h2/"})
    # the password never shows in the settings' summary
    assert ":p@" not in str(BusSettings.from_env({"AMQP_URL": "amqp://u:p@h1/,amqp://u:p@h2/"}).redacted())


def test_generation_queue_type_follows_the_broker_list():
    assert resolve_gen_queue_type("auto", "amqp://g:g@h1/") == "classic"
    assert resolve_gen_queue_type("auto", "amqp://g:g@h1/,amqp://g:g@h2/") == "quorum"
    assert resolve_gen_queue_type("classic", "amqp://g:g@h1/,amqp://g:g@h2/") == "classic"
    assert resolve_gen_queue_type("quorum", "amqp://g:g@h1/") == "quorum"
    with pytest.raises(SettingsError, match="GEN_QUEUE_TYPE"):
        BusSettings.from_env({"GEN_QUEUE_TYPE": "mirrored"})
    with pytest.raises(ValueError):
        Topology("ns", gen_queue_type="stream")


def test_every_work_queue_is_a_quorum_queue():
    t = Topology("ns", gen_queue_type="quorum")
    work = {q.name: q for q in (t.tasks_queue, t.deltas_queue, t.leases_queue, t.experience_queue, t.fetch_queue)}
    assert set(work) <= {q.name for q in t.shared_queues()}
    for q in work.values():
        assert q.durable and q.is_quorum, q
        assert q.arguments["x-delivery-limit"] == t.delivery_limit
        assert q.arguments["x-dead-letter-exchange"] == t.dlx
    gen = t.gen_queue("m")
    assert gen.is_quorum and gen.arguments["x-overflow"] == "reject-publish" and gen.arguments["x-delivery-limit"] > 0
    classic = Topology("ns").gen_queue("m")
    assert classic.arguments["x-queue-type"] == "classic" and "x-delivery-limit" not in classic.arguments
    assert classic.name == gen.name  # the same queue name; a deployment picks one type


def test_broker_definitions_declare_the_generation_queue_of_the_deployments_type():
    from npcbus import broker_setup as bs

    pw = {r: "x" for r in (*bs.ROLES, bs.ADMIN)}
    doc = bs.definitions("ns", "v", pw, base_model="", gen_queue_type="quorum")
    types = {q["name"]: q["arguments"]["x-queue-type"] for q in doc["queues"]}
    assert types["ns.gen.npcbus-default"] == "quorum"
    assert types["ns.fetch.requests"] == types["ns.train.tasks"] == "quorum"
    doc = bs.definitions("ns", "v", pw, base_model="")
    assert {q["name"]: q["arguments"]["x-queue-type"] for q in doc["queues"]}["ns.gen.npcbus-default"] == "classic"


# ------------------------------------------------------------------------------------------------
# failover between broker addresses (the local broker behind proxies)
# ------------------------------------------------------------------------------------------------

needs_broker = pytest.mark.skipif(not broker_up(), reason="needs the local RabbitMQ")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.broker
@needs_broker
async def test_a_dead_address_in_the_list_is_skipped(namespace):
    from npcbus.bus import Bus

    dead = f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"
    bus = Bus(BusSettings.from_env({"AMQP_URL": f"{dead},{AMQP_URL}", "NPCBUS_NAMESPACE": namespace}), name="t")
    await bus.connect(timeout=5)
    try:
        assert ":5672/" in bus.broker_url and "guest:guest" not in bus.broker_url
    finally:
        await bus.close()
    # none answers: a clear error naming every address tried
    only_dead = Bus(BusSettings.from_env({"AMQP_URL": f"{dead},{dead}", "NPCBUS_NAMESPACE": namespace}), name="t")
    with pytest.raises(ConnectionError, match="no broker answered"):
        await only_dead.connect(timeout=3)


@pytest.mark.broker
@needs_broker
@pytest.mark.timeout(120)
async def test_failover_to_the_next_address_restores_every_consumer(namespace):
    """Two addresses in front of one broker; the first dies for good (its proxy closes and refuses
    connections): the bus moves to the second and every consumer works again: a work queue, a
    per-process listener queue on a fanout exchange, and the reply queue of request/response."""
    from npcbus.bus import Ack, Bus, BusConnectionLost
    from npcbus.messages import Cancel, ConsumerHeartbeat

    a, b = await TCPProxy().start(), await TCPProxy().start()
    urls = f"amqp://guest:guest@127.0.0.1:{a.port}/,amqp://guest:guest@127.0.0.1:{b.port}/"
    settings = BusSettings.from_env({"AMQP_URL": urls, "NPCBUS_NAMESPACE": namespace})
    direct = BusSettings.from_env({"AMQP_URL": AMQP_URL, "NPCBUS_NAMESPACE": namespace})
    client, server = Bus(settings, name="client"), Bus(direct, name="server")
    await client.connect()
    await server.connect()
    await server.declare_topology()
    topo = client.topology
    tasks: set[str] = set()
    events: list[str] = []
    try:
        assert f":{a.port}/" in client.broker_url

        async def on_task(msg, _d):
            tasks.add(msg.request_id)
            return Ack()

        async def on_event(msg, _d):
            events.append(msg.worker_id)
            return Ack()

        async def answer(msg, d):
            await server.reply(d, Cancel("pong:" + msg.request_id))
            return Ack()

        await client.consume(topo.tasks_queue, on_task)
        await client.consume(topo.listener_queue("events", client.client_id, topo.events_exchange), on_event)
        rpc = Topology(namespace).gen_queue("ping")
        await server.consume(rpc, answer)
        assert (await client.request(topo.gen_exchange, "ping", Cancel("1"), timeout=10)).request_id == "pong:1"

        # a request waiting for replies when the connection goes ends at once, not at its deadline:
        # its reply queue went with the connection
        await server.declare_queue(Topology(namespace).gen_queue("silent"))
        waiting = asyncio.create_task(client.request(topo.gen_exchange, "silent", Cancel("w"), timeout=120))
        await asyncio.sleep(0.3)
        a.accepting = False  # the first address is gone for good
        a.cut()
        with pytest.raises(BusConnectionLost):
            await asyncio.wait_for(waiting, 10)
        await a.close()
        t0 = time.monotonic()
        await asyncio.wait_for(_until(lambda: client.connected and client.reconnects >= 1), 30)
        assert f":{b.port}/" in client.broker_url
        failover_s = time.monotonic() - t0
        assert failover_s < 15, failover_s

        await server.publish_many(topo.train_exchange, "task", [Cancel(f"t{i}") for i in range(20)])
        await server.publish(topo.events_exchange, "", ConsumerHeartbeat("after", "m", "e", 1, 0), persistent=False)
        reply = await client.request(topo.gen_exchange, "ping", Cancel("2"), timeout=15)
        assert reply.request_id == "pong:2"
        await asyncio.wait_for(_until(lambda: len(tasks) == 20 and "after" in events), 15)
        # and publishing from the failed-over bus still works (confirms on the new connection)
        await client.publish(topo.train_exchange, "task", Cancel("from-client"))
        await asyncio.wait_for(_until(lambda: "from-client" in tasks), 15)
    finally:
        await client.close()
        await server.close()
        await b.close()
        await delete_namespace(direct, [Topology(namespace).gen_queue(m).name for m in ("ping", "silent")])


async def _until(pred, interval: float = 0.05) -> None:
    while not pred():
        await asyncio.sleep(interval)


# ------------------------------------------------------------------------------------------------
# a real three-node cluster
# ------------------------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.timeout(300)
async def test_cluster_work_queues_are_quorum_queues_on_all_three_nodes(cluster, namespace):
    from npcbus.bus import Bus

    assert cluster.running() == sorted(cluster_util.node_name(n) for n in cluster_util.NODES)
    settings = BusSettings.from_env({"AMQP_URL": cluster.url_list(), "NPCBUS_NAMESPACE": namespace})
    assert settings.effective_gen_queue_type == "quorum"
    bus = Bus(settings, name="declare")
    await bus.connect()
    try:
        await bus.declare_topology()
        await bus.declare_queue(bus.topology.gen_queue("m"))
        queues = await asyncio.to_thread(cluster.queues)
        t = bus.topology
        for spec in (t.tasks_queue, t.deltas_queue, t.leases_queue, t.experience_queue, t.fetch_queue,
                     t.dead_queue, t.gen_queue("m")):
            q = queues[spec.name]
            assert q["type"] == "quorum", q
            assert sorted(q["members"]) == sorted(cluster_util.node_name(n) for n in cluster_util.NODES), q
    finally:
        await bus.close()
        await delete_namespace(BusSettings.from_env({"AMQP_URL": cluster.urls[0], "NPCBUS_NAMESPACE": namespace}),
                               [Topology(namespace).gen_queue("m").name])


@pytest.mark.broker
@pytest.mark.timeout(300)
async def test_broker_definitions_apply_to_the_cluster(cluster, monkeypatch):
    """`npcbus.broker_setup apply` against node 1 (RABBITMQ_NODENAME): every role's user logs in on
    every node, and the definitions' queues are quorum queues replicated on all three."""
    import aio_pika

    from npcbus import broker_setup as bs

    from .broker_roles import new_roles

    monkeypatch.setenv("RABBITMQ_NODENAME", cluster_util.node_name(1))
    roles = new_roles()
    try:
        roles.doc = bs.definitions(roles.namespace, roles.vhost, roles.passwords, user_prefix=roles.prefix,
                                   base_model="", gen_queue_type="quorum")
        await asyncio.to_thread(bs.apply, roles.doc)
        for n in cluster_util.NODES:
            for role in bs.ROLES:
                conn = await aio_pika.connect(
                    f"amqp://{roles.user(role)}:{roles.passwords[role]}@127.0.0.1:{cluster_util.port(n)}/{roles.vhost}")
                await conn.close()
        queues = await asyncio.to_thread(cluster.queues, roles.vhost)
        for q in roles.doc["queues"]:
            assert queues[q["name"]]["type"] == "quorum"
            assert len(queues[q["name"]]["members"]) == 3
    finally:
        await asyncio.to_thread(roles.remove)


@pytest.mark.broker
@pytest.mark.timeout(400)
async def test_kill9_of_a_node_loses_no_confirmed_message_and_every_consumer_comes_back(cluster, namespace):
    """Publishers and consumers spread over the three nodes; tasks (a work queue) and generation
    requests (request/stream through the quorum generation queue) flow; node after node is killed
    with kill -9 and started again: the worker's, the responder's, then the work queue's leader's.
    Every confirmed task is consumed, requests are answered, and each consumer that lost its node is
    consuming again from another one.

    The third kill found a RabbitMQ 3.10 behaviour: a publisher that failed over to another node
    while a quorum queue elected its new leader got nacks on that channel until the killed node was
    back (publishes were refused as "queue full" for as long as the node was down). The bus now
    tries a nacked message again on a new channel after a reconnect (npcbus.bus._publish_raw)."""
    from npcbus.bus import Ack, Bus
    from npcbus.messages import Cancel

    def bus(name: str, rotate: int) -> Bus:
        return Bus(BusSettings.from_env({"AMQP_URL": cluster.url_list(rotate=rotate), "NPCBUS_NAMESPACE": namespace,
                                         "AMQP_HEARTBEAT_S": "5"}), name=name)

    publisher, worker, responder, requester = bus("pub", 0), bus("worker", 1), bus("resp", 2), bus("req", 0)
    for b in (publisher, worker, responder, requester):
        await b.connect()
    await publisher.declare_topology()
    topo = publisher.topology
    confirmed: list[str] = []
    consumed: set[str] = set()
    answered: list[str] = []
    failed: list[str] = []
    stop = asyncio.Event()

    async def on_task(msg, _d):
        consumed.add(msg.request_id)
        return Ack()

    async def answer(msg, d):
        await responder.reply(d, Cancel("re:" + msg.request_id))
        return Ack()

    async def publish_loop():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                await publisher.publish(topo.train_exchange, "task", Cancel(f"t{i}"))
                confirmed.append(f"t{i}")
            except Exception:  # noqa: BLE001 - not confirmed: not counted
                pass
            await asyncio.sleep(0.01)

    async def request_loop():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = await requester.request(topo.gen_exchange, "m", Cancel(f"r{i}"), timeout=10)
                answered.append(r.request_id)
            except Exception as e:  # noqa: BLE001 - a failed request is retried by its client
                failed.append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.01)

    await worker.consume(topo.tasks_queue, on_task)
    await responder.consume(topo.gen_queue("m"), answer)
    loops = [asyncio.create_task(publish_loop()), asyncio.create_task(request_loop())]
    recoveries = []
    try:
        await asyncio.sleep(2)
        # kill the node of one consumer, then of the other, then the node that leads the work
        # queue (its consumers elsewhere keep their connection: the queue elects a new leader)
        for victim in ("worker", "responder", "leader"):
            if victim == "leader":
                queues = await asyncio.to_thread(cluster.queues)
                n = int(queues[topo.tasks_queue.name]["leader"].split("@")[0].removeprefix("npc"))
                victim_bus = worker if cluster_util.node_of_url(worker.broker_url) == n else None
            else:
                victim_bus = worker if victim == "worker" else responder
                n = cluster_util.node_of_url(victim_bus.broker_url)
            before = victim_bus.reconnects if victim_bus else 0
            t0 = await asyncio.to_thread(cluster.kill, n)
            if victim_bus is not None:
                await asyncio.wait_for(_until(lambda b=victim_bus, k=before: b.connected and b.reconnects > k), 60)
                assert cluster_util.node_of_url(victim_bus.broker_url) != n
            base_c, base_a = len(consumed), len(answered)
            try:
                await asyncio.wait_for(_until(lambda c=base_c, a=base_a: len(consumed) > c and len(answered) > a), 60)
            except TimeoutError:
                state = {b.name: (b.connected, b.broker_url, b.reconnects)
                         for b in (publisher, worker, responder, requester)}
                raise AssertionError(f"after killing node {n} ({victim}): tasks {base_c} -> {len(consumed)}, answered "
                                     f"{base_a} -> {len(answered)}; buses {state}; last failures {failed[-3:]}") from None
            recoveries.append(round(time.monotonic() - t0, 2))
            await asyncio.to_thread(cluster.restart, n)
            await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*loops)
        await asyncio.wait_for(_until(lambda: set(confirmed) <= consumed), 60)
        print(f"\ncluster kill -9: tasks confirmed {len(confirmed)}, consumed {len(consumed)}; requests answered "
              f"{len(answered)}, failed {len(failed)}; consumers back after {recoveries} s")
        assert len(answered) > 50 and len(confirmed) > 50
        # a request in flight on the killed node may time out (its client retries); most do not
        assert len(failed) <= 10, failed
    finally:
        stop.set()
        for t in loops:
            t.cancel()
        for t in loops:
            with contextlib.suppress(BaseException):
                await t
        for b in (publisher, worker, responder, requester):
            await b.close()
        for n in cluster_util.NODES:  # whatever happened, the cluster is whole again for the next test
            await asyncio.to_thread(cluster.restart, n)
        await delete_namespace(BusSettings.from_env({"AMQP_URL": cluster.urls[0], "NPCBUS_NAMESPACE": namespace}),
                               [Topology(namespace).gen_queue("m").name])
