"""WebSocket NPC chat (``GET /v1/ws``): sessions, turns, streaming, cancel.

The protocol is specified by ``schemas/ws_protocol.schema.json`` and described in
``docs/websocket-protocol.md``. One socket holds at most one session; a session outlives its socket
for ``SESSION_RESUME_S`` so that a client that reconnects can resume it (its history and its
finished turn ids, so a retried turn is answered from memory instead of running twice).

Sessions live in a :class:`gateway.sessions.SessionStore`: this gateway's memory by default, or
Redis (``SESSION_STORE_URL``), where any gateway of the namespace can resume them. The live state
of an attached session is the :class:`Session` object of the socket that holds it; every change is
written to the store by its :class:`gateway.sessions.SessionSync` (a turn's ``turn.final`` goes to
the player while the write runs, never after it). The socket holds the session's lease in the
store, renewed by :func:`sweep_sessions`, so that exactly one socket, on any gateway, holds it.

Turns of a session run one at a time, in order (each prompt carries the history of the turns
before it); each turn runs as its own task so that the socket keeps reading (cancel, ping,
context updates) while it streams. Cancelling a turn, ending the session or losing the socket
cancels the task, and :meth:`gateway.core.Gateway.generate` then aborts the generation at the
engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from npcbus.logs import get_logger
from npcbus.messages import FinalResponse, TokenDelta
from npcbus.npc import NPCRequestError, load_personas, validate_request

from .core import WS_SESSIONS, Gateway, GatewayError
from .keys import CLIENT_KEY, GATEWAY
from .protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_TRY_LATER,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    ProtocolError,
    context_errors,
    dumps,
    parse_frame,
)
from .sessions import (
    RatedTurn,
    SessionInUse,
    SessionRecord,
    SessionSync,
    SessionUnknown,
    StoreUnavailable,
    new_holder,
)

log = get_logger("npcbus.gateway.ws")


def merge_context(current: dict, update: dict, *, replace: bool = False) -> dict:
    """The context after an update: keys replace keys; world_state and quest_state merge key by key."""
    if replace:
        return copy.deepcopy(update)
    out = copy.deepcopy(current)
    for k, v in update.items():
        if k in ("world_state", "quest_state") and isinstance(out.get(k), dict):
            out[k] = {**out[k], **copy.deepcopy(v)}
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass
class Turn:
    turn_id: str
    request_id: str
    received: float  # perf_counter
    task: asyncio.Task | None = None


@dataclass
class Session:
    id: str
    owner: str
    persona: dict
    player: dict
    audience: str
    context: dict
    adapter: str | None
    safe_mode: bool
    generation: dict
    history: deque
    done: OrderedDict = field(default_factory=OrderedDict)   # turn id -> its turn.final event
    rated: OrderedDict = field(default_factory=OrderedDict)  # turn id -> RatedTurn (npc request, final, given)
    created: float = field(default_factory=time.time)
    active: dict = field(default_factory=dict)              # turn id -> Turn (queued or running)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conn: Connection | None = None
    sync: SessionSync | None = None                         # writes it to the store while attached

    @property
    def persona_id(self) -> str:
        return self.persona["id"]

    # the stored copy -------------------------------------------------------------------------
    def to_record(self) -> SessionRecord:
        """A snapshot for the store (new containers: later changes do not reach it)."""
        return SessionRecord(
            id=self.id, owner=self.owner, persona=self.persona, player=self.player, audience=self.audience,
            context=self.context, adapter=self.adapter, safe_mode=self.safe_mode, generation=self.generation,
            history=list(self.history), done=dict(self.done),
            rated={tid: RatedTurn(r.npc, r.final, r.given) for tid, r in self.rated.items()}, created=self.created)

    @classmethod
    def from_record(cls, rec: SessionRecord, *, history_lines: int) -> Session:
        """The live session of a stored one; ``history_lines``: this gateway's history bound."""
        keep = history_lines
        return cls(
            id=rec.id, owner=rec.owner, persona=rec.persona, player=rec.player, audience=rec.audience,
            context=rec.context, adapter=rec.adapter, safe_mode=rec.safe_mode, generation=dict(rec.generation),
            history=deque(rec.history[-keep:] if keep else [], maxlen=keep), done=OrderedDict(rec.done),
            rated=OrderedDict((tid, RatedTurn(r.npc, r.final, r.given)) for tid, r in rec.rated.items()),
            created=rec.created)

    def changed(self) -> None:
        """The state changed: write it to the store (at once in memory, else in the background)."""
        if self.sync is not None:
            self.sync.changed()

    async def send(self, event: dict) -> bool:
        conn = self.conn
        return await conn.send(event) if conn is not None else False

    def npc_request(self, text: str, generation: dict | None) -> dict:
        return {
            "persona": self.persona,
            "context": self.context,
            "history": list(self.history),
            "player": self.player,
            "player_input": text,
            "audience": self.audience,
            "adapter": self.adapter,
            "generation": {**self.generation, **(generation or {})},
            "safe_mode": self.safe_mode,
        }

    def remember(self, turn_id: str, event: dict, limit: int) -> None:
        self.done[turn_id] = event
        while len(self.done) > limit:
            self.done.popitem(last=False)

    def remember_for_feedback(self, turn_id: str, npc: dict, final: FinalResponse, limit: int) -> None:
        self.rated[turn_id] = RatedTurn(npc, final, False)
        while len(self.rated) > limit:
            self.rated.popitem(last=False)

    def cancel_turns(self) -> list[str]:
        ids = list(self.active)
        for turn in list(self.active.values()):
            if turn.task is not None:
                turn.task.cancel()
        self.active.clear()
        return ids


