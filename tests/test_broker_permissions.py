"""Broker users per role (npcbus/broker_setup.py): each role's user can do what its service does, and
is refused another role's exchanges and queues, on the real local RabbitMQ (a vhost and users of
the test's own, deleted after). No role may configure an exchange (or a queue it does not consume),
yet every service starts against the definitions; what RabbitMQ checks on the default exchange,
and the training worker's defence against tasks put in its queue by a user not allowed to issue
them."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import aiormq
import pytest

from npcbus import broker_setup as bs
from npcbus.topology import Topology, model_route_key

from .broker_roles import applied_roles
from .conftest import broker_up, read_queue

NS = "npcbus"
T = Topology(NS)
GEN_Q = T.gen_queue(model_route_key("npcbus-default"))


def test_permission_regexes_follow_the_topology():
    p = bs.role_permissions(NS)
    # what each role publishes to
    assert p["gateway"].allows("write", T.gen_exchange) and p["gateway"].allows("write", T.experience_exchange)
    assert not p["gateway"].allows("write", T.train_exchange)
    assert not p["gateway"].allows("write", T.versions_exchange)
    assert not p["gateway"].allows("write", "amq.default")
    assert p["infer"].allows("write", T.events_exchange) and p["infer"].allows("write", T.replies_exchange)
    assert not p["infer"].allows("write", T.train_exchange) and not p["infer"].allows("write", T.gen_exchange)
    assert p["train"].allows("write", T.train_exchange) and not p["train"].allows("write", T.versions_exchange)
    assert not p["train"].allows("write", T.experience_exchange) and not p["train"].allows("write", "amq.default")
    assert p["aggregator"].allows("write", T.versions_exchange) and not p["aggregator"].allows("write", T.gen_exchange)
    # what each role consumes
    assert p["infer"].allows("read", GEN_Q.name) and not p["gateway"].allows("read", GEN_Q.name)
    assert p["train"].allows("read", T.tasks_queue.name) and not p["train"].allows("read", T.deltas_queue.name)
    assert p["aggregator"].allows("read", T.deltas_queue.name) and not p["aggregator"].allows("read", T.tasks_queue.name)
    assert p["aggregator"].allows("read", T.experience_queue.name) and not p["gateway"].allows("read", T.experience_queue.name)
    for role in bs.ROLES:
        # every consumer dead-letters through the bus; nobody but its own process reads a reply queue
        assert p[role].allows("write", T.dlx)
        assert not p[role].allows("read", T.dead_queue.name)
        # names of another namespace are out of reach
        assert not p[role].allows("configure", "other.train") and not p[role].allows("write", "other.gen")
    # the name of an exchange and the per-process queues bound to it stay apart
    assert p["gateway"].allows("read", T.name("events.abc")) and not p["gateway"].allows("configure", T.name("eventsX"))


def test_each_role_configures_only_what_it_owns():
    p = bs.role_permissions(NS)
    for role in bs.ROLES:
        # exchanges belong to the broker setup (the definitions), and so does the dead-letter queue
        for ex in [*T.exchanges(), "amq.default"]:
            name = getattr(ex, "name", ex)
            assert not p[role].allows("configure", name), (role, name)
        assert not p[role].allows("configure", T.dead_queue.name), role
    # a shared queue: configured by the one role that consumes it
    owner = {T.tasks_queue.name: "train", T.deltas_queue.name: "aggregator", T.leases_queue.name: "aggregator",
             T.experience_queue.name: "aggregator", T.fetch_queue.name: "aggregator", GEN_Q.name: "infer"}
    for queue, role in owner.items():
        assert [r for r in bs.ROLES if p[r].allows("configure", queue)] == [role], queue
    # ... and each its own per-process queues
    for role, kinds in (("gateway", ("reply", "events")), ("infer", ("reply", "cancel", "versions")),
                        ("train", ("reply", "versions"))):
        for kind in kinds:
            assert p[role].allows("configure", T.name(f"{kind}.abc123")), (role, kind)
    # nobody may publish to the default exchange (it routes into any queue by name); the roles that
    # reply publish to NS.replies, where only reply queues are bound
    assert [r for r in bs.ROLES if p[r].allows("write", "amq.default")] == []
    assert [r for r in bs.ROLES if p[r].allows("write", T.replies_exchange)] == ["infer", "aggregator"]
    # every requester may bind its own reply queue there
    for role in ("gateway", "infer", "train"):
        assert p[role].allows("read", T.replies_exchange) and p[role].allows("write", T.name("reply.abc123"))


def test_training_worker_accepts_tasks_only_from_allowed_senders(tmp_path):
    from npcbus.bus import Delivery
    from npcbus.settings import BusSettings, ModelSettings
    from workers.train_worker import TrainWorker, TrainWorkerSettings

    def delivery(user_id):
        return Delivery(queue=T.tasks_queue.name, exchange=T.train_exchange, routing_key="task", message_id="m1",
                        correlation_id=None, reply_to=None, user_id=user_id, headers={}, redelivered=False,
                        delivery_count=0, body_size=1)

    default = TrainWorkerSettings.from_env({}, cache_dir=str(tmp_path))
    # the aggregator role's user (aggregator, loop, task publish) and the single-user setup
    assert default.allowed_task_senders == ["npcbus-aggregator", "guest"]
    w = TrainWorker(default, BusSettings.from_env({}), ModelSettings.from_env({}))
    assert w.sender_refusal(delivery("npcbus-aggregator")) is None and w.sender_refusal(delivery("guest")) is None
    assert "ALLOWED_TASK_SENDERS" in w.sender_refusal(delivery("npcbus-infer"))
    assert "no broker-validated user id" in w.sender_refusal(delivery(None))
    anyone = TrainWorkerSettings.from_env({"ALLOWED_TASK_SENDERS": ""}, cache_dir=str(tmp_path))
    w = TrainWorker(anyone, BusSettings.from_env({}), ModelSettings.from_env({}))
    assert w.sender_refusal(delivery("npcbus-infer")) is None and w.sender_refusal(delivery(None)) is not None


def test_definitions_hash_passwords_and_declare_the_shared_queues():
    pw = {r: f"pw-{r}" for r in (*bs.ROLES, bs.ADMIN)}
    doc = bs.definitions(NS, "vh", pw, user_prefix="p-", base_model="")
    text = str(doc)
    assert all(f"pw-{r}" not in text for r in pw), "a password in clear"
    assert {u["name"] for u in doc["users"]} == {f"p-{r}" for r in (*bs.ROLES, bs.ADMIN)}
    assert {q["name"] for q in doc["queues"]} == {q.name for q in T.shared_queues()} | {GEN_Q.name}
    q = next(q for q in doc["queues"] if q["name"] == T.deltas_queue.name)
    assert q["arguments"] == T.deltas_queue.arguments
    pol = {p["name"]: p for p in doc["policies"]}
    assert pol[f"{NS}.work"]["definition"]["delivery-limit"] == T.delivery_limit
    assert pol[f"{NS}.gen"]["definition"]["max-length"] == T.gen_max_length
    with pytest.raises(bs.SettingsError, match="AMQP_PASSWORD_TRAIN"):
        bs.definitions(NS, "vh", {k: v for k, v in pw.items() if k != "train"})


async def _noop(_m, _d):
    return None


async def _refused(coro) -> str:
    try:
        await coro
    except (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelPreconditionFailed,
            aio_pika.exceptions.ChannelClosed) as e:
        return type(e).__name__
    raise AssertionError("the broker allowed it")


async def _publish(conn, exchange: str, rk: str, user: str, *, user_id: str | None = None):
    ch = await conn.channel(publisher_confirms=True)
    ex = ch.default_exchange if exchange == "" else await ch.get_exchange(exchange, ensure=False)
    await ex.publish(aio_pika.Message(b"x", user_id=user_id or user), routing_key=rk, mandatory=False)
    await ch.close()


async def _consume(conn, queue: str):
    ch = await conn.channel()
    q = await ch.get_queue(queue, ensure=False)
    async def noop(_m):
        return None

    tag = await q.consume(noop)
    await q.cancel(tag)
    await ch.close()


@pytest.mark.broker
@pytest.mark.skipif(not broker_up(), reason="needs the local RabbitMQ")
async def test_each_role_is_refused_another_roles_exchanges_and_queues():
    from npcbus.bus import Bus
    from npcbus.settings import BusSettings

    with applied_roles(NS) as roles:
        conns = {r: await aio_pika.connect(roles.url(r)) for r in bs.ROLES}
        try:
            # each role does what its service does, through the bus client
            for role, queues in (("aggregator", None), ("gateway", [T.experience_queue]), ("infer", [T.dead_queue]),
                                 ("train", [T.tasks_queue, T.deltas_queue, T.leases_queue])):
                bus = Bus(BusSettings.from_env({"AMQP_URL": roles.url(role), "NPCBUS_NAMESPACE": NS}), name=f"perm-{role}")
                await bus.connect()
                try:
                    await bus.declare_topology(queues=queues)
                    await bus.declare_topology()  # every exchange and shared queue: checked, not declared
                    if role in ("gateway", "infer", "train"):
                        await bus.reply_queue()
                    if role == "infer":
                        await bus.consume(GEN_Q, _noop)
                        for kind, ex in (("cancel", T.cancel_exchange), ("versions", T.versions_exchange)):
                            await bus.consume(T.listener_queue(kind, bus.client_id, ex), _noop)
                    if role == "gateway":
                        await bus.consume(T.listener_queue("events", bus.client_id, T.events_exchange),
                                          _noop, no_ack=True, exclusive=True)
                    if role == "train":
                        await bus.consume(T.listener_queue("versions", "train-" + bus.client_id, T.versions_exchange),
                                          _noop)
                finally:
                    await bus.close()
            u = roles.user
            # allowed: each role's own exchanges and queues
            await _publish(conns["gateway"], T.gen_exchange, GEN_Q.name.rsplit(".", 1)[-1], u("gateway"))
            await _publish(conns["gateway"], T.experience_exchange, "experience", u("gateway"))
            await _publish(conns["train"], T.train_exchange, "delta", u("train"))
            await _publish(conns["aggregator"], T.versions_exchange, "", u("aggregator"))
            await _publish(conns["infer"], T.events_exchange, "", u("infer"))
            await _consume(conns["infer"], GEN_Q.name)
            await _consume(conns["aggregator"], T.deltas_queue.name)
            await _consume(conns["train"], T.tasks_queue.name)
            # refused: another role's exchanges
            refusals = [
                _publish(conns["gateway"], T.train_exchange, "task", u("gateway")),
                _publish(conns["gateway"], T.versions_exchange, "", u("gateway")),
                _publish(conns["infer"], T.train_exchange, "delta", u("infer")),
                _publish(conns["infer"], T.gen_exchange, "x", u("infer")),
                _publish(conns["train"], T.versions_exchange, "", u("train")),
                _publish(conns["train"], T.gen_exchange, "x", u("train")),
                _publish(conns["train"], T.experience_exchange, "experience", u("train")),
                _publish(conns["aggregator"], T.gen_exchange, "x", u("aggregator")),
                _publish(conns["aggregator"], T.cancel_exchange, "", u("aggregator")),
                # ... and another role's queues
                _consume(conns["gateway"], T.tasks_queue.name),
                _consume(conns["gateway"], GEN_Q.name),
                _consume(conns["infer"], T.deltas_queue.name),
                _consume(conns["train"], T.experience_queue.name),
                _consume(conns["train"], T.deltas_queue.name),
                _consume(conns["aggregator"], GEN_Q.name),
                _consume(conns["aggregator"], T.tasks_queue.name),
                # a user id that is not the connection's own
                _publish(conns["train"], T.train_exchange, "delta", u("train"), user_id=u("aggregator")),
            ]
            for coro in refusals:
                assert await _refused(coro)
            # deleting a shared queue needs configure on it
            ch = await conns["gateway"].channel()
            assert await _refused(ch.queue_delete(T.deltas_queue.name))
            # a role user has no access to other vhosts
            with pytest.raises((aiormq.exceptions.AMQPError, ConnectionError)):
                await asyncio.wait_for(aio_pika.connect(roles.url("gateway").rsplit("/", 1)[0] + "/"), 10)
        finally:
            for c in conns.values():
                await c.close()


def _role_bus(roles, role: str, namespace: str = NS, name: str | None = None):
    from npcbus.bus import Bus
    from npcbus.settings import BusSettings

    return Bus(BusSettings.from_env({"AMQP_URL": roles.url(role), "NPCBUS_NAMESPACE": namespace}),
               name=name or f"perm-{role}")


@pytest.mark.broker
@pytest.mark.skipif(not broker_up(), reason="needs the local RabbitMQ")
async def test_each_role_is_refused_configure_on_exchanges_it_does_not_own():
    """No role may declare or delete an exchange, the dead-letter queue or a queue another role
    consumes; a passive declare (what services fall back to) needs no permission; a service whose
    names are missing says which and what to do."""
    from npcbus.bus import BusError

    owned = {"train": {T.tasks_queue.name}, "infer": set(),
             "aggregator": {T.deltas_queue.name, T.leases_queue.name, T.experience_queue.name, T.fetch_queue.name},
             "gateway": set()}
    with applied_roles(NS) as roles:
        conns = {r: await aio_pika.connect(roles.url(r)) for r in bs.ROLES}
        try:
            for role, conn in conns.items():
                for ex in T.exchanges():
                    ch = await conn.channel()
                    assert await _refused(ch.declare_exchange(ex.name, ex.type, durable=ex.durable)), (role, ex.name)
                    ch = await conn.channel()
                    assert await _refused(ch.exchange_delete(ex.name)), (role, ex.name)
                    ch = await conn.channel()
                    await ch.declare_exchange(ex.name, passive=True)  # it exists: checking is allowed
                    await ch.close()
                for q in T.shared_queues():
                    if q.name in owned[role]:
                        continue
                    ch = await conn.channel()
                    assert await _refused(ch.declare_queue(q.name, durable=q.durable, arguments=q.arguments)), \
                        (role, q.name)
                    ch = await conn.channel()
                    assert await _refused(ch.queue_delete(q.name)), (role, q.name)
                # nor may a role make a new exchange of its namespace
                ch = await conn.channel()
                assert await _refused(ch.declare_exchange(T.name("mine"), "fanout")), role
            # the exchanges and shared queues are all still there
            admin = await aio_pika.connect(roles.url(bs.ADMIN))
            try:
                ch = await admin.channel()
                for ex in T.exchanges():
                    await ch.declare_exchange(ex.name, passive=True)
                for q in T.shared_queues():
                    await ch.declare_queue(q.name, passive=True)
            finally:
                await admin.close()
            # without the definitions (here: a namespace they do not cover) a service stops and says why
            bus = _role_bus(roles, "train", namespace="other")
            await bus.connect()
            try:
                with pytest.raises(BusError, match=r"exchange 'other\.train' does not exist .*npcbus broker apply"):
                    await bus.declare_topology(queues=[])
            finally:
                await bus.close()
        finally:
            for c in conns.values():
                await c.close()


async def _dead_letters(url: str, n: int, timeout: float = 60.0) -> dict[str, tuple[str, str, str | None]]:
    from npcbus.codec import decode
    from npcbus.topology import H_REJECT_CODE, H_REJECT_REASON

    return {decode(m.body).task_id: (m.headers[H_REJECT_CODE], m.headers[H_REJECT_REASON], m.user_id)
            for m in await read_queue(url, T.dead_queue.name, n, timeout)}


@pytest.mark.broker
@pytest.mark.timeout(300)
@pytest.mark.skipif(not broker_up(), reason="needs the local RabbitMQ")
async def test_no_role_reaches_a_queue_by_name_and_the_worker_checks_who_issued_a_task(tmp_path):
    """RabbitMQ checks a publish to the default exchange against write on ``amq.default`` only, not
    against the queue it routes to, so no role may write there: replies go through ``NS.replies``,
    where only reply queues are bound. A role that may publish to ``NS.train`` (the training
    worker, for its lease messages) can still send a ``task`` there: the training worker
    dead-letters every task whose broker-validated sender is not in ALLOWED_TASK_SENDERS."""
    from npcbus.bus import Unroutable
    from npcbus.settings import ModelSettings
    from npcbus.tasks import build_tasks, publish_task_messages
    from workers.train_worker import TrainWorker, TrainWorkerSettings

    from .test_training_flow import _StubTrainer

    ex = [{"text": "hello there"}]
    with applied_roles(NS) as roles:
        u = roles.user
        # no role reaches a queue through the default exchange
        conns = {r: await aio_pika.connect(roles.url(r)) for r in bs.ROLES}
        try:
            for role, conn in conns.items():
                assert await _refused(_publish(conn, "", T.tasks_queue.name, u(role))), role
        finally:
            for c in conns.values():
                await c.close()
        forged_infer = build_tasks("npc", examples=ex, steps=1)[0]
        forged_train = build_tasks("npc", examples=ex, steps=1)[0]
        issued = build_tasks("npc", examples=ex, steps=1, deadline=time.time() - 1)[0]  # passes the check, expired
        buses = {r: _role_bus(roles, r) for r in ("infer", "train", "aggregator")}
        try:
            for b in buses.values():
                await b.connect()
            # the replies exchange routes to reply queues only: a task sent there by name goes nowhere
            with pytest.raises(Unroutable):
                await buses["infer"].publish(T.replies_exchange, T.tasks_queue.name, forged_infer)
            await buses["train"].publish(T.train_exchange, "task", forged_train)  # a worker issuing a task
            await publish_task_messages(buses["aggregator"], [issued])
        finally:
            for b in buses.values():
                await b.close()
        admin = await aio_pika.connect(roles.url(bs.ADMIN))
        try:
            ch = await admin.channel()
            q = await ch.declare_queue(T.tasks_queue.name, passive=True)
            assert q.declaration_result.message_count == 2
        finally:
            await admin.close()

        ws = TrainWorkerSettings.from_env({}, worker_id="perm-w", cache_dir=str(tmp_path / "cache"),
                                          allowed_task_senders=[u("aggregator")])
        worker = TrainWorker(ws, _role_bus(roles, "train").settings, ModelSettings.from_env({}),
                             trainer=_StubTrainer())
        await worker.start()  # as the train user: checks the exchanges and queues it may not declare
        try:
            dead = await _dead_letters(roles.url(bs.ADMIN), 2)
        finally:
            await worker.stop()
        assert set(dead) == {forged_train.task_id, issued.task_id}, dead
        code, reason, user_id = dead[forged_train.task_id]
        assert code == "unauthorized_sender" and user_id == u("train"), dead[forged_train.task_id]
        assert f"sender {u('train')!r} is not in ALLOWED_TASK_SENDERS" in reason
        assert dead[issued.task_id][0] == "expired"  # the aggregator's task got past the sender check
        assert worker.tasks_done == 0
