"""The inference consumer (``npcbus worker infer``): generation requests in, token streams out.

One process serves one base model. It consumes ``NS.gen.<model id>`` with a prefetch of its
engine's capacity plus a quarter (:func:`gen_prefetch`) and holds each delivery until the
generation ends, so the broker hands it little more than it can run and several consumers on one
queue share the load. The headroom covers the requests that are finishing (their last reply and
ack still on the way) while new ones arrive: the engine queues those few and starts them at its
next step, instead of the broker holding them back until an ack comes in. For each request it:

1. drops it unrun when its deadline has passed (``generation_error`` code ``expired``) or it was
   cancelled before it started (code ``cancelled``);
2. validates it and builds the prompt: ``npc`` mode (NPC request -> prompt, the response schema as
   the constraint, the spoken line streamed through :class:`npcbus.npc.DialogueStreamer`, the
   final output parsed strictly, validated and passed through the safety rails; unsafe player
   input is refused without generating), ``chat`` (OpenAI messages through the tokenizer's chat
   template) or ``text`` (a raw prompt); ``json_schema`` constrains chat and text output too. A
   request that is malformed or names an unknown adapter is dead-lettered with its reason, and
   the requester gets a ``generation_error`` (``invalid_request``, ``invalid_params``,
   ``unknown_adapter``);
3. runs it on the engine with the adapter's current version and streams ``token_delta`` events
   to the requester's reply queue (correlation id and sequence numbers; the first text at once,
   then batched: ``TOKEN_BATCH_TOKENS`` tokens or the next ``TOKEN_BATCH_MS`` tick, whichever
   comes first), then ``final_response`` with the adapter and version used. Events for one
   requester that are ready in the same event-loop turn (the streams' first tokens of one engine
   step, every stream's text at a tick) travel as one ``reply_batch`` message when the requester
   accepts them (``x-npcbus-batch-replies`` header; npcbus's own requesters do). JSON output of
   chat and text (``json_schema``) never repeats a key within an object, which the constraint
   alone allows: as a key repeats (:class:`RepeatedKeyWatch`), the text is withheld, the
   generation stops and the requester gets ``generation_error`` ``invalid_output`` (retryable
   when sampling without a seed);
4. aborts the generation at the engine on a ``cancel`` message (cancel fanout), when the deadline
   passes (code ``deadline``) or when the requester's reply queue is gone.

A request redelivered after its consumer died is run again and answered with its final event
only (sequence number 0): the requester keeps the text it already has and gets the complete,
authoritative final response.

Adapter versions: at start, before its first heartbeat, the consumer asks whoever serves adapter
fetches (the aggregator) for every adapter's current version, so that its first heartbeat already
tells gateways of every adapter (a persona session started as soon as the gateway is healthy uses
its persona's adapter); later announcements on the versions fanout are fetched through the bus
(cached by content hash) and registered in the engine under a new name; new requests use the new
version at once (requests that arrive during the swap wait for it), running ones finish on the old
one, which is removed from the engine when its last request ends.

Heartbeats (``consumer_heartbeat`` on the events fanout, every ``HEARTBEAT_INTERVAL_S``) tell the
gateway which consumers are alive, their capacity and load, and the adapter versions they hold.

``ENGINE_CPUS`` puts the engine's own processes (vLLM) on CPUs of their own and the consumer's
threads on the others (:mod:`workers.engines.cpus`), for hosts where the consumer shares CPUs with
the broker or a gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from npcbus.settings import Settings, env_field
from workers.engines.cpus import cpu_list_ok

# heavy imports (torch, vllm, the engines) happen inside functions


def _engine_ok(s: str) -> bool:
    return s in ("auto", "vllm", "hf") or (":" in s and all(s.partition(":")[::2]))


def _json_object(s: str) -> bool:
    return s.strip() == "" or isinstance(json.loads(s), dict)


@dataclass
class InferSettings(Settings):
    """The inference consumer (``npcbus worker infer``)."""

    title: ClassVar[str] = "worker infer"

    engine: str = env_field(
        "ENGINE", "auto",
        "Inference engine: `auto` (vllm when importable, else hf), `vllm`, `hf` (transformers+PEFT), or "
        "`package.module:Class` for a custom engine (see workers/engines/__init__.py).",
        check=_engine_ok, check_msg="use auto, vllm, hf or package.module:Class")
    max_concurrency: int = env_field(
        "MAX_CONCURRENCY", 16, "Generations one consumer runs at once (the engine's batch size; the consumer's "
        "prefetch is this plus a quarter, see workers/infer_worker.py).",
        check=lambda n: 1 <= n <= 4096, check_msg="must be between 1 and 4096")
    max_loras: int = env_field(
        "MAX_LORAS", 4, "Adapter versions loaded in the engine at once (vLLM gets one slot more as headroom).",
        check=lambda n: 1 <= n <= 256, check_msg="must be between 1 and 256")
    max_lora_rank: int = env_field(
        "MAX_LORA_RANK", 16, "Highest LoRA rank the engine accepts (vLLM: 1, 8, 16, 32, 64, 128, 256, 320 or 512).",
        check=lambda n: n in (1, 8, 16, 32, 64, 128, 256, 320, 512), check_msg="must be 1, 8, 16, 32, 64, 128, 256, 320 or 512")
    max_model_len: int = env_field(
        "MAX_MODEL_LEN", 2048, "Longest prompt + output in tokens (0: the model's own limit).",
        check=lambda n: n >= 0, check_msg="must be >= 0")
    dtype: str = env_field(
        "ENGINE_DTYPE", "auto", "Weights dtype in the engine: auto, float32, bfloat16 or float16.",
        check=lambda s: s in ("auto", "float32", "bfloat16", "float16"), check_msg="use auto, float32, bfloat16 or float16")
    seed: int = env_field("ENGINE_SEED", 0, "Engine seed (sampling without a request seed).")
    device: str = env_field("ENGINE_DEVICE", "", "Torch device of the hf engine (empty: cpu).")
    gpu_memory_utilization: float = env_field(
        "GPU_MEMORY_UTILIZATION", 0.0, "vLLM on GPUs: fraction of GPU memory for the engine (0: vLLM's default).",
        check=lambda x: 0 <= x <= 1, check_msg="must be between 0 and 1")
    engine_cpus: str = env_field(
        "ENGINE_CPUS", "",
        "CPUs for the engine's own processes (vLLM's engine core and workers), e.g. `1` or `2-7,12`; the "
        "consumer's threads keep to the other CPUs it may use. For hosts where the consumer shares CPUs with the "
        "broker or a gateway: vLLM's engine core polls its workers in a loop, and each broker hop then waits for a "
        "core (docs/benchmarks.md). Empty: no confinement. Ignored by the transformers engine.",
        check=cpu_list_ok, check_msg="use a CPU list such as 1 or 2-7,12")
    engine_extra_args: str = env_field(
        "ENGINE_EXTRA_ARGS", "", "JSON object of extra vLLM AsyncEngineArgs (e.g. {\"enforce_eager\": true}).",
        check=_json_object, check_msg="must be a JSON object")
    adapter_cache_dir: str = env_field(
        "ADAPTER_CACHE_DIR", ".npcbus/adapter-cache", "Where fetched adapter versions are cached by content hash.")
    adapter_fetch_timeout_s: float = env_field(
        "ADAPTER_FETCH_TIMEOUT_S", 30.0, "How long to wait for an adapter version fetched through the bus.",
        check=lambda x: x > 0, check_msg="must be > 0")
    preload_adapters: list[str] = env_field(
        "PRELOAD_ADAPTERS", [], "Comma-separated adapter names to fetch and load at start.")
    token_batch_ms: float = env_field(
        "TOKEN_BATCH_MS", 50.0,
        "The first token delta of a stream goes out at once; later text is sent when TOKEN_BATCH_TOKENS tokens are "
        "pending or at the next tick of a clock of this period (at most this many milliseconds after the first "
        "pending token; all streams share the ticks, so their deltas to one requester leave as one message).",
        check=lambda x: x >= 0, check_msg="must be >= 0")
    token_batch_tokens: int = env_field(
        "TOKEN_BATCH_TOKENS", 16, "Tokens that make a token delta go out at once (see TOKEN_BATCH_MS).",
        check=lambda n: n >= 1, check_msg="must be >= 1")
    heartbeat_interval_s: float = env_field(
        "HEARTBEAT_INTERVAL_S", 5.0, "Seconds between consumer heartbeats on the events exchange.",
        check=lambda x: x > 0, check_msg="must be > 0")
    default_max_tokens: int = env_field(
        "DEFAULT_MAX_TOKENS", 256, "max_tokens of chat and text requests that give none.",
        check=lambda n: n >= 1, check_msg="must be >= 1")
    drain_timeout_s: float = env_field(
        "DRAIN_TIMEOUT_S", 30.0, "On shutdown, how long running generations may finish before they are aborted.",
        check=lambda x: x >= 0, check_msg="must be >= 0")
    worker_id: str = env_field("WORKER_ID", "", "This consumer's id in heartbeats and logs (empty: host-pid).")

    def vllm_extra_args(self) -> dict:
        return json.loads(self.engine_extra_args) if self.engine_extra_args.strip() else {}


# ------------------------------------------------------------------------------------------------
# request preparation (pure)
# ------------------------------------------------------------------------------------------------

PARAM_KEYS = ("max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
MODES = ("npc", "chat", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


class InvalidRequest(ValueError):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Job:
    """A validated request, ready for the engine."""

    mode: str
    prompt: Any                      # text or token ids
    params: Any                      # SamplingSpec
    adapter: str | None
    adapter_version: int | None
    npc: Any = None                  # the validated NPCRequest (npc mode)
    refusal: dict | None = None      # npc mode: refuse at once with this response
    schema: dict | None = None       # validate the final output against it


def sampling_from(params: dict, base: dict | None, default_max_tokens: int):
    """A :class:`SamplingSpec` from a request's ``params`` (over ``base``, the NPC request's
    generation settings). Raises :class:`InvalidRequest` naming the bad parameter."""
    from workers.engines.base import BadEngineRequest, SamplingSpec

    if not isinstance(params, dict):
        raise InvalidRequest("invalid_params", "params must be an object")
    unknown = sorted(k for k, v in params.items() if k not in PARAM_KEYS and v is not None)
    if unknown:
        raise InvalidRequest("invalid_params", f"unknown generation parameter(s) {', '.join(map(repr, unknown))}; "
                                               f"supported: {', '.join(PARAM_KEYS)}")
    merged = dict(base or {})
    merged.update({k: v for k, v in params.items() if v is not None})
    max_tokens = merged.get("max_tokens", merged.get("max_new_tokens", default_max_tokens))
    stop = merged.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    try:
        spec = SamplingSpec(
            max_tokens=max_tokens,
            temperature=merged.get("temperature", 0.0),
            top_p=merged.get("top_p", 1.0),
            top_k=merged.get("top_k", 0) or 0,
            seed=merged.get("seed"),
            stop=list(stop) if isinstance(stop, list) else stop,
            ignore_eos=bool(merged.get("ignore_eos", False)),
        )
        spec.validate()
    except BadEngineRequest as e:
        raise InvalidRequest("invalid_params", str(e)) from None
    return spec


def _special_strings(tokenizer) -> list[str]:
    if tokenizer is None:
        return []
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            specials.add(str(getattr(tok, "content", tok)))
    return sorted((s for s in specials if s), key=len, reverse=True)


def _strip_specials(text: str, specials: list[str]) -> str:
    for _ in range(4):
        before = text
        for s in specials:
            text = text.replace(s, "")
        if text == before:
            break
    return text


def _chat_prompt(messages: Any, tokenizer) -> str:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("invalid_request", "chat mode needs a non-empty 'messages' list")
    specials = _special_strings(tokenizer)
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest("invalid_request", f"messages[{i}] must be an object with a 'role'")
        if m["role"] not in CHAT_ROLES:
            raise InvalidRequest("invalid_request", f"messages[{i}].role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        content = m.get("content", "")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise InvalidRequest("invalid_request", f"messages[{i}].content[{j}] must be a text part")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequest("invalid_request", f"messages[{i}].content must be a string or text parts")
        role = m["role"] if m["role"] in ("system", "user", "assistant") else ("system" if m["role"] == "developer" else "user")
        clean.append({"role": role, "content": _strip_specials(content, specials)})
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template's own refusal
            raise InvalidRequest("invalid_request", f"the chat template refused the messages: {e}") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"


_TOKENIZER_LOCK = threading.Lock()  # fast tokenizers may refuse concurrent use from several threads


def _encode(tokenizer, text: str, *, add_special_tokens: bool):
    if tokenizer is None:
        return text
    with _TOKENIZER_LOCK:
        return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def prepare(msg, tokenizer, settings: InferSettings) -> Job:
    """Validate a :class:`GenerationRequest` and build its :class:`Job` (pure; may take a few ms)."""
    from npcbus import npc as npclib

    if not isinstance(msg.request_id, str) or not msg.request_id:
        raise InvalidRequest("invalid_request", "request_id must be a non-empty string")
    if msg.mode not in MODES:
        raise InvalidRequest("invalid_request", f"unknown mode {msg.mode!r}; use one of {', '.join(MODES)}")
    adapter = msg.adapter or None
    if adapter is not None and (not isinstance(adapter, str) or len(adapter) > 128):
        raise InvalidRequest("invalid_request", "adapter must be a short string")
    version = msg.adapter_version
    if version is not None and version < 0:
        raise InvalidRequest("invalid_request", "adapter_version must be >= 0")
    if msg.mode == "npc":
        try:
            req = npclib.validate_request(msg.npc)
        except npclib.NPCRequestError as e:
            raise InvalidRequest("invalid_request", f"npc.{e.field}: {e.reason}") from None
        adapter = adapter or req.get("adapter") or None
        # what the request sets, else the model's recommended NPC sampling, else the request defaults
        g = npclib.generation_for(msg.npc, tokenizer)
        base = {"max_tokens": g.get("max_new_tokens"), "temperature": g.get("temperature"), "top_p": g.get("top_p"),
                "top_k": g.get("top_k"), "seed": g.get("seed")}
        params = sampling_from(msg.params, base, settings.default_max_tokens)
        category = npclib.unsafe_input_category(req)
        if category is not None:
            return Job("npc", "", params, adapter, version, npc=req, refusal=npclib.refusal_response(req, category))
        # the constraint writes the keys in the order the model was trained on; validation ignores it
        schema = npclib.response_schema_for(req, npclib.response_order_of(tokenizer))
        params.json_schema = schema
        prompt_text = npclib.build_prompt(req, tokenizer)
        templated = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        prompt = _encode(tokenizer, prompt_text, add_special_tokens=not templated)
        return Job("npc", prompt, params, adapter, version, npc=req, schema=schema)
    params = sampling_from(msg.params, None, settings.default_max_tokens)
    schema = None
    if msg.json_schema is not None:
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(msg.json_schema)
        except jsonschema.SchemaError as e:
            raise InvalidRequest("invalid_request", f"json_schema is not a valid JSON Schema: {e.message[:200]}") from None
        schema = msg.json_schema
        params.json_schema = schema
    if msg.mode == "chat":
        text = _chat_prompt(msg.messages, tokenizer)
        templated = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        prompt = _encode(tokenizer, text, add_special_tokens=not templated)
    else:
        if not isinstance(msg.prompt, str) or not msg.prompt:
            raise InvalidRequest("invalid_request", "text mode needs a non-empty 'prompt'")
        prompt = _encode(tokenizer, msg.prompt, add_special_tokens=True)
    return Job(msg.mode, prompt, params, adapter, version, schema=schema)


def check_json_output(text: str, schema: dict) -> tuple[Any, list[str]]:
    """Strictly parse ``text`` and validate it against ``schema``: (value or None, problems)."""
    import jsonschema

    from npcbus.npc import StrictJSONError, strict_json_loads

    try:
        value = strict_json_loads(text)
    except StrictJSONError as e:
        return None, [f"invalid: json: {e}"]
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(value))
    if errors:
        return None, [f"invalid: schema: {e.message[:200]}" for e in errors[:5]]
    return value, []


class RepeatedKeyWatch:
    """Watches JSON text fed in arbitrary chunks for an object that repeats a key.

    A JSON-schema constraint does not stop a repeated key (``{"type": "object"}``, the constraint
    of ``response_format: json_object``, allows any keys in any number), and strict parsing refuses
    it only once the text is complete. ``feed(chunk)`` returns the repeated key (decoded) as soon as
    the chunk completes a key that its object already has, else None; ``repeated`` keeps it. Keys
    count per object, so nested objects may reuse their parents' keys. Text that is not JSON is
    scanned all the same and proves nothing: the final strict parse judges it.
    """

    def __init__(self) -> None:
        self.repeated: str | None = None
        self._stack: list[set[str] | None] = []  # per open container: its keys (objects) or None (arrays)
        self._expect_key = False
        self._in_string = False
        self._is_key = False
        self._escaped = False
        self._key: list[str] = []

    def feed(self, chunk: str) -> str | None:
        if self.repeated is not None:
            return self.repeated
        for ch in chunk:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                    if self._is_key and self._close_key():
                        return self.repeated
                    continue
                if self._is_key:
                    self._key.append(ch)
            elif ch == '"':
                self._in_string = True
                self._is_key = bool(self._stack) and self._stack[-1] is not None and self._expect_key
                self._expect_key = False
            elif ch == "{":
                self._stack.append(set())
                self._expect_key = True
            elif ch == "[":
                self._stack.append(None)
            elif ch in "}]":
                if self._stack:
                    self._stack.pop()
                self._expect_key = False
            elif ch == ",":
                self._expect_key = bool(self._stack) and self._stack[-1] is not None
        return None

    def _close_key(self) -> bool:
        raw, self._key = "".join(self._key), []
        try:
            key = json.loads(f'"{raw}"')
        except ValueError:
            key = raw
        keys = self._stack[-1]
        if key in keys:
            self.repeated = key
            return True
        keys.add(key)
        return False


def repeated_key_error(key: str, params) -> tuple[str, str, bool]:
    """The ``generation_error`` (code, message, retryable) of JSON output that repeated ``key``:
    sampling without a seed may well answer differently, so it is retryable then."""
    message = (f"the model repeated the key {key!r} in a JSON object; the output was withheld and the "
               "generation stopped")
    return "invalid_output", message, not params.greedy and params.seed is None


# ------------------------------------------------------------------------------------------------
# adapter versions
# ------------------------------------------------------------------------------------------------


class UnknownAdapter(Exception):
    """The adapter (or version) does not exist for this base model."""


class AdapterFetchFailed(Exception):
    """The adapter could not be fetched now (try again later)."""


@dataclass
class AdapterVersion:
    adapter: str
    version: int
    content_hash: str
    engine_name: str
    path: str
    inflight: int = 0


class AdapterVersions:
    """Which version of each adapter new requests use, and the engine registrations behind them."""

    def __init__(self, bus, engine, cache, *, model_ok, manifest=None, fetch_timeout_s: float = 30.0, log=None):
        self.bus = bus
        self.engine = engine
        self.cache = cache
        self.model_ok = model_ok
        self.manifest = manifest
        self.fetch_timeout_s = fetch_timeout_s
        self.log = log
        self.current: dict[str, AdapterVersion] = {}
        self.pinned: dict[tuple[str, int], AdapterVersion] = {}
        self.announced: dict[str, Any] = {}
        self._swapping: dict[str, asyncio.Future] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retired: list[AdapterVersion] = []

    def snapshot(self) -> dict[str, int]:
        """Adapter name -> version, for every adapter this consumer serves: the ones loaded and the
        ones announced (loaded on first use), so that gateways learn of every adapter that exists."""
        out = {name: a.version for name, a in self.announced.items()}
        out.update((name, v.version) for name, v in self.current.items())
        return out

    def _lock(self, name: str) -> asyncio.Lock:
        lk = self._locks.get(name)
        if lk is None:
            lk = self._locks[name] = asyncio.Lock()
        return lk

    async def _fetch(self, name: str, version: int | None, content_hash: str = ""):
        from npcbus.adapter_store import AdapterUnavailable, FetchedAdapter, read_adapter_files
        from npcbus.adapter_store import content_hash as hash_files
        from npcbus.bus import BusError

        # a local folder named by the manifest (this version or the current one) needs no fetch
        if self.manifest is not None:
            try:
                entry, cur = self.manifest.resolve_ref(name)
            except Exception:  # noqa: BLE001 - not in the manifest: ask the bus
                entry, cur = None, None
            if entry is not None:
                if entry.base_model and not self.model_ok(entry.base_model):
                    raise UnknownAdapter(f"adapter {name!r} is for base model {entry.base_model!r}")
                want = version if version is not None else cur
                if entry.path and os.path.isfile(os.path.join(entry.path, "adapter_config.json")) and (
                        want is None or want == cur):
                    files = await asyncio.to_thread(read_adapter_files, entry.path)
                    chash = await asyncio.to_thread(hash_files, files)
                    _, path = await asyncio.to_thread(self.cache.put, files)
                    return FetchedAdapter(name, cur if cur is not None else 0, chash, entry.base_model, path)
                if version is None and cur is not None:
                    version, content_hash = cur, content_hash or entry.content_hash
        from npcbus.adapter_store import fetch_adapter

        try:
            fetched = await fetch_adapter(self.bus, self.cache, name, version, content_hash_hint=content_hash or None,
                                          timeout=self.fetch_timeout_s)
        except AdapterUnavailable as e:
            raise UnknownAdapter(f"adapter {name!r}" + (f" version {version}" if version is not None else "")
                                 + f" is not available: {e}") from None
        except (BusError, TimeoutError) as e:
            raise AdapterFetchFailed(f"could not fetch adapter {name!r}: {type(e).__name__}: {e}") from None
        if fetched.base_model and not self.model_ok(fetched.base_model):
            raise UnknownAdapter(f"adapter {name!r} is for base model {fetched.base_model!r}")
        return fetched

    async def _register(self, fetched) -> AdapterVersion:
        engine_name = f"{fetched.adapter}@v{fetched.version}-{fetched.content_hash[:10]}"
        try:
            await self.engine.add_adapter(engine_name, str(fetched.path))
        except Exception as e:  # noqa: BLE001 - an adapter the engine refuses is unusable
            raise UnknownAdapter(f"adapter {fetched.adapter!r} version {fetched.version} was refused by the "
                                 f"engine: {e}") from None
        return AdapterVersion(fetched.adapter, fetched.version, fetched.content_hash, engine_name, str(fetched.path))

    async def acquire(self, name: str, version: int | None = None) -> AdapterVersion:
        """The version a new request for ``name`` runs on (loading it first if needed)."""
        fut = self._swapping.get(name)
        if fut is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), self.fetch_timeout_s)
        cur = self.current.get(name)
        if cur is not None and (version is None or version == cur.version):
            cur.inflight += 1
            return cur
        if version is not None:
            key = (name, version)
            async with self._lock(name):
                v = self.pinned.get(key)
                if v is None:
                    cur = self.current.get(name)
                    if cur is not None and cur.version == version:
                        v = cur
                    else:
                        ann = self.announced.get(name)
                        chash = ann.content_hash if ann is not None and ann.version == version else ""
                        v = await self._register(await self._fetch(name, version, chash))
                        self.pinned[key] = v
                v.inflight += 1
                return v
        async with self._lock(name):
            cur = self.current.get(name)
            if cur is None:
                ann = self.announced.get(name)
                fetched = await self._fetch(name, ann.version if ann else None, ann.content_hash if ann else "")
                cur = await self._register(fetched)
                self.current[name] = cur
                if self.log:
                    self.log.info("adapter ready", adapter=name, version=cur.version, engine_name=cur.engine_name)
            cur.inflight += 1
            return cur

    async def release(self, v: AdapterVersion) -> None:
        v.inflight -= 1
        if v.inflight > 0:
            return
        if self.current.get(v.adapter) is v:
            return
        key = (v.adapter, v.version)
        if self.pinned.get(key) is v:
            del self.pinned[key]
        if v in self._retired:
            self._retired.remove(v)
        await self.engine.remove_adapter(v.engine_name)
        if self.log:
            self.log.info("old adapter version removed", adapter=v.adapter, version=v.version,
                          engine_name=v.engine_name)

    async def close(self) -> None:
        """Unregister every version from the engine (another consumer may share it)."""
        versions = {id(v): v for v in [*self.current.values(), *self.pinned.values(), *self._retired]}
        self.current.clear()
        self.pinned.clear()
        self._retired.clear()
        for v in versions.values():
            with contextlib.suppress(Exception):
                await self.engine.remove_adapter(v.engine_name)

    async def on_announcement(self, ann) -> None:
        """A new version was announced: swap to it when this consumer uses the adapter."""
        if ann.base_model and not self.model_ok(ann.base_model):
            return
        prev = self.announced.get(ann.adapter)
        if prev is None or ann.version >= prev.version:
            self.announced[ann.adapter] = ann
        cur = self.current.get(ann.adapter)
        if cur is None or ann.version <= cur.version:
            return
        loop = asyncio.get_running_loop()
        fut = self._swapping.get(ann.adapter)
        own = fut is None
        if own:
            fut = self._swapping[ann.adapter] = loop.create_future()
        try:
            async with self._lock(ann.adapter):
                cur = self.current.get(ann.adapter)
                if cur is None or ann.version <= cur.version:
                    return
                started = time.monotonic()
                fetched = await self._fetch(ann.adapter, ann.version, ann.content_hash)
                new = await self._register(fetched)
                old, self.current[ann.adapter] = cur, new
                if self.log:
                    self.log.info("adapter version swapped", adapter=ann.adapter, version=new.version,
                                  old_version=old.version, engine_name=new.engine_name,
                                  seconds=round(time.monotonic() - started, 3), old_inflight=old.inflight)
                if old.inflight == 0:
                    await self.engine.remove_adapter(old.engine_name)
                else:
                    self._retired.append(old)
        except (UnknownAdapter, AdapterFetchFailed) as e:
            if self.log:
                self.log.warning("could not swap to the announced version; keeping the current one",
                                 adapter=ann.adapter, version=ann.version, error=str(e))
        finally:
            if own:
                self._swapping.pop(ann.adapter, None)
                if not fut.done():
                    fut.set_result(None)


# ------------------------------------------------------------------------------------------------
# the consumer
# ------------------------------------------------------------------------------------------------


class RequesterGone(Exception):
    """The requester's reply queue no longer exists."""


