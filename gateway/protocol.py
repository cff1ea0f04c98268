"""The WebSocket protocol's messages: validation of client messages against
``schemas/ws_protocol.schema.json`` and the codes the server answers with.

Plain functions, no event loop: the handler in :mod:`gateway.ws` wires them to the socket.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jsonschema
from referencing import Registry, Resource

from npcbus.npc import describe_schema_error, load_schema

PROTOCOL_VERSION = 1
SUBPROTOCOL = "npcbus.v1"
BEARER_PREFIX = "bearer."

CLIENT_TYPES = ("session.start", "turn", "turn.cancel", "turn.feedback", "context.update", "ping", "session.end")
SERVER_TYPES = ("session.started", "turn.accepted", "turn.delta", "turn.final", "turn.error", "turn.cancelled",
                "turn.feedback.accepted", "context.updated", "pong", "session.ended", "error")

# close codes (see the schema's x-close-codes)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013
CLOSE_BAD_SESSION = 4400
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_SESSION_TIMEOUT = 4408
CLOSE_SESSION_IN_USE = 4409

# protocol error codes that close the socket, with the close code
CLOSING_ERRORS = {
    "invalid_session": CLOSE_BAD_SESSION,
    "no_session": CLOSE_BAD_SESSION,
    "unknown_session": CLOSE_UNKNOWN_SESSION,
    "session_in_use": CLOSE_SESSION_IN_USE,
    "session_timeout": CLOSE_SESSION_TIMEOUT,
    "overloaded": CLOSE_TRY_LATER,
    "internal": CLOSE_INTERNAL,
}


class ProtocolError(Exception):
    """A client message the server refuses; becomes an ``error`` event (and maybe a close)."""

    def __init__(self, code: str, message: str, *, field: str | None = None, turn_id: str | None = None,
                 retryable: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.turn_id = turn_id
        self.retryable = retryable

    @property
    def close_code(self) -> int | None:
        return CLOSING_ERRORS.get(self.code)

    def event(self) -> dict:
        ev: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message, "retryable": self.retryable}
        if self.field:
            ev["field"] = self.field
        if self.turn_id is not None:
            ev["turn_id"] = self.turn_id
        if self.close_code is not None:
            ev["close_code"] = self.close_code
        return ev


@functools.cache
def protocol_schema() -> dict:
    return load_schema("ws_protocol")


@functools.cache
def registry() -> Registry:
    reg = Registry()
    for name in ("npc_request", "npc_response", "ws_protocol"):
        schema = load_schema(name)
        reg = reg.with_resource(schema["$id"], Resource.from_contents(schema))
    return reg


@functools.cache
def validator(definition: str) -> jsonschema.Draft202012Validator:
    """A validator for one ``$defs`` entry of the protocol schema (``turn``, ``server_message``...)."""
    ref = {"$ref": f"{protocol_schema()['$id']}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(ref, registry=registry())


def describe(err: jsonschema.ValidationError) -> tuple[str, str]:
    """(field, short message) of a schema error."""
    return describe_schema_error(err, root="message")


def _best(errors: list[jsonschema.ValidationError]) -> jsonschema.ValidationError:
    best = jsonschema.exceptions.best_match(errors)
    while best.context:
        best = jsonschema.exceptions.best_match(best.context)
    return best


_TURN_ID = re.compile(r"[!-~]{1,64}")
_PLAYER_INPUT_BAD = re.compile("[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f]")
_SESSION_ID = re.compile(r"s_[0-9a-f]{32}")


def _plain_turn(msg: dict) -> bool:
    """Whether ``msg`` is a turn with only turn_id, text (and session_id), valid by the schema's rules.

    False means "not sure": the schema validator decides (and explains what is wrong).
    """
    if len(msg) > 4:
        return False
    tid, text = msg.get("turn_id"), msg.get("text")
    sid = msg.get("session_id", "")
    return (len(msg) == 3 + ("session_id" in msg) and isinstance(tid, str) and _TURN_ID.fullmatch(tid) is not None
            and isinstance(text, str) and 1 <= len(text) <= 500 and _PLAYER_INPUT_BAD.search(text) is None
            and (sid == "" or (isinstance(sid, str) and _SESSION_ID.fullmatch(sid) is not None)))


def parse_frame(data: str) -> dict:
    """Decode one text frame into a validated client message; raises :class:`ProtocolError`."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "the frame is not valid JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", f"the frame must be a JSON object, got {type(msg).__name__}")
    mtype = msg.get("type")
    if not isinstance(mtype, str) or mtype not in CLIENT_TYPES:
        shown = mtype if isinstance(mtype, str) else None
        detail = f"unknown message type {shown[:40]!r}" if shown is not None else "the message has no string 'type'"
        raise ProtocolError("unknown_type", f"{detail}; expected one of: {', '.join(CLIENT_TYPES)}", field="type")
    if mtype == "turn" and _plain_turn(msg):
        return msg  # the common case, checked without the schema validator (same rules)
    turn_id = msg.get("turn_id") if isinstance(msg.get("turn_id"), str) else None
    if mtype == "session.start" and "resume" not in msg:
        if "persona" not in msg and "persona_id" not in msg:
            raise ProtocolError("invalid_session", "session.start: persona is required (or persona_id, or resume)",
                                field="persona")
        if "player" not in msg:
            raise ProtocolError("invalid_session", "session.start: player is required", field="player")
    try:
        errors = list(validator(mtype).iter_errors(msg))
    except RecursionError:
        raise ProtocolError("invalid_message", "the message is nested too deeply", turn_id=turn_id) from None
    if errors:
        field, message = describe(_best(errors))
        code = "invalid_session" if mtype == "session.start" else "invalid_message"
        raise ProtocolError(code, f"{mtype}: {field} {message}", field=field, turn_id=turn_id)
    return msg


@functools.cache
def _context_validator() -> jsonschema.Draft202012Validator:
    ref = {"$ref": "urn:npcbus:schemas:npc_request.schema.json#/properties/context"}
    return jsonschema.Draft202012Validator(ref, registry=registry())


def context_errors(context: dict) -> tuple[str, str] | None:
    """(field, message) of the first problem of a merged context, or None when it is valid."""
    errors = list(_context_validator().iter_errors(context))
    if not errors:
        return None
    field, message = describe(_best(errors))
    return ("" if field == "message" else field), f"{field} {message}"


def dumps(event: dict) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))
