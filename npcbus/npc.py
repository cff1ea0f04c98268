"""NPC logic: request validation, the generation constraint, prompts, strict parsing, safety rails
and streaming of the spoken line.

Everything here is plain functions and small classes: no event loop, no broker, no torch. The
inference consumer wires them together roughly like this::

    req = validate_request(msg.npc)                     # NPCRequestError -> reject the request
    category = unsafe_input_category(req)               # refuse at once, without generating
    if category:
        final = refusal_response(req, category)
    else:
        prompt = build_prompt(req, tokenizer)
        schema = response_schema_for(req)               # the JSON-schema constraint
        streamer = DialogueStreamer.for_request(req)    # spoken text only, rails applied
        for chunk in engine_output:
            send_delta(streamer.feed(chunk))
        send_delta(streamer.finish())
        final, problems = parse_response(full_text, req)

The final response is authoritative: when the output fails validation or a rail replaces it, the
text streamed before differs from ``final["dialogue"]``.

Schemas live in the repository's ``schemas/`` folder (``npc_request.schema.json``,
``npc_response.schema.json``); the shipped personas in ``npcbus/data_files/personas.json``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema

__all__ = [
    "ACTION_MIN_AUDIENCE", "AUDIENCES", "EMOTIONS", "INTENTS", "DIALOGUE_PATTERN", "TARGET_PATTERN",
    "PLAIN_PROMPT_FORMAT", "PROMPT_STYLES", "PROMPT_STYLE_KEY", "prompt_style_of", "NPCRequest", "NPCRequestError", "StrictJSONError", "DialogueStreamer",
    "load_schema", "load_personas", "validate_request", "response_schema_for", "build_messages",
    "build_prompt", "format_training_example", "canonical_json", "RESPONSE_ORDERS", "RESPONSE_ORDER_KEY",
    "response_order_of", "NPC_SAMPLING_KEY", "npc_sampling_of", "generation_for", "strict_json_loads", "parse_response",
    "response_is_valid", "fallback_response", "refusal_response", "unsafe_input_category",
    "unsafe_text_category", "apply_safety_rails", "rails_audience", "mask_profanity", "action_allowed",
    "action_targets", "dialogue_problems",
]

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"  # the repository's schemas/, packaged with npcbus
DATA_DIR = Path(__file__).resolve().parent / "data_files"

AUDIENCES = ("child", "teen", "general", "adult")
_AUDIENCE_RANK = {a: i for i, a in enumerate(AUDIENCES)}

# Kept equal to the enums of schemas/npc_response.schema.json (a test checks it).
EMOTIONS = ("neutral", "happy", "sad", "angry", "afraid", "surprised", "disgusted", "curious", "amused",
            "suspicious", "grateful", "worried", "proud", "tired")
INTENTS = ("greet", "inform", "trade", "quest_offer", "quest_update", "threaten", "refuse", "farewell", "joke",
           "ask", "thank", "warn", "comfort", "smalltalk")
RESPONSE_KEYS = ("dialogue", "emotion", "intent", "actions", "relationship_change", "end_conversation")
#: The orders in which a model may write a response's keys. ``dialogue_first`` (:data:`RESPONSE_KEYS`, the
#: default): the spoken line comes first, so it streams from the first tokens. ``plan_first``: the
#: intent and the actions, then the emotion, then the line: the model decides what kind of answer to
#: give before it words it (the offline default model is trained so; a tiny model picks the answer
#: better that way). Either way a final response's keys are in :data:`RESPONSE_KEYS` order.
RESPONSE_ORDERS = {
    "dialogue_first": RESPONSE_KEYS,
    "plan_first": ("intent", "actions", "emotion", "dialogue", "relationship_change", "end_conversation"),
}
#: The tokenizer_config.json key (``tokenizer.init_kwargs``) that names the order a model was trained on.
RESPONSE_ORDER_KEY = "npcbus_response_order"

# Strings the model generates are bounded by a pattern, never by minLength/maxLength: xgrammar 0.2.8
# lets raw control characters through a length-bounded string (and refuses escapes in it), while a
# pattern over this character class keeps them out. Quotes and backslashes are excluded too, so the
# generated text never needs an escape and the decoded value is the raw text between the quotes.
DIALOGUE_PATTERN = '^[^\\x00-\\x1f\\x7f-\\x9f"\\\\]{1,500}$'
TARGET_PATTERN = '^[^\\x00-\\x1f\\x7f-\\x9f"\\\\]{0,64}$'
_DIALOGUE_BAD = re.compile('[\\x00-\\x1f\\x7f-\\x9f"\\\\]')

DEFAULT_PLAYER = {"id": "", "name": "Traveler"}
DEFAULT_GENERATION = {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.95, "top_k": 50, "seed": None}
DEFAULT_CONTEXT = {"location": "", "time_of_day": "", "world_state": {}, "quest_state": {}, "notes": "",
                   "entities": []}

MAX_RESPONSE_CHARS = 65536

# Actions that only suit older audiences: the action is dropped below the given audience while the
# rails are on. Actions not listed suit everyone.
ACTION_MIN_AUDIENCE = {
    "attack": "teen",
    "duel": "teen",
    "steal": "teen",
    "pickpocket": "teen",
    "serve_ale": "teen",
    "sell_poison": "adult",
    "execute": "adult",
    "torture": "adult",
}


class NPCRequestError(ValueError):
    """An NPC request is invalid. ``field`` names the offending field (``persona.allowed_actions[2]``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}")


class StrictJSONError(ValueError):
    """Text is not one strict JSON value."""


class NPCRequest(dict):
    """A validated, normalized NPC request: a plain dict with every default filled in.

    Returned by :func:`validate_request`; the other functions accept raw dicts too and validate
    those first.
    """


# --------------------------------------------------------------------------------------------
# schemas and data
# --------------------------------------------------------------------------------------------


def _schema_path(name: str) -> Path:
    base = name.removesuffix(".json").removesuffix(".schema")
    return SCHEMA_DIR / f"{base}.schema.json"


@functools.cache
def _load_schema_cached(name: str) -> dict:
    path = _schema_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"schema {name!r} not found at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_schema(name: str) -> dict:
    """A schema of the ``schemas/`` folder by name (``npc_request``, ``npc_response.schema.json``...).

    Returns a fresh copy each time: callers may change it.
    """
    return copy.deepcopy(_load_schema_cached(name))


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_load_schema_cached(name))


@functools.cache
def _load_personas_cached(path: str) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of personas by id")
    return data


def load_personas(path: str | Path | None = None) -> dict[str, dict]:
    """Personas by id (the shipped ``npcbus/data_files/personas.json`` unless ``path`` is given)."""
    return copy.deepcopy(_load_personas_cached(str(path or DATA_DIR / "personas.json")))


