"""Broker topology: every exchange and queue name and its arguments, in one place.

Every name is ``<namespace>.<name>`` so that deployments and test runs can share one broker.
Declaring is idempotent: each service declares what it uses with exactly these arguments, or, where
its broker user may not (a role's user configures only what its role owns), checks that it exists;
the broker definitions (:mod:`npcbus.broker_setup`) declare the exchanges and shared queues.

==========================  ========  ==========================================================
exchange                    type      purpose
==========================  ========  ==========================================================
``NS.train``                direct    ``task`` -> ``NS.train.tasks``; ``delta`` -> ``NS.train.deltas``;
                                      ``accepted`` -> ``NS.train.leases``
``NS.versions``             fanout    version announcements; each listener binds its own queue
``NS.fetch``                direct    ``adapter`` -> ``NS.fetch.requests`` (adapter weight fetches, adapter lists)
``NS.gen``                  direct    ``<model id>`` -> ``NS.gen.<model id>`` (generation requests)
``NS.cancel``               fanout    cancel messages; every inference consumer listens
``NS.events``               fanout    consumer heartbeats (the gateway's health uses them)
``NS.experience``           direct    ``experience`` -> ``NS.experience.pending`` (finished turns, feedback)
``NS.dlx``                  topic     dead letters of every queue -> ``NS.dead``
==========================  ========  ==========================================================

Work that must not be lost (tasks, deltas, leases, experience, adapter fetches) sits in durable
quorum queues with a delivery limit and the dead-letter exchange; on a cluster they are replicated
on every node (RabbitMQ's default group size for a quorum queue is all of the cluster's members).

Generation requests sit in one queue per base model with a maximum length and ``reject-publish``
overflow, so that a full queue answers the publisher at once (a negative confirm) and the gateway
can say "overloaded", and a per-message expiry from the request's deadline. On one broker it is a
classic queue (the lowest latency; nothing to replicate to). On a cluster it is a quorum queue
(``GEN_QUEUE_TYPE``; ``auto`` picks quorum when ``AMQP_URL`` lists several nodes): a classic
queue lives on one node, and when that node dies its consumers are cancelled and every publish is
returned unroutable until the node is back (a durable one cannot even be declared again
elsewhere), so every turn in that window would fail; a quorum queue elects a new leader, keeps the
queued requests, and redelivers those whose consumer died. It costs about 1.3 ms more per request
(``python -m bench.cluster`` on this machine's three-node cluster: a round trip of 3.9 against
2.6 ms at the median), small beside a generation. Replies go through ``NS.replies`` to one exclusive queue per requesting process.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

DELIVERY_LIMIT = 5
GEN_QUEUE_MAX_LENGTH = 1000
GEN_QUEUE_TYPES = ("classic", "quorum")

RK_TASK = "task"
RK_DELTA = "delta"
RK_ACCEPTED = "accepted"
RK_FETCH = "adapter"
RK_EXPERIENCE = "experience"

# headers set by npcbus
H_REJECT_REASON = "x-npcbus-reject-reason"
H_REJECT_CODE = "x-npcbus-reject-code"
H_ORIGINAL_QUEUE = "x-npcbus-original-queue"
H_ORIGINAL_EXCHANGE = "x-npcbus-original-exchange"
H_ORIGINAL_ROUTING_KEY = "x-npcbus-original-routing-key"
H_MESSAGE_TYPE = "x-npcbus-type"
H_CHUNK_STREAM = "x-npcbus-chunk-stream"
H_DEADLINE = "x-npcbus-deadline"
H_BATCH_REPLIES = "x-npcbus-batch-replies"  # the requester unpacks reply_batch messages


def model_route_key(model: str) -> str:
    """A routing-key-safe id for a base model name or path.

    Readable when the name is simple; a short hash keeps different paths apart.
    """
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", model.strip("/").split("/")[-1])[:40].strip("-") or "model"
    if base == model:
        return base
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{base}-{digest}"


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str
    durable: bool = True


@dataclass(frozen=True)
class QueueSpec:
    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing key)

    @property
    def is_quorum(self) -> bool:
        return self.arguments.get("x-queue-type") == "quorum"


class Topology:
    """Names and arguments of every exchange and queue under one namespace."""

    def __init__(self, namespace: str, *, delivery_limit: int = DELIVERY_LIMIT,
                 gen_max_length: int = GEN_QUEUE_MAX_LENGTH, gen_queue_type: str = "classic"):
        if gen_queue_type not in GEN_QUEUE_TYPES:
            raise ValueError(f"gen_queue_type must be one of {GEN_QUEUE_TYPES}, not {gen_queue_type!r}")
        self.ns = namespace
        self.delivery_limit = delivery_limit
        self.gen_max_length = gen_max_length
        self.gen_queue_type = gen_queue_type

    def name(self, suffix: str) -> str:
        return f"{self.ns}.{suffix}"

    # exchanges -------------------------------------------------------------------------------
    @property
    def train_exchange(self) -> str:
        return self.name("train")

    @property
    def versions_exchange(self) -> str:
        return self.name("versions")

    @property
    def fetch_exchange(self) -> str:
        return self.name("fetch")

    @property
    def gen_exchange(self) -> str:
        return self.name("gen")

    @property
    def cancel_exchange(self) -> str:
        return self.name("cancel")

    @property
    def events_exchange(self) -> str:
        return self.name("events")

    @property
    def experience_exchange(self) -> str:
        return self.name("experience")

    @property
    def replies_exchange(self) -> str:
        """Replies: every reply queue is bound here under its own name. Responders publish replies
        here, never to the default exchange, which would let them route into any queue by name."""
        return self.name("replies")

    @property
    def dlx(self) -> str:
        return self.name("dlx")

    def exchanges(self) -> list[ExchangeSpec]:
        return [
            ExchangeSpec(self.train_exchange, "direct"),
            ExchangeSpec(self.versions_exchange, "fanout"),
            ExchangeSpec(self.fetch_exchange, "direct"),
            ExchangeSpec(self.gen_exchange, "direct"),
            ExchangeSpec(self.cancel_exchange, "fanout"),
            ExchangeSpec(self.events_exchange, "fanout"),
            ExchangeSpec(self.experience_exchange, "direct"),
            ExchangeSpec(self.replies_exchange, "direct"),
            ExchangeSpec(self.dlx, "topic"),
        ]

    # queues ----------------------------------------------------------------------------------
    def _quorum(self, suffix: str, bindings: tuple[tuple[str, str], ...]) -> QueueSpec:
        return QueueSpec(
            self.name(suffix),
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-exchange": self.dlx,
                "x-dead-letter-routing-key": suffix,
            },
            bindings=bindings,
        )

    @property
    def tasks_queue(self) -> QueueSpec:
        return self._quorum("train.tasks", ((self.train_exchange, RK_TASK),))

    @property
    def deltas_queue(self) -> QueueSpec:
        return self._quorum("train.deltas", ((self.train_exchange, RK_DELTA),))

    @property
    def leases_queue(self) -> QueueSpec:
        return self._quorum("train.leases", ((self.train_exchange, RK_ACCEPTED),))

    @property
    def experience_queue(self) -> QueueSpec:
        # not named like its exchange: RabbitMQ's permissions are regexes over names, and a queue
        # named like an exchange would share its configure/read rights
        return self._quorum("experience.pending", ((self.experience_exchange, RK_EXPERIENCE),))

    @property
    def fetch_queue(self) -> QueueSpec:
        # a quorum queue like the other work queues (it was the classic ``NS.fetch.adapter`` before
        # the cluster work; a queue's type cannot change, so the replicated one has a new name)
        return self._quorum("fetch.requests", ((self.fetch_exchange, RK_FETCH),))

    @property
    def dead_queue(self) -> QueueSpec:
        return QueueSpec(self.name("dead"), arguments={"x-queue-type": "quorum"}, bindings=((self.dlx, "#"),))

    def gen_queue(self, model_id: str) -> QueueSpec:
        """The generation requests of one base model: classic (one broker; the lowest latency) or
        quorum (a cluster: replicated, so that a node's loss loses no queued request and the
        consumers on the other nodes keep consuming). See :data:`GEN_QUEUE_TYPES`."""
        args: dict[str, Any] = {
            "x-queue-type": self.gen_queue_type,
            "x-max-length": self.gen_max_length,
            "x-overflow": "reject-publish",
            "x-dead-letter-exchange": self.dlx,
            "x-dead-letter-routing-key": f"gen.{model_id}",
        }
        if self.gen_queue_type == "quorum":
            # a request whose consumer died is delivered again (its stream restarts); a request
            # that kills consumers is dead-lettered after a few tries instead of going round forever
            args["x-delivery-limit"] = self.delivery_limit
        return QueueSpec(self.name(f"gen.{model_id}"), arguments=args, bindings=((self.gen_exchange, model_id),))

    def reply_queue(self, client_id: str) -> QueueSpec:
        """A process's exclusive reply queue, bound to ``NS.replies`` under its own name. The bus
        declares it again as ``<name>.<n>`` after each reconnect (see :meth:`npcbus.bus.Bus.reply_queue`)."""
        name = self.name(f"reply.{client_id}")
        return QueueSpec(name, durable=False, exclusive=True, auto_delete=True,
                         arguments={"x-queue-type": "classic"}, bindings=((self.replies_exchange, name),))

    def listener_queue(self, kind: str, client_id: str, exchange: str) -> QueueSpec:
        """An exclusive per-process queue bound to a fanout exchange (versions, cancel, events)."""
        return QueueSpec(self.name(f"{kind}.{client_id}"), durable=False, exclusive=True, auto_delete=True,
                         arguments={"x-queue-type": "classic"}, bindings=((exchange, ""),))

    def shared_queues(self) -> list[QueueSpec]:
        """Durable queues that exist independently of any process."""
        return [self.tasks_queue, self.deltas_queue, self.leases_queue, self.experience_queue,
                self.fetch_queue, self.dead_queue]
