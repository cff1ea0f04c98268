"""The bus client: aio-pika with the house rules built in.

- A robust connection; consumers are kept referenced so that they are restored after a drop.
- Publisher confirms on a dedicated channel; many publishes may be in flight at once
  (:meth:`Bus.publish_many` pipelines them). Every message carries the connection's user id,
  which RabbitMQ validates: consumers can trust ``Delivery.user_id``.
- Manual acks. A handler returns an explicit outcome: :class:`Ack`, :class:`Reject` (the message
  is re-published to the dead-letter exchange with its reason in headers, then acked),
  :class:`Retry` (requeued; quorum queues count it against the delivery limit) or :class:`Defer`
  (the handler settles it later with :meth:`Bus.settle`). A message that fails to decode is
  dead-lettered with the codec's reason; it never crashes the consumer and is never retried.
- Payloads larger than ``chunk_bytes`` travel as numbered, hashed chunks that the consumer
  reassembles and verifies before the handler sees the message (see :mod:`npcbus.chunks`).
- Requests with streamed replies: :meth:`Bus.request_stream` publishes with a correlation id and
  reply-to queue (one exclusive queue per process) and yields replies in sequence order until a
  final event, failing with :class:`BusTimeout` at the deadline.
- Exclusive queues (the reply queue, per-process listener queues) belong to one connection: after
  a reconnect each is declared again under a new name (``<name>.<n>``) before the bus counts as
  connected, and a request never names a reply queue of a lost connection (see
  :meth:`Bus.reply_queue`). Declaring it again under its old name is not safe on a RabbitMQ 3.x
  cluster: each surviving node deletes the dead node's transient queues, and their bindings, by
  name, in its own time, and so can delete the queue just declared again under that name.
- Using the bus before :meth:`Bus.connect` raises :class:`BusNotConnected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, urlparse

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from npcbus import metrics
from npcbus.chunks import Assembler, split
from npcbus.codec import CodecError, decode, encode
from npcbus.logs import get_logger
from npcbus.messages import Chunk, Message, ReplyBatch, new_id
from npcbus.settings import BusSettings
from npcbus.topology import (
    H_BATCH_REPLIES,
    H_CHUNK_STREAM,
    H_DEADLINE,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_QUEUE,
    H_ORIGINAL_ROUTING_KEY,
    H_REJECT_CODE,
    H_REJECT_REASON,
    QueueSpec,
    Topology,
)

log = get_logger("npcbus.bus")

Properties = aiormq.spec.Basic.Properties
_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
_TRANSIENT = int(aio_pika.DeliveryMode.NOT_PERSISTENT)
OFFLOAD_BYTES = 1 << 20  # encode/decode/hash larger payloads in a thread
RECONNECT_GRACE_S = 15.0  # after a reconnect, a nack is retried on a new channel (see _publish_raw)


class BusError(RuntimeError):
    """Base class of bus errors."""


class BusNotConnected(BusError):
    """The bus was used before connect() or after close()."""


class BusConnectionLost(BusError):
    """The connection to the broker was lost while a request waited for its replies: the reply
    queue (exclusive to the connection) went with it, so the replies cannot all arrive. Retry.
    Also raised when a request needs a reply queue while the connection is down and it does not
    come back within the publish timeout."""


class _StaleReplyTo(BusConnectionLost):
    """A request was about to be published naming the reply queue of a lost connection (the
    connection went while the request was being published). It was not published; the request
    methods send it again with the reply queue of the new connection."""


_LOST = object()  # put into every waiting request's queue when the connection goes


class BusTimeout(BusError, TimeoutError):
    """A request's deadline passed before its reply stream ended."""


class Overloaded(BusError):
    """The broker refused a message: the target queue is full (reject-publish)."""


class Unroutable(BusError):
    """No queue is bound for the message's routing key."""


# ----------------------------------------------------------------------------------------------
# handler outcomes
# ----------------------------------------------------------------------------------------------


class Outcome:
    pass


@dataclass
class Ack(Outcome):
    pass


@dataclass
class Reject(Outcome):
    reason: str
    code: str = "rejected"


@dataclass
class Retry(Outcome):
    reason: str = ""


@dataclass
class Defer(Outcome):
    """The handler keeps the delivery and settles it later with :meth:`Bus.settle`."""


@dataclass
class Delivery:
    """What a handler knows about a delivery besides the decoded message."""

    queue: str
    exchange: str
    routing_key: str
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    user_id: str | None
    headers: dict
    redelivered: bool
    delivery_count: int
    body_size: int
    raw: list[AbstractIncomingMessage] = field(default_factory=list, repr=False)
    settled: bool = False

    @property
    def deadline(self) -> float | None:
        v = self.headers.get(H_DEADLINE)
        if isinstance(v, (bytes, str)):
            try:
                return float(v)
            except ValueError:
                return None
        return float(v) if isinstance(v, (int, float)) else None


Handler = Callable[[Message, Delivery], Awaitable[Outcome | None]]


def _delivery_count(msg: AbstractIncomingMessage) -> int:
    h = msg.headers or {}
    v = h.get("x-delivery-count")
    if isinstance(v, int):
        return v
    return 1 if msg.redelivered else 0


def _make_delivery(queue: str, msgs: list[AbstractIncomingMessage], size: int) -> Delivery:
    first = msgs[-1]
    mid = first.message_id
    if len(msgs) > 1 and mid and ":" in mid:
        mid = mid.rsplit(":", 1)[0]
    return Delivery(
        queue=queue,
        exchange=first.exchange or "",
        routing_key=first.routing_key or "",
        message_id=mid,
        correlation_id=first.correlation_id,
        reply_to=first.reply_to,
        user_id=first.user_id,
        headers=dict(first.headers or {}),
        redelivered=any(m.redelivered for m in msgs),
        delivery_count=max(_delivery_count(m) for m in msgs),
        body_size=size,
        raw=list(msgs),
    )