# --------------------------------------------------------------------------------------------
# request validation
# --------------------------------------------------------------------------------------------


def _field_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_schema_error(err: jsonschema.ValidationError, root: str = "request") -> tuple[str, str]:
    """(field, message) for a jsonschema error, with the field named and the message short;
    ``root`` names the whole document when the error is at its top."""
    path = list(err.absolute_path)
    v, vv, inst = err.validator, err.validator_value, err.instance
    if v == "required" and isinstance(inst, dict):
        missing = [k for k in vv if k not in inst]
        return _field_path([*path, missing[0] if missing else "?"]), "is required"
    if v == "additionalProperties" and isinstance(inst, dict):
        known = set(err.schema.get("properties", {}))
        extra = [k for k in inst if k not in known]
        name = extra[0] if extra else "?"
        return _field_path([*path, name]), "is not a known field"
    field = _field_path(path) or root
    if v == "type":
        want = vv if isinstance(vv, str) else " or ".join(vv)
        return field, f"must be of type {want}, got {type(inst).__name__}"
    if v == "enum":
        return field, f"must be one of {', '.join(map(str, vv))}; got {_short(inst)}"
    if v == "maxLength":
        return field, f"is longer than {vv} characters"
    if v == "minLength":
        return field, "must not be empty" if vv == 1 else f"is shorter than {vv} characters"
    if v == "const":
        return field, f"must be {vv!r}"
    if v == "pattern":
        if len(str(vv)) <= 40:
            return field, f"contains characters that are not allowed (must match {vv})"
        return field, "contains characters that are not allowed or has a bad length"
    if v in ("maxItems", "maxProperties"):
        return field, f"has more than {vv} entries"
    if v in ("minItems", "minProperties"):
        return field, f"needs at least {vv} entries"
    if v == "uniqueItems":
        return field, "has duplicate entries"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        word = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return field, f"must be {word} {vv}; got {_short(inst)}"
    if v == "propertyNames":
        return field, f"has a key that is not allowed: {err.message[:120]}"
    return field, err.message[:200]


def _first_error(validator: jsonschema.Draft202012Validator, obj: Any) -> jsonschema.ValidationError | None:
    errors = list(validator.iter_errors(obj))
    if not errors:
        return None
    best = jsonschema.exceptions.best_match(errors)
    # For anyOf / oneOf, point at the deepest explanation.
    while best.context:
        best = jsonschema.exceptions.best_match(best.context)
    return best


def validate_request(obj: Any, *, personas: dict[str, dict] | None = None) -> NPCRequest:
    """Validate an NPC request and return it normalized, with every default filled in.

    ``persona_id`` is resolved against ``personas`` (default: :func:`load_personas`). The result is
    itself a valid request, and validating it again gives the same result. Raises
    :class:`NPCRequestError` naming the offending field.
    """
    if isinstance(obj, NPCRequest):
        return obj
    if not isinstance(obj, dict):
        raise NPCRequestError("request", f"must be a JSON object, got {type(obj).__name__}")
    if "persona" not in obj and "persona_id" not in obj:
        raise NPCRequestError("persona", "is required (or give persona_id)")
    err = _first_error(_validator("npc_request"), obj)
    if err is not None:
        raise NPCRequestError(*describe_schema_error(err))

    req = copy.deepcopy(obj)
    persona = req.get("persona")
    if persona is None:
        catalog = _load_personas_cached(str(DATA_DIR / "personas.json")) if personas is None else personas
        pid = req["persona_id"]
        if pid not in catalog:
            raise NPCRequestError("persona_id", f"unknown persona {pid!r}")
        persona = copy.deepcopy(catalog[pid])
        perr = _first_error(_validator("npc_request"), {"persona": persona, "player_input": "x"})
        if perr is not None:
            field, msg = describe_schema_error(perr)
            raise NPCRequestError("persona_id", f"catalog entry {pid!r} is invalid: {field}: {msg}")
    elif "persona_id" in req and req["persona_id"] != persona["id"]:
        raise NPCRequestError("persona_id", f"{req['persona_id']!r} does not match persona.id {persona['id']!r}")
    persona.setdefault("traits", [])
    persona.setdefault("speaking_style", "")
    persona.setdefault("allowed_emotions", list(EMOTIONS))
    persona.setdefault("known_entities", [])

    audience = req.get("audience", "general")
    safe_mode = req.get("safe_mode", True)
    if not safe_mode and _AUDIENCE_RANK[audience] < _AUDIENCE_RANK["general"]:
        raise NPCRequestError("safe_mode", f"cannot be false for audience {audience!r}")

    out = NPCRequest()
    out["persona"] = persona
    out["persona_id"] = persona["id"]
    out["context"] = {**copy.deepcopy(DEFAULT_CONTEXT), **req.get("context", {})}
    out["history"] = req.get("history", [])
    out["player"] = {**DEFAULT_PLAYER, **req.get("player", {})}
    out["player_input"] = req["player_input"]
    out["audience"] = audience
    out["adapter"] = req.get("adapter")
    out["generation"] = {**DEFAULT_GENERATION, **req.get("generation", {})}
    out["safe_mode"] = safe_mode
    return out


def _req(request: Any) -> NPCRequest:
    return validate_request(request)


# --------------------------------------------------------------------------------------------
# the generation constraint
# --------------------------------------------------------------------------------------------


def response_order_of(tokenizer) -> str:
    """The response order (:data:`RESPONSE_ORDERS`) a tokenizer's model was trained on: ``dialogue_first``
    unless its config names another (or there is no tokenizer)."""
    order = (getattr(tokenizer, "init_kwargs", None) or {}).get(RESPONSE_ORDER_KEY) or "dialogue_first"
    return order if order in RESPONSE_ORDERS else "dialogue_first"


def response_schema_for(request: Any, order: str = "dialogue_first") -> dict:
    """The response schema for one request: the generation constraint and the validation schema.

    ``actions[].type`` is restricted to the persona's allowed actions (no actions at all when it has
    none), ``actions[].target`` to :func:`action_targets` and ``emotion`` to its allowed emotions.
    Free strings are bounded by patterns only (see :data:`DIALOGUE_PATTERN`), so the result is safe
    to hand to xgrammar. ``properties`` are listed in ``order`` (:data:`RESPONSE_ORDERS`), which is
    the order a constrained decoder writes them in; validation does not depend on it.
    """
    req = _req(request)
    persona = req["persona"]
    schema = load_schema("npc_response")
    schema.pop("$id", None)
    schema.pop("examples", None)
    schema["title"] = f"NPC response of {persona['name']}"
    props = schema["properties"]
    allowed_emotions = [e for e in EMOTIONS if e in set(persona["allowed_emotions"])]
    props["emotion"]["enum"] = allowed_emotions
    actions = props["actions"]
    allowed_actions = list(persona["allowed_actions"])
    if allowed_actions:
        action_type = actions["items"]["properties"]["type"]
        action_type.pop("pattern", None)
        action_type["enum"] = allowed_actions
    else:
        actions["maxItems"] = 0
    target = actions["items"]["properties"]["target"]
    for bound in ("pattern", "minLength", "maxLength"):
        target.pop(bound, None)
    target["enum"] = action_targets(req)
    if order != "dialogue_first":
        keys = RESPONSE_ORDERS[order]
        schema["properties"] = {k: props[k] for k in keys} | {k: v for k, v in props.items() if k not in keys}
        schema["required"] = [k for k in keys if k in schema["required"]] + [
            k for k in schema["required"] if k not in keys]
    return schema