@dataclass
class _Run:
    request_id: str
    engine_id: str
    cancel_reason: str | None = None
    deadline_hit: bool = False
    gone: bool = False
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class InferenceWorker:
    """Serves generation requests for one base model on one engine (see the module docstring)."""

    def __init__(self, bus, engine, settings: InferSettings, *, model_id: str, model_names: tuple[str, ...] = (),
                 worker_id: str | None = None, manifest=None):
        from npcbus.adapter_store import AdapterCache
        from npcbus.logs import get_logger

        self.bus = bus
        self.engine = engine
        self.settings = settings
        self.model_id = model_id
        self.model_names = {n for n in (model_id, *model_names) if n}
        self.worker_id = worker_id or settings.worker_id or f"infer-{socket.gethostname()}-{os.getpid()}"
        self.log = get_logger("workers.infer", worker=self.worker_id, model=model_id)
        self.cache = AdapterCache(settings.adapter_cache_dir)
        self.adapters = AdapterVersions(bus, engine, self.cache, model_ok=self.model_ok, manifest=manifest,
                                        fetch_timeout_s=settings.adapter_fetch_timeout_s, log=self.log)
        self.running: dict[str, _Run] = {}
        self._cancelled: dict[str, float] = {}
        self._consumers: list = []
        self._gen_consumer = None
        self._heartbeat_task: asyncio.Task | None = None
        self.failed = asyncio.Event()
        self.stopping = False
        self.served = 0

    # base models -------------------------------------------------------------------------------
    def model_ok(self, base_model: str) -> bool:
        from npcbus.topology import model_route_key

        if not base_model or base_model in self.model_names:
            return True
        return model_route_key(base_model) == self.model_id or any(
            model_route_key(base_model) == model_route_key(n) for n in self.model_names)

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        topo = self.bus.topology
        await self.bus.declare_topology(queues=[topo.dead_queue])
        for name in self.settings.preload_adapters:
            try:
                v = await self.adapters.acquire(name)
                await self.adapters.release(v)
            except Exception as e:  # noqa: BLE001 - a missing adapter must not stop the consumer
                self.log.warning("could not preload adapter", adapter=name, error=str(e))
        cid = self.bus.client_id
        self._consumers.append(await self.bus.consume(
            topo.listener_queue("cancel", cid, topo.cancel_exchange), self._on_cancel, prefetch=256))
        self._consumers.append(await self.bus.consume(
            topo.listener_queue("versions", cid, topo.versions_exchange), self._on_version, prefetch=16))
        await self._sync_versions()
        self._gen_consumer = await self.bus.consume(topo.gen_queue(self.model_id), self._on_request,
                                                    prefetch=gen_prefetch(self.engine.capacity),
                                                    on_malformed=self._on_malformed)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="infer-heartbeat")
        self.log.info("inference consumer started", engine=self.engine.name, capacity=self.engine.capacity,
                      queue=topo.gen_queue(self.model_id).name)

    async def _sync_versions(self) -> None:
        """Every adapter's current version from the aggregator (when one serves adapter fetches), as if
        each had just been announced: announcements are made when a version is made and repeated every
        REANNOUNCE_INTERVAL_SEC, and a consumer that starts between two would not know the adapters
        that exist until the next one. Without an answer it goes on; the announcements still come."""
        from npcbus.adapter_store import list_adapters

        try:
            anns = await list_adapters(self.bus, timeout=self.settings.adapter_fetch_timeout_s)
        except Exception as e:  # noqa: BLE001 - a missing list must not stop the consumer
            self.log.warning("adapter list not received; adapters become known as they are announced",
                             error=f"{type(e).__name__}: {e}")
            return
        if anns is None:
            self.log.info("no aggregator serves adapter fetches yet; adapters become known as they are announced")
            return
        for ann in anns:
            await self.adapters.on_announcement(ann)
        self.log.info("adapter versions known", adapters={a.adapter: a.version for a in anns})

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking requests, let running ones finish (up to the drain timeout), abort the rest."""
        self.stopping = True
        drain = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        c = self._gen_consumer
        if c is not None and c.tag is not None:
            # stop deliveries but keep the channel: the running requests still ack on it
            with contextlib.suppress(Exception):
                await c.queue.cancel(c.tag)
            c.tag = None
        inflight = set(c.inflight) if c is not None else set()
        if inflight:
            await asyncio.wait(inflight, timeout=drain)
        for run in list(self.running.values()):
            run.cancel_reason = run.cancel_reason or "worker_shutdown"
            await self.engine.abort(run.engine_id)
        if inflight:
            await asyncio.wait(inflight, timeout=5)
        if c is not None:
            with contextlib.suppress(Exception):
                await c.cancel()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._heartbeat_task
        for c in self._consumers:
            with contextlib.suppress(Exception):
                await c.cancel()
        await self.adapters.close()
        self.log.info("inference consumer stopped", served=self.served)

    # heartbeats ---------------------------------------------------------------------------------
    async def heartbeat(self) -> None:
        from npcbus.messages import ConsumerHeartbeat

        hb = ConsumerHeartbeat(worker_id=self.worker_id, base_model=self.model_id, engine=self.engine.name,
                               capacity=int(self.engine.capacity), running=len(self.running),
                               adapters=self.adapters.snapshot())
        await self.bus.publish(self.bus.topology.events_exchange, "", hb, persistent=False, mandatory=False)

    async def _heartbeat_loop(self) -> None:
        from workers.engines.base import EngineDead

        while True:
            try:
                await self.engine.health()
            except EngineDead as e:
                self.log.error("engine is dead; this consumer stops taking requests", error=str(e))
                if self._gen_consumer is not None:
                    with contextlib.suppress(Exception):
                        await self._gen_consumer.cancel()
                self.failed.set()
                return
            except Exception as e:  # noqa: BLE001
                self.log.warning("engine health check failed", error=f"{type(e).__name__}: {e}")
            try:
                await self.heartbeat()
            except Exception as e:  # noqa: BLE001 - the next beat may get through
                self.log.warning("heartbeat not sent", error=f"{type(e).__name__}: {e}")
            now = time.monotonic()
            for rid, t in list(self._cancelled.items()):
                if now - t > 600:
                    del self._cancelled[rid]
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    # cancel and versions ------------------------------------------------------------------------
    async def _on_cancel(self, msg, d):
        from npcbus.bus import Ack
        from npcbus.messages import Cancel

        if not isinstance(msg, Cancel):
            return Ack()
        run = self.running.get(msg.request_id)
        if run is None:
            self._cancelled[msg.request_id] = time.monotonic()
            return Ack()
        if run.cancel_reason is None:
            run.cancel_reason = msg.reason or "cancelled"
        self.log.info("cancel: aborting generation", request_id=msg.request_id, reason=run.cancel_reason)
        await self.engine.abort(run.engine_id)
        return Ack()

    async def _on_version(self, msg, d):
        from npcbus.bus import Ack
        from npcbus.messages import VersionAnnouncement

        if isinstance(msg, VersionAnnouncement):
            await self.adapters.on_announcement(msg)
        return Ack()

    # requests -----------------------------------------------------------------------------------
    async def _on_malformed(self, d, reason: str) -> None:
        """A request that does not decode: tell its requester (when it named a reply queue) before
        the bus dead-letters it. Its request id is unknown; the correlation id matches it up."""
        _metric_requests("invalid")
        await self._error(d, "", 0, "invalid_request", reason)

    async def _error(self, d, request_id: str, seq: int, code: str, message: str, retryable: bool = False) -> None:
        from npcbus.messages import GenerationError

        if not d.reply_to:
            return
        try:
            await self.bus.reply(d, GenerationError(request_id or "", seq, code, message[:2000], retryable))
        except Exception as e:  # noqa: BLE001 - the requester may be gone; nothing else to do
            self.log.info("could not send the error event", request_id=request_id, code=code,
                          error=f"{type(e).__name__}: {e}")

    async def _on_request(self, msg, d):
        from npcbus.bus import Ack, Reject, Retry
        from npcbus.messages import GenerationRequest
        from workers.engines.base import EngineDead

        received = time.time()
        if not isinstance(msg, GenerationRequest):
            reason = f"expected a generation_request, got {msg.TYPE}"
            await self._error(d, getattr(msg, "request_id", "") or "", 0, "invalid_request", reason)
            return Reject(reason, "wrong_type")
        rid = msg.request_id
        log = self.log.bind(request_id=rid, message_id=d.message_id, adapter=msg.adapter)
        if self.stopping:
            return Retry("consumer stopping")
        deadline = min([t for t in (msg.deadline, d.deadline) if t], default=None)
        if deadline is not None and received >= deadline:
            log.info("request expired before it ran", late_s=round(received - deadline, 3))
            _metric_requests("expired")
            await self._error(d, rid, 0, "expired", "the request's deadline passed before it could run")
            return Ack()
        if rid in self._cancelled:
            self._cancelled.pop(rid, None)
            _metric_requests("cancelled")
            await self._error(d, rid, 0, "cancelled", "cancelled before it ran")
            return Ack()
        try:
            if msg.mode == "text":
                job = prepare(msg, self.engine.tokenizer, self.settings)
            else:
                job = await asyncio.to_thread(prepare, msg, self.engine.tokenizer, self.settings)
        except InvalidRequest as e:
            log.warning("invalid request; dead-lettering", code=e.code, reason=e.reason)
            _metric_requests("invalid")
            await self._error(d, rid, 0, e.code, e.reason)
            return Reject(e.reason, e.code)
        version = None
        if job.adapter is not None and job.refusal is None:
            try:
                version = await self.adapters.acquire(job.adapter, job.adapter_version)
            except UnknownAdapter as e:
                log.warning("unknown adapter; dead-lettering", reason=str(e))
                _metric_requests("unknown_adapter")
                await self._error(d, rid, 0, "unknown_adapter", str(e))
                return Reject(str(e), "unknown_adapter")
            except AdapterFetchFailed as e:
                log.warning("adapter unavailable", reason=str(e))
                _metric_requests("adapter_unavailable")
                await self._error(d, rid, 0, "adapter_unavailable", str(e), retryable=True)
                return Ack()
        try:
            outcome = await self._serve(msg, d, job, version, deadline, received, log)
        except EngineDead as e:
            log.error("engine died during a request", error=str(e))
            _metric_requests("engine_dead")
            await self._error(d, rid, 0, "engine_failed", f"the inference engine failed: {e}", retryable=True)
            self.failed.set()
            outcome = None
        except Exception as e:  # noqa: BLE001 - a bug must not leave the requester waiting
            log.exception("request failed")
            _metric_requests("internal_error")
            await self._error(d, rid, 0, "internal_error", f"{type(e).__name__}: {e}", retryable=True)
            outcome = None
        finally:
            if version is not None:
                await self.adapters.release(version)
        return outcome or Ack()

    async def _serve(self, msg, d, job: Job, version: AdapterVersion | None, deadline: float | None,
                     received: float, log):
        """Run one request and answer it; returns a :class:`Reject` when the engine refused it as
        malformed (it was answered with an error event), else None."""
        from npcbus import npc as npclib
        from npcbus.bus import Unroutable
        from npcbus.messages import FinalResponse, TokenDelta
        from workers.engines.base import BadEngineRequest, EngineDead, EngineError, FinishEvent, run_id

        rid = msg.request_id
        started = time.time()
        adapter_name = version.adapter if version else None
        adapter_version = version.version if version else None
        timings = {"queue_ms": round((received - msg.created_at) * 1000, 2) if msg.created_at else None}
        seq = 0
        stream = bool(msg.stream) and not d.redelivered
        if d.redelivered:
            log.info("redelivered request: answering with the final event only")

        async def send(*msgs) -> None:
            nonlocal seq
            try:
                await self.bus.reply_many(d, list(msgs))
            except Unroutable:
                raise RequesterGone() from None
            seq += len(msgs)

        if job.refusal is not None:
            text = npclib.canonical_json(job.refusal)
            with contextlib.suppress(RequesterGone):
                await send(FinalResponse(rid, seq, text, "refused", job.refusal, True, job.adapter, None,
                                         {"prompt_tokens": 0, "completion_tokens": 0}, timings, self.worker_id))
            _metric_requests("refused")
            self.served += 1
            return

        run = _Run(rid, run_id(rid))
        self.running[rid] = run
        _RUNNING.set(len(self.running))
        if self._cancelled.pop(rid, None) is not None:  # cancelled while it was being prepared
            self.running.pop(rid, None)
            _RUNNING.set(len(self.running))
            _metric_requests("cancelled")
            await self._error(d, rid, seq, "cancelled", "cancelled before it ran")
            return None
        loop = asyncio.get_running_loop()
        streamer = npclib.DialogueStreamer.for_request(job.npc) if job.mode == "npc" else None
        watch = RepeatedKeyWatch() if job.mode != "npc" and job.schema is not None else None
        full: list[str] = []
        pending: list[str] = []
        pending_tokens = 0
        first_sent = False
        ttft = None
        completion = 0
        finish: FinishEvent | None = None
        batch_s = self.settings.token_batch_ms / 1000.0
        batch_tokens = self.settings.token_batch_tokens
        error: tuple[str, str, bool] | None = None
        lock = asyncio.Lock()       # one publish at a time: sequence numbers go out in order
        closed = False              # the final event is on its way: no more deltas
        timer: asyncio.TimerHandle | None = None
        last_text: tuple[str, int] | None = None  # text still to send when the stream ends
        background: set[asyncio.Task] = set()

        def spawn(coro) -> None:
            t = loop.create_task(coro)
            background.add(t)
            t.add_done_callback(background.discard)

        async def flush() -> None:
            nonlocal pending, pending_tokens, first_sent, timer
            async with lock:
                if timer is not None:
                    timer.cancel()
                    timer = None
                if closed or not pending:
                    return
                text, n = "".join(pending), pending_tokens
                pending, pending_tokens = [], 0
                await send(TokenDelta(rid, seq, text, n))
                first_sent = True

        async def flush_later() -> None:
            try:
                await flush()
            except RequesterGone:
                if not run.gone:
                    run.gone = True
                    await self.engine.abort(run.engine_id)
            except Exception as e:  # noqa: BLE001 - the next flush or the final reports it
                log.warning("could not send a token delta", error=f"{type(e).__name__}: {e}")

        def on_timer() -> None:
            nonlocal timer
            timer = None
            spawn(flush_later())

        def on_deadline() -> None:
            if not run.deadline_hit:
                run.deadline_hit = True
                log.info("deadline passed: aborting generation")
                spawn(self.engine.abort(run.engine_id))

        deadline_timer = (loop.call_later(max(0.0, deadline - time.time()), on_deadline)
                          if deadline is not None else None)
        agen = self.engine.generate(run.engine_id, job.prompt, job.params, version.engine_name if version else None)
        try:
            async for ev in agen:
                if isinstance(ev, FinishEvent):
                    finish = ev
                    break
                completion += len(ev.token_ids)
                if ttft is None and ev.token_ids:
                    ttft = time.time() - started
                if watch is not None and watch.feed(ev.text) is not None:
                    error = repeated_key_error(watch.repeated, job.params)
                    break
                full.append(ev.text)
                if not stream:
                    continue
                visible = streamer.feed(ev.text) if streamer is not None else ev.text
                pending_tokens += len(ev.token_ids)
                if visible:
                    pending.append(visible)
                    if not first_sent or pending_tokens >= batch_tokens:
                        await flush()
                    elif timer is None:
                        # on a clock shared by every stream, so that their deltas leave together
                        # (one reply batch per requester, see Bus.reply)
                        timer = loop.call_at(_next_tick(loop.time(), batch_s), on_timer)
                if run.gone:
                    break
            if stream and streamer is not None:
                tail = streamer.finish()
                if tail:
                    pending.append(tail)
            if finish is not None and finish.reason != "abort" and not run.gone:
                # the last text leaves with the final event, in one message (below)
                async with lock:
                    if timer is not None:
                        timer.cancel()
                        timer = None
                    if pending:
                        last_text = ("".join(pending), pending_tokens)
                        pending, pending_tokens = [], 0
        except RequesterGone:
            run.gone = True
        except BadEngineRequest as e:
            error = ("invalid_request", str(e), False)
        except EngineDead:
            raise
        except EngineError as e:
            error = ("engine_error", str(e), True)
        finally:
            if timer is not None:
                timer.cancel()
            if deadline_timer is not None:
                deadline_timer.cancel()
            await agen.aclose()  # aborts the generation at the engine if it is still running
            async with lock:
                closed = True
            self.running.pop(rid, None)
            _RUNNING.set(len(self.running))
        if run.gone:
            log.info("requester is gone: generation aborted")
        if finish is None and error is None and not run.gone:
            error = ("engine_error", "the engine ended the stream without a finish event", True)

        total_ms = round((time.time() - started) * 1000, 2)
        timings.update({"ttft_ms": round(ttft * 1000, 2) if ttft is not None else None, "total_ms": total_ms})
        if run.gone:
            _metric_requests("requester_gone")
            return
        if error is not None:
            log.warning("generation failed", code=error[0], error=error[1])
            _metric_requests(error[0])
            await self._error(d, rid, seq, *error)
            if error[0] == "invalid_request":
                from npcbus.bus import Reject

                return Reject(error[1], "invalid_request")
            return None
        usage = {"prompt_tokens": finish.prompt_tokens, "completion_tokens": completion}
        _TOKENS.inc(completion)
        if ttft is not None:
            _TTFT.observe(ttft)
        if finish.reason == "abort":
            if run.deadline_hit:
                code, text, retry = "deadline", "the deadline passed during generation; aborted", False
            else:
                reason = run.cancel_reason or "aborted"
                code = "worker_shutdown" if reason == "worker_shutdown" else "cancelled"
                text, retry = f"generation aborted ({reason}) after {completion} tokens", reason == "worker_shutdown"
            log.info("generation aborted", code=code, completion_tokens=completion)
            _metric_requests(code)
            await self._error(d, rid, seq, code, text, retry)
            return
        text = "".join(full)
        response, valid, problems = None, True, []
        if job.mode == "npc":
            response, problems = await asyncio.to_thread(npclib.parse_response, text, job.npc)
            valid = npclib.response_is_valid(problems)
        elif job.schema is not None:
            response, problems = await asyncio.to_thread(check_json_output, text, job.schema)
            valid = not problems
        if problems:
            log.info("output checked", problems=problems[:3], valid=valid)
        last = [TokenDelta(rid, seq, *last_text)] if last_text is not None else []
        final = FinalResponse(rid, seq + len(last), text, finish.reason, response, valid, adapter_name,
                              adapter_version, usage, timings, self.worker_id)
        with contextlib.suppress(RequesterGone):
            await send(*last, final)
        self.served += 1
        _metric_requests("ok" if valid else "invalid_output")
        log.debug("request served", finish=finish.reason, completion_tokens=completion, total_ms=total_ms,
                  version=adapter_version)


def gen_prefetch(capacity: int) -> int:
    """The generation consumer's prefetch: the engine's capacity plus a quarter (at least one)."""
    capacity = max(1, int(capacity))
    return capacity + max(1, capacity // 4)


def _next_tick(now: float, period: float) -> float:
    """The next multiple of ``period`` after ``now`` (``now`` itself when ``period`` is 0)."""
    if period <= 0:
        return now
    return (math.floor(now / period) + 1) * period


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------

def _metrics():
    from npcbus import metrics

    return (
        metrics.counter("infer_requests_total", "Generation requests by outcome.", ("outcome",)),
        metrics.gauge("infer_running", "Generations running in this consumer."),
        metrics.counter("infer_tokens_total", "Tokens generated."),
        metrics.histogram("infer_ttft_seconds", "Time to first token at the engine.",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
    )


_REQUESTS, _RUNNING, _TOKENS, _TTFT = _metrics()


def _metric_requests(outcome: str) -> None:
    _REQUESTS.labels(outcome).inc()


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", help="auto, vllm, hf or package.module:Class (ENGINE)")
    parser.add_argument("--max-concurrency", type=int, help="generations at once (MAX_CONCURRENCY)")
    parser.add_argument("--max-loras", type=int, help="adapter versions loaded at once (MAX_LORAS)")
    parser.add_argument("--max-model-len", type=int, help="longest prompt + output in tokens (MAX_MODEL_LEN)")
    parser.add_argument("--worker-id", help="id in heartbeats and logs (WORKER_ID)")
    parser.add_argument("--preload", action="append", default=None, metavar="ADAPTER",
                        help="adapter to load at start (repeatable; PRELOAD_ADAPTERS)")
    from npcbus.service import add_print_settings

    add_print_settings(parser)


def settings_from_args(args) -> InferSettings:
    overrides = {}
    for attr in ("engine", "max_concurrency", "max_loras", "max_model_len", "worker_id"):
        v = getattr(args, attr, None)
        if v is not None:
            overrides[attr] = v
    if getattr(args, "preload", None):
        overrides["preload_adapters"] = list(args.preload)
    settings = InferSettings.from_env(**overrides)
    settings.validate()
    return settings


async def serve(settings: InferSettings, *, bus_settings=None, model_settings=None,
                stop: asyncio.Event | None = None) -> int:
    """Start the engine, connect, serve until ``stop`` is set (or SIGINT/SIGTERM); returns the exit code."""
    import signal

    from npcbus.bus import Bus
    from npcbus.logs import get_logger
    from npcbus.metrics import start_metrics_server
    from npcbus.model import resolve_base_model
    from npcbus.settings import BusSettings, ModelSettings
    from workers.engines import make_engine
    from workers.engines.cpus import start_engine

    log = get_logger("workers.infer")
    bus_settings = bus_settings or BusSettings.from_env()
    model_settings = model_settings or ModelSettings.from_env()
    model = await asyncio.to_thread(resolve_base_model, model_settings)
    manifest = None
    try:
        from npcbus.adapters import AdapterManifest

        manifest = AdapterManifest()
    except Exception as e:  # noqa: BLE001 - the manifest is optional
        log.info("no adapter manifest", error=str(e))
    start_metrics_server(bus_settings.metrics_port)
    engine = make_engine(settings, model)
    await start_engine(engine, settings.engine_cpus, log)
    bus = Bus(bus_settings, name="infer")
    code = 0
    try:
        await bus.connect()
        worker = InferenceWorker(bus, engine, settings, model_id=model_settings.model_id,
                                 model_names=(model_settings.base_model, model, "npcbus-default"), manifest=manifest)
        await worker.start()
        from npcbus.health import mark_ready

        mark_ready("infer")
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        stop_wait = asyncio.create_task(stop.wait())
        fail_wait = asyncio.create_task(worker.failed.wait())
        await asyncio.wait({stop_wait, fail_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        fail_wait.cancel()
        if worker.failed.is_set():
            code = 1
        await worker.stop()
    finally:
        await bus.close()
        await engine.close()
    return code


def run(args) -> int:
    from npcbus.service import prepare
    from npcbus.settings import BusSettings

    bus_settings = BusSettings.from_env()
    settings = settings_from_args(args)
    if not prepare(args, bus_settings, worker=settings):
        return 0
    return asyncio.run(serve(settings, bus_settings=bus_settings))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.infer_worker")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
