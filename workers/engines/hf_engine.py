"""The transformers + PEFT engine, for machines without vLLM.

Continuous batching in a plain decode loop:

- Each new request is prefilled on its own (no padding, so its prompt is computed exactly as a
  single-sequence ``generate`` would), then joins the running batch: the batch's key/value cache
  is left-padded to a common length and stacked, and one decode step serves every running
  request at once. Finished and aborted requests leave the batch between steps.
- Adapters: PEFT LoRA adapters loaded into one ``PeftModel``; a batch mixes adapters and the base
  model through PEFT's ``adapter_names`` argument. At most ``MAX_LORAS`` are loaded at once; idle
  ones are unloaded to make room (see :class:`workers.engines.base.AdapterSlots`).
- JSON schema: xgrammar compiles the schema (compact JSON, as vLLM's backend is configured here);
  a grammar matcher per request masks the logits before sampling.
- Streaming: every step yields the new text of every request (held back while a multi-byte
  character is incomplete). Abort takes effect at the next step.

All torch work runs in a worker thread, one step at a time; the event loop only hands out results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from npcbus.logs import get_logger

from .base import (
    ABORT,
    LENGTH,
    STOP,
    AdapterEntry,
    AdapterSlots,
    BadEngineRequest,
    Engine,
    EngineDead,
    EngineEvent,
    EngineHealth,
    FinishEvent,
    Prompt,
    SamplingSpec,
    TokenEvent,
    xgrammar_safe_schema,
)

log = get_logger("workers.engines.hf")

BASE = "__base__"
#: prompt tokens prefilled per step at most (one longer prompt still goes alone)
PREFILL_TOKENS_PER_STEP = 2048
_DONE = object()


@dataclass
class _Seq:
    rid: str
    prompt_ids: list[int]
    params: SamplingSpec
    max_tokens: int
    entry: AdapterEntry | None
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    schema_key: str | None = None
    matcher: Any = None
    generator: Any = None
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    next_input: int = -1
    aborted: bool = False
    finished: str | None = None

    @property
    def peft_name(self) -> str:
        return f"a{self.entry.int_id}" if self.entry is not None else BASE


class HFEngine(Engine):
    name = "hf"

    def __init__(self, settings, model: str):
        super().__init__()
        self.settings = settings
        self.model_path = model
        self.capacity = settings.max_concurrency
        self.max_model_len = settings.max_model_len
        self.model = None
        self.peft = None
        self.tokenizer = None
        self._eos: set[int] = set()
        self._vocab = 0
        self._device = None
        self._compiler = None
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._slots = AdapterSlots(settings.max_loras, self._load_adapter, self._unload_adapter)
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._by_id: dict[str, _Seq] = {}
        self._cache = None
        self._mask = None
        self._lock = asyncio.Lock()       # one step or adapter change at a time
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._closed = False
        self._torch_lock = threading.Lock()

    # lifecycle --------------------------------------------------------------------------------
    def _load(self) -> None:
        import torch

        from npcbus.model import _torch_dtype, load_model_and_tokenizer

        dtype = "float32" if self.settings.dtype in ("auto", "") else self.settings.dtype
        model, tok = load_model_and_tokenizer(self.model_path, dtype=_torch_dtype(dtype),
                                              device=self.settings.device or "cpu")
        self.model = model
        self.tokenizer = tok
        self._device = next(model.parameters()).device
        cfg = model.config
        self._vocab = int(getattr(cfg, "vocab_size", len(tok)))
        eos = getattr(model.generation_config, "eos_token_id", None) or cfg.eos_token_id or tok.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        ctx = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        if not self.max_model_len:
            self.max_model_len = ctx or 2048
        elif ctx:
            self.max_model_len = min(self.max_model_len, ctx)
        torch.manual_seed(self.settings.seed)

    def _compiler_for(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self._vocab,
                                                      stop_token_ids=sorted(self._eos))
            self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return self._compiler

    async def start(self) -> None:
        log.info("starting transformers engine", model=self.model_path)
        await asyncio.to_thread(self._load)
        self._loop_task = asyncio.create_task(self._run(), name="hf-engine-loop")
        log.info("transformers engine ready", max_model_len=self.max_model_len, capacity=self.capacity)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        for s in list(self._waiting) + list(self._running):
            self._emit(s, FinishEvent(ABORT, len(s.prompt_ids), len(s.generated)))
            await self._release(s)
        self._waiting.clear()
        self._running.clear()

    # adapters ---------------------------------------------------------------------------------
    def _load_adapter_sync(self, e: AdapterEntry) -> None:
        from peft import PeftModel

        name = f"a{e.int_id}"
        with self._torch_lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, e.path, adapter_name=name, is_trainable=False)
            else:
                self.peft.load_adapter(e.path, adapter_name=name, is_trainable=False)
            self.peft.eval()

    async def _load_adapter(self, e: AdapterEntry) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(self._load_adapter_sync, e)
            except Exception as ex:
                raise BadEngineRequest(f"could not load adapter {e.name!r} from {e.path}: {ex}") from ex
        log.info("adapter loaded", adapter=e.name, lora_id=e.int_id)

    def _unload_adapter_sync(self, e: AdapterEntry) -> None:
        with self._torch_lock:
            name = f"a{e.int_id}"
            if self.peft is None or name not in self.peft.peft_config:
                return
            if len(self.peft.peft_config) == 1:
                # the last one: take the LoRA layers out again and run the plain model
                self.model = self.peft.unload()
                self.peft = None
            else:
                import warnings

                with warnings.catch_warnings():  # "... was active": irrelevant, batches name their adapters
                    warnings.simplefilter("ignore", UserWarning)
                    self.peft.delete_adapter(name)

    async def _unload_adapter(self, e: AdapterEntry) -> None:
        async with self._lock:
            await asyncio.to_thread(self._unload_adapter_sync, e)
        log.info("adapter unloaded", adapter=e.name, lora_id=e.int_id)

    async def add_adapter(self, name: str, path: str) -> None:
        await self._slots.add(name, str(path))

    async def remove_adapter(self, name: str) -> None:
        await self._slots.remove(name)

    def adapters(self) -> list[str]:
        return self._slots.names()

    def loaded_adapters(self) -> list[str]:
        return self._slots.loaded_names()

    # generation -------------------------------------------------------------------------------
    def _grammar(self, schema: dict):
        key = json.dumps(schema, sort_keys=True)
        g = self._grammars.get(key)
        if g is None:
            g = self._compiler_for().compile_json_schema(json.dumps(xgrammar_safe_schema(schema)),
                                                         any_whitespace=False, separators=(",", ":"))
            self._grammars[key] = g
            while len(self._grammars) > 64:
                self._grammars.popitem(last=False)
        else:
            self._grammars.move_to_end(key)
        return g

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDead(f"the transformers engine failed: {self._dead}")
        if self.model is None or self._closed:
            raise EngineDead("the transformers engine is not running")

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingSpec,
                       adapter: str | None = None) -> AsyncIterator[EngineEvent]:
        self._check_alive()
        params.validate()
        if request_id in self._by_id:
            raise BadEngineRequest(f"request id {request_id!r} is already running")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise BadEngineRequest("empty prompt")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise BadEngineRequest(f"prompt of {len(ids)} tokens does not fit the context of {self.max_model_len}")
        matcher = None
        if params.json_schema is not None:
            import xgrammar as xgr

            try:
                grammar = await asyncio.to_thread(self._grammar, params.json_schema)
            except Exception as e:  # noqa: BLE001 - a schema xgrammar refuses is a bad request
                raise BadEngineRequest(f"cannot compile the JSON schema: {e}") from e
            matcher = xgr.GrammarMatcher(grammar)
        gen = None
        if not params.greedy:
            import torch

            gen = torch.Generator()
            gen.manual_seed(params.seed if params.seed is not None else int.from_bytes(
                __import__("os").urandom(7), "little"))
        entry = await self._slots.acquire(adapter) if adapter else None
        seq = _Seq(request_id, ids, params, min(params.max_tokens, room), entry, asyncio.Queue(),
                   asyncio.get_running_loop(), matcher=matcher, generator=gen)
        self._by_id[request_id] = seq
        self._waiting.append(seq)
        self._wake.set()
        finish: FinishEvent | None = None
        try:
            while True:
                ev = await seq.queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, FinishEvent):
                    finish = ev
                    break
                yield ev
        except (asyncio.CancelledError, GeneratorExit):
            seq.aborted = True
            self._wake.set()
            self._record_finish(request_id, FinishEvent(ABORT, len(ids), len(seq.generated)))
            raise
        finally:
            self._by_id.pop(request_id, None)
            if seq in self._waiting:
                self._waiting.remove(seq)
                await self._release(seq)
            elif seq.finished is None:
                seq.aborted = True  # admitted: the loop drops it at its next step and releases it
                self._wake.set()
        self._record_finish(request_id, finish)
        yield finish

    async def _release(self, s: _Seq) -> None:
        e, s.entry = s.entry, None
        if e is not None:
            await self._slots.release(e)

    async def abort(self, request_id: str) -> None:
        s = self._by_id.get(request_id)
        if s is None:
            return
        s.aborted = True
        if s in self._waiting:
            self._waiting.remove(s)
            s.finished = ABORT
            self._emit(s, FinishEvent(ABORT, len(s.prompt_ids), 0))
            await self._release(s)
        self._wake.set()

    async def health(self) -> EngineHealth:
        self._check_alive()
        return EngineHealth(True, len(self._running), len(self._waiting), self.adapters(),
                            {"loaded_adapters": self.loaded_adapters()})

    # the loop ---------------------------------------------------------------------------------
    def _emit(self, s: _Seq, ev) -> None:
        s.queue.put_nowait(ev)

    async def _run(self) -> None:
        try:
            while not self._closed:
                if not self._running and not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                room = self.capacity - len(self._running)
                admit, budget = [], PREFILL_TOKENS_PER_STEP
                for s in list(self._waiting[:max(0, room)]):
                    if s.aborted:
                        continue
                    if admit and len(s.prompt_ids) > budget:
                        break  # the rest waits for the next step, so running requests keep decoding
                    admit.append(s)
                    budget -= len(s.prompt_ids)
                for s in admit:
                    self._waiting.remove(s)
                if not admit and not self._running:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                async with self._lock:
                    results = await asyncio.to_thread(self._step, admit)
                for s, ev in results:
                    self._emit(s, ev)
                    if isinstance(ev, FinishEvent):
                        await self._release(s)
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - the engine is broken: fail every request
            log.exception("transformers engine loop failed")
            self._dead = e
            for s in list(self._waiting) + list(self._running):
                self._emit(s, EngineDead(f"the transformers engine failed: {e}"))
            self._waiting.clear()
            self._running.clear()

    # torch side (runs in a worker thread) -------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache, adapter_names):
        import torch

        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
        with torch.inference_mode():
            if self.peft is not None:
                out = self.peft(**kw, adapter_names=adapter_names)
            else:
                out = self.model(**kw)
        return out.logits[:, -1, :].float().cpu(), out.past_key_values  # sampling and grammar masks on the CPU

    def _new_cache(self):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        if all(type(layer) is DynamicLayer for layer in cache.layers):
            cache.layers = [_GrowingLayer() for _ in cache.layers]
        return cache

    def _step(self, admit: list[_Seq]) -> list[tuple[_Seq, Any]]:
        with self._torch_lock:
            return self._step_locked(admit)

    def _step_locked(self, admit: list[_Seq]) -> list[tuple[_Seq, Any]]:
        import torch

        events: list[tuple[_Seq, Any]] = []
        # 1. drop aborted requests from the batch
        self._drop([s for s in self._running if s.aborted], events, ABORT)
        # 2. prefill the new ones one by one and add them to the batch
        for s in admit:
            if s.aborted:
                events.append((s, FinishEvent(ABORT, len(s.prompt_ids), 0)))
                s.finished = ABORT
                continue
            ids = torch.tensor([s.prompt_ids], dtype=torch.long, device=self._device)
            mask = torch.ones_like(ids)
            pos = torch.arange(ids.shape[1], dtype=torch.long, device=self._device)[None, :]
            logits, cache = self._forward(ids, mask, pos, self._new_cache(), [s.peft_name])
            tok = self._sample([s], logits)[0]
            self._join(s, cache)
            self._accept(s, tok, events)
        self._drop([s for s in self._running if s.finished], events, None)
        # 3. one decode step for the whole batch
        if self._running:
            batch = self._running
            ids = torch.tensor([[s.next_input] for s in batch], dtype=torch.long, device=self._device)
            self._mask = torch.cat([self._mask, self._mask.new_ones((len(batch), 1))], dim=1)
            pos = (self._mask.sum(dim=1, keepdim=True) - 1).long()
            logits, self._cache = self._forward(ids, self._mask, pos, self._cache, [s.peft_name for s in batch])
            toks = self._sample(batch, logits)
            for s, tok in zip(batch, toks, strict=True):
                self._accept(s, tok, events)
            self._drop([s for s in self._running if s.finished], events, None)
        return events

    def _sample(self, seqs: list[_Seq], logits) -> list[int]:
        import torch
        import xgrammar as xgr

        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            bitmask = xgr.allocate_token_bitmask(len(seqs), self._vocab)
            for i in constrained:
                seqs[i].matcher.fill_next_token_bitmask(bitmask, i)
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self._vocab, indices=constrained)
        out = []
        for i, s in enumerate(seqs):
            row = logits[i]
            p = s.params
            if p.greedy:
                out.append(int(torch.argmax(row)))
                continue
            row = row / float(p.temperature)
            if p.top_k > 0 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, idx = torch.sort(row, descending=True)
                probs = torch.softmax(sorted_logits, dim=-1)
                cum = torch.cumsum(probs, dim=-1)
                remove = cum - probs > p.top_p
                sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
                row = torch.full_like(row, float("-inf")).scatter(0, idx, sorted_logits)
            probs = torch.softmax(row, dim=-1)
            out.append(int(torch.multinomial(probs, 1, generator=s.generator)))
        return out

    def _accept(self, s: _Seq, tok: int, events: list) -> None:
        s.generated.append(tok)
        s.next_input = tok
        reason = None
        if s.matcher is not None:
            if not s.matcher.accept_token(tok):
                reason = STOP  # cannot happen under the mask; end rather than emit broken output
            elif s.matcher.is_terminated():
                reason = STOP
        if reason is None and tok in self._eos and not s.params.ignore_eos:
            reason = STOP
        if reason is None and len(s.generated) >= s.max_tokens:
            reason = LENGTH
        text = self.tokenizer.decode(s.generated, skip_special_tokens=True)
        if s.params.stop:
            hits = [text.find(stop, max(0, s.sent_chars - len(stop))) for stop in s.params.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                text = text[:min(hits)]
                reason = STOP
        if reason is None and text.endswith("\ufffd"):
            new = ""  # an incomplete character: wait for the next token
        else:
            new = text[s.sent_chars:]
            s.sent_chars = max(s.sent_chars, len(text))
        events.append((s, TokenEvent(new, [tok])))
        if reason is not None:
            s.finished = reason
            events.append((s, FinishEvent(reason, len(s.prompt_ids), len(s.generated))))

    def _join(self, s: _Seq, cache) -> None:
        """Add a prefilled request (batch of one) to the running batch, left-padding caches."""
        import torch

        n = cache.get_seq_length()
        mask = torch.ones((1, n), dtype=torch.long, device=self._device)
        if not self._running:
            self._cache, self._mask = cache, mask
            self._running.append(s)
            return
        cur = self._mask.shape[1]
        width = max(cur, n)
        for mine, new in zip(self._cache.layers, cache.layers, strict=True):
            _set_kv(mine, torch.cat([_pad_left(mine.keys, width), _pad_left(new.keys, width)], dim=0),
                    torch.cat([_pad_left(mine.values, width), _pad_left(new.values, width)], dim=0))
        self._mask = torch.cat([_pad_left_mask(self._mask, width), _pad_left_mask(mask, width)], dim=0)
        self._running.append(s)

    def _drop(self, gone: list[_Seq], events: list, reason: str | None) -> None:
        import torch

        if not gone:
            return
        for s in gone:
            if reason is not None and not s.finished:
                s.finished = reason
                events.append((s, FinishEvent(reason, len(s.prompt_ids), len(s.generated))))
        keep = [i for i, s in enumerate(self._running) if s not in gone]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self._device)
        self._mask = self._mask[idx]
        # trim the columns that are padding for every remaining request
        first = int((self._mask.sum(dim=0) > 0).nonzero()[0])
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            _set_kv(layer, layer.keys[idx, :, first:, :], layer.values[idx, :, first:, :])


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A key/value cache layer that appends into spare room instead of concatenating each step."""

        SPARE = 64

        def _alloc(self, keys, values, room: int) -> None:
            n = keys.shape[-2]
            shape_k = (*keys.shape[:-2], n + room, keys.shape[-1])
            shape_v = (*values.shape[:-2], n + room, values.shape[-1])
            self._kb = keys.new_empty(shape_k)
            self._vb = values.new_empty(shape_v)
            self._kb[..., :n, :] = keys
            self._vb[..., :n, :] = values
            self._n = n
            self.keys = self._kb[..., :n, :]
            self.values = self._vb[..., :n, :]

        def set(self, keys, values) -> None:
            if not self.is_initialized:
                self.lazy_initialization(keys, values)
            self._alloc(keys, values, self.SPARE)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._alloc(key_states, value_states, self.SPARE)
                return self.keys, self.values
            n = key_states.shape[-2]
            if self._n + n > self._kb.shape[-2]:
                self._alloc(self.keys, self.values, max(self.SPARE, self._n + n))
            self._kb[..., self._n:self._n + n, :] = key_states
            self._vb[..., self._n:self._n + n, :] = value_states
            self._n += n
            self.keys = self._kb[..., :self._n, :]
            self.values = self._vb[..., :self._n, :]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._n if self.is_initialized else 0

    return GrowingLayer


_GROWING = None


def _GrowingLayer():
    global _GROWING
    if _GROWING is None:
        _GROWING = _growing_layer_class()
    return _GROWING()


def _set_kv(layer, keys, values) -> None:
    if hasattr(layer, "set"):
        layer.set(keys, values)
    else:
        layer.keys, layer.values = keys, values


def _pad_left(t, width: int):
    import torch

    missing = width - t.shape[-2]
    if missing <= 0:
        return t
    pad = torch.zeros((*t.shape[:-2], missing, t.shape[-1]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=-2)


def _pad_left_mask(m, width: int):
    import torch

    missing = width - m.shape[1]
    if missing <= 0:
        return m
    return torch.cat([m.new_zeros((m.shape[0], missing)), m], dim=1)


def transformers_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True