def action_targets(request: Any) -> list[str]:
    """The targets an action of the request's response may name, in this order and without repeats:
    ``""`` (nothing), the player's name, the persona's ``known_entities``, the scene's
    ``context.entities``."""
    req = _req(request)
    names = ["", req["player"]["name"], *req["persona"]["known_entities"], *req["context"]["entities"]]
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------

AUDIENCE_RULES = {
    "child": (
        "The players are young children. Keep every line gentle, kind and simple. No swearing or rude words, "
        "no violence beyond mild cartoon peril, no romance, no alcohol, drugs or smoking, nothing frightening. "
        "Never ask for or repeat personal details such as a real name, home address, school or phone number. "
        "If the player asks for anything unsuitable, refuse kindly in character and steer back to the adventure."
    ),
    "teen": (
        "The players are teenagers. No strong language, no sexual content, no graphic violence or gore, "
        "no drug use; fantasy combat may be mentioned without gory detail. Never ask for personal details. "
        "Refuse unsuitable requests in character."
    ),
    "general": (
        "General audience. Mild language only, no sexual content, no graphic violence or gore, no drug use. "
        "Refuse unsuitable requests in character."
    ),
    "adult": (
        "Adult audience. Mature themes, rough language and dark humor are allowed when they fit the character."
    ),
}
HARD_RULES = (
    "Always: never give real-world instructions for weapons, explosives, drugs or hurting anyone; never "
    "sexual content involving minors; no hate speech. If the player talks about hurting themself, answer "
    "with care and encourage them to reach out to someone they trust."
)

PLAIN_PROMPT_FORMAT = "### System\n{system}\n\n### Player\n{user}\n\n### NPC\n"
"""The prompt format used when no chat template is available: a system block, the player's block
(recent conversation and the new input), then the header after which the NPC's JSON follows."""


def _kv_lines(mapping: dict) -> str:
    return "; ".join(f"{k}: {json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}"
                     for k, v in mapping.items())


def _format_example(req: NPCRequest) -> str:
    emotion = _pick_emotion(req, ("happy", "neutral"))
    example = {"dialogue": f"Well met, {_dialogue_safe(req['player']['name'])}. What can I do for you?",
               "emotion": emotion, "intent": "greet", "actions": [], "relationship_change": 0,
               "end_conversation": False}
    return canonical_json(example)


def _system_message(req: NPCRequest) -> str:
    persona, ctx = req["persona"], req["context"]
    lines = [
        f"You are {persona['name']}, a character in a game. Stay in character at all times; never mention "
        "being an AI, a model or a game.",
        "",
        f"Who you are: {persona['description']}",
    ]
    if persona["traits"]:
        lines.append(f"Personality: {', '.join(persona['traits'])}.")
    if persona["speaking_style"]:
        lines.append(f"How you speak: {persona['speaking_style']}")
    scene = []
    if ctx["location"]:
        scene.append(f"- Location: {ctx['location']}")
    if ctx["time_of_day"]:
        scene.append(f"- Time of day: {ctx['time_of_day']}")
    if ctx["world_state"]:
        scene.append(f"- What you know of the world: {_kv_lines(ctx['world_state'])}")
    if ctx["quest_state"]:
        scene.append(f"- The player's quests: {_kv_lines(ctx['quest_state'])}")
    if ctx["notes"]:
        scene.append(f"- Notes: {ctx['notes']}")
    if scene:
        lines += ["", "The scene:", *scene]
    lines += ["", f"You are talking with {req['player']['name']}."]
    audience = rails_audience(req)
    lines += ["", f"Audience rules ({req['audience']}): {AUDIENCE_RULES[audience]} {HARD_RULES}"]
    allowed_actions = [a for a in req["persona"]["allowed_actions"] if action_allowed(a, audience)]
    emotions = [e for e in EMOTIONS if e in set(persona["allowed_emotions"])]
    if allowed_actions:
        actions_line = ("- \"actions\": a list of at most 3 objects {\"type\": ACTION, \"target\": TEXT}, where ACTION "
                        f"is one of: {', '.join(allowed_actions)}; TEXT names what or whom the action is about "
                        "(empty if nothing); use [] when you take no action.")
    else:
        actions_line = "- \"actions\": always [] (you take no game actions)."
    lines += [
        "",
        "Reply with exactly one JSON object on one line and nothing else, with these keys in this order:",
        "- \"dialogue\": what you say aloud, 1 to 500 characters, no line breaks, no double quotes "
        "(use ‘ ’ or “ ” instead) and no backslashes.",
        f"- \"emotion\": one of: {', '.join(emotions)}.",
        f"- \"intent\": one of: {', '.join(INTENTS)}.",
        actions_line,
        "- \"relationship_change\": an integer from -5 to 5: how this exchange changes your attitude to the "
        "player (0: no change).",
        "- \"end_conversation\": true if you end the conversation with this line, else false.",
        f"Example: {_format_example(req)}",
    ]
    return "\n".join(lines)


def _user_message(req: NPCRequest) -> str:
    player, npc = req["player"]["name"], req["persona"]["name"]
    parts = []
    if req["history"]:
        parts.append("Conversation so far:")
        for turn in req["history"]:
            who = player if turn["role"] == "player" else npc
            parts.append(f"{who}: {turn['text']}")
        parts.append("")
    parts.append(f"{player} says: {req['player_input']}")
    return "\n".join(parts)


def _compact_system_message(req: NPCRequest) -> str:
    persona, ctx = req["persona"], req["context"]
    audience = rails_audience(req)
    lines = [f"{persona['name']} ({persona['id']}): {persona['description']}"]
    if persona["traits"]:
        lines.append(f"Traits: {', '.join(persona['traits'])}.")
    if persona["speaking_style"]:
        lines.append(f"Style: {persona['speaking_style']}")
    lines += _scene_lines(ctx)
    if ctx["notes"]:
        lines.append(f"Notes: {ctx['notes']}")
    lines.append(f"Audience: {req['audience']}")
    actions = [a for a in persona["allowed_actions"] if action_allowed(a, audience)]
    lines.append(f"Actions: {', '.join(actions) if actions else 'none'}")
    lines.append(f"Targets: {', '.join(action_targets(req)[1:])}")
    return "\n".join(lines)


