"""The engine interface every inference engine implements, and the pieces engines share.

An engine runs generations for one base model with any number of LoRA adapter versions. The
inference consumer (:mod:`workers.infer_worker`) talks to it only through :class:`Engine`:

==============================================  ==================================================
``await engine.start()``                        load the model; ready to generate afterwards
``engine.generate(request_id, prompt, params,   an async iterator of :class:`TokenEvent` (new text
adapter=None)``                                 and token ids), ending with one
                                                :class:`FinishEvent` (``stop``, ``length`` or
                                                ``abort``)
``await engine.abort(request_id)``              stop a running generation; its stream then ends
                                                with ``FinishEvent(reason="abort")``
``await engine.add_adapter(name, path)``        register an adapter version (a PEFT folder) under
                                                a name never used for other weights
``await engine.remove_adapter(name)``           unregister it; it is unloaded once no running
                                                generation uses it
``await engine.health()``                       raise :class:`EngineDead` when the engine is gone
``await engine.close()``                        shut down
``engine.name``, ``engine.capacity``,           engine kind, most generations run at once, the
``engine.tokenizer``                            Hugging Face tokenizer (None if the engine has none)
==============================================  ==================================================

``prompt`` is either text (the engine tokenizes it as is, adding no special tokens) or a list of
token ids. ``params`` is a :class:`SamplingSpec`; its ``json_schema`` constrains the output to
JSON valid against the schema (compact: no whitespace between tokens of the JSON).

Adapter versions are immutable: a new version is added under a new name, never reloaded in place.
:class:`AdapterSlots` implements the bookkeeping both shipped engines share: registration counts
(several consumers may share one engine), how many generations use each adapter, a bounded set of
adapters loaded in the engine (least recently used idle ones are evicted to make room) and removal
once idle.

Errors: :class:`EngineDead` (the engine is gone; restart the process), :class:`BadEngineRequest`
(this request cannot run: bad parameters, unknown adapter, prompt too long) and
:class:`EngineError` for anything else that failed one request.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# finish reasons
STOP = "stop"
LENGTH = "length"
ABORT = "abort"


class EngineError(RuntimeError):
    """A generation failed."""


class EngineDead(EngineError):
    """The engine is gone (its process died or it failed for good); restart it."""


class BadEngineRequest(EngineError, ValueError):
    """The request cannot run as given (parameters, adapter, prompt length)."""


@dataclass
class SamplingSpec:
    """How to sample one generation. ``temperature == 0`` is greedy decoding.

    ``top_k <= 0`` and ``top_p == 1`` disable those filters. ``seed`` makes sampling reproducible
    per request. ``stop`` strings end the generation (not included in the output). ``ignore_eos``
    keeps generating past the end-of-sequence token (benchmarks). ``json_schema`` constrains the
    output to compact JSON valid against the schema.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    json_schema: dict | None = None

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise BadEngineRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise BadEngineRequest(f"temperature must be between 0 and 100, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise BadEngineRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise BadEngineRequest(f"top_k must be an integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise BadEngineRequest(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise BadEngineRequest("stop must be a list of non-empty strings")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise BadEngineRequest("json_schema must be an object")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenEvent:
    """New output of a generation: its text (may be empty while a character is incomplete) and
    the new token ids."""

    text: str
    token_ids: list[int]


@dataclass
class FinishEvent:
    """The end of a generation. ``reason``: ``stop`` (end of sequence, stop string, or the JSON
    constraint completed), ``length`` (max_tokens or the context length reached) or ``abort``."""

    reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


EngineEvent = TokenEvent | FinishEvent
Prompt = str | list[int]


@dataclass
class EngineHealth:
    ok: bool
    running: int
    waiting: int
    adapters: list[str]
    detail: dict = field(default_factory=dict)


class Engine(abc.ABC):
    """The interface of an inference engine; see the module docstring."""

    #: short kind name reported in heartbeats (``vllm``, ``hf``, ...)
    name: str = "engine"

    #: most generations that run at once; the consumer's prefetch follows it
    capacity: int = 1

    #: the base model's Hugging Face tokenizer, or None (prompts then go in as text)
    tokenizer: Any = None

    #: the longest prompt + output in tokens the engine accepts (0: unknown)
    max_model_len: int = 0

    #: the engine computes in processes of its own (``ENGINE_CPUS`` confines them, see
    #: :mod:`workers.engines.cpus`); false when it runs in the consumer's process
    own_processes: bool = False

    def __init__(self) -> None:
        #: the last finished generations: (request id, finish reason, completion tokens, unix time)
        self.finished: collections.deque[tuple[str, str, int, float]] = collections.deque(maxlen=1000)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model. Called once before any other method."""

    @abc.abstractmethod
    def generate(self, request_id: str, prompt: Prompt, params: SamplingSpec,
                 adapter: str | None = None) -> AsyncIterator[EngineEvent]:
        """Run one generation; yields :class:`TokenEvent` s then exactly one :class:`FinishEvent`.

        ``request_id`` must be unique among running generations. ``adapter`` is a name given to
        :meth:`add_adapter` (None: the base model). Closing the iterator early aborts the
        generation. Raises :class:`BadEngineRequest`, :class:`EngineDead` or :class:`EngineError`.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a running generation (no-op when it is not running)."""

    @abc.abstractmethod
    async def add_adapter(self, name: str, path: str) -> None:
        """Register an adapter version stored as a PEFT folder at ``path`` under ``name``."""

    @abc.abstractmethod
    async def remove_adapter(self, name: str) -> None:
        """Unregister an adapter; running generations finish on it, then it is unloaded."""

    def adapters(self) -> list[str]:
        """Names of the registered adapters."""
        return []

    @abc.abstractmethod
    async def health(self) -> EngineHealth:
        """The engine's state; raises :class:`EngineDead` when it is gone."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Shut the engine down."""

    # helpers for implementations ---------------------------------------------------------------
    def _record_finish(self, request_id: str, ev: FinishEvent) -> None:
        self.finished.append((request_id, ev.reason, ev.completion_tokens, time.time()))

    def finish_reason_of(self, request_id: str) -> str | None:
        """The finish reason of a recently finished generation (None if unknown)."""
        for rid, reason, _n, _t in reversed(self.finished):
            if rid == request_id:
                return reason
        return None


# ------------------------------------------------------------------------------------------------
# adapter bookkeeping shared by the engines
# ------------------------------------------------------------------------------------------------


@dataclass
class AdapterEntry:
    name: str
    path: str
    int_id: int
    refs: int = 1            # registrations (add_adapter calls minus remove_adapter calls)
    inflight: int = 0        # generations using it now
    loaded: bool = False     # loaded in the engine (holds a slot)
    last_used: float = 0.0


def _same_files(a: str, b: str) -> bool:
    """Whether two adapter folders hold the same files (names and bytes)."""
    import filecmp
    import os

    try:
        names = sorted(n for n in os.listdir(a) if not n.startswith("."))
        if names != sorted(n for n in os.listdir(b) if not n.startswith(".")):
            return False
        return all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)
    except OSError:
        return False


class AdapterSlots:
    """Adapter registry with a bounded number of loaded adapters.

    ``load(entry)`` and ``unload(entry)`` are the engine's coroutines that really load and unload.
    :meth:`acquire` (before a generation) loads the adapter if needed, evicting the least recently
    used idle one when ``max_loaded`` are loaded, or waits until one is idle. :meth:`release` (after
    it) unloads adapters that were removed and are now idle.
    """

    def __init__(self, max_loaded: int, load: Callable[[AdapterEntry], Awaitable[None]],
                 unload: Callable[[AdapterEntry], Awaitable[None]]):
        if max_loaded < 1:
            raise ValueError("max_loaded must be >= 1")
        self.max_loaded = max_loaded
        self._load = load
        self._unload = unload
        self.entries: dict[str, AdapterEntry] = {}
        self._removed: dict[str, AdapterEntry] = {}   # unregistered, still in use
        self._next_id = 1
        self._cond = asyncio.Condition()

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> AdapterEntry:
        e = self.entries.get(name)
        if e is None:
            raise BadEngineRequest(f"adapter {name!r} is not registered in the engine")
        return e

    async def add(self, name: str, path: str) -> AdapterEntry:
        async with self._cond:
            e = self.entries.get(name)
            if e is not None:
                if e.path != path and not await asyncio.to_thread(_same_files, e.path, path):
                    raise BadEngineRequest(f"adapter {name!r} is already registered with other weights; "
                                           "register a new version under a new name")
                e.refs += 1
                return e
            e = self._removed.pop(name, None)
            if e is not None and e.path == path:
                e.refs = 1          # re-registered while its last generations were still running
            else:
                if e is not None:   # a different folder under an old name: keep the old id apart
                    self._removed[name] = e
                    raise BadEngineRequest(f"adapter {name!r} is still being removed; use a new name")
                e = AdapterEntry(name, path, self._next_id)
                self._next_id += 1
            self.entries[name] = e
            return e

    async def remove(self, name: str) -> None:
        async with self._cond:
            e = self.entries.get(name)
            if e is None:
                return
            e.refs -= 1
            if e.refs > 0:
                return
            del self.entries[name]
            if e.inflight > 0:
                self._removed[name] = e
                return
            if e.loaded:
                e.loaded = False
                await self._unload(e)
            self._cond.notify_all()

    async def acquire(self, name: str, timeout: float | None = None) -> AdapterEntry:
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._cond:
            while True:
                e = self.entries.get(name)
                if e is None:
                    raise BadEngineRequest(f"adapter {name!r} is not registered in the engine")
                if e.loaded:
                    break
                if self._loaded_count() < self.max_loaded:
                    await self._load(e)
                    e.loaded = True
                    break
                victim = self._lru_idle()
                if victim is not None:
                    victim.loaded = False
                    await self._unload(victim)
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise EngineError("timed out waiting for a free adapter slot")
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except TimeoutError:
                    raise EngineError("timed out waiting for a free adapter slot") from None
            e.inflight += 1
            e.last_used = time.monotonic()
            return e

    async def release(self, e: AdapterEntry) -> None:
        async with self._cond:
            e.inflight -= 1
            e.last_used = time.monotonic()
            if e.inflight == 0 and self._removed.get(e.name) is e:
                del self._removed[e.name]
                if e.loaded:
                    e.loaded = False
                    await self._unload(e)
            self._cond.notify_all()

    def _all(self):
        yield from self.entries.values()
        yield from self._removed.values()

    def _loaded_count(self) -> int:
        return sum(1 for e in self._all() if e.loaded)

    def _lru_idle(self) -> AdapterEntry | None:
        idle = [e for e in self._all() if e.loaded and e.inflight == 0]
        return min(idle, key=lambda e: e.last_used) if idle else None

    def loaded_names(self) -> list[str]:
        return [e.name for e in self._all() if e.loaded]


# ------------------------------------------------------------------------------------------------
# JSON-schema patterns that xgrammar's cached compiler can take
# ------------------------------------------------------------------------------------------------

#: xgrammar 0.2.8 with its compile cache on (vLLM's backend always turns it on) fails to compile a
#: regex repetition with a count above 128 ("per_rule_fsm_hashes" check). Patterns are rewritten to
#: an equivalent form whose counts stay at or below this.
MAX_REPEAT = 128

_QUANT = __import__("re").compile(r"\{(\d+)(,(\d*))?\}")


def _repeat(atom: str, lo: int, hi: int | None) -> str:
    """``atom{lo,hi}`` (hi None: unbounded) with every count <= MAX_REPEAT, same language, no
    ambiguity beyond two alternatives."""
    B = MAX_REPEAT
    parts = []
    if lo > B:
        parts.append(f"(?:{atom}{{{B}}}){{{lo // B}}}")
        if lo % B:
            parts.append(f"{atom}{{{lo % B}}}")
    elif lo:
        parts.append(f"{atom}{{{lo}}}")
    if hi is None:
        parts.append(f"{atom}*")
        return "(?:" + "".join(parts) + ")"
    k = hi - lo  # the optional part: atom{0,k}
    if k <= B:
        if k:
            parts.append(f"{atom}{{0,{k}}}")
        return "(?:" + "".join(parts) + ")" if parts else ""
    for b in range(B, 15, -1):
        if (k + 1) % b == 0:
            # lengths 0..k, each written one way: j full blocks, then 0..b-1 more
            parts.append(f"(?:{atom}{{{b}}}){{0,{(k + 1) // b - 1}}}{atom}{{0,{b - 1}}}")
            break
    else:
        q, s = divmod(k, B)
        short = f"(?:{atom}{{{B}}}){{0,{q - 1}}}{atom}{{0,{B - 1}}}" if q > 1 else f"{atom}{{0,{B - 1}}}"
        full = f"(?:{atom}{{{B}}}){{{q}}}" + (f"{atom}{{0,{s}}}" if s else "")
        parts.append(f"(?:{short}|{full})")
    return "(?:" + "".join(parts) + ")"


def _class_end(p: str, i: int) -> int:
    """Index just past the bracket class starting at ``p[i] == "["``."""
    j = i + 1
    if j < len(p) and p[j] == "^":
        j += 1
    if j < len(p) and p[j] == "]":
        j += 1
    while j < len(p) and p[j] != "]":
        j += 2 if p[j] == "\\" else 1
    return j + 1


def _rewrite(p: str, i: int = 0, stop: str = "") -> tuple[str, int]:
    atoms: list[str] = []
    while i < len(p) and p[i] != stop:
        c = p[i]
        if c == "\\":
            m = __import__("re").match(r"\\(?:x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|.)", p[i:])
            atoms.append(m.group(0))
            i += len(m.group(0))
        elif c == "[":
            j = _class_end(p, i)
            atoms.append(p[i:j])
            i = j
        elif c == "(":
            m = __import__("re").match(r"\((?:\?(?:[:=!>]|<[=!]|P?<[A-Za-z_][A-Za-z0-9_]*>))?", p[i:])
            inner, j = _rewrite(p, i + len(m.group(0)), ")")
            atoms.append(m.group(0) + inner + ")")
            i = j + 1
        elif c == "{" and atoms and (q := _QUANT.match(p, i)):
            lo, comma, hi = int(q.group(1)), q.group(2), q.group(3)
            high = lo if not comma else (int(hi) if hi else None)
            i = q.end()
            lazy = p[i:i + 1] == "?"   # laziness does not change which strings match
            if max(lo, high or 0) > MAX_REPEAT:
                atoms[-1] = _repeat(atoms[-1], lo, high)
            else:
                atoms[-1] += q.group(0) + ("?" if lazy else "")
            i += lazy
        else:
            atoms.append(c)
            i += 1
    return "".join(atoms), i


def xgrammar_safe_pattern(pattern: str) -> str:
    """``pattern`` with counted repetitions above :data:`MAX_REPEAT` rewritten to an equivalent
    form (same language) whose counts stay at or below it."""
    return _rewrite(pattern)[0]


def xgrammar_safe_schema(schema: Any) -> Any:
    """A copy of a JSON schema with every ``pattern`` passed through :func:`xgrammar_safe_pattern`.

    The language stays the same, so the output still validates against the original schema."""
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "pattern" and isinstance(v, str):
                out[k] = xgrammar_safe_pattern(v)
            elif k in ("enum", "const", "default", "examples"):
                out[k] = v  # values, not schemas
            elif k in ("properties", "patternProperties", "$defs", "definitions") and isinstance(v, dict):
                out[k] = {name: xgrammar_safe_schema(sub) for name, sub in v.items()}
            else:
                out[k] = xgrammar_safe_schema(v)
        return out
    if isinstance(schema, list):
        return [xgrammar_safe_schema(v) for v in schema]
    return schema


def run_id(request_id: str) -> str:
    """A unique engine-side id for a run of a request (a request can be run again after a
    redelivery)."""
    import uuid

    return f"{request_id}:{uuid.uuid4().hex[:8]}"
