"""The gateway's shared state and its one way to the bus: :meth:`Gateway.generate`.

Every route (WebSocket turns, ``POST /generate``, the OpenAI-compatible API) turns its input into
a :class:`~npcbus.messages.GenerationRequest` and iterates :meth:`Gateway.generate`, which

- sends the request with the deadline as the bus message's expiry,
- maps bus failures to :class:`GatewayError` (a full generation queue -> ``overloaded`` at once),
- and, when the caller stops early (cancel, disconnect, deadline), publishes
  :class:`~npcbus.messages.Cancel` on the cancel fanout so the consumer aborts the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from npcbus import metrics
from npcbus.bus import Bus, BusConnectionLost, BusError, BusNotConnected, BusTimeout, Delivery, Overloaded, Unroutable
from npcbus.logs import get_logger
from npcbus.messages import (
    Cancel,
    ConsumerHeartbeat,
    Experience,
    FinalResponse,
    GenerationError,
    GenerationRequest,
    Message,
    TokenDelta,
    new_id,
)
from npcbus.settings import ModelSettings
from npcbus.topology import RK_EXPERIENCE

from .limits import ConcurrencyCap, RateLimiter
from .settings import GatewaySettings

log = get_logger("npcbus.gateway")

REQUESTS = metrics.counter("gateway_requests_total", "HTTP requests answered, by route and status.", ("route", "status"))
GENERATIONS = metrics.counter("gateway_generations_total", "Generations through the gateway, by API and outcome.",
                              ("api", "outcome"))
IN_FLIGHT = metrics.gauge("gateway_generations_in_flight", "Generations in flight through this gateway.")
TTFT = metrics.histogram("gateway_time_to_first_token_seconds", "Time from request to the first token delta.", ("api",),
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TOTAL = metrics.histogram("gateway_generation_seconds", "Time from request to the final response.", ("api",),
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
WS_SESSIONS = metrics.gauge("gateway_ws_sessions", "Open WebSocket sessions.")
REFUSED = metrics.counter("gateway_refused_total", "Requests refused at the door, by reason.", ("reason",))
FEEDBACK = metrics.counter("gateway_feedback_total", "Player feedback published as experience, by sign.", ("sign",))
CONSUMERS = metrics.gauge("gateway_live_consumers", "Inference consumers heard from within CONSUMER_STALE_S.")


class GatewayError(Exception):
    """A failure to report to the client: a code, a message, an HTTP status, whether to retry."""

    def __init__(self, code: str, message: str, *, status: int = 500, retryable: bool = False,
                 retry_after_s: float | None = None, field: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.field = field
        self.param = param


def error_from_event(ev: GenerationError) -> GatewayError:
    """The consumer's generation_error as a gateway error (HTTP status chosen by code and retryability)."""
    code = ev.code or "engine_error"
    if code in ("invalid_request", "bad_request", "invalid", "invalid_params"):
        status = 400
    elif code in ("unknown_adapter", "adapter_not_found", "model_not_found"):
        status = 404
    elif code in ("overloaded", "busy"):
        status = 503
    elif code in ("timeout", "expired", "deadline"):
        status = 504
    else:
        status = 503 if ev.retryable else 502
    return GatewayError(code, ev.message or code, status=status, retryable=bool(ev.retryable),
                        retry_after_s=1.0 if ev.retryable else None)


@dataclass
class ConsumerInfo:
    heartbeat: ConsumerHeartbeat
    seen: float  # monotonic