def _scene_lines(ctx: dict) -> list[str]:
    """``Scene:`` (location, time, world state) and ``Quests:`` lines of the short prompt styles."""
    lines = []
    scene = [v for v in (ctx["location"], ctx["time_of_day"]) if v]
    if ctx["world_state"]:
        scene.append(_kv_lines(ctx["world_state"]))
    if scene:
        lines.append(f"Scene: {'; '.join(scene)}")
    if ctx["quest_state"]:
        lines.append(f"Quests: {_kv_lines(ctx['quest_state'])}")
    return lines


def _minimal_system_message(req: NPCRequest) -> str:
    persona = req["persona"]
    lines = [f"{persona['name']} ({persona['id']})", *_scene_lines(req["context"])]
    lines.append(f"Audience: {req['audience']}")
    return "\n".join(lines)


def _compact_user_message(req: NPCRequest) -> str:
    player, npc = req["player"]["name"], req["persona"]["name"]
    lines = [f"{player if t['role'] == 'player' else npc}: {t['text']}" for t in req["history"]]
    lines.append(f"{player}: {req['player_input']}")
    return "\n".join(lines)


def _minimal_user_message(req: NPCRequest) -> str:
    """The conversation, then whose turn it is: the persona's name and id again, next to where the
    answer starts (a small model keeps to the voice it is told last)."""
    persona = req["persona"]
    return f"{_compact_user_message(req)}\n{persona['name']} ({persona['id']}):"


PROMPT_STYLES = ("full", "compact", "minimal")
"""How an NPC request becomes messages. ``full`` spells out the persona, the scene, the audience rules and
the exact JSON format in words, for instruction-tuned models. ``compact`` gives the same facts as short
labelled lines (about a fifth of the tokens), for small models trained on it. ``minimal`` names the
persona (name and id: a model trained on the persona's turns knows the rest), the scene and quests
and the audience, then the conversation and the persona's name and id again as the speaker of the
turn to come (about a tenth of the tokens), for the offline default
model: a model that small reads no description, and short prompts buy it more training in the same
time. The response schema constrains the output (allowed actions, targets, emotions) either way."""

#: The tokenizer_config.json key (``tokenizer.init_kwargs``) that names a model's prompt style.
PROMPT_STYLE_KEY = "npcbus_prompt_style"


#: The tokenizer_config.json key (``tokenizer.init_kwargs``) that holds a model's recommended sampling of NPC
#: turns: an object of ``temperature``, ``top_p`` and ``top_k``, which an NPC request's missing
#: ``generation`` fields take instead of :data:`DEFAULT_GENERATION`'s.
NPC_SAMPLING_KEY = "npcbus_npc_sampling"
_SAMPLING_BOUNDS = {"temperature": (0.0, 2.0, float), "top_p": (1e-6, 1.0, float), "top_k": (0, 1000, int)}


def npc_sampling_of(tokenizer) -> dict[str, float | int]:
    """The sampling a tokenizer's model recommends for NPC turns (see :data:`NPC_SAMPLING_KEY`); ``{}`` when it
    names none. Unknown keys and out-of-range values are left out."""
    raw = (getattr(tokenizer, "init_kwargs", None) or {}).get(NPC_SAMPLING_KEY)
    out: dict[str, float | int] = {}
    if isinstance(raw, dict):
        for key, (lo, hi, kind) in _SAMPLING_BOUNDS.items():
            v = raw.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi:
                out[key] = kind(v)
    return out


def generation_for(request: Any, tokenizer=None) -> dict:
    """The generation settings of an NPC request: the fields it sets, then the model's recommended NPC
    sampling (:func:`npc_sampling_of`) for those it leaves out, then :data:`DEFAULT_GENERATION`."""
    given = request.get("generation") if isinstance(request, dict) else None
    given = given if isinstance(given, dict) else {}
    return {**DEFAULT_GENERATION, **npc_sampling_of(tokenizer), **given}


def prompt_style_of(tokenizer) -> str:
    """The prompt style a tokenizer's model was trained on (``full`` unless its config names another)."""
    style = (getattr(tokenizer, "init_kwargs", None) or {}).get(PROMPT_STYLE_KEY) or "full"
    return style if style in PROMPT_STYLES else "full"


def build_messages(request: Any, style: str = "full") -> list[dict[str, str]]:
    """OpenAI-style messages for a request: a system message (persona, scene, audience rules, the
    JSON output format) and a user message (recent conversation and the player's new input), in one
    of :data:`PROMPT_STYLES`."""
    req = _req(request)
    if style == "compact":
        return [{"role": "system", "content": _compact_system_message(req)},
                {"role": "user", "content": _compact_user_message(req)}]
    if style == "minimal":
        return [{"role": "system", "content": _minimal_system_message(req)},
                {"role": "user", "content": _minimal_user_message(req)}]
    if style != "full":
        raise ValueError(f"unknown prompt style {style!r}; use one of {', '.join(PROMPT_STYLES)}")
    return [{"role": "system", "content": _system_message(req)}, {"role": "user", "content": _user_message(req)}]


def _special_strings(tokenizer) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tok in decoder.values():
        if getattr(tok, "special", False):
            specials.add(str(tok.content if hasattr(tok, "content") else tok))
    return sorted((s for s in specials if s), key=len, reverse=True)


def _scrub(text: str, specials: list[str]) -> str:
    """Remove special-token strings from text, so no one can forge turns of the chat template."""
    for _ in range(4):  # removing one may join the pieces of another
        before = text
        for s in specials:
            text = text.replace(s, "")
        if text == before:
            break
    return text


