"""Where WebSocket sessions live between sockets: in this gateway's memory, or in Redis, shared by
every gateway of a namespace so that a session can be resumed on any of them.

A session's state (:class:`SessionRecord`: who owns it, the NPC, the player, the scene, sampling
defaults, history, the finished turns and the turns that can still be rated) is written to the
store after every change. One socket holds a session at a time, across gateways: the holder takes a
*lease* in the store when it starts or resumes the session, renews it while the socket lives and
gives it back when the socket goes; a resume while someone else holds the lease is refused
(:class:`SessionInUse`), and a crashed gateway's leases simply expire.

- :class:`MemorySessionStore` (``SESSION_STORE_URL`` empty, the default): a dict in this process;
  exactly the single-gateway behaviour (a session resumes only on the gateway that started it).
  No I/O: it writes at once.
- :class:`RedisSessionStore` (``SESSION_STORE_URL=redis://...``): one hash per session
  (``owner``, ``holder``, ``blob``: the msgpack-encoded record) and one lease key, both named
  ``NAMESPACE:session...:{SESSION_ID}`` (one hash slot per session); every step that must not race
  is one Lua script. Expiry: while attached, ``SESSION_LEASE_S + SESSION_RESUME_S`` (renewed with
  the lease), so that a crashed gateway's sessions stay resumable for ``SESSION_RESUME_S`` after its
  lease runs out; after a detach, ``SESSION_RESUME_S``. A write is fenced by the lease: a holder
  that lost its lease cannot overwrite the new holder's state.

Operations that cannot reach the store raise :class:`StoreUnavailable` within about
``op_timeout_s``; callers answer the client with a retryable error and never hang.

:class:`SessionSync` writes one attached session in the background, coalescing changes and keeping
one write in flight, so that a turn's reply never waits for the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgpack

from npcbus import metrics
from npcbus.codec import CodecError, decode, encode
from npcbus.logs import get_logger
from npcbus.messages import FinalResponse

log = get_logger("npcbus.gateway.sessions")

RECORD_VERSION = 1

STORE_OPS = metrics.counter("gateway_session_store_operations_total",
                            "Session store operations, by store, operation and outcome (ok, refused, error).",
                            ("store", "op", "outcome"))
STORE_SECONDS = metrics.histogram("gateway_session_store_seconds", "Time of one session store operation.",
                                  ("store", "op"),
                                  buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
STORE_UP = metrics.gauge("gateway_session_store_up",
                         "1 while the session store answered its last operation or health check, by store.", ("store",))
STORED_TRIMMED = metrics.counter("gateway_session_store_trimmed_total",
                                 "Session records that went over SESSION_MAX_BYTES and lost their oldest turns.")


class SessionStoreError(Exception):
    """Base of the session store's refusals and failures."""


class SessionUnknown(SessionStoreError):
    """No such session for this owner (never existed, ended, expired, or another API key's)."""


class SessionInUse(SessionStoreError):
    """Another socket (on this gateway or another) holds the session's lease."""


class StoreUnavailable(SessionStoreError):
    """The store could not be reached or did not answer in time; retry shortly."""


# ---------------------------------------------------------------------------------------------
# the record
# ---------------------------------------------------------------------------------------------


@dataclass
class RatedTurn:
    """A finished turn that can still be rated: its NPC request, the final response, whether rated."""

    npc: dict
    final: FinalResponse
    given: bool = False


@dataclass
class SessionRecord:
    """Everything a resumed session needs (see the module docstring)."""

    id: str
    owner: str
    persona: dict
    player: dict
    audience: str
    context: dict
    adapter: str | None
    safe_mode: bool
    generation: dict
    history: list[dict] = field(default_factory=list)
    done: dict[str, dict] = field(default_factory=dict)         # turn id -> its turn.final event, oldest first
    rated: dict[str, RatedTurn] = field(default_factory=dict)   # turn id -> rated turn, oldest first
    created: float = field(default_factory=time.time)


