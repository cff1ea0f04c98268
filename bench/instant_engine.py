"""A benchmark-only engine that answers at once, so that benchmarks measure everything but the model.

Load it in the inference consumer with ``ENGINE=bench.instant_engine:InstantEngine`` (run from the
repository root so that ``bench`` imports). It is never a default: ``ENGINE=auto`` picks vLLM or
the transformers engine.

Output: for a request constrained by a JSON schema (NPC mode), a compact JSON object valid against
the NPC response schema (the first allowed emotion, no actions), in a few pieces; otherwise a short
fixed sentence. Nothing sleeps; ``abort`` ends a running stream with ``abort``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from workers.engines.base import ABORT, STOP, Engine, EngineHealth, FinishEvent, Prompt, SamplingSpec, TokenEvent

LINE = "Well met, traveler. The road is quiet tonight."
PIECES = 4


def _npc_json(schema: dict) -> str:
    props = schema.get("properties", {})
    emotions = props.get("emotion", {}).get("enum") or ["neutral"]
    intents = props.get("intent", {}).get("enum") or ["greet"]
    response = {"dialogue": LINE, "emotion": emotions[0], "intent": "greet" if "greet" in intents else intents[0],
                "actions": [], "relationship_change": 0, "end_conversation": False}
    return json.dumps(response, separators=(",", ":"))


def _split(text: str, n: int) -> list[str]:
    size = max(1, -(-len(text) // n))
    return [text[i:i + size] for i in range(0, len(text), size)]


class InstantEngine(Engine):
    name = "instant"
    capacity = 1024
    tokenizer = None
    max_model_len = 0

    def __init__(self, settings=None, model: str | None = None):
        super().__init__()
        if settings is not None:
            self.capacity = max(1, int(getattr(settings, "max_concurrency", self.capacity)))
        self._running: dict[str, bool] = {}
        self._adapters: dict[str, str] = {}

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingSpec,
                       adapter: str | None = None) -> AsyncIterator[TokenEvent | FinishEvent]:
        text = _npc_json(params.json_schema) if params.json_schema else LINE
        self._running[request_id] = False
        try:
            pieces = _split(text, PIECES)
            for i, piece in enumerate(pieces):
                if self._running.get(request_id):
                    ev = FinishEvent(ABORT, prompt_tokens=len(prompt), completion_tokens=i)
                    self._record_finish(request_id, ev)
                    yield ev
                    return
                yield TokenEvent(piece, [i])
                await asyncio.sleep(0)
            ev = FinishEvent(STOP, prompt_tokens=len(prompt), completion_tokens=len(pieces))
            self._record_finish(request_id, ev)
            yield ev
        finally:
            self._running.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            self._running[request_id] = True

    async def add_adapter(self, name: str, path: str) -> None:
        self._adapters[name] = path

    async def remove_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)

    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def health(self) -> EngineHealth:
        return EngineHealth(ok=True, running=len(self._running), waiting=0, adapters=list(self._adapters))