def build_prompt(request: Any, tokenizer=None, style: str | None = None) -> str:
    """The prompt text for a request.

    With a tokenizer that has a chat template: ``tokenizer.apply_chat_template(build_messages(...),
    add_generation_prompt=True, tokenize=False)`` (the system message is folded into the user message
    for templates that refuse a system role). Otherwise :data:`PLAIN_PROMPT_FORMAT`. Special-token
    strings of the tokenizer are removed from the messages first, and in the plain format lines
    starting with ``###`` are defused, so player text cannot forge a turn. ``style`` defaults to the
    tokenizer's :func:`prompt_style_of` (training and inference render a request alike).
    """
    messages = build_messages(request, style or (prompt_style_of(tokenizer) if tokenizer is not None else "full"))
    if tokenizer is not None:
        specials = _special_strings(tokenizer)
        messages = [{**m, "content": _scrub(m["content"], specials)} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - templates without a system role raise their own errors
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
    system, user = (re.sub(r"(?m)^#{3,}", "##", m["content"]) for m in messages)
    return PLAIN_PROMPT_FORMAT.format(system=system, user=user)


def canonical_json(response: dict, order: str = "dialogue_first") -> str:
    """The canonical text of a response: compact JSON, keys in ``order`` (:data:`RESPONSE_ORDERS`),
    non-ASCII kept as is.

    This is the exact completion the model is trained on and the shape the constraint produces.
    """
    ordered = {k: response[k] for k in RESPONSE_ORDERS[order] if k in response}
    ordered.update((k, v) for k, v in response.items() if k not in ordered)
    if isinstance(ordered.get("actions"), list):
        ordered["actions"] = [
            {**{k: a[k] for k in ("type", "target") if k in a}, **a} if isinstance(a, dict) else a
            for a in ordered["actions"]]
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def format_training_example(record: dict, tokenizer=None) -> tuple[str, str]:
    """``(prompt, completion)`` for a ``{"request": ..., "response": ...}`` record.

    The prompt is exactly what :func:`build_prompt` gives at inference time; the completion is the
    canonical JSON of the response, in the tokenizer's :func:`response_order_of`, and nothing else (the
    trainer appends the end-of-sequence token).
    Raises :class:`NPCRequestError` for a bad request and ``ValueError`` for a response that is not
    valid for its request.
    """
    if not isinstance(record, dict) or "request" not in record or "response" not in record:
        raise ValueError("a training record needs 'request' and 'response'")
    req = _req(record["request"])
    response = record["response"]
    err = _first_error(jsonschema.Draft202012Validator(response_schema_for(req)), response)
    if err is not None:
        field, msg = describe_schema_error(err)
        raise ValueError(f"response.{field}: {msg}" if field != "request" else f"response: {msg}")
    return build_prompt(req, tokenizer), canonical_json(response, response_order_of(tokenizer))


# --------------------------------------------------------------------------------------------
# strict parsing
# --------------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise StrictJSONError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str):
    raise StrictJSONError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"number {text[:40]} is out of range")
    return value


def _check_strings(value: Any) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise StrictJSONError("string holds a lone surrogate escape") from e
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def strict_json_loads(text: str | bytes) -> Any:
    """Parse exactly one JSON value, strictly: no raw control characters inside strings, no NaN or
    Infinity (nor numbers that overflow to it), no duplicate keys, no lone surrogates, nothing but
    whitespace after the value. Raises :class:`StrictJSONError`."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise StrictJSONError(f"not UTF-8: {e}") from e
    if not isinstance(text, str):
        raise StrictJSONError(f"expected text, got {type(text).__name__}")
    if len(text) > MAX_RESPONSE_CHARS:
        raise StrictJSONError(f"longer than {MAX_RESPONSE_CHARS} characters")
    try:
        value = json.loads(text, strict=True, object_pairs_hook=_no_duplicates,
                           parse_constant=_reject_constant, parse_float=_finite_float)
    except StrictJSONError:
        raise
    except json.JSONDecodeError as e:
        raise StrictJSONError(f"{e.msg} at line {e.lineno} column {e.colno}") from e
    except RecursionError as e:
        raise StrictJSONError("nested too deeply") from e
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise StrictJSONError(str(e)[:200]) from e
    _check_strings(value)
    return value


MIN_DIALOGUE_WORDS = 2
MIN_LETTER_SHARE = 0.6
_LETTER_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_JSON_DEBRIS = re.compile(r'[{}\[\]]|":|",')
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


def _repetition(words: list[str], text: str) -> list[str]:
    problems = []
    run = 1
    for i in range(1, len(words)):
        run = run + 1 if words[i] == words[i - 1] else 1
        if run == 4:
            problems.append(f"repeats {words[i]!r} 4 times in a row")
            break
    grams: dict[tuple[str, ...], int] = {}
    for gram in zip(words, words[1:], words[2:], strict=False):
        grams[gram] = grams.get(gram, 0) + 1
        if grams[gram] == 3:
            problems.append(f"repeats {' '.join(gram)!r} 3 times")
            break
    sentences = [tuple(w.lower() for w in _LETTER_WORD.findall(part)) for part in _SENTENCE_END.split(text)]
    for a, b in zip(sentences, sentences[1:], strict=False):
        if len(a) >= 2 and a == b:
            problems.append(f"says {' '.join(a)!r} twice in a row")
            break
    return problems


def dialogue_problems(text: str) -> list[str]:
    """Why a spoken line is not readable for a player; empty when it is.

    A line is unreadable when it is empty or blank; has fewer than :data:`MIN_DIALOGUE_WORDS` words
    of letters; is mostly punctuation or digits (letters under :data:`MIN_LETTER_SHARE` of the
    characters that are not spaces); carries JSON debris (``{``, ``}``, ``[``, ``]``, ``":``,
    ``",``, or it starts with ``:`` or ``,``); or says the same thing over and over (a word 4 times
    in a row, a three-word phrase 3 times, a sentence twice in a row). Every shipped line, refusal
    and fallback is readable.
    """
    if not isinstance(text, str) or not text.strip():
        return ["empty"]
    problems = []
    words = [w.lower() for w in _LETTER_WORD.findall(text)]
    if len(words) < MIN_DIALOGUE_WORDS:
        problems.append(f"fewer than {MIN_DIALOGUE_WORDS} words")
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if letters < MIN_LETTER_SHARE * len(visible):
        problems.append(f"mostly punctuation or digits ({letters} letters in {len(visible)} characters)")
    debris = list(dict.fromkeys(_JSON_DEBRIS.findall(text)))
    start = text.lstrip()[0]
    if start in ":,":
        debris.insert(0, f"{start} at the start")
    if debris:
        problems.append(f"JSON debris ({', '.join(debris)})")
    return problems + _repetition(words, text)


def response_is_valid(problems: list[str]) -> bool:
    """Whether the model's own output was valid (no problem starting with ``invalid:``); rails may
    still have changed it (problems starting with ``rail:``)."""
    return not any(p.startswith("invalid:") for p in problems)


def parse_response(text: str | bytes, request: Any) -> tuple[dict, list[str]]:
    """Parse and check generated text for a request; always returns a usable response.

    Steps: unsafe player input (for the audience) -> an in-character refusal, whatever was generated;
    strict JSON (:func:`strict_json_loads`), validation against :func:`response_schema_for` and a
    readable spoken line (:func:`dialogue_problems`) -> :func:`fallback_response` on failure; then
    :func:`apply_safety_rails`. ``problems`` lists what happened, each entry prefixed ``invalid:``
    (the output was replaced by the fallback) or ``rail:`` (a safety rail changed it); empty when
    the output was used as generated.
    """
    req = _req(request)
    category = unsafe_input_category(req)
    if category is not None:
        return refusal_response(req, category), [f"rail: refused unsafe player input ({category})"]
    try:
        value = strict_json_loads(text)
    except StrictJSONError as e:
        return fallback_response(req, "invalid_json"), [f"invalid: json: {e}"]
    validator = jsonschema.Draft202012Validator(response_schema_for(req))
    errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        problems = []
        for err in errors[:5]:
            field, msg = describe_schema_error(err)
            problems.append(f"invalid: schema: {field if field != 'request' else 'response'}: {msg}")
        return fallback_response(req, "invalid_schema"), problems
    response = {k: value[k] for k in RESPONSE_KEYS}
    response["relationship_change"] = int(response["relationship_change"])
    unreadable = dialogue_problems(response["dialogue"])
    if unreadable:
        return fallback_response(req, "unreadable"), [f"invalid: unreadable dialogue: {p}" for p in unreadable]
    return apply_safety_rails(response, req)


# --------------------------------------------------------------------------------------------
# safety rails
# --------------------------------------------------------------------------------------------


def rails_audience(request: Any) -> str:
    """The audience whose rails apply: the request's audience, or ``adult`` when ``safe_mode`` is off."""
    req = _req(request)
    return req["audience"] if req["safe_mode"] else "adult"


