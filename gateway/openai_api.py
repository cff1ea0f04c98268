"""An OpenAI-compatible API: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` and ``GET /v1/models/{id}``.

``model`` selects the adapter (see :mod:`gateway.models`); streaming is server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``. Errors use OpenAI's error object, so the
official clients raise their usual exceptions.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from aiohttp import web

from npcbus.messages import FinalResponse, TokenDelta

from .auth import apply_cors, error_body
from .core import Gateway, GatewayError
from .http_api import read_json
from .keys import GATEWAY

ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "audio", "modalities", "prediction")
MAX_TOKENS_LIMIT = 4096


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(code, message, status=400, param=param)


def _number(body: dict, key: str, lo: float, hi: float, *, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad(f"{key} must be {'an integer' if integer else 'a number'}", key)
    if not lo <= v <= hi:
        raise _bad(f"{key} must be between {lo:g} and {hi:g}", key)
    return v


def sampling_params(body: dict) -> dict:
    params: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        params["max_new_tokens"] = _number({key: max_tokens}, key, 1, MAX_TOKENS_LIMIT, integer=True)
    for key, lo, hi, integer in (("temperature", 0, 2, False), ("top_p", 0, 1, False), ("top_k", 0, 1000, True),
                                 ("seed", 0, 2**63 - 1, True)):
        v = _number(body, key, lo, hi, integer=integer)
        if v is not None:
            params[key] = v
    if params.get("top_p") == 0:
        raise _bad("top_p must be greater than 0", "top_p")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop must be a string or a list of up to 4 non-empty strings", "stop")
        params["stop"] = stops
    n = body.get("n", 1)
    if n != 1:
        raise _bad("only n=1 is supported", "n")
    for key in UNSUPPORTED:
        if body.get(key):
            raise _bad(f"{key} is not supported by this server", key, code="unsupported_parameter")
    return params


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise _bad(f"{where}.content[{i}]: only text parts are supported", f"{where}.content")
        return "".join(parts)
    raise _bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text_of(m.get("content"), where)})
    return out


def json_constraint(body: dict) -> dict | None:
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("response_format.type must be text, json_object or json_schema", "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"type": "object"}
    schema = (rf.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema must be an object", "response_format")
    return schema


def _finish(reason: str | None) -> str:
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def _usage(final: FinalResponse | None) -> dict:
    u = (final.usage if final is not None else None) or {}
    prompt = int(u.get("prompt_tokens", 0) or 0)
    completion = int(u.get("completion_tokens", 0) or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Completion:
    """What chat and text completions share: admission, the stream, the response shapes."""

    def __init__(self, request: web.Request, body: dict, *, chat: bool):
        self.request = request
        self.gw: Gateway = request.app[GATEWAY]
        self.body = body
        self.chat = chat
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("model must be a string", "model")
        self.model = model or self.gw.model_id
        self.adapter, self.version = self.gw.adapters.resolve(self.model)
        self.params = sampling_params(body)
        self.stream = bool(body.get("stream", False))
        so = body.get("stream_options") or {}
        self.include_usage = bool(so.get("include_usage")) if isinstance(so, dict) else False
        self.created = int(time.time())

    def gen_request(self):
        kw: dict[str, Any] = dict(adapter=self.adapter, adapter_version=self.version, params=self.params,
                                  json_schema=json_constraint(self.body))
        if self.chat:
            kw.update(mode="chat", messages=chat_messages(self.body))
        else:
            prompt = self.body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise _bad("prompt must be a non-empty string", "prompt")
            kw.update(mode="text", prompt=prompt)
        return self.gw.new_request(**kw)

    @property
    def id_prefix(self) -> str:
        return "chatcmpl-" if self.chat else "cmpl-"

    def chunk(self, rid: str, text: str | None, finish: str | None, *, first: bool = False) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id_prefix + rid, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": [choice]}

    def full(self, rid: str, final: FinalResponse) -> dict:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": final.text,
                                                              "refusal": None},
                                      "logprobs": None, "finish_reason": _finish(final.finish_reason)}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": final.text, "logprobs": None, "finish_reason": _finish(final.finish_reason)}
            obj = "text_completion"
        return {"id": self.id_prefix + rid, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": _fingerprint(final), "choices": [choice], "usage": _usage(final)}

    async def respond(self) -> web.StreamResponse:
        gw = self.gw
        req = self.gen_request()
        rid = req.request_id
        api = "openai_chat" if self.chat else "openai_text"
        with gw.slot():
            async with contextlib.aclosing(gw.generate(req, timeout_s=gw.timeout_for(None), api=api)) as stream:
                if not self.stream:
                    final = None
                    async for ev in stream:
                        if isinstance(ev, FinalResponse):
                            final = ev
                    if final is None:
                        raise GatewayError("bad_response", "the inference consumer sent no response", status=502,
                                           retryable=True)
                    return web.json_response(self.full(rid, final))
                # the first event comes before the response starts, so that admission failures
                # (queue full, no consumer) are still plain HTTP errors
                it = stream.__aiter__()
                try:
                    first_ev = await it.__anext__()
                except StopAsyncIteration:
                    raise GatewayError("bad_response", "the inference consumer sent no response", status=502,
                                       retryable=True) from None
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                   "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                apply_cors(self.request, resp)
                await resp.prepare(self.request)
                try:
                    await self._stream(resp, rid, first_ev, it)
                except ConnectionResetError:
                    pass  # the client left; leaving the stream aborts the generation
                return resp

    async def _stream(self, resp: web.StreamResponse, rid: str, ev, it) -> None:
        if self.chat:
            await self._send(resp, self.chunk(rid, "", None, first=True))
        final = None
        try:
            while True:
                if isinstance(ev, TokenDelta) and ev.text:
                    await self._send(resp, self.chunk(rid, ev.text, None))
                elif isinstance(ev, FinalResponse):
                    final = ev
                    break
                ev = await it.__anext__()
        except StopAsyncIteration:
            pass
        except GatewayError as e:
            await self._send(resp, error_body(e.status, e.code, e.message, retryable=e.retryable))
            await resp.write(b"data: [DONE]\n\n")
            return
        await self._send(resp, self.chunk(rid, None, _finish(final.finish_reason if final else None)))
        if self.include_usage:
            last = self.chunk(rid, None, None)
            last["choices"] = []
            last["usage"] = _usage(final)
            await self._send(resp, last)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()

    @staticmethod
    async def _send(resp: web.StreamResponse, obj: dict | None) -> None:
        if obj is not None:
            await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n")


def _fingerprint(final: FinalResponse) -> str | None:
    if not final.adapter:
        return None
    return f"{final.adapter}@{final.adapter_version}" if final.adapter_version is not None else final.adapter


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return await _Completion(request, body, chat=True).respond()


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return await _Completion(request, body, chat=False).respond()


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": request.app[GATEWAY].adapters.listing()})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    for m in request.app[GATEWAY].adapters.listing():
        if m["id"] == name:
            return web.json_response(m)
    raise GatewayError("model_not_found", f"the model {name!r} does not exist", status=404, param="model")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