class Connection:
    """One WebSocket and the session it holds."""

    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, client_key: str):
        self.gw = gw
        self.ws = ws
        self.client_key = client_key
        self.holder = new_holder()  # this socket's id as a session lease holder
        self.session: Session | None = None
        self.closing = False

    # sending ---------------------------------------------------------------------------------
    async def send(self, event: dict) -> bool:
        if self.ws.closed or self.closing:
            return False
        try:
            await self.ws.send_str(dumps(event))
            return True
        except (ConnectionError, RuntimeError):
            return False

    async def close(self, code: int, message: str = "") -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=message.encode()[:120])

    async def fail(self, err: ProtocolError) -> bool:
        """Send the error event; close when its code says so. Returns whether the socket stays open."""
        await self.send(err.event())
        if err.close_code is not None:
            await self.close(err.close_code, err.code)
            return False
        return True

    # the read loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.gw.settings
        while not self.closing:
            if self.session is None:
                timeout = s.ws_start_timeout_s
            else:
                timeout = s.ws_idle_timeout_s or None
            try:
                msg = await self.ws.receive(timeout=timeout)
            except TimeoutError:
                what = "no session.start" if self.session is None else "no message"
                await self.fail(ProtocolError("session_timeout", f"{what} within {timeout:g} s"))
                return
            if msg.type == WSMsgType.TEXT:
                try:
                    keep = await self.on_text(msg.data)
                except ProtocolError as e:
                    keep = await self.fail(e)
                except Exception:
                    log.exception("websocket message failed", session_id=self.session.id if self.session else None)
                    keep = await self.fail(ProtocolError("internal", "the gateway failed on this message",
                                                         retryable=True))
                if not keep:
                    return
            elif msg.type == WSMsgType.BINARY:
                await self.fail(ProtocolError("bad_frame", "binary frames are not part of the protocol; send JSON "
                                                           "text frames"))
            else:  # CLOSE, CLOSING, CLOSED, ERROR (a too-large frame: aiohttp closes with 1009)
                return

    async def on_text(self, data: str) -> bool:
        try:
            msg = parse_frame(data)
        except ProtocolError as e:
            if e.code == "invalid_session" and self.session is not None:
                raise ProtocolError("session_exists", "this socket already has a session") from None
            raise
        mtype = msg["type"]
        if mtype == "ping":
            await self.send({"type": "pong", "id": msg.get("id"), "time": time.time()})
            return True
        if mtype == "session.start":
            if self.session is not None:
                raise ProtocolError("session_exists", "this socket already has a session")
            await self.start(msg)
            return True
        sess = self.session
        if sess is None:
            raise ProtocolError("no_session", f"{mtype} before session.start")
        sid = msg.get("session_id")
        if sid is not None and sid != sess.id:
            raise ProtocolError("unknown_session", f"session {sid!r} is not this socket's session")
        if mtype == "turn":
            await self.on_turn(sess, msg)
        elif mtype == "turn.cancel":
            await self.on_cancel(sess, msg["turn_id"])
        elif mtype == "turn.feedback":
            await self.on_feedback(sess, msg)
        elif mtype == "context.update":
            merged = merge_context(sess.context, msg["context"], replace=bool(msg.get("replace")))
            problem = context_errors(merged)
            if problem:
                raise ProtocolError("invalid_message", f"context.update: the merged context: {problem[1]}",
                                    field=f"context.{problem[0]}".rstrip("."))
            sess.context = merged
            sess.changed()
            await self.send({"type": "context.updated", "context": merged})
        elif mtype == "session.end":
            for tid in sess.cancel_turns():
                await self.send({"type": "turn.cancelled", "turn_id": tid})
            self.gw.sessions.pop(sess.id, None)
            sess.conn = None
            self.session = None
            if sess.sync is not None:
                await sess.sync.close()
            try:
                await self.gw.store.delete(sess.id, self.holder)
            except StoreUnavailable as e:  # it expires on its own (SESSION_LEASE_S + SESSION_RESUME_S)
                log.warning("ended session not deleted from the store", session_id=sess.id, error=str(e))
            await self.send({"type": "session.ended", "session_id": sess.id})
            await self.close(CLOSE_NORMAL, "session ended")
            return False
        return True

    # sessions --------------------------------------------------------------------------------
    async def start(self, msg: dict) -> None:
        gw = self.gw
        s = gw.settings
        if "resume" in msg:
            try:
                rec = await gw.store.claim(msg["resume"], self.client_key, self.holder)
            except SessionUnknown:
                raise ProtocolError("unknown_session", "no such session (it may have expired)",
                                    field="resume") from None
            except SessionInUse:
                raise ProtocolError("session_in_use", "another socket holds this session", field="resume",
                                    retryable=True) from None
            except StoreUnavailable as e:
                await self.store_unavailable(e, msg["resume"])
                return
            sess = Session.from_record(rec, history_lines=2 * s.history_turns)
            resumed = True
        else:
            probe = {k: msg[k] for k in ("persona", "persona_id", "player", "audience", "context", "adapter",
                                         "safe_mode", "generation", "history") if k in msg}
            probe["player_input"] = "hello"
            personas = None
            if "persona" not in msg:
                try:
                    personas = load_personas()
                except (OSError, ValueError):
                    personas = {}
            try:
                req = validate_request(probe, personas=personas)
            except NPCRequestError as e:
                raise ProtocolError("invalid_session", f"session.start: {e.field}: {e.reason}", field=e.field) from None
            if "adapter" in msg:
                adapter = msg["adapter"]
            else:
                adapter = gw.adapters.default_for_persona(req["persona"]["id"]) if gw.adapters is not None else None
            if adapter is not None and gw.adapters is not None:
                try:
                    gw.adapters.resolve(adapter)
                except GatewayError as e:
                    raise ProtocolError("invalid_session", f"session.start: adapter: {e.message}",
                                        field="adapter") from None
            keep = 2 * s.history_turns
            sess = Session(
                id=f"s_{uuid.uuid4().hex}", owner=self.client_key, persona=req["persona"], player=req["player"],
                audience=req["audience"], context=req["context"], adapter=adapter, safe_mode=req["safe_mode"],
                generation=dict(msg.get("generation") or {}),
                history=deque(req["history"][-keep:] if keep else [], maxlen=keep),
            )
            try:
                await gw.store.create(sess.to_record(), self.holder)
            except (StoreUnavailable, SessionInUse) as e:
                await self.store_unavailable(e, sess.id)
                return
            resumed = False
        gw.sessions[sess.id] = sess
        sess.conn = self
        sess.sync = SessionSync(gw.store, self.holder, sess.to_record, self.lost_session)
        self.session = sess
        await self.send({
            "type": "session.started", "session_id": sess.id, "resumed": resumed, "persona_id": sess.persona_id,
            "adapter": sess.adapter, "history_turns": s.history_turns, "turns_done": list(sess.done),
            "limits": {"max_frame_bytes": s.max_frame_bytes, "max_pending_turns": s.max_pending_turns,
                       "request_timeout_ms": int(s.request_timeout_s * 1000), "heartbeat_s": s.ws_heartbeat_s},
            "protocol": PROTOCOL_VERSION,
        })
        log.info("session started", session_id=sess.id, persona=sess.persona_id, adapter=sess.adapter,
                 resumed=resumed)

    async def store_unavailable(self, err: Exception, session_id: str) -> None:
        """session.start could not reach the session store: a retryable error; the socket stays open."""
        log.warning("session store unavailable at session.start", session_id=session_id, error=str(err))
        await self.send({"type": "error", "code": "unavailable", "retryable": True, "retry_after_ms": 1000,
                         "message": "the session store is unreachable, so no session can start or resume on this "
                                    "gateway now; retry shortly (this socket stays open)"})

    def lost_session(self) -> None:
        """The store says another socket holds this session now (after this gateway lost touch with
        the store for longer than the lease): give it up and close."""
        sess = self.session
        if sess is None or self.closing:
            return
        log.warning("session lease lost; closing the socket", session_id=sess.id)
        self.session = None
        sess.cancel_turns()
        sess.conn = None
        if sess.sync is not None:
            sess.sync.closed = True
        self.gw.sessions.pop(sess.id, None)
        self.gw.spawn(self.fail(ProtocolError("session_in_use", "another socket took over this session")),
                      name=f"lost-{sess.id}")

    async def detach(self) -> None:
        """The socket is gone: abort its turns; write the session and give its lease back, so that it
        can be resumed (here or on another gateway) for SESSION_RESUME_S."""
        sess = self.session
        self.session = None
        if sess is None:
            return
        aborted = sess.cancel_turns()
        sess.conn = None
        self.gw.sessions.pop(sess.id, None)
        if aborted:
            log.info("socket lost; turns aborted", session_id=sess.id, turns=aborted)
        if sess.sync is not None:
            await sess.sync.close()
        try:
            await self.gw.store.release(sess.to_record(), self.holder)
        except StoreUnavailable as e:  # the lease runs out on its own; the last written state stays resumable
            log.warning("session not released in the store", session_id=sess.id, error=str(e))

    # turns -----------------------------------------------------------------------------------
    async def on_turn(self, sess: Session, msg: dict) -> None:
        gw = self.gw
        s = gw.settings
        tid = msg["turn_id"]
        if tid in sess.active:
            raise ProtocolError("duplicate_turn", f"turn {tid!r} is already queued or running", turn_id=tid)
        if tid in sess.done:
            await self.send({**sess.done[tid], "replay": True})
            return
        if len(sess.active) > s.max_pending_turns:
            await self.send(turn_error(tid, "busy", f"{len(sess.active)} turns of this session are already queued "
                                       "or running; send this one when one has ended", True, 0.5))
            return
        try:
            gw.rate_check(self.client_key)
        except GatewayError as e:
            await self.send(turn_error(tid, e.code, e.message, e.retryable, e.retry_after_s))
            return
        turn = Turn(tid, uuid.uuid4().hex, time.perf_counter())
        queued = len(sess.active)
        sess.active[tid] = turn
        await self.send({"type": "turn.accepted", "turn_id": tid, "request_id": turn.request_id, "queued": queued})
        turn.task = asyncio.get_running_loop().create_task(self.run_turn(sess, turn, msg), name=f"turn-{tid}")

    async def on_cancel(self, sess: Session, tid: str) -> None:
        turn = sess.active.pop(tid, None)
        if turn is None:
            raise ProtocolError("unknown_turn", f"turn {tid!r} is not queued or running", turn_id=tid)
        if turn.task is not None:
            turn.task.cancel()
        await self.send({"type": "turn.cancelled", "turn_id": tid})
        log.info("turn cancelled by the client", session_id=sess.id, turn_id=tid, request_id=turn.request_id)

    async def on_feedback(self, sess: Session, msg: dict) -> None:
        """The player's thumbs or score on a finished turn, published as experience."""
        gw = self.gw
        tid = msg["turn_id"]
        if not gw.settings.publish_experience:
            raise ProtocolError("feedback_disabled", "this gateway does not record feedback (PUBLISH_EXPERIENCE is off)",
                                turn_id=tid)
        entry = sess.rated.get(tid)
        if entry is None:
            raise ProtocolError("unknown_turn", f"turn {tid!r} is not a finished turn of this session", turn_id=tid)
        npc, final = entry.npc, entry.final
        if entry.given:
            raise ProtocolError("duplicate_feedback", f"turn {tid!r} already has feedback", turn_id=tid)
        thumbs = msg.get("thumbs", "")
        score = float(msg["score"]) if "score" in msg else (1.0 if thumbs == "up" else -1.0)
        exp = gw.experience(npc=npc, final=final, session_id=sess.id, player_id=sess.player.get("id", ""),
                            turn_id=tid, score=score, thumbs=thumbs)
        entry.given = True
        try:
            await gw.publish_feedback(exp)
        except GatewayError as e:
            entry.given = False
            raise ProtocolError(e.code, e.message, turn_id=tid, retryable=e.retryable) from None
        sess.changed()
        await self.send({"type": "turn.feedback.accepted", "turn_id": tid, "score": score,
                         "experience_id": exp.experience_id, "adapter": final.adapter,
                         "adapter_version": final.adapter_version})

    async def run_turn(self, sess: Session, turn: Turn, msg: dict) -> None:
        gw = self.gw
        tid = turn.turn_id
        try:
            async with sess.lock:
                started = time.perf_counter()
                if sess.active.get(tid) is not turn:
                    return  # cancelled while queued
                if msg.get("context"):
                    merged = merge_context(sess.context, msg["context"])
                    problem = context_errors(merged)
                    if problem:
                        raise GatewayError("invalid_request", f"the merged context: {problem[1]}", status=400,
                                           field=f"context.{problem[0]}".rstrip("."))
                    sess.context = merged
                    sess.changed()
                npc = sess.npc_request(msg["text"], msg.get("generation"))
                timeout_ms = msg.get("timeout_ms")
                timeout = gw.timeout_for(timeout_ms / 1000 if timeout_ms else None)
                req = gw.new_request(request_id=turn.request_id, mode="npc", npc=npc, adapter=sess.adapter)
                first: float | None = None
                final: FinalResponse | None = None
                index = 0
                with gw.slot():
                    async with contextlib.aclosing(gw.generate(req, timeout_s=timeout, api="ws")) as stream:
                        async for ev in stream:
                            if isinstance(ev, TokenDelta):
                                if not ev.text:
                                    continue
                                if first is None:
                                    first = time.perf_counter()
                                await sess.send({"type": "turn.delta", "turn_id": tid, "text": ev.text, "index": index})
                                index += 1
                            elif isinstance(ev, FinalResponse):
                                final = ev
                end = time.perf_counter()
                if final is None or not isinstance(final.response, dict):
                    raise GatewayError("bad_response", "the inference consumer sent no structured response",
                                       status=502, retryable=True, retry_after_s=0.5)
                ms = 1000.0
                event = {
                    "type": "turn.final", "turn_id": tid, "request_id": turn.request_id, "response": final.response,
                    "valid": bool(final.valid), "adapter": final.adapter, "adapter_version": final.adapter_version,
                    "finish_reason": final.finish_reason, "usage": final.usage,
                    "timings": {"queue_ms": round((started - turn.received) * ms, 3),
                                "ttft_ms": None if first is None else round((first - turn.received) * ms, 3),
                                "total_ms": round((end - turn.received) * ms, 3),
                                "engine": final.timings or {}},
                }
                # settle the turn before awaiting anything, so a late cancel cannot race the final
                if sess.active.get(tid) is turn:
                    del sess.active[tid]
                sess.remember(tid, event, gw.settings.turn_cache)
                if sess.history.maxlen:
                    sess.history.append({"role": "player", "text": msg["text"]})
                    sess.history.append({"role": "npc", "text": final.response.get("dialogue", "")})
                gw.publish_experience(npc=npc, final=final, session_id=sess.id, player_id=sess.player.get("id", ""),
                                      turn_id=tid)
                if gw.settings.publish_experience:
                    sess.remember_for_feedback(tid, npc, final, gw.settings.turn_cache)
                # the store write starts now and runs beside the send: the final never waits for it
                sess.changed()
                await sess.send(event)
                log.info("turn done", session_id=sess.id, turn_id=tid, request_id=turn.request_id,
                         adapter=final.adapter, version=final.adapter_version, total_ms=event["timings"]["total_ms"])
        except asyncio.CancelledError:
            return  # cancel or disconnect: whoever cancelled has answered the client
        except GatewayError as e:
            if sess.active.get(tid) is turn:
                del sess.active[tid]
                await sess.send(turn_error(tid, e.code, e.message, e.retryable, e.retry_after_s, field=e.field))
            log.info("turn failed", session_id=sess.id, turn_id=tid, request_id=turn.request_id, code=e.code)
        except Exception:
            log.exception("turn failed", session_id=sess.id, turn_id=tid, request_id=turn.request_id)
            if sess.active.get(tid) is turn:
                del sess.active[tid]
                await sess.send(turn_error(tid, "internal", "the gateway failed on this turn", True, 0.5))
        finally:
            if sess.active.get(tid) is turn:
                del sess.active[tid]