def action_allowed(action: str, audience: str) -> bool:
    """Whether an action suits an audience (see :data:`ACTION_MIN_AUDIENCE`)."""
    need = ACTION_MIN_AUDIENCE.get(action)
    return need is None or _AUDIENCE_RANK[audience] >= _AUDIENCE_RANK[need]


# Masked for child audiences only.
_MILD_WORDS = (r"damn(?:ed|it)?", r"dammit", r"hell", r"crap(?:py)?", r"piss(?:ed)?", r"bugger", r"arse")
# Masked for child, teen and general audiences.
_STRONG_WORDS = (r"fuck\w*", r"shit(?:s|ty|ting|ted|head)?", r"bitch(?:es|y|ing)?", r"bastards?", r"assholes?",
                 r"wankers?", r"pricks?", r"sluts?", r"whores?", r"retard(?:s|ed)?")
_MILD_RE = re.compile(r"\b(?:" + "|".join(_MILD_WORDS + _STRONG_WORDS) + r")\b", re.IGNORECASE)
_STRONG_RE = re.compile(r"\b(?:" + "|".join(_STRONG_WORDS) + r")\b", re.IGNORECASE)


def _mask_word(m: re.Match) -> str:
    w = m.group(0)
    return w[0] + "*" * (len(w) - 1)


def mask_profanity(text: str, audience: str) -> str:
    """Mask listed words for an audience (first letter kept, the rest as ``*``; length unchanged)."""
    if audience == "child":
        return _MILD_RE.sub(_mask_word, text)
    if audience in ("teen", "general"):
        return _STRONG_RE.sub(_mask_word, text)
    return text


_ALL = frozenset(AUDIENCES)
_BELOW_ADULT = frozenset({"child", "teen", "general"})
_YOUNG = frozenset({"child", "teen"})


def _rx(*patterns: str) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


_SEXUAL = _rx(r"\b(?:sex|sexy|sexual|naked|nude|nudes|horny|orgasm\w*|porn\w*|erotic\w*|undress\w*|seduc\w*)\b",
              r"\b(?:make love|sleep with me|have sex|strip for me|take (?:your|my) clothes off)\b")
_MINOR = _rx(r"\b(?:child|children|kid|kids|minor|minors|underage|little (?:girl|boy)|schoolgirl|schoolboy)\b",
             r"\b1[0-7] ?(?:yo|y/o|year old|years old)\b")
# category, audiences it is refused for, patterns (checked on the player's input; all but
# personal_info and self_harm also on the generated line).
_RULES: list[tuple[str, frozenset, re.Pattern]] = [
    ("self_harm", _ALL, _rx(r"\b(?:kill|killing) myself\b", r"\bsuicid\w*", r"\bself[- ]harm\w*",
                            r"\b(?:want|wanna|going|gonna|try|trying|plan|planning) to (?:hurt|harm|cut) myself\b",
                            r"\bend(?:ing)? my (?:own )?life\b", r"\bwant(?:ed)? to die\b", r"\bdon'?t want to (?:live|be alive)\b")),
    ("real_world_harm", _ALL, _rx(
        r"\b(?:how (?:do|can|would|could|should) (?:i|you|we|one)|how to|teach me|show me how|instructions|recipe|"
        r"steps? to|step by step)\b.{0,40}\b(?:bombs?|explosives?|napalm|meth|methamphetamine|nerve (?:agent|gas)|"
        r"sarin|ricin|anthrax|molotov\w*|thermite|gunpowder|cocaine|heroin|fentanyl)\b",
        r"\bhow (?:do i|to|can i|would i)\b.{0,20}\b(?:poison|stab|strangle|shoot|kill)\b.{0,20}"
        r"\b(?:a real|real people|my (?:teacher|mom|mother|dad|father|brother|sister|classmate|boss|wife|husband|neighbou?r))\b")),
    ("hate", _ALL, _rx(
        r"\b(?:genocide|ethnic cleansing)\b",
        r"\b(?:jews|muslims|christians|black people|white people|asians|gays|gay people|trans people|immigrants|"
        r"women)\b.{0,30}\b(?:should (?:all )?die|are inferior|are subhuman|are vermin|should be (?:killed|wiped out))\b")),
    ("sexual", _BELOW_ADULT, _SEXUAL),
    ("romance", frozenset({"child"}), _rx(r"\b(?:kiss|kissing) me\b", r"\b(?:marry|date) me\b",
                                         r"\bbe my (?:girlfriend|boyfriend|wife|husband)\b")),
    ("graphic_violence", _BELOW_ADULT, _rx(
        r"\btortur\w*", r"\bdismember\w*", r"\bbehead\w*", r"\bdisembowel\w*", r"\bgore\b", r"\bgory\b",
        r"\bmutilat\w*", r"\bflay(?:ed|ing)?\b", r"\bskin (?:him|her|them|it) alive\b",
        r"\b(?:cut|slit|chop) (?:off )?(?:his|her|their) (?:head|throat|fingers|tongue)\b")),
    ("violence", frozenset({"child"}), _rx(
        r"\bmurder\w*",
        r"\b(?:kill|stab|strangle|slaughter|shoot|beat up)\b (?:him|her|them|you|people|someone|everyone|"
        r"the (?:guard|guards|merchant|innkeeper|villagers?|farmer|king|queen|children|kids|baker|healer|bard))\b")),
    ("drugs", _BELOW_ADULT, _rx(r"\b(?:cocaine|heroin|meth|marijuana|cannabis|lsd|ecstasy|opium)\b",
                               r"\b(?:get|getting) high\b", r"\bsmoke (?:a )?joint\b")),
    ("alcohol", frozenset({"child"}), _rx(r"\b(?:beer|ale|ales|wine|mead|whiske?y|rum|vodka|liquor|booze|drunk)\b")),
    ("personal_info", _YOUNG, _rx(
        r"\bmy (?:home |real |house )?address is\b", r"\bi live (?:at|on) \d", r"\bmy (?:phone|cell|mobile) (?:number|no\.?) is\b",
        r"\bmy (?:school|teacher) is (?:called )?\w", r"\bi go to \w+ (?:school|elementary|middle school|high school)\b",
        r"\bmy password is\b", r"\bmy (?:real|full) name is\b")),
]
_INPUT_ONLY = frozenset({"self_harm", "personal_info"})