@dataclass
class Gateway:
    """Shared state of one gateway process (stored in the app under :data:`gateway.app.GATEWAY`)."""

    settings: GatewaySettings
    model: ModelSettings
    bus: Bus | None = None
    limiter: RateLimiter = field(init=False)
    cap: ConcurrencyCap = field(init=False)
    consumers: dict[str, ConsumerInfo] = field(default_factory=dict)
    last_answer: float | None = None  # monotonic time of the last reply from a consumer
    started: float = field(default_factory=time.monotonic)
    sessions: dict[str, Any] = field(default_factory=dict)       # session id -> gateway.ws.Session attached here
    connections: set[Any] = field(default_factory=set)           # open gateway.ws.Connection objects
    adapters: Any = None                                         # gateway.models.ModelCatalog
    store: Any = None                                            # gateway.sessions.SessionStore (sessions between sockets)
    _background: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        s = self.settings
        self.limiter = RateLimiter(s.rate_limit_rps, s.rate_limit_burst)
        self.cap = ConcurrencyCap(s.max_concurrency)
        self.model_id = self.model.model_id
        self.base_model = self.model.base_model or self.model_id

    # background tasks ----------------------------------------------------------------------
    def spawn(self, coro, name: str = "") -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name or None)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain_background(self, timeout: float = 5.0) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    # consumers -----------------------------------------------------------------------------
    async def on_event(self, msg: Message, _d: Delivery) -> None:
        if isinstance(msg, ConsumerHeartbeat):
            self.consumers[msg.worker_id] = ConsumerInfo(msg, time.monotonic())
            if self.adapters is not None:
                self.adapters.note_heartbeat(msg)

    def live_consumers(self) -> list[ConsumerInfo]:
        now = time.monotonic()
        stale = self.settings.consumer_stale_s
        for wid in [w for w, c in self.consumers.items() if now - c.seen > 10 * stale]:
            del self.consumers[wid]
        live = [c for c in self.consumers.values()
                if now - c.seen <= stale and c.heartbeat.base_model in (self.model_id, self.base_model, "")]
        if not live:  # a consumer that names its model differently still counts
            live = [c for c in self.consumers.values() if now - c.seen <= stale]
        CONSUMERS.set(len(live))
        return live

    def consumer_recent(self) -> bool:
        now = time.monotonic()
        if self.last_answer is not None and now - self.last_answer <= self.settings.consumer_stale_s:
            return True
        return bool(self.live_consumers())

    # admission -----------------------------------------------------------------------------
    def rate_check(self, key: str, cost: float = 1.0) -> None:
        wait = self.limiter.take(key, cost)
        if wait > 0:
            REFUSED.labels("rate_limited").inc()
            raise GatewayError("rate_limited", f"rate limit of {self.settings.rate_limit_rps:g} requests/s "
                               f"(burst {self.settings.rate_limit_burst}) exceeded; retry in {wait:.2f} s",
                               status=429, retryable=True, retry_after_s=wait)

    @contextlib.contextmanager
    def slot(self, n: int = 1):
        """Hold ``n`` generation slots, or fail at once with 503 overloaded."""
        if not self.cap.try_acquire(n):
            REFUSED.labels("concurrency").inc()
            raise GatewayError("overloaded", f"the gateway is at its concurrency limit ({self.cap.limit} "
                               "generations in flight); retry shortly", status=503, retryable=True, retry_after_s=1.0)
        IN_FLIGHT.set(self.cap.in_flight)
        try:
            yield
        finally:
            self.cap.release(n)
            IN_FLIGHT.set(self.cap.in_flight)

    def timeout_for(self, requested_s: float | None) -> float:
        t = self.settings.request_timeout_s
        if requested_s is not None and requested_s > 0:
            t = min(t, requested_s)
        return t

    # generation ----------------------------------------------------------------------------
    def new_request(self, **kw) -> GenerationRequest:
        return GenerationRequest(request_id=kw.pop("request_id", None) or new_id(), base_model=self.base_model, **kw)

    async def generate(self, req: GenerationRequest, *, timeout_s: float, api: str) -> AsyncIterator[Message]:
        """Send ``req`` and yield its reply events (TokenDelta..., then FinalResponse).

        A :class:`GenerationError` reply is raised as :class:`GatewayError`. Use with
        ``contextlib.aclosing`` so that leaving early aborts the generation at once.
        """
        bus = self.bus
        if bus is None or not bus.connected:
            raise GatewayError("unavailable", "the gateway is not connected to the broker; retry shortly",
                               status=503, retryable=True, retry_after_s=2.0)
        deadline = time.time() + timeout_s
        req.deadline = deadline
        started = time.perf_counter()
        first = True
        finished = False
        published = True
        outcome = "cancelled"
        try:
            stream = bus.request_stream(bus.topology.gen_exchange, self.model_id, req, deadline=deadline,
                                        timeout=None, correlation_id=req.request_id)
            async for ev in stream:
                if isinstance(ev, TokenDelta):
                    if first and ev.text:
                        first = False
                        TTFT.labels(api).observe(time.perf_counter() - started)
                    yield ev
                elif isinstance(ev, FinalResponse):
                    finished = True
                    outcome = "ok"
                    self.last_answer = time.monotonic()
                    TOTAL.labels(api).observe(time.perf_counter() - started)
                    yield ev
                    return
                elif isinstance(ev, GenerationError):
                    finished = True
                    outcome = f"error:{ev.code}"
                    self.last_answer = time.monotonic()
                    raise error_from_event(ev)
        except Overloaded:
            published = False
            outcome = "overloaded"
            REFUSED.labels("queue_full").inc()
            raise GatewayError("overloaded", "the inference queue is full; retry shortly", status=503,
                               retryable=True, retry_after_s=1.0) from None
        except Unroutable:
            published = False
            outcome = "no_consumer"
            raise GatewayError("no_consumer", f"no inference consumer serves model {self.model_id!r} yet",
                               status=503, retryable=True, retry_after_s=5.0) from None
        except BusTimeout:
            outcome = "timeout"
            raise GatewayError("timeout", f"no complete answer within {timeout_s:g} s", status=504,
                               retryable=True, retry_after_s=1.0) from None
        except BusNotConnected:
            outcome = "unavailable"
            raise GatewayError("unavailable", "the broker connection is closed; retry shortly", status=503,
                               retryable=True, retry_after_s=2.0) from None
        except BusConnectionLost:
            outcome = "unavailable"
            raise GatewayError("unavailable", "the broker connection was lost during the generation; retry", status=503,
                               retryable=True, retry_after_s=1.0) from None
        except BusError as e:
            outcome = "unavailable"
            raise GatewayError("unavailable", f"the broker did not take the request: {e}", status=503,
                               retryable=True, retry_after_s=2.0) from None
        finally:
            GENERATIONS.labels(api, outcome.split(":")[0]).inc()
            if not finished and published:
                self.spawn(self._cancel(req.request_id, outcome), name=f"cancel-{req.request_id}")

    async def _cancel(self, request_id: str, reason: str) -> None:
        bus = self.bus
        if bus is None or not bus.connected:
            return
        try:
            await bus.publish(bus.topology.cancel_exchange, "", Cancel(request_id, reason=reason), persistent=False,
                              mandatory=False)
            log.info("generation aborted", request_id=request_id, reason=reason)
        except Exception as e:  # noqa: BLE001 - best effort: the message's expiry still bounds it
            log.warning("could not publish cancel", request_id=request_id, error=f"{type(e).__name__}: {e}")

    # experience ----------------------------------------------------------------------------
    def experience(self, *, npc: dict, final: FinalResponse, session_id: str = "", player_id: str = "",
                   turn_id: str = "", score: float | None = None, thumbs: str = "") -> Experience:
        return Experience(experience_id=new_id(), adapter=final.adapter or "", npc=npc, response=final.response,
                          adapter_version=final.adapter_version, score=score, session_id=session_id,
                          player_id=player_id, turn_id=turn_id, request_id=final.request_id, valid=bool(final.valid),
                          thumbs=thumbs)

    def publish_experience(self, *, npc: dict, final: FinalResponse, session_id: str = "", player_id: str = "",
                           turn_id: str = "") -> None:
        """A finished turn as experience (no score yet), in the background; best effort."""
        if not self.settings.publish_experience or final.response is None or self.bus is None:
            return
        exp = self.experience(npc=npc, final=final, session_id=session_id, player_id=player_id, turn_id=turn_id)

        async def send() -> None:
            try:
                await self.bus.publish(self.bus.topology.experience_exchange, RK_EXPERIENCE, exp)
            except Exception as e:  # noqa: BLE001
                log.warning("could not publish experience", experience_id=exp.experience_id,
                            error=f"{type(e).__name__}: {e}")

        self.spawn(send(), name="experience")

    async def publish_feedback(self, exp: Experience) -> None:
        """A turn with the player's score as experience, confirmed by the broker (GatewayError if not)."""
        bus = self.bus
        if bus is None or not bus.connected:
            raise GatewayError("unavailable", "the gateway is not connected to the broker; retry shortly",
                               status=503, retryable=True, retry_after_s=2.0)
        try:
            await bus.publish(bus.topology.experience_exchange, RK_EXPERIENCE, exp)
        except BusError as e:
            raise GatewayError("unavailable", f"the feedback was not recorded: {e}", status=503, retryable=True,
                               retry_after_s=2.0) from None
        FEEDBACK.labels("up" if (exp.score or 0) > 0 else ("down" if (exp.score or 0) < 0 else "neutral")).inc()
        log.info("feedback published", experience_id=exp.experience_id, turn_id=exp.turn_id, adapter=exp.adapter,
                 version=exp.adapter_version, score=exp.score)
