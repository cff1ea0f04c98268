"""Every message type on the bus, and nothing else.

Each message is a dataclass registered under a wire ``type`` name. The codec
(:mod:`npcbus.codec`) turns them into bytes and back; it tolerates unknown fields and rejects
missing or mistyped required ones with an error naming the field.

Tensors are ``numpy.ndarray`` values inside ``dict[str, np.ndarray]`` fields; the codec sends
them as dtype, shape and raw bytes and decodes them as read-only views of the received buffer.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

PROTOCOL_VERSION = 1

REGISTRY: dict[str, type[Message]] = {}


def new_id() -> str:
    return uuid.uuid4().hex


def register(name: str):
    def deco(cls):
        if name in REGISTRY:
            raise RuntimeError(f"message type {name!r} registered twice")
        cls.TYPE = name
        REGISTRY[name] = cls
        return cls

    return deco


@dataclass
class Message:
    TYPE: ClassVar[str] = ""


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


@register("training_task")
@dataclass
class TrainingTask(Message):
    """A unit of fine-tuning work for one adapter.

    ``data`` is either ``{"examples": [...]}`` (inline NPC turns or ``{"text": ...}`` records) or
    ``{"path": "...", "shard": i, "num_shards": n}`` (a local data file every worker can read).
    """

    task_id: str
    adapter: str
    data: dict
    steps: int
    hyperparams: dict = field(default_factory=dict)
    base_model: str = ""
    deadline: float | None = None
    lease_s: float = 600.0
    attempt: int = 0
    issued_at: float = field(default_factory=time.time)


@register("task_accepted")
@dataclass
class TaskAccepted(Message):
    """A worker took a task: the issuer starts its lease."""

    task_id: str
    adapter: str
    worker_id: str
    base_version: int
    lease_s: float
    accepted_at: float = field(default_factory=time.time)
    task: dict = field(default_factory=dict)


@register("delta")
@dataclass
class Delta(Message):
    """A LoRA delta: trained weights minus the weights of ``base_version``.

    ``quant`` is ``fp16`` (tensors in float16), ``fp32``, or ``int8`` (int8 tensors plus a float32
    ``scales`` entry per tensor, one scale per block of ``block`` values along the flattened tensor).
    """

    delta_id: str
    task_id: str
    adapter: str
    base_version: int
    worker_id: str
    num_samples: int
    tensors: dict[str, np.ndarray]
    quant: str = "fp16"
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    block: int = 0
    metrics: dict = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)


@register("version_announcement")
@dataclass
class VersionAnnouncement(Message):
    """A new adapter version exists; fetch it with :class:`AdapterFetchRequest`."""

    adapter: str
    version: int
    base_model: str
    content_hash: str
    parent: int | None = None
    metrics: dict = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)


@register("adapter_fetch_request")
@dataclass
class AdapterFetchRequest(Message):
    """Ask for an adapter version's files (``version`` None: the current one)."""

    adapter: str
    version: int | None = None


@register("adapter_fetch_reply")
@dataclass
class AdapterFetchReply(Message):
    """An adapter version in PEFT format: file name -> bytes; ``error`` set when unavailable."""

    adapter: str
    version: int = -1
    content_hash: str = ""
    base_model: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    error: str = ""


@register("adapter_list_request")
@dataclass
class AdapterListRequest(Message):
    """Ask whoever serves adapter fetches (the aggregator) for every adapter's current version, so that
    a process that starts between two announcements knows them at once."""


@register("adapter_list_reply")
@dataclass
class AdapterListReply(Message):
    """Every adapter's current version: one map per adapter with the fields of a
    :class:`VersionAnnouncement` (``adapter``, ``version``, ``base_model``, ``content_hash``, ``parent``)."""

    versions: list[dict] = field(default_factory=list)
    error: str = ""

    def announcements(self) -> list[VersionAnnouncement]:
        """The entries as announcements; an entry without a string adapter, an integer version and a
        string content hash is left out."""
        out = []
        for v in self.versions:
            if not isinstance(v, dict):
                continue
            adapter, version, chash = v.get("adapter"), v.get("version"), v.get("content_hash")
            parent = v.get("parent")
            if not (isinstance(adapter, str) and adapter and isinstance(version, int) and not isinstance(version, bool)
                    and isinstance(chash, str)):
                continue
            out.append(VersionAnnouncement(adapter, version, str(v.get("base_model") or ""), chash,
                                           parent if isinstance(parent, int) and not isinstance(parent, bool) else None))
        return out