def _category(text: str, audience: str, *, output: bool) -> str | None:
    if _SEXUAL.search(text) and _MINOR.search(text):
        return "sexual_minors"
    for category, refused_for, pattern in _RULES:
        if output and category in _INPUT_ONLY:
            continue
        if audience in refused_for and pattern.search(text):
            return category
    return None


def unsafe_input_category(request: Any) -> str | None:
    """The unsafe category of the player's input for the request's audience, or None.

    Categories: self_harm, real_world_harm, hate, sexual_minors (refused for every audience);
    sexual, graphic_violence, drugs (relaxed for adult); romance, violence, alcohol (child only);
    personal_info (child and teen). ``safe_mode`` off relaxes like adult.
    """
    req = _req(request)
    return _category(req["player_input"], rails_audience(req), output=False)


def unsafe_text_category(text: str, audience: str) -> str | None:
    """The unsafe category of a generated line for an audience (the input-only categories skipped)."""
    return _category(text, audience, output=True)


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()[:8], "big")


def _dialogue_safe(text: str, default: str = "friend") -> str:
    cleaned = " ".join(_DIALOGUE_BAD.sub(" ", text).split())
    return cleaned[:64] or default


def _pick_emotion(req: NPCRequest, preferred: tuple[str, ...]) -> str:
    allowed = [e for e in EMOTIONS if e in set(req["persona"]["allowed_emotions"])]
    for e in (*preferred, "neutral"):
        if e in allowed:
            return e
    return allowed[0]


_REFUSALS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...], bool]] = {
    # category: (lines, intent, preferred emotions, end_conversation)
    "self_harm": ((
        "{player}, those are heavy words, and I'm glad you said them aloud. If you are truly hurting, please "
        "talk to someone you trust or a helpline where you live, today. You matter more than any quest.",
        "Hold on, {player}. If that is how you really feel, please reach out to a friend, your family or a local "
        "helpline right now. I'll still be here when you come back.",
    ), "comfort", ("worried", "sad"), False),
    "real_world_harm": ((
        "That's knowledge I won't share with anyone, {player}. Some things are best left unlearned.",
        "No, {player}. I won't help anyone hurt people, not with words and not with recipes.",
    ), "refuse", ("suspicious", "neutral"), False),
    "hate": ((
        "I won't hear talk like that, {player}. Everyone who comes here gets the same respect.",
        "Mind your tongue, {player}. Folk of every kind are welcome here, and that kind of talk is not.",
    ), "refuse", ("angry", "disgusted", "neutral"), False),
    "sexual_minors": ((
        "No. I won't talk about that, {player}, and this conversation is over.",
    ), "refuse", ("disgusted", "angry", "neutral"), True),
    "sexual": ((
        "Ha! Let's keep our talk to honest business, {player}. What else can I do for you?",
        "That's not a road I'll walk with you, {player}. Ask me about something else.",
    ), "refuse", ("surprised", "amused", "neutral"), False),
    "romance": ((
        "Oh, that's sweet, {player}, but let's stay good friends. Shall we get back to our adventure?",
    ), "refuse", ("amused", "happy", "neutral"), False),
    "graphic_violence": ((
        "I'd rather not dwell on such grim things, {player}. Let's talk of something else.",
        "That's darker than I care to go, {player}. Ask me something else.",
    ), "refuse", ("disgusted", "worried", "neutral"), False),
    "violence": ((
        "Whoa there! We don't hurt folk around here, {player}. How about we find a kinder way to sort this out?",
        "No, no, {player}, nobody gets hurt on my watch. Let's think of a better plan together.",
    ), "refuse", ("worried", "surprised", "neutral"), False),
    "drugs": ((
        "I don't deal in that sort of thing, {player}, and you would do well to stay clear of it too.",
    ), "refuse", ("suspicious", "neutral"), False),
    "alcohol": ((
        "That's a grown-up drink, {player}! How about a cup of warm milk with honey instead?",
        "None of that for you, {player}. I have fresh apple juice, though, if you are thirsty.",
    ), "refuse", ("amused", "happy", "neutral"), False),
    "personal_info": ((
        "Keep that to yourself, {player}! Homes, schools and phone numbers are secrets you shouldn't share "
        "with strangers you meet on the road, not even a friendly face like mine.",
    ), "warn", ("worried", "neutral"), False),
}


def _build(line: str, intent: str, emotion: str, end: bool) -> dict:
    return {"dialogue": line, "emotion": emotion, "intent": intent, "actions": [], "relationship_change": 0,
            "end_conversation": end}


def refusal_response(request: Any, category: str) -> dict:
    """An in-character refusal for an unsafe category (see :func:`unsafe_input_category`).

    Deterministic for a given persona, input and category; valid against the request's response schema.
    """
    req = _req(request)
    lines, intent, emotions, end = _REFUSALS.get(category, _REFUSALS["real_world_harm"])
    line = lines[_seed(category, req["persona"]["id"], req["player_input"]) % len(lines)]
    text = line.format(player=_dialogue_safe(req["player"]["name"]), npc=_dialogue_safe(req["persona"]["name"]))
    return _build(text, intent, _pick_emotion(req, emotions), end)


_FALLBACKS = {
    "busy": ((
        "Give me a moment, {player}, I'm a little busy right now. Ask me again shortly.",
        "Just a moment, {player}, I have my hands full. Try me again in a little while.",
    ), "smalltalk", ("tired", "neutral")),
    "default": ((
        "Hm? Forgive me, {player}, my thoughts wandered off. What were you saying?",
        "Sorry, {player}, I lost my train of thought. Could you say that again?",
        "Pardon me, {player}, I didn't quite catch that. Once more?",
    ), "ask", ("surprised", "curious", "neutral")),
}