def turn_error(tid: str, code: str, message: str, retryable: bool, retry_after_s: float | None = None, *,
               field: str | None = None) -> dict:
    ev: dict[str, Any] = {"type": "turn.error", "turn_id": tid, "code": code, "message": message, "retryable": retryable}
    if retryable and retry_after_s is not None:
        ev["retry_after_ms"] = max(0, round(retry_after_s * 1000))
    if field:
        ev["field"] = field
    return ev


async def ws_handler(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    s = gw.settings
    ws = web.WebSocketResponse(heartbeat=s.ws_heartbeat_s, max_msg_size=s.max_frame_bytes, protocols=(SUBPROTOCOL,),
                               autoping=True)
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(text="this route takes a WebSocket upgrade")
    await ws.prepare(request)
    conn = Connection(gw, ws, request[CLIENT_KEY])
    if len(gw.connections) >= s.max_ws_sessions:
        err = ProtocolError("overloaded", f"the gateway holds its maximum of {s.max_ws_sessions} sessions; retry later",
                            retryable=True)
        ev = err.event()
        ev["retry_after_ms"] = 5000
        await conn.send(ev)
        await conn.close(CLOSE_TRY_LATER, "overloaded")
        return ws
    gw.connections.add(conn)
    WS_SESSIONS.set(len(gw.connections))
    try:
        await conn.run()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("websocket failed")
        await conn.fail(ProtocolError("internal", "the gateway failed", retryable=True))
    finally:
        try:
            await conn.detach()
        finally:
            gw.connections.discard(conn)
        WS_SESSIONS.set(len(gw.connections))
        if not ws.closed:
            await conn.close(CLOSE_NORMAL)
    return ws


async def close_all(gw: Gateway) -> None:
    """At shutdown: close every socket with 1001 (going away)."""
    for conn in list(gw.connections):
        await conn.close(CLOSE_GOING_AWAY, "server shutdown")


async def sweep_sessions(gw: Gateway, interval: float | None = None) -> None:
    """Keep the store in order: forget detached sessions after SESSION_RESUME_S (the memory store;
    Redis expires them itself), renew the leases of this gateway's attached sessions (every third of
    SESSION_LEASE_S, at most every 5 s), retry writes that failed, and give up sessions whose lease
    another socket has taken."""
    store = gw.store
    every = interval if interval is not None else min(5.0, store.lease_s / 3)
    failing = False
    while True:
        await asyncio.sleep(every)
        try:
            await store.sweep()
            held = [(sid, sess.conn.holder) for sid, sess in list(gw.sessions.items()) if sess.conn is not None]
            trouble = await store.refresh(held)
        except StoreUnavailable as e:
            if not failing:
                log.warning("session store unreachable; leases not renewed", error=str(e), sessions=len(gw.sessions))
            failing = True
            continue
        except Exception:  # noqa: BLE001 - the sweeper must keep running
            log.exception("session sweep failed")
            continue
        if failing:
            log.info("session store reachable again", sessions=len(gw.sessions))
            failing = False
        holders = dict(held)
        for sid, sess in list(gw.sessions.items()):
            if sess.conn is None or sess.conn.holder != holders.get(sid):
                continue  # attached since the refresh began: next time
            what = trouble.get(sid)
            if what == "lost":
                sess.conn.lost_session()
            elif sess.sync is not None:
                if what == "missing":
                    sess.sync.changed()
                else:
                    sess.sync.retry()


__all__ = ["Connection", "Session", "close_all", "merge_context", "sweep_sessions", "ws_handler"]
