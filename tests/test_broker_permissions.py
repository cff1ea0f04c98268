"""Broker users per role (npcbus/broker_setup.py): each role's user can do what its service does, and
is refused another role's exchanges and queues, on the real local RabbitMQ (a vhost and users of
the test's own, deleted after)."""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import pytest

from npcbus import broker_setup as bs
from npcbus.topology import Topology, model_route_key

from .broker_roles import applied_roles
from .conftest import broker_up

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
    assert p["infer"].allows("write", T.events_exchange) and p["infer"].allows("write", "amq.default")
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