class Consumer:
    """A running consumer; keeps the queue referenced so the robust channel restores it.

    The consumer of an exclusive queue (``spec.exclusive``: the queue lives and dies with the
    connection) is not restored by aio-pika under its old name: the bus declares the queue again
    under a new name after each reconnect (:meth:`Bus._renew`); ``spec`` is then the current one
    and ``base_spec`` the one it was started with."""

    def __init__(self, bus: Bus, spec: QueueSpec, queue: AbstractQueue, channel, handler: Handler,
                 *, decode_messages: bool = True):
        self.bus = bus
        self.spec = spec
        self.base_spec = spec
        self.queue = queue
        self.channel = channel
        self.handler = handler
        self.tag: str | None = None
        self.epoch = bus._epoch  # the connection (counted by the bus) the queue was declared on
        self.prefetch = 0
        self.no_ack = False
        self.exclusive_consumer = False
        self.on_message: Callable[[AbstractIncomingMessage], Awaitable[None]] | None = None
        self.renew_lock = asyncio.Lock()
        self.assembler = Assembler(max_payload_bytes=bus.settings_max_payload, timeout_s=bus.chunk_timeout_s)
        self._sweeper: asyncio.Task | None = None
        self.inflight: set[asyncio.Task] = set()
        self.chunk_lock = asyncio.Lock()
        self.on_malformed: Callable[[Delivery, str], Awaitable[None]] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def per_connection(self) -> bool:
        """Whether the queue is exclusive to the connection (declared anew after a reconnect)."""
        return self.spec.exclusive

    async def pause(self) -> None:
        """Stop new deliveries but keep the channel, so deliveries in hand can still be settled."""
        if self.tag is not None:
            with contextlib.suppress(Exception):
                await self.queue.cancel(self.tag)
            self.tag = None

    async def cancel(self) -> None:
        """Stop consuming, close the channel and forget this consumer."""
        with contextlib.suppress(ValueError):
            self.bus._consumers.remove(self)
        if self._sweeper:
            self._sweeper.cancel()
        if self.tag is not None:
            with contextlib.suppress(Exception):
                await self.queue.cancel(self.tag)
            self.tag = None
        with contextlib.suppress(Exception):
            await self.channel.close()


class _ReplyCoalescer:
    """Replies to one requester queued in the same event-loop turn travel as one broker message.

    An inference consumer streams token deltas for many requests, most of them from the same
    gateway (one reply queue per requesting process); every broker message costs a socket write
    and a confirm, so the deltas that become ready together (one engine step, one batching tick)
    go out as one :class:`~npcbus.messages.ReplyBatch`. Batches are published in the order they
    were made, on the one confirming channel, without waiting for the confirm of the one before:
    the order of each stream holds because its sender awaits each reply (or sends several at once
    with :meth:`Bus.reply_many`, which puts them in one batch).
    """

    MAX_ITEMS = 512
    MAX_BYTES = 1 << 20

    def __init__(self, bus: Bus):
        self.bus = bus
        self._open: dict[str, list[tuple[str, bytes, str, asyncio.Future]]] = {}
        self._sending: set[asyncio.Task] = set()

    def add(self, reply_to: str, correlation_id: str, body: bytes, mtype: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        items = self._open.get(reply_to)
        if items is None:
            items = self._open[reply_to] = []
            loop.call_soon(self._flush, reply_to)
        items.append((correlation_id, body, mtype, fut))
        return fut

    def _flush(self, reply_to: str) -> None:
        items = self._open.pop(reply_to, None)
        if items:
            task = asyncio.get_running_loop().create_task(self._send(reply_to, items))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, reply_to: str, items: list) -> None:
        try:
            for group in _groups(items, self.MAX_ITEMS, self.MAX_BYTES):
                try:
                    if len(group) == 1:
                        cid, body, mtype, _ = group[0]
                        await self.bus.publish_bytes(self.bus.topology.replies_exchange, reply_to, body,
                                                     msg_type=mtype, persistent=False,
                                                     correlation_id=cid)
                    else:
                        await self.bus.publish(self.bus.topology.replies_exchange, reply_to,
                                               ReplyBatch([[cid, body] for cid, body, _, _ in group]),
                                               persistent=False)
                except Exception as e:  # noqa: BLE001 - every waiting sender gets the error
                    for *_, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for *_, fut in group:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            for *_, fut in items:  # cancelled (the bus is closing): nobody may wait forever
                if not fut.done():
                    fut.set_exception(BusNotConnected("the reply was not sent: the bus is closing"))


def _groups(items: list, max_items: int, max_bytes: int):
    group: list = []
    size = 0
    for it in items:
        if group and (len(group) >= max_items or size + len(it[1]) > max_bytes):
            yield group
            group, size = [], 0
        group.append(it)
        size += len(it[1])
    if group:
        yield group


class FailoverConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection over several broker URLs (the nodes of a cluster).

    aio-pika reconnects to the one URL it was given; when that node is gone for good, a service
    would wait for it forever. This connection moves on: the attempt after a lost connection, and
    after every failed attempt, goes to the next URL of the list (round robin). Everything else,
    restoring channels, queues and consumers on the new connection, is aio-pika's.

    The hook: aio-pika's reconnect loop clears ``transport`` right before each attempt and
    connects to ``self.url``; both are properties here. That is aio-pika's internal behaviour, which
    is why pyproject.toml pins aio-pika exactly: check this class (tests/test_cluster.py) when
    moving the pin. :func:`failover_connect` makes the first
    connection, trying each URL once.
    """

    def __init__(self, url, loop=None, *, urls: list[str] | None = None, start: int = 0, **kwargs):
        from yarl import URL

        self._urls = [URL(u) for u in (urls or [str(url)])]
        self._index = start % len(self._urls)
        self._advance = False  # the next attempt goes to the next URL
        self._transport = None
        self.failovers = 0
        super().__init__(url, loop=loop, **kwargs)

    @property
    def url(self):
        return self._urls[self._index]

    @url.setter
    def url(self, value) -> None:
        from yarl import URL

        self._urls[self._index] = URL(value)

    @property
    def transport(self):
        return self._transport

    @transport.setter
    def transport(self, value) -> None:
        if value is None and not getattr(self, "_close_called", True) \
                and not getattr(self, "_close_in_progress", False):
            # a connection attempt starts (the reconnect loop clears the transport first)
            if self._advance and len(self._urls) > 1:
                self._index = (self._index + 1) % len(self._urls)
                self.failovers += 1
            self._advance = True  # until this attempt succeeds
        self._transport = value

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._advance = False

    async def _on_connection_close(self, closing) -> None:
        self._advance = True
        await super()._on_connection_close(closing)


async def failover_connect(urls: list[str], *, timeout: float, **kwargs) -> FailoverConnection:
    """The first connection over ``urls``: each tried once, in order; the first that answers wins
    (the others are kept for failover). Raises the last error when none answers."""
    errors: list[str] = []
    for i, url in enumerate(urls):
        conn = FailoverConnection(url, urls=urls, start=i, **kwargs)
        try:
            await conn.connect(timeout=timeout)
            return conn
        except (ConnectionError, OSError, TimeoutError, aiormq.exceptions.AMQPError) as e:
            with contextlib.suppress(Exception):
                await conn.close()
            errors.append(f"{_mask(url)}: {type(e).__name__}: {e}")
            if i == len(urls) - 1:
                raise ConnectionError("no broker answered: " + "; ".join(errors)) from e
    raise ConnectionError("no broker URL given")


def _mask(url: str) -> str:
    from npcbus.settings import _mask_url_password

    return _mask_url_password(url)


class Bus:
    """An npcbus client on one robust connection (over the nodes of a cluster where AMQP_URL lists several)."""

    def __init__(self, settings: BusSettings | None = None, *, name: str = "npcbus",
                 client_id: str | None = None, max_payload_bytes: int = 1 << 30,
                 chunk_timeout_s: float = 120.0, publish_timeout_s: float = 30.0):
        self.settings = settings or BusSettings.from_env()
        self.topology = Topology(self.settings.namespace, gen_queue_type=self.settings.effective_gen_queue_type)
        self.name = name
        self.client_id = client_id or new_id()[:12]
        self.settings_max_payload = max_payload_bytes
        self.chunk_timeout_s = chunk_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None
        self._pub: aio_pika.abc.AbstractChannel | None = None
        self._pub_lock = asyncio.Lock()
        self._pub_refreshed = 0.0  # monotonic time of the last replacement of the publishing channel
        self._reconnected_at = float("-inf")
        self.publisher_refreshes = 0
        self._background: set[asyncio.Task] = set()
        self._consumers: list[Consumer] = []
        self._epoch = 0  # connections lost so far: exclusive queues of an older epoch are gone
        self._reply_consumer: Consumer | None = None
        self._retired_reply_queues: set[str] = set()  # reply queues of lost connections
        self._reply_lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Queue] = {}
        self._reply_assembler = Assembler(max_payload_bytes=max_payload_bytes, timeout_s=chunk_timeout_s)
        self.user = unquote(urlparse(self.settings.amqp_urls[0]).username or "guest")
        self._closed = False
        self.reconnects = 0
        self._connected_evt = asyncio.Event()
        self._seq = 0
        self._coalescer = _ReplyCoalescer(self)

    def _next_id(self) -> str:
        # unique per process without a syscall per message (uuid4 reads the OS entropy pool)
        self._seq += 1
        return f"{self.client_id}-{self._seq}"

    # connection ------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed and self._connected_evt.is_set()

    def _require(self) -> None:
        if self._conn is None or self._closed:
            raise BusNotConnected("the bus is not connected: call `await bus.connect()` first")

    async def connect(self, timeout: float = 30.0) -> Bus:
        if self._conn is not None:
            return self
        self._conn = await failover_connect(
            self.settings.amqp_urls, timeout=timeout, heartbeat=self.settings.heartbeat_s,
            reconnect_interval=self.settings.reconnect_s,
            client_properties={"connection_name": f"{self.name}:{self.client_id}"},
        )
        self._conn.reconnect_callbacks.add(self._on_reconnect)
        self._conn.close_callbacks.add(self._on_close)
        self._pub = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._connected_evt.set()
        metrics.BUS_CONNECTED.labels(self.name).set(1)
        log.info("bus connected", client=self.name, client_id=self.client_id, namespace=self.settings.namespace,
                 broker=self.broker_url)
        return self

    def _on_close(self, *_args) -> None:
        if not self._closed:
            self._connected_evt.clear()
            metrics.BUS_CONNECTED.labels(self.name).set(0)
            # every exclusive queue went with the connection; the reply queue's name must not be
            # named by any request from now on (_publish_raw refuses it)
            self._epoch += 1
            if self._reply_consumer is not None:
                self._retired_reply_queues.add(self._reply_consumer.name)
            # the reply queue is exclusive to the lost connection: replies sent meanwhile are gone,
            # so every request still waiting ends now (BusConnectionLost) instead of at its deadline
            for q in self._pending.values():
                q.put_nowait(_LOST)
            log.warning("bus connection lost; reconnecting", client=self.name, waiting_requests=len(self._pending))

    @property
    def broker_url(self) -> str:
        """The URL (password masked) of the broker node this bus is connected to now."""
        return _mask(str(self._conn.url)) if self._conn is not None else ""

    async def _on_reconnect(self, *_args) -> None:
        """aio-pika has restored the channels and the robust queues and consumers. The exclusive
        queues are declared again under new names (:meth:`_renew`) before the bus counts as
        connected, so that no request is published naming a reply queue that does not exist."""
        self.reconnects += 1
        self._reconnected_at = time.monotonic()
        # pieces held from the old channel can no longer be settled; the broker redelivers them
        for c in self._consumers:
            c.assembler.drop_tokens(lambda m: getattr(m, "channel", None) is None or m.channel.is_closed)
        epoch = self._epoch
        try:
            if not await self._renew_all():
                self._spawn(self._renew_later(epoch))
        finally:
            if not self._closed and self._epoch == epoch:
                self._connected_evt.set()
                metrics.BUS_CONNECTED.labels(self.name).set(1)
        log.info("bus reconnected", client=self.name, reconnects=self.reconnects, broker=self.broker_url,
                 reply_queue=self._reply_consumer.name if self._reply_consumer is not None else None)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _renew_all(self) -> bool:
        """Declare every exclusive queue of an older connection again on this one; False if one
        could not be (it is logged and tried again)."""
        ok = True
        for c in list(self._consumers):
            if not c.per_connection or c.epoch == self._epoch:
                continue
            try:
                await self._renew(c)
            except Exception as e:  # noqa: BLE001 - the others are renewed all the same
                ok = False
                log.warning("could not declare an exclusive queue on the new connection; will retry",
                            queue=c.base_spec.name, error=f"{type(e).__name__}: {e}")
        return ok

    async def _renew_later(self, epoch: int) -> None:
        """Retry :meth:`_renew_all` while the connection of ``epoch`` lasts."""
        while not self._closed and self._epoch == epoch:
            await asyncio.sleep(max(0.1, self.settings.reconnect_s))
            if self._closed or self._epoch != epoch or await self._renew_all():
                return

    async def _renew(self, c: Consumer) -> None:
        """Declare ``c``'s exclusive queue on the current connection under a name of its own
        (``<base name>.<epoch>``), bind and consume it, if it was declared on a lost connection.

        Its old name is never declared again: on a RabbitMQ 3.x cluster every surviving node
        deletes the dead node's transient queues (record and bindings) by name, each in its own
        time (``rabbit_amqqueue:on_node_down``), so a queue declared again under the old name on
        another node can lose its bindings moments later while its consumer lives on, and replies
        to it are returned unroutable with nothing to tell this process."""
        async with c.renew_lock:
            epoch = self._epoch
            if c.epoch == epoch or self._closed or self._conn is None:
                return
            old = c.spec
            base = c.base_spec
            name = f"{base.name}.{epoch}"
            spec = replace(base, name=name, bindings=tuple((ex, name if rk == base.name else rk)
                                                           for ex, rk in base.bindings))
            ch = c.channel
            if ch is None or ch.is_closed:
                ch = await self._conn.channel()
                await ch.set_qos(prefetch_count=c.prefetch)
            try:
                async with asyncio.timeout(self.publish_timeout_s):
                    q = await self._declare_queue(ch, spec, robust=False)
                    tag = None
                    if c.tag is not None and c.on_message is not None:  # not paused
                        tag = await q.consume(c.on_message, no_ack=c.no_ack, exclusive=c.exclusive_consumer,
                                              robust=False)
            except BaseException:
                if ch is not c.channel:
                    with contextlib.suppress(Exception):
                        await ch.close()
                raise
            if ch is not c.channel:
                with contextlib.suppress(Exception):
                    await c.channel.close()
            c.spec, c.queue, c.channel, c.tag, c.epoch = spec, q, ch, tag, epoch
            log.info("exclusive queue declared on the new connection", queue=spec.name, previous=old.name,
                     client=self.name)

    async def wait_connected(self, timeout: float | None = None) -> None:
        self._require()
        await asyncio.wait_for(self._connected_evt.wait(), timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        metrics.BUS_CONNECTED.labels(self.name).set(0)
        for t in list(self._background):
            t.cancel()
        for c in list(self._consumers):
            await c.cancel()
        self._consumers.clear()
        for q in self._pending.values():
            q.put_nowait(None)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None
        log.info("bus closed", client=self.name)

    async def __aenter__(self) -> Bus:
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # topology --------------------------------------------------------------------------------
    async def declare_topology(self, *, queues: Iterable[QueueSpec] | None = None) -> None:
        """Declare every exchange and the shared durable queues (idempotent).

        A role's broker user may configure only what its role owns (:mod:`npcbus.broker_setup`);
        the exchanges and shared queues come with the broker definitions. Where the broker refuses
        a declare for lack of configure permission, the name is checked instead (a passive
        declare, no bindings: the definitions hold them), and every later name is checked first
        and declared only when missing, so a role's user costs one refused declare per call. A
        name that is missing and may not be declared raises :class:`BusError`. A user allowed
        everything (guest: the single-user setup, the tests) declares everything, as before."""
        self._require()
        ch = await self._conn.channel()
        check_first = False

        async def fresh(old):  # a refused or failed declare closes its channel
            with contextlib.suppress(Exception):
                await old.close()
            return await self._conn.channel()

        async def one(kind: str, name: str, declare, check) -> None:
            nonlocal ch, check_first
            if check_first:
                try:
                    await check(ch)
                    return
                except aiormq.exceptions.ChannelNotFoundEntity:
                    ch = await fresh(ch)
            try:
                await declare(ch)
                return
            except aiormq.exceptions.ChannelAccessRefused:
                check_first = True
                ch = await fresh(ch)
            try:
                await check(ch)
            except aiormq.exceptions.ChannelNotFoundEntity as e:
                raise BusError(f"{kind} {name!r} does not exist and broker user {self.user!r} may not declare it: "
                               "apply the broker definitions first (npcbus broker apply)") from e

        try:
            for ex in self.topology.exchanges():
                await one("exchange", ex.name,
                          lambda c, ex=ex: c.declare_exchange(ex.name, ex.type, durable=ex.durable),
                          lambda c, ex=ex: c.declare_exchange(ex.name, passive=True))
            for q in self.topology.shared_queues() if queues is None else queues:
                await one("queue", q.name, lambda c, q=q: self._declare_queue(c, q),
                          lambda c, q=q: c.declare_queue(q.name, passive=True))
        finally:
            with contextlib.suppress(Exception):
                await ch.close()

    async def declare_queue(self, spec: QueueSpec) -> None:
        self._require()
        ch = await self._conn.channel()
        try:
            await self._declare_queue(ch, spec)
        finally:
            await ch.close()

    async def queue_consumers(self, name: str) -> int | None:
        """How many consumers the queue ``name`` has now (a passive declare: no permission needed,
        nothing changes); None when it does not exist."""
        self._require()
        ch = await self._conn.channel()
        try:
            q = await ch.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            with contextlib.suppress(Exception):
                await ch.close()
        return int(q.declaration_result.consumer_count)

    async def _declare_queue(self, ch, spec: QueueSpec, *, robust: bool = True) -> AbstractQueue:
        """Declare and bind ``spec`` on ``ch``; with ``robust`` (a robust channel) aio-pika declares
        and binds it again, under the same name, after a reconnect."""
        once = {} if robust else {"robust": False}  # only robust channels know the keyword
        q = await ch.declare_queue(spec.name, durable=spec.durable, exclusive=spec.exclusive,
                                   auto_delete=spec.auto_delete, arguments=spec.arguments, **once)
        for ex, rk in spec.bindings:
            await q.bind(ex, routing_key=rk, **once)
        return q

    # publishing ------------------------------------------------------------------------------
    async def _encode(self, msg: Message) -> bytes:
        if _may_be_large(type(msg)):
            return await asyncio.to_thread(encode, msg)
        return encode(msg)

    async def publish(self, exchange: str, routing_key: str, msg: Message, *, persistent: bool = True,
                      deadline: float | None = None, headers: dict | None = None,
                      correlation_id: str | None = None, reply_to: str | None = None,
                      message_id: str | None = None, mandatory: bool = True,
                      priority: int | None = None) -> None:
        """Encode and publish one message (chunked when large), waiting for the broker's confirm.

        ``deadline`` (unix time) becomes the message's expiration. Raises :class:`Overloaded` when
        the target queue refuses it, :class:`Unroutable` when no queue is bound.
        """
        self._require()
        body = await self._encode(msg)
        await self.publish_bytes(exchange, routing_key, body, msg_type=msg.TYPE, persistent=persistent,
                                 deadline=deadline, headers=headers, correlation_id=correlation_id,
                                 reply_to=reply_to, message_id=message_id, mandatory=mandatory, priority=priority)

    async def publish_bytes(self, exchange: str, routing_key: str, body: bytes, *, msg_type: str = "",
                            persistent: bool = True, deadline: float | None = None,
                            headers: dict | None = None, correlation_id: str | None = None,
                            reply_to: str | None = None, message_id: str | None = None,
                            mandatory: bool = True, priority: int | None = None) -> None:
        self._require()
        hdrs = dict(headers) if headers else {}
        expiration = None
        if deadline is not None:
            # as text: AMQP tables carry Python floats as 32-bit floats, which put a unix time up to a minute off
            hdrs[H_DEADLINE] = repr(float(deadline))
            remaining = deadline - time.time()
            if remaining <= 0:
                raise BusTimeout("deadline already passed; not published")
            expiration = str(max(1, int(remaining * 1000)))
        mode = _PERSISTENT if persistent else _TRANSIENT
        if len(body) <= self.settings.chunk_bytes:
            props = Properties(delivery_mode=mode, correlation_id=correlation_id, reply_to=reply_to,
                               user_id=self.user, expiration=expiration, priority=priority,
                               headers=hdrs or None, message_id=message_id or self._next_id())
            await self._publish_raw(exchange, routing_key, body, props, mandatory)
        else:
            chunks = await asyncio.to_thread(split, body, self.settings.chunk_bytes)
            sid = chunks[0].stream_id
            pieces = []
            for ch in chunks:
                h = dict(hdrs)
                h[H_CHUNK_STREAM] = sid
                props = Properties(delivery_mode=mode, correlation_id=correlation_id, reply_to=reply_to,
                                   user_id=self.user, expiration=expiration, priority=priority,
                                   headers=h, message_id=f"{message_id or sid}:{ch.index}")
                pieces.append((encode(ch), props))
            await asyncio.gather(*(self._publish_raw(exchange, routing_key, b, p, mandatory) for b, p in pieces))
        _published(msg_type or "raw").inc()

    async def _publish_raw(self, exchange: str, routing_key: str, body: bytes, props: Properties,
                           mandatory: bool) -> None:
        """Publish on the confirming channel and wait for the broker's confirm (retrying across a
        reconnect until ``publish_timeout_s``). Goes to aio-pika's AMQP layer (aiormq) directly:
        the message properties are built once, without an intermediate ``aio_pika.Message``."""
        deadline = time.monotonic() + self.publish_timeout_s
        delay = 0.05
        refreshed = False
        while True:
            if props.reply_to is not None and props.reply_to in self._retired_reply_queues:
                raise _StaleReplyTo(f"the reply queue {props.reply_to!r} went with the lost connection; "
                                    "the request was not published")
            try:
                if self._pub.is_closed:
                    raise aiormq.exceptions.ChannelInvalidStateError("the publishing channel is closed")
                ch = await self._pub.get_underlay_channel()
                await ch.basic_publish(body, exchange=exchange, routing_key=routing_key, properties=props,
                                               mandatory=mandatory, timeout=self.publish_timeout_s)
                return
            except aiormq.exceptions.PublishError as e:
                raise Unroutable(f"no queue bound for {exchange!r}/{routing_key!r}") from e
            except aiormq.exceptions.DeliveryError as e:
                # a nack: the queue is full (reject-publish), or, on a cluster, the publishing
                # channel went stale in a quorum queue's leader change (RabbitMQ 3.10: a channel
                # that publishes while the leader is being elected gets nacks from then on, until
                # the old leader's node is back; a new channel does not; such a channel exists only
                # after a reconnect). So a nack is tried again on a new channel: in the first
                # seconds after a reconnect until the publish timeout, a new channel a second; else
                # once (then the nack is the queue's answer: "overloaded", at once).
                keep_trying = time.monotonic() - self._reconnected_at < RECONNECT_GRACE_S
                if not self._closed and (not refreshed or (keep_trying and time.monotonic() < deadline)):
                    refreshed = True
                    await self._refresh_publisher()
                    if keep_trying:
                        await asyncio.sleep(0.2)
                    continue
                raise Overloaded(f"broker refused the message for {exchange!r}/{routing_key!r} (queue full)") from e
            except aiormq.exceptions.ChannelNotFoundEntity as e:
                raise Unroutable(f"exchange {exchange!r} does not exist") from e
            except (TimeoutError, aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError, RuntimeError) as e:
                if self._closed or time.monotonic() > deadline:
                    raise BusError(f"publish failed: {type(e).__name__}: {e}") from e
                log.warning("publish failed; retrying after reconnect", error=f"{type(e).__name__}: {e}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._connected_evt.wait(), max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                if self._pub is None or self._pub.is_closed:
                    with contextlib.suppress(Exception):
                        await self._pub.reopen()

    async def _refresh_publisher(self) -> None:
        """Replace the publishing channel with a new one (at most once a second; a publish that
        finds it refreshed less than a second ago retries on that one). The old channel is closed
        later, once the confirms it still awaits have come."""
        async with self._pub_lock:
            now = time.monotonic()
            if now - self._pub_refreshed < 1.0 or self._conn is None or self._closed:
                return
            self._pub_refreshed = now
            try:
                new = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
            except Exception as e:  # noqa: BLE001 - keep the old one; the retry will tell
                log.warning("could not open a new publishing channel", error=f"{type(e).__name__}: {e}")
                return
            old, self._pub = self._pub, new
            self.publisher_refreshes += 1
            log.info("publishing channel replaced after a nack", refreshes=self.publisher_refreshes)

        async def close_later(ch) -> None:
            await asyncio.sleep(self.publish_timeout_s + 1)
            with contextlib.suppress(Exception):
                await ch.close()

        task = asyncio.get_running_loop().create_task(close_later(old))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def publish_many(self, exchange: str, routing_key: str, msgs: Iterable[Message], **kw) -> None:
        """Publish several messages with pipelined confirms (all in flight, then all awaited)."""
        await asyncio.gather(*(self.publish(exchange, routing_key, m, **kw) for m in msgs))

    # consuming -------------------------------------------------------------------------------
    async def consume(self, spec: QueueSpec, handler: Handler, *, prefetch: int | None = None,
                      no_ack: bool = False, declare: bool = True, exclusive: bool = False,
                      on_malformed: Callable[[Delivery, str], Awaitable[None]] | None = None) -> Consumer:
        """Consume ``spec`` (declared first unless ``declare`` is false) with ``handler``.

        A message that does not decode never reaches ``handler``: it is dead-lettered with the
        reason, after ``on_malformed(delivery, reason)`` is awaited (e.g. to answer the requester
        named by its reply-to and correlation id; its errors are logged, never raised).

        Each consumer has its own channel so prefetch is per consumer. A consumer that may receive
        chunked payloads needs a prefetch above the number of pieces of its largest payload.
        """
        self._require()
        ch = await self._conn.channel()
        await ch.set_qos(prefetch_count=prefetch or self.settings.prefetch)
        # an exclusive queue goes with the connection: after a reconnect the bus declares it again
        # under a new name (_renew), so aio-pika must not restore it under this one
        robust = not spec.exclusive
        if declare:
            q = await self._declare_queue(ch, spec, robust=robust)
        else:
            q = await ch.get_queue(spec.name, ensure=True)
        c = Consumer(self, spec, q, ch, handler)
        c.on_malformed = on_malformed
        c.prefetch = prefetch or self.settings.prefetch
        c.no_ack = no_ack
        c.exclusive_consumer = exclusive

        async def on_message(m: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            c.inflight.add(task)
            try:
                await self._dispatch(c, m, no_ack)
            finally:
                c.inflight.discard(task)

        c.on_message = on_message
        c.tag = await q.consume(on_message, no_ack=no_ack, exclusive=exclusive, robust=robust)
        c._sweeper = asyncio.create_task(self._sweep(c))
        self._consumers.append(c)
        log.info("consuming", queue=spec.name, prefetch=prefetch or self.settings.prefetch)
        return c

    async def _sweep(self, c: Consumer) -> None:
        while True:
            await asyncio.sleep(min(5.0, c.assembler.timeout_s / 4))
            for res in c.assembler.expire():
                log.warning("chunked payload incomplete; dead-lettering its pieces", queue=c.name,
                            stream=res.stream_id, reason=res.reason)
                await self._reject_raw(c.name, res.tokens, res.reason, "chunk_missing")

    async def _dispatch(self, c: Consumer, m: AbstractIncomingMessage, no_ack: bool) -> None:
        body = m.body
        hdrs = m.headers or {}
        if H_CHUNK_STREAM in hdrs:
            try:
                chunk = decode(body)
                if not isinstance(chunk, Chunk):
                    raise CodecError(f"expected a chunk, got {chunk.TYPE}")
            except CodecError as e:
                await self._reject_raw(c.name, [m], f"malformed chunk: {e}", "malformed")
                return
            async with c.chunk_lock:
                res = await asyncio.to_thread(c.assembler.add, chunk, m)
            if res.status == "partial":
                return
            if res.status == "duplicate":
                if res.replaced is not None and not no_ack:
                    with contextlib.suppress(Exception):
                        await res.replaced.ack()
                return
            if res.status == "corrupt":
                log.warning("corrupt chunked payload; dead-lettering", queue=c.name, stream=res.stream_id,
                            reason=res.reason)
                metrics.CONSUMED.labels("chunk", "corrupt").inc()
                await self._reject_raw(c.name, res.tokens, res.reason, "chunk_corrupt")
                return
            payload = res.payload
            raws = res.tokens
        else:
            payload = body
            raws = [m]
        delivery = _make_delivery(c.name, raws, len(payload))
        try:
            msg = await asyncio.to_thread(decode, payload) if len(payload) > OFFLOAD_BYTES else decode(payload)
        except CodecError as e:
            log.warning("malformed message; dead-lettering", queue=c.name, message_id=delivery.message_id,
                        reason=str(e))
            metrics.CONSUMED.labels("unknown", "malformed").inc()
            if c.on_malformed is not None:
                try:
                    await c.on_malformed(delivery, f"malformed message: {e}")
                except Exception as he:  # noqa: BLE001 - the message is dead-lettered all the same
                    log.warning("on_malformed hook failed", queue=c.name, error=f"{type(he).__name__}: {he}")
            if not no_ack:
                await self.settle(delivery, Reject(f"malformed message: {e}", "malformed"))
            return
        started = time.perf_counter()
        try:
            outcome = await c.handler(msg, delivery)
        except asyncio.CancelledError:
            if not no_ack and not delivery.settled:
                await self.settle(delivery, Retry("consumer cancelled"))
            raise
        except CodecError as e:
            outcome = Reject(f"invalid message: {e}", "invalid")
        except Exception as e:  # noqa: BLE001 - a handler bug must not kill the consumer
            log.exception("handler failed", queue=c.name, message_id=delivery.message_id, type=msg.TYPE)
            outcome = Retry(f"{type(e).__name__}: {e}") if c.spec.is_quorum else Reject(
                f"handler error: {type(e).__name__}: {e}", "handler_error")
        if not no_ack:
            _handler_seconds(c.name).observe(time.perf_counter() - started)
        if outcome is None:
            outcome = Ack()
        _consumed(msg.TYPE, type(outcome).__name__.lower()).inc()
        if not no_ack and not isinstance(outcome, Defer):
            await self.settle(delivery, outcome)

    async def settle(self, delivery: Delivery, outcome: Outcome) -> bool:
        """Apply an outcome to a delivery (all its pieces). Returns False when the delivery's
        channel is gone (the broker redelivers the message)."""
        if delivery.settled:
            return True
        delivery.settled = True
        try:
            if isinstance(outcome, Ack):
                for r in delivery.raw:
                    await r.ack()
            elif isinstance(outcome, Retry):
                for r in delivery.raw:
                    await r.nack(requeue=True)
            elif isinstance(outcome, Reject):
                await self._reject_raw(delivery.queue, delivery.raw, outcome.reason, outcome.code)
            return True
        except (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError, RuntimeError) as e:
            log.warning("could not settle a delivery; the broker will redeliver it", queue=delivery.queue,
                        message_id=delivery.message_id, error=f"{type(e).__name__}: {e}")
            return False

    async def _reject_raw(self, queue: str, raws: list[AbstractIncomingMessage], reason: str, code: str) -> None:
        """Dead-letter ``raws`` with the reason in headers (publish to the DLX, then ack)."""
        metrics.DEAD_LETTERED.labels(queue, code).inc()
        suffix = queue[len(self.settings.namespace) + 1:] if queue.startswith(self.settings.namespace + ".") else queue
        try:
            for r in raws:
                h = dict(r.headers or {})
                h.update({H_REJECT_REASON: reason[:1000], H_REJECT_CODE: code, H_ORIGINAL_QUEUE: queue,
                          H_ORIGINAL_EXCHANGE: r.exchange or "", H_ORIGINAL_ROUTING_KEY: r.routing_key or ""})
                props = Properties(headers=h, message_id=r.message_id, correlation_id=r.correlation_id,
                                   delivery_mode=_PERSISTENT, user_id=self.user)
                await self._publish_raw(self.topology.dlx, suffix, r.body, props, mandatory=False)
            for r in raws:
                with contextlib.suppress(Exception):
                    await r.ack()
        except Exception as e:  # noqa: BLE001 - never lose it: let the broker redeliver instead
            log.error("dead-lettering failed; requeueing", queue=queue, error=f"{type(e).__name__}: {e}")
            for r in raws:
                with contextlib.suppress(Exception):
                    await r.nack(requeue=True)

    # replies and request/stream --------------------------------------------------------------
    async def reply_queue(self) -> str:
        """The name of this process's exclusive reply queue on the current connection (declared
        and consumed on first use).

        The queue goes with its connection; after a reconnect it is declared again under a new name
        (``NS.reply.<client id>.<n>``). The name returned is that of a queue declared, bound and
        consumed on the current connection: when the connection is down, this waits for the
        reconnect (up to the publish timeout; then :class:`BusConnectionLost`)."""
        self._require()
        async with self._reply_lock:
            c = self._reply_consumer
            if c is None:
                spec = self.topology.reply_queue(self.client_id)
                c = self._reply_consumer = await self.consume(spec, self._on_reply, prefetch=1000, no_ack=True,
                                                              exclusive=True)
        if c.epoch != self._epoch:
            await self._current(c)
        return c.name

    async def _current(self, c: Consumer) -> None:
        """Make sure ``c``'s exclusive queue is declared on the current connection, waiting for a
        reconnect (up to the publish timeout) where the connection is down."""
        deadline = time.monotonic() + self.publish_timeout_s
        while c.epoch != self._epoch:
            if self._closed:
                raise BusNotConnected("the bus was closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusConnectionLost(f"the broker connection is lost and did not come back within "
                                        f"{self.publish_timeout_s:g} s: no reply queue to name")
            if not self._connected_evt.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._connected_evt.wait(), remaining)
                continue
            epoch = self._epoch
            try:
                await self._renew(c)
            except Exception as e:  # noqa: BLE001 - a lost connection is waited for; else a clear error
                if self._epoch == epoch and not self._closed:
                    raise BusError(f"could not declare the reply queue on the new connection: "
                                   f"{type(e).__name__}: {e}") from e

    async def _publish_request(self, exchange: str, routing_key: str, msg: Message, cid: str, *,
                               persistent: bool, deadline: float | None) -> asyncio.Queue:
        """Publish a request naming this process's current reply queue; returns the queue its
        replies are put in (registered before the publish, so no reply can come first).

        A request caught by a lost connection while it was being published is not published
        afterwards naming the old connection's reply queue (its replies could not arrive): it is
        sent again naming the new connection's one (a few times at most, within the deadline)."""
        for attempt in range(3):
            reply_to = await self.reply_queue()
            q: asyncio.Queue = asyncio.Queue()
            self._pending[cid] = q
            try:
                await self.publish(exchange, routing_key, msg, persistent=persistent, deadline=deadline,
                                   correlation_id=cid, reply_to=reply_to, headers=_BATCH_OK)
                return q
            except _StaleReplyTo:
                if attempt == 2:
                    raise
                log.info("request caught by a reconnect; sending it again with the new reply queue",
                         correlation_id=cid, stale_reply_to=reply_to)
        raise AssertionError("unreachable")

    async def _on_reply(self, msg: Message, d: Delivery) -> Outcome:
        if type(msg) is ReplyBatch:
            for item in msg.items:
                try:
                    cid, frame = item
                    inner = decode(frame)
                    if type(inner) is ReplyBatch:
                        raise ValueError("nested reply batch")
                except (CodecError, TypeError, ValueError) as e:
                    log.warning("malformed item in a reply batch; skipped", message_id=d.message_id,
                                error=f"{type(e).__name__}: {e}")
                    continue
                q = self._pending.get(cid) if isinstance(cid, str) else None
                if q is not None:
                    q.put_nowait(inner)
            return Ack()
        cid = d.correlation_id
        q = self._pending.get(cid or "")
        if q is not None:
            q.put_nowait(msg)
        return Ack()

    async def reply(self, delivery: Delivery, msg: Message, *, mandatory: bool = True,
                    coalesce: bool = False) -> None:
        """Send ``msg`` to the requester of ``delivery``: through ``NS.replies`` with the request's
        reply-to queue name as routing key (reply queues are bound there under their own name),
        with the request's correlation id.

        With ``coalesce``, and when the requester accepts batched replies (its request carried the
        ``x-npcbus-batch-replies`` header), replies to the same requester that are sent in the
        same event-loop turn travel as one :class:`~npcbus.messages.ReplyBatch` message; the call
        returns once that message is confirmed. Raises :class:`Unroutable` when the requester's
        queue is gone."""
        if not delivery.reply_to:
            raise Unroutable("the request has no reply-to queue")
        if coalesce and mandatory and delivery.headers.get(H_BATCH_REPLIES):
            body = encode(msg)
            if len(body) <= self.settings.chunk_bytes:
                await self._coalescer.add(delivery.reply_to, delivery.correlation_id or "", body, msg.TYPE)
                return
        await self.publish(self.topology.replies_exchange, delivery.reply_to, msg, persistent=False,
                           correlation_id=delivery.correlation_id,
                           mandatory=mandatory)

    async def reply_many(self, delivery: Delivery, msgs: list[Message], *, coalesce: bool = True) -> None:
        """Send several replies in order; with ``coalesce`` (and a requester that accepts batched
        replies) they leave as one message, awaiting one confirm instead of one per reply."""
        if coalesce and delivery.reply_to and delivery.headers.get(H_BATCH_REPLIES):
            await asyncio.gather(*(self.reply(delivery, m, coalesce=True) for m in msgs))
            return
        for m in msgs:
            await self.reply(delivery, m)

    async def request_stream(self, exchange: str, routing_key: str, msg: Message, *,
                             deadline: float | None = None, timeout: float | None = 30.0,
                             is_final: Callable[[Message], bool] | None = None,
                             correlation_id: str | None = None, persistent: bool = False,
                             ) -> AsyncIterator[Message]:
        """Publish a request and yield its replies in sequence order until a final one.

        Replies carrying a ``seq`` field are re-ordered by it; ``is_final`` (default: any reply
        without a ``seq`` field, or of type final_response/generation_error) ends the stream.
        """
        if deadline is None and timeout is not None:
            deadline = time.time() + timeout
        cid = correlation_id or self._next_id()
        final = is_final or _default_final
        try:
            q = await self._publish_request(exchange, routing_key, msg, cid, persistent=persistent,
                                            deadline=deadline)
            expected = 0
            held: dict[int, Message] = {}
            while True:
                remaining = None if deadline is None else deadline - time.time()
                if remaining is not None and remaining <= 0:
                    raise BusTimeout(f"no complete reply before the deadline (correlation id {cid})")
                if not q.empty():
                    item = q.get_nowait()
                else:
                    try:
                        async with asyncio.timeout(remaining):
                            item = await q.get()
                    except TimeoutError:
                        raise BusTimeout(f"no complete reply before the deadline (correlation id {cid})") from None
                if item is None:
                    raise BusNotConnected("the bus was closed")
                if item is _LOST:
                    raise BusConnectionLost(f"the broker connection was lost during the request (correlation id {cid})")
                seq = getattr(item, "seq", None)
                if seq is None:
                    yield item
                    if final(item):
                        return
                    continue
                if seq < expected:
                    if final(item):
                        # the end of a restarted stream (the request was redelivered after its
                        # consumer died): it still ends this one
                        yield item
                        return
                    continue  # duplicate
                held[seq] = item
                while expected in held:
                    nxt = held.pop(expected)
                    expected += 1
                    yield nxt
                    if final(nxt):
                        return
        finally:
            self._pending.pop(cid, None)

    async def request(self, exchange: str, routing_key: str, msg: Message, *, deadline: float | None = None,
                      timeout: float | None = 30.0, persistent: bool = False) -> Message:
        """Publish a request and return its single reply (:class:`BusTimeout` at the deadline)."""
        if deadline is None and timeout is not None:
            deadline = time.time() + timeout
        cid = self._next_id()
        try:
            q = await self._publish_request(exchange, routing_key, msg, cid, persistent=persistent,
                                            deadline=deadline)
            if q.empty():
                try:
                    async with asyncio.timeout(None if deadline is None else max(0.0, deadline - time.time())):
                        item = await q.get()
                except TimeoutError:
                    raise BusTimeout(f"no reply before the deadline (correlation id {cid})") from None
            else:
                item = q.get_nowait()
            if item is None:
                raise BusNotConnected("the bus was closed")
            if item is _LOST:
                raise BusConnectionLost(f"the broker connection was lost during the request (correlation id {cid})")
            return item
        finally:
            self._pending.pop(cid, None)


@functools.cache
def _may_be_large(cls: type) -> bool:
    """Whether a message type carries tensors or file bytes (those are encoded in a thread)."""
    import typing

    hints = typing.get_type_hints(cls)
    return any("ndarray" in str(t) or "bytes" in str(t) for t in hints.values())


@functools.cache
def _published(mtype: str):
    return metrics.PUBLISHED.labels(mtype)


@functools.cache
def _consumed(mtype: str, outcome: str):
    return metrics.CONSUMED.labels(mtype, outcome)


@functools.lru_cache(maxsize=1024)
def _handler_seconds(queue: str):
    return metrics.HANDLER_SECONDS.labels(queue)


_BATCH_OK = {H_BATCH_REPLIES: 1}


def _default_final(m: Message) -> bool:
    return m.TYPE in ("final_response", "generation_error") or not hasattr(m, "seq")


async def run_forever(*closers: Callable[[], Awaitable[Any]]) -> None:
    """Wait for SIGINT/SIGTERM, then run ``closers`` in order."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for c in closers:
        with contextlib.suppress(Exception):
            await c()


def install_uvloop() -> None:
    """Use uvloop's event loop where it is installed."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