def fallback_response(request: Any, reason: str) -> dict:
    """A safe in-character line used when no valid response is available.

    ``reason`` (``invalid_json``, ``invalid_schema``, ``unreadable``, ``unsafe_output``, ``timeout``,
    ``overloaded``...)
    picks the wording; the result is valid against :func:`response_schema_for` for the request.
    """
    req = _req(request)
    kind = "busy" if reason in ("timeout", "overloaded", "busy") else "default"
    lines, intent, emotions = _FALLBACKS[kind]
    line = lines[_seed(reason, req["persona"]["id"], req["player_input"]) % len(lines)]
    text = line.format(player=_dialogue_safe(req["player"]["name"]))
    return _build(text, intent, _pick_emotion(req, emotions), False)


def apply_safety_rails(response: dict, request: Any) -> tuple[dict, list[str]]:
    """Apply the audience's rails to a schema-valid response; returns (response, problems).

    An unsafe generated line is replaced by the fallback; listed words are masked; actions that do not
    suit the audience are dropped. Nothing changes for adult (or ``safe_mode`` off) except the limits
    that apply to everyone.
    """
    req = _req(request)
    audience = rails_audience(req)
    problems: list[str] = []
    out = copy.deepcopy(response)
    category = unsafe_text_category(out["dialogue"], audience)
    if category is not None:
        return fallback_response(req, "unsafe_output"), [f"rail: replaced unsafe generated line ({category})"]
    masked = mask_profanity(out["dialogue"], audience)
    if masked != out["dialogue"]:
        out["dialogue"] = masked
        problems.append("rail: masked words in dialogue")
    kept = []
    for action in out["actions"]:
        if action_allowed(action["type"], audience):
            kept.append(action)
        else:
            problems.append(f"rail: dropped action {action['type']} (audience {audience})")
    out["actions"] = kept
    return out, problems


# --------------------------------------------------------------------------------------------
# streaming the spoken line
# --------------------------------------------------------------------------------------------

_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WORD = re.compile(r"\w")


class DialogueStreamer:
    """Extracts the decoded ``dialogue`` string from JSON text fed in arbitrary chunks.

    ``feed(chunk)`` returns the characters of the top-level ``dialogue`` value that became available
    (escapes such as ``\\n``, ``\\"`` and ``\\uXXXX``, surrogate pairs included, may be split across
    chunks); ``finish()`` returns what was held back. Lone surrogates come out as U+FFFD. With
    ``mask`` (a function over text), the streamer holds back a trailing partial word until the word
    ends and passes completed text through ``mask``: word-wise masking such as
    :func:`mask_profanity` then gives the same text as masking the whole line at once.
    """

    def __init__(self, *, key: str = "dialogue", mask: Callable[[str], str] | None = None):
        self.key = key
        self.mask = mask
        self.done = False        # the dialogue string has closed
        self.text = ""           # everything returned so far
        self._depth = 0
        self._in_string = False
        self._is_key = False     # the current string is an object key at depth 1
        self._expect_key = False
        self._top_is_object = False
        self._last_key: str | None = None
        self._capturing = False  # inside the dialogue value
        self._armed = False      # after "dialogue": at depth 1, waiting for the value
        self._esc: str | None = None  # None, "" after a backslash, "u..." while reading hex
        self._high: int | None = None  # pending high surrogate
        self._key_buf: list[str] = []
        self._out: list[str] = []
        self._held = ""

    @classmethod
    def for_request(cls, request: Any) -> DialogueStreamer:
        """A streamer that applies the request's profanity masking as it streams."""
        audience = rails_audience(request)
        if audience == "adult":
            return cls()
        return cls(mask=functools.partial(mask_profanity, audience=audience))

    # -- string content ------------------------------------------------------------------------

    def _emit(self, ch: str) -> None:
        if self._is_key:
            self._key_buf.append(ch)
        elif self._capturing:
            self._out.append(ch)

    def _put_code(self, code: int) -> None:
        if 0xD800 <= code <= 0xDBFF:
            if self._high is not None:
                self._emit("\ufffd")
            self._high = code
            return
        if 0xDC00 <= code <= 0xDFFF:
            if self._high is not None:
                self._emit(chr(0x10000 + ((self._high - 0xD800) << 10) + (code - 0xDC00)))
                self._high = None
            else:
                self._emit("\ufffd")
            return
        self._flush_high()
        self._emit(chr(code))

    def _flush_high(self) -> None:
        if self._high is not None:
            self._emit("\ufffd")
            self._high = None

    def _string_char(self, ch: str) -> None:
        if self._esc is not None:
            if self._esc == "":
                if ch == "u":
                    self._esc = "u"
                    return
                self._esc = None
                self._flush_high()
                self._emit(_SIMPLE_ESCAPES.get(ch, ch))
                return
            self._esc += ch
            if len(self._esc) == 5:
                hexdigits, self._esc = self._esc[1:], None
                try:
                    self._put_code(int(hexdigits, 16))
                except ValueError:
                    self._flush_high()
                    self._emit("\ufffd")
            return
        if ch == "\\":
            self._esc = ""
        elif ch == '"':
            self._flush_high()
            self._close_string()
        else:
            self._flush_high()
            self._emit(ch)

    def _close_string(self) -> None:
        self._in_string = False
        if self._is_key:
            self._is_key = False
            self._last_key = "".join(self._key_buf)
            self._key_buf = []
        elif self._capturing:
            self._capturing = False
            self.done = True

    # -- structure -----------------------------------------------------------------------------

    def _structural(self, ch: str) -> None:
        if ch in " \t\r\n":
            return
        if self._armed:
            self._armed = False
            if ch == '"':
                self._in_string = True
                self._capturing = True
                return
        if ch == '"':
            self._in_string = True
            if self._depth == 1 and self._expect_key:
                self._is_key = True
                self._expect_key = False
            return
        if ch in "{[":
            self._depth += 1
            if self._depth == 1:
                self._top_is_object = self._expect_key = ch == "{"
        elif ch in "}]":
            self._depth -= 1
        elif ch == "," and self._depth == 1:
            self._expect_key = self._top_is_object
        elif ch == ":" and self._depth == 1:
            self._armed = self._last_key == self.key
            self._last_key = None

    def _take(self, final: bool) -> str:
        text = "".join(self._out)
        self._out = []
        if self.mask is not None:
            text = self._held + text
            if final:
                self._held = ""
            else:
                cut = len(text)
                while cut > 0 and _WORD.match(text[cut - 1]):
                    cut -= 1
                text, self._held = text[:cut], text[cut:]
            text = self.mask(text) if text else ""
        self.text += text
        return text

    def feed(self, chunk: str) -> str:
        """Feed the next piece of generated text; returns newly available dialogue characters."""
        if self.done or not chunk:
            return ""
        for ch in chunk:
            if self._in_string:
                self._string_char(ch)
            else:
                self._structural(ch)
            if self.done:
                break
        return self._take(final=self.done)

    def finish(self) -> str:
        """The end of the text: returns whatever was held back (also when the JSON was cut off)."""
        if self._capturing:
            self._flush_high()
        return self._take(final=True)