# --------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------


@register("generation_request")
@dataclass
class GenerationRequest(Message):
    """One generation.

    ``mode`` is ``npc`` (``npc`` holds an NPC request per schemas/npc_request.schema.json; the
    consumer builds the prompt, constrains output to the response schema, streams the spoken
    text and ends with the validated response), ``chat`` (``messages`` in OpenAI form) or
    ``text`` (a raw ``prompt``). ``deadline`` is a unix time after which the request is not run.
    """

    request_id: str
    base_model: str
    mode: str = "text"
    prompt: str = ""
    messages: list = field(default_factory=list)
    npc: dict = field(default_factory=dict)
    adapter: str | None = None
    adapter_version: int | None = None
    params: dict = field(default_factory=dict)
    json_schema: dict | None = None
    stream: bool = True
    deadline: float | None = None
    created_at: float = field(default_factory=time.time)


@register("token_delta")
@dataclass
class TokenDelta(Message):
    """New text of a stream (for ``npc`` mode: of the spoken line only)."""

    request_id: str
    seq: int
    text: str
    num_tokens: int = 0


@register("final_response")
@dataclass
class FinalResponse(Message):
    """The end of a stream: the full text, and for ``npc`` mode the validated response."""

    request_id: str
    seq: int
    text: str
    finish_reason: str = "stop"
    response: dict | None = None
    valid: bool = True
    adapter: str | None = None
    adapter_version: int | None = None
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    worker_id: str = ""


@register("generation_error")
@dataclass
class GenerationError(Message):
    """The end of a stream that failed. ``retryable``: trying again may help."""

    request_id: str
    seq: int
    code: str
    message: str
    retryable: bool = False


@register("cancel")
@dataclass
class Cancel(Message):
    """Abort a running generation."""

    request_id: str
    reason: str = "cancelled"


@register("reply_batch")
@dataclass
class ReplyBatch(Message):
    """Several replies to one requester in one broker message.

    ``items`` holds ``[correlation_id, frame]`` pairs in order, each ``frame`` an encoded message
    (token deltas, final responses, errors of different requests). A responder sends these only to
    requesters whose request carried the ``x-npcbus-batch-replies`` header (``Bus.request`` and
    ``Bus.request_stream`` set it); the requester's bus unpacks them, so a caller of those methods
    never sees this type.
    """

    items: list = field(default_factory=list)


@register("consumer_heartbeat")
@dataclass
class ConsumerHeartbeat(Message):
    """An inference consumer is alive (sent on the events fanout)."""

    worker_id: str
    base_model: str
    engine: str
    capacity: int
    running: int
    adapters: dict = field(default_factory=dict)
    sent_at: float = field(default_factory=time.time)


# --------------------------------------------------------------------------------------------
# feedback loop
# --------------------------------------------------------------------------------------------


@register("experience")
@dataclass
class Experience(Message):
    """A finished conversation turn, with player feedback when there is some.

    ``score`` (-1 bad .. 1 good) is None for a turn published when it finished, before any
    feedback; a turn's feedback is published as another experience with the score set (same
    ``turn_id`` and ``request_id``, a new ``experience_id``)."""

    experience_id: str
    adapter: str
    npc: dict
    response: dict
    adapter_version: int | None = None
    score: float | None = None
    session_id: str = ""
    player_id: str = ""
    created_at: float = field(default_factory=time.time)
    turn_id: str = ""
    request_id: str = ""
    valid: bool = True   # the response passed the output checks (not a fallback line)
    thumbs: str = ""     # "up" / "down" when the score came from thumbs


# --------------------------------------------------------------------------------------------
# bus internals
# --------------------------------------------------------------------------------------------


@register("chunk")
@dataclass
class Chunk(Message):
    """One numbered piece of a payload larger than the chunk size.

    ``sha256`` is the hash of this piece, ``total_sha256`` of the whole payload, which is itself
    an encoded message.
    """

    stream_id: str
    index: int
    count: int
    total_size: int
    sha256: str
    total_sha256: str
    data: bytes