def _record_obj(rec: SessionRecord) -> dict:
    return {
        "v": RECORD_VERSION, "id": rec.id, "owner": rec.owner, "persona": rec.persona, "player": rec.player,
        "audience": rec.audience, "context": rec.context, "adapter": rec.adapter, "safe_mode": rec.safe_mode,
        "generation": rec.generation, "history": list(rec.history),
        "done": [[tid, ev] for tid, ev in rec.done.items()],
        "rated": [[tid, r.npc, encode(r.final), r.given] for tid, r in rec.rated.items()],
        "created": rec.created,
    }


def encode_record(rec: SessionRecord, max_bytes: int | None = None) -> bytes:
    """The record as msgpack (final responses through :func:`npcbus.codec.encode`).

    Over ``max_bytes`` the oldest rated turns, then the oldest finished turns, are left out of the
    stored copy until it fits (the live session keeps them); what is left (persona, scene, history)
    is bounded by the request limits.
    """
    obj = _record_obj(rec)
    data = msgpack.packb(obj, use_bin_type=True)
    if max_bytes is None or len(data) <= max_bytes:
        return data
    trimmed = 0
    while len(data) > max_bytes and (obj["rated"] or obj["done"]):
        drop = max(1, len(obj["rated"] or obj["done"]) // 4)
        if obj["rated"]:
            del obj["rated"][:drop]
        else:
            del obj["done"][:drop]
        trimmed += drop
        data = msgpack.packb(obj, use_bin_type=True)
    STORED_TRIMMED.inc()
    log.warning("session record over SESSION_MAX_BYTES; oldest turns left out of the stored copy", session_id=rec.id,
                dropped=trimmed, bytes=len(data), max_bytes=max_bytes)
    return data


def decode_record(data: bytes) -> SessionRecord:
    """The record from :func:`encode_record`'s bytes; ``ValueError`` when it is not one."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if not isinstance(obj, dict) or obj.get("v") != RECORD_VERSION:
            raise ValueError(f"unknown session record version {obj.get('v') if isinstance(obj, dict) else None!r}")
        rated: dict[str, RatedTurn] = {}
        for tid, npc, final, given in obj.get("rated") or []:
            msg = decode(final)
            if not isinstance(msg, FinalResponse):
                raise ValueError(f"rated turn {tid!r}: expected a final_response, got {msg.TYPE}")
            rated[tid] = RatedTurn(npc, msg, bool(given))
        return SessionRecord(
            id=obj["id"], owner=obj["owner"], persona=obj["persona"], player=obj["player"], audience=obj["audience"],
            context=obj["context"], adapter=obj.get("adapter"), safe_mode=bool(obj.get("safe_mode")),
            generation=obj.get("generation") or {}, history=list(obj.get("history") or []),
            done={tid: ev for tid, ev in obj.get("done") or []}, rated=rated, created=float(obj.get("created") or 0),
        )
    except (KeyError, TypeError, ValueError, CodecError, msgpack.UnpackException) as e:
        raise ValueError(f"not a session record: {type(e).__name__}: {e}") from None


def new_holder() -> str:
    """A lease holder id: this process and a random part (one per socket)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# the interface
# ---------------------------------------------------------------------------------------------


class SessionStore:
    """Sessions between sockets, and the lease that lets one socket hold a session at a time.

    ``resume_s``: how long a detached session stays resumable (``SESSION_RESUME_S``; 0: it ends with
    its socket). ``lease_s``: how long a hold lasts unless renewed (``SESSION_LEASE_S``).
    """

    kind = "abstract"

    def __init__(self, *, resume_s: float, lease_s: float):
        self.resume_s = resume_s
        self.lease_s = lease_s

    async def create(self, rec: SessionRecord, holder: str) -> None:
        """Store a new session, held by ``holder``."""
        raise NotImplementedError

    async def claim(self, session_id: str, owner: str, holder: str) -> SessionRecord:
        """Take the lease of a stored session and return its state.

        :class:`SessionUnknown` when there is none for ``owner``; :class:`SessionInUse` when another
        holder has it.
        """
        raise NotImplementedError

    async def save(self, rec: SessionRecord, holder: str) -> bool:
        """Write the state of a held session; False when ``holder`` no longer holds it (nothing written)."""
        raise NotImplementedError

    async def refresh(self, held: list[tuple[str, str]]) -> dict[str, str]:
        """Renew the leases of (session id, holder) pairs. Returns the ones that need attention:
        ``"lost"`` (another holder has it now) or ``"missing"`` (the state is gone: write it again)."""
        raise NotImplementedError

    async def release(self, rec: SessionRecord, holder: str) -> bool:
        """The socket is gone: write the final state, give the lease back, and keep the session for
        ``resume_s`` (delete it when 0). False when ``holder`` had lost the lease (nothing written)."""
        raise NotImplementedError

    async def delete(self, session_id: str, holder: str) -> None:
        """The session ended: forget it (when ``holder`` holds it)."""
        raise NotImplementedError

    async def sweep(self) -> int:
        """Forget expired sessions (where the store does not expire them itself); returns how many."""
        return 0

    async def health(self) -> dict:
        """The store's state for ``/health``: at least ``kind`` and ``ok``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""


# ---------------------------------------------------------------------------------------------
# in memory
# ---------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    record: SessionRecord
    holder: str | None                 # the socket that holds it, or None while detached
    expires_at: float | None = None    # clock time; None while held


class MemorySessionStore(SessionStore):
    """Sessions in this process (the default). A held session never expires (its holder lives in the
    same process and releases it when its socket goes); a detached one lasts ``resume_s``. Beyond
    ``max_sessions`` the sweep forgets the detached ones that were left first."""

    kind = "memory"

    def __init__(self, *, resume_s: float, lease_s: float = 15.0, max_sessions: int = 4000,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(resume_s=resume_s, lease_s=lease_s)
        self.max_sessions = max_sessions
        self.clock = clock
        self.entries: dict[str, _Entry] = {}

    def _live(self, session_id: str) -> _Entry | None:
        e = self.entries.get(session_id)
        if e is not None and e.expires_at is not None and self.clock() >= e.expires_at:
            del self.entries[session_id]
            return None
        return e

    def _count(self, op: str, outcome: str = "ok") -> None:
        STORE_OPS.labels(self.kind, op, outcome).inc()

    async def create(self, rec: SessionRecord, holder: str) -> None:
        self.entries[rec.id] = _Entry(rec, holder)
        self._count("create")

    async def claim(self, session_id: str, owner: str, holder: str) -> SessionRecord:
        e = self._live(session_id)
        if e is None or e.record.owner != owner:
            self._count("claim", "refused")
            raise SessionUnknown(session_id)
        if e.holder is not None and e.holder != holder:
            self._count("claim", "refused")
            raise SessionInUse(session_id)
        e.holder = holder
        e.expires_at = None
        self._count("claim")
        return e.record

    def save_now(self, rec: SessionRecord, holder: str) -> bool:
        e = self.entries.get(rec.id)
        if e is None or e.holder != holder:
            self._count("save", "refused")
            return False
        e.record = rec
        self._count("save")
        return True

    async def save(self, rec: SessionRecord, holder: str) -> bool:
        return self.save_now(rec, holder)

    async def refresh(self, held: list[tuple[str, str]]) -> dict[str, str]:
        out = {}
        for sid, holder in held:
            e = self.entries.get(sid)
            if e is None:
                out[sid] = "missing"
            elif e.holder != holder:
                out[sid] = "lost"
        return out

    async def release(self, rec: SessionRecord, holder: str) -> bool:
        e = self.entries.get(rec.id)
        if e is None or e.holder != holder:
            self._count("release", "refused")
            return False
        if self.resume_s <= 0:
            del self.entries[rec.id]
        else:
            e.record = rec
            e.holder = None
            e.expires_at = self.clock() + self.resume_s
        self._count("release")
        return True

    async def delete(self, session_id: str, holder: str) -> None:
        e = self.entries.get(session_id)
        if e is not None and e.holder in (holder, None):
            del self.entries[session_id]
        self._count("delete")

    async def sweep(self) -> int:
        now = self.clock()
        gone = [sid for sid, e in self.entries.items() if e.expires_at is not None and now >= e.expires_at]
        for sid in gone:
            del self.entries[sid]
        over = len(self.entries) - self.max_sessions
        if over > 0:
            detached = sorted((e.expires_at, sid) for sid, e in self.entries.items() if e.expires_at is not None)
            for _at, sid in detached[:over]:
                del self.entries[sid]
                gone.append(sid)
        return len(gone)

    async def health(self) -> dict:
        held = sum(1 for e in self.entries.values() if e.holder is not None)
        return {"kind": self.kind, "ok": True, "sessions": len(self.entries), "attached": held}


# ---------------------------------------------------------------------------------------------
# in Redis
# ---------------------------------------------------------------------------------------------

# KEYS[1] = the session hash, KEYS[2] = its lease. Hash fields: owner, holder (the last socket to
# claim it: only that one may take an expired lease back), blob (the encoded record).
_CREATE = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) == false then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[4], 'holder', ARGV[1], 'blob', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# ARGV: holder, lease ms, attached ttl ms, owner  ->  {0} unknown, {2} in use, {1, blob}
_CLAIM = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if (not owner) or owner ~= ARGV[4] then return {0} end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] then return {2} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'holder', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, redis.call('HGET', KEYS[1], 'blob')}
"""
# does ARGV[1] hold the lease (or held it last, and nobody took it since it ran out)?
_HOLDS = """
local function holds(lease_ms)
  local cur = redis.call('GET', KEYS[2])
  if cur == ARGV[1] then return true end
  if (not cur) and redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
    redis.call('SET', KEYS[2], ARGV[1], 'PX', lease_ms)
    return true
  end
  return false
end
"""
# ARGV: holder, lease ms, attached ttl ms, owner, blob  ->  1 written, 0 not the holder
_SAVE = _HOLDS + """
if not holds(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[4], 'holder', ARGV[1], 'blob', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# ARGV: holder, lease ms, attached ttl ms  ->  1 renewed, 0 lost, -1 renewed but the state is gone
_REFRESH = _HOLDS + """
if not holds(ARGV[2]) then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('PEXPIRE', KEYS[1], ARGV[3]) == 0 then return -1 end
return 1
"""
# ARGV: holder, lease ms, resume ttl ms (0: delete), owner, blob  ->  1 released, 0 not the holder
_RELEASE = _HOLDS + """
if not holds(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
if tonumber(ARGV[3]) <= 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'owner', ARGV[4], 'holder', ARGV[1], 'blob', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# ARGV: holder, lease ms
_DELETE = _HOLDS + """
if not holds(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials (for logs and /health)."""
    try:
        u = urlsplit(url)
        if u.scheme == "unix":
            return f"unix:{u.path}"
        return f"{u.hostname or 'localhost'}:{u.port or 6379}{u.path or '/0'}"
    except ValueError:
        return "(unparsable url)"


class RedisSessionStore(SessionStore):
    """Sessions in Redis, shared by every gateway of the namespace (see the module docstring)."""

    kind = "redis"

    def __init__(self, url: str, *, namespace: str, resume_s: float, lease_s: float, password: str = "",
                 max_bytes: int = 1 << 20, op_timeout_s: float = 2.0, max_connections: int = 64):
        super().__init__(resume_s=resume_s, lease_s=lease_s)
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        self.namespace = namespace
        self.max_bytes = max_bytes
        self.op_timeout_s = op_timeout_s
        self.where = _where(url)
        kw: dict[str, Any] = {
            "socket_connect_timeout": min(1.0, op_timeout_s), "socket_timeout": op_timeout_s,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1), "health_check_interval": 30,
            "max_connections": max_connections, "timeout": op_timeout_s,
        }
        if password and not urlsplit(url).password:
            kw["password"] = password
        pool = aioredis.BlockingConnectionPool.from_url(url, **kw)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._scripts = {name: self.redis.register_script(src) for name, src in (
            ("create", _CREATE), ("claim", _CLAIM), ("save", _SAVE), ("refresh", _REFRESH), ("release", _RELEASE),
            ("delete", _DELETE))}
        self.last_error: str | None = None

    # keys ------------------------------------------------------------------------------------
    def key(self, session_id: str) -> str:
        return f"{self.namespace}:session:{{{session_id}}}"

    def lease_key(self, session_id: str) -> str:
        return f"{self.namespace}:session-lease:{{{session_id}}}"

    def _keys(self, session_id: str) -> list[str]:
        return [self.key(session_id), self.lease_key(session_id)]

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    @property
    def _attached_ms(self) -> int:
        return max(1, int((self.lease_s + self.resume_s) * 1000))

    # one operation, timed, counted, bounded -----------------------------------------------------
    async def _run(self, op: str, coro_fn: Callable[[], Any]) -> Any:
        from redis.exceptions import RedisError

        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(coro_fn(), self.op_timeout_s)
        except (RedisError, OSError, TimeoutError) as e:
            STORE_OPS.labels(self.kind, op, "error").inc()
            STORE_UP.labels(self.kind).set(0)
            self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise StoreUnavailable(f"the session store ({self.where}) did not answer: {self.last_error}") from None
        STORE_SECONDS.labels(self.kind, op).observe(time.perf_counter() - t0)
        STORE_UP.labels(self.kind).set(1)
        self.last_error = None
        return result

    def _count(self, op: str, outcome: str) -> None:
        STORE_OPS.labels(self.kind, op, outcome).inc()

    # the interface ---------------------------------------------------------------------------
    async def create(self, rec: SessionRecord, holder: str) -> None:
        blob = encode_record(rec, self.max_bytes)
        ok = await self._run("create", lambda: self._scripts["create"](
            keys=self._keys(rec.id), args=[holder, self._lease_ms, self._attached_ms, rec.owner, blob]))
        if not ok:  # a random new id that is already held: astronomically unlikely
            self._count("create", "refused")
            raise SessionInUse(rec.id)
        self._count("create", "ok")

    async def claim(self, session_id: str, owner: str, holder: str) -> SessionRecord:
        res = await self._run("claim", lambda: self._scripts["claim"](
            keys=self._keys(session_id), args=[holder, self._lease_ms, self._attached_ms, owner]))
        status = int(res[0])
        if status == 0:
            self._count("claim", "refused")
            raise SessionUnknown(session_id)
        if status == 2:
            self._count("claim", "refused")
            raise SessionInUse(session_id)
        try:
            rec = decode_record(res[1])
        except (ValueError, IndexError, TypeError) as e:
            log.warning("stored session unreadable; treated as unknown", session_id=session_id, error=str(e))
            await self.delete(session_id, holder)
            self._count("claim", "refused")
            raise SessionUnknown(session_id) from None
        self._count("claim", "ok")
        return rec

    async def save(self, rec: SessionRecord, holder: str) -> bool:
        blob = encode_record(rec, self.max_bytes)
        ok = await self._run("save", lambda: self._scripts["save"](
            keys=self._keys(rec.id), args=[holder, self._lease_ms, self._attached_ms, rec.owner, blob]))
        self._count("save", "ok" if ok else "refused")
        return bool(ok)

    async def refresh(self, held: list[tuple[str, str]]) -> dict[str, str]:
        if not held:
            return {}

        async def go() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for sid, holder in held:
                await self._scripts["refresh"](keys=self._keys(sid), args=[holder, self._lease_ms, self._attached_ms],
                                               client=pipe)
            return await pipe.execute()

        results = await self._run("refresh", go)
        out = {}
        for (sid, _holder), r in zip(held, results, strict=True):
            r = int(r)
            if r == 0:
                out[sid] = "lost"
            elif r == -1:
                out[sid] = "missing"
        self._count("refresh", "ok")
        return out

    async def release(self, rec: SessionRecord, holder: str) -> bool:
        blob = encode_record(rec, self.max_bytes) if self.resume_s > 0 else b""
        resume_ms = int(self.resume_s * 1000) if self.resume_s > 0 else 0
        ok = await self._run("release", lambda: self._scripts["release"](
            keys=self._keys(rec.id), args=[holder, self._lease_ms, resume_ms, rec.owner, blob]))
        self._count("release", "ok" if ok else "refused")
        return bool(ok)

    async def delete(self, session_id: str, holder: str) -> None:
        await self._run("delete", lambda: self._scripts["delete"](keys=self._keys(session_id),
                                                                  args=[holder, self._lease_ms]))
        self._count("delete", "ok")

    async def health(self) -> dict:
        t0 = time.perf_counter()
        try:
            await self._run("ping", self.redis.ping)
        except StoreUnavailable:
            return {"kind": self.kind, "ok": False, "where": self.where, "error": self.last_error}
        return {"kind": self.kind, "ok": True, "where": self.where,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.aclose()


def make_store(settings: Any, namespace: str) -> SessionStore:
    """The store that ``settings`` (:class:`gateway.settings.GatewaySettings`) ask for."""
    url = settings.session_store_url
    if not url:
        return MemorySessionStore(resume_s=settings.session_resume_s, lease_s=settings.session_lease_s,
                                  max_sessions=2 * settings.max_ws_sessions)
    return RedisSessionStore(url, namespace=namespace, resume_s=settings.session_resume_s,
                             lease_s=settings.session_lease_s, password=settings.session_store_password,
                             max_bytes=settings.session_max_bytes)


# ---------------------------------------------------------------------------------------------
# writing one attached session
# ---------------------------------------------------------------------------------------------


class SessionSync:
    """Writes one attached session to the store after each change, off the reply path.

    :meth:`changed` takes no time: with the memory store it writes at once; otherwise it marks the
    session dirty and makes sure a background task is writing. That task writes the newest state
    (a snapshot taken when the write starts), one write at a time, until nothing changed meanwhile.
    A failed write leaves the session dirty; :meth:`retry` (the lease refresher calls it) tries
    again. ``on_lost`` is called when the store says another socket holds the session now.
    """

    def __init__(self, store: SessionStore, holder: str, snapshot: Callable[[], SessionRecord],
                 on_lost: Callable[[], None]):
        self.store = store
        self.holder = holder
        self.snapshot = snapshot
        self.on_lost = on_lost
        self.dirty = False
        self.closed = False
        self._task: asyncio.Task | None = None

    def changed(self) -> None:
        if self.closed:
            return
        if isinstance(self.store, MemorySessionStore):  # no I/O: write at once
            if not self.store.save_now(self.snapshot(), self.holder):
                self._lost()
            return
        self.dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write(), name="session-write")

    def retry(self) -> None:
        if self.dirty:
            self.changed()

    async def _write(self) -> None:
        while self.dirty and not self.closed:
            self.dirty = False
            rec = self.snapshot()
            try:
                ok = await self.store.save(rec, self.holder)
            except StoreUnavailable as e:
                self.dirty = True
                log.warning("session not written; will retry", session_id=rec.id, error=str(e))
                return
            except Exception:  # noqa: BLE001 - a bug here must not kill the socket
                self.dirty = True
                log.exception("session write failed", session_id=rec.id)
                return
            if not ok:
                self._lost()
                return

    def _lost(self) -> None:
        if not self.closed:
            self.closed = True
            self.on_lost()

    async def close(self) -> None:
        """Stop writing; wait for a write in flight (so that the final write comes after it)."""
        self.closed = True
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task


__all__ = [
    "MemorySessionStore", "RatedTurn", "RedisSessionStore", "SessionInUse", "SessionRecord", "SessionStore",
    "SessionStoreError", "SessionSync", "SessionUnknown", "StoreUnavailable", "decode_record", "encode_record",
    "make_store", "new_holder",
]
