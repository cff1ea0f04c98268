"""Middlewares: errors as JSON, bearer-token authentication, rate limits, request size, CORS."""

from __future__ import annotations

import hashlib
import hmac
import json

from aiohttp import web

from npcbus.logs import get_logger

from .core import REQUESTS, GatewayError
from .keys import CLIENT_KEY, GATEWAY
from .limits import retry_after_header
from .protocol import BEARER_PREFIX

log = get_logger("npcbus.gateway")

# OpenAI's error "type" by HTTP status: OpenAI clients read it, so every route uses this format.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def error_body(status: int, code: str, message: str, *, retryable: bool = False, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "api_error"), "param": param,
                      "code": code, "retryable": retryable}}


def error_response(status: int, code: str, message: str, *, retryable: bool = False,
                   retry_after_s: float | None = None, param: str | None = None,
                   headers: dict | None = None) -> web.Response:
    hdrs = dict(headers or {})
    if retry_after_s is not None:
        hdrs["Retry-After"] = retry_after_header(retry_after_s)
    return web.json_response(error_body(status, code, message, retryable=retryable, param=param), status=status,
                             headers=hdrs)


def gateway_error_response(e: GatewayError) -> web.Response:
    return error_response(e.status, e.code, e.message, retryable=e.retryable, retry_after_s=e.retry_after_s,
                          param=e.param or e.field)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenChecker:
    """Constant-time check of a presented token against the configured ones."""

    def __init__(self, tokens: list[str]):
        self._digests = [_digest(t) for t in tokens]

    def check(self, presented: str) -> str | None:
        """The client key of a valid token (a fingerprint, never the token), else None."""
        d = _digest(presented)
        found = None
        for ref in self._digests:  # compare with every token, whatever matches
            if hmac.compare_digest(d, ref):
                found = ref
        return None if found is None else "t:" + found.hex()[:16]


def presented_tokens(request: web.Request) -> list[str]:
    out = []
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        out.append(value.strip())
    # browsers cannot set headers on a WebSocket: they offer the token as a subprotocol
    if request.headers.get("Upgrade", "").lower() == "websocket":
        for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
            proto = proto.strip()
            if proto.startswith(BEARER_PREFIX) and len(proto) > len(BEARER_PREFIX):
                out.append(proto[len(BEARER_PREFIX):])
    return out


def is_public(request: web.Request) -> bool:
    if request.method == "OPTIONS":
        return True
    path = request.path
    if path == "/health":
        return True
    settings = request.app[GATEWAY].settings
    if path == "/metrics":
        return settings.metrics_public
    return settings.playground and (path in ("/", "/favicon.ico", "/playground") or path.startswith("/static/"))


def _route_name(request: web.Request) -> str:
    info = request.match_info
    route = info.route if info is not None else None
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure as the JSON error format; counts requests by route and status."""
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except GatewayError as e:
        status = e.status
        return gateway_error_response(e)
    except web.HTTPException as e:
        status = e.status
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                415: "unsupported_media_type"}.get(e.status, "http_error")
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if e.status == 413:
            message = f"the request body is larger than MAX_REQUEST_BYTES ({request.app[GATEWAY].settings.max_request_bytes} bytes)"
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
        return error_response(e.status, code, message, headers=headers)
    except json.JSONDecodeError as e:
        status = 400
        return error_response(400, "bad_json", f"the request body is not valid JSON: {e.msg}")
    except Exception:
        log.exception("request failed", path=request.path, method=request.method)
        return error_response(500, "internal", "the gateway failed on this request", retryable=True)
    finally:
        REQUESTS.labels(_route_name(request), str(status)).inc()


def auth_middleware(checker: TokenChecker):
    @web.middleware
    async def middleware(request: web.Request, handler):
        gw = request.app[GATEWAY]
        settings = gw.settings
        key = None
        for token in presented_tokens(request):
            key = checker.check(token)
            if key is not None:
                break
        if is_public(request):
            request[CLIENT_KEY] = key or f"ip:{request.remote}"
            return await handler(request)
        if key is None and settings.require_api_token:
            given = bool(presented_tokens(request))
            return error_response(401, "invalid_token" if given else "missing_token",
                                  "invalid API token" if given else "missing API token: send 'Authorization: Bearer TOKEN'",
                                  headers={"WWW-Authenticate": 'Bearer realm="npcbus"'})
        request[CLIENT_KEY] = key or f"ip:{request.remote}"
        length = request.content_length
        if length is not None and length > settings.max_request_bytes:
            return error_response(413, "request_too_large",
                                  f"the request body is larger than MAX_REQUEST_BYTES ({settings.max_request_bytes} bytes)")
        gw.rate_check(request[CLIENT_KEY])
        return await handler(request)

    return middleware


def apply_cors(request: web.Request, resp: web.StreamResponse) -> None:
    """Add CORS headers for an allowed Origin (before the response is prepared)."""
    origins = request.app[GATEWAY].settings.cors_origins
    origin = request.headers.get("Origin")
    if not origin or not ("*" in origins or origin in origins) or resp.prepared:
        return
    resp.headers["Access-Control-Allow-Origin"] = origin
    resp.headers["Vary"] = "Origin"
    resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
    resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    resp.headers["Access-Control-Max-Age"] = "600"


@web.middleware
async def cors_middleware(request: web.Request, handler):
    if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
        resp: web.StreamResponse = web.Response(status=204)
    else:
        resp = await handler(request)
    apply_cors(request, resp)
    return resp
