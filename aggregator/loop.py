"""``npcbus loop``: the feedback loop. Accepted experience in, training tasks out.

The gateway publishes every finished NPC turn as :class:`npcbus.messages.Experience` (unscored), and
the player's feedback on a turn as another experience with its score (-1 bad .. 1 good). This
service consumes the experience queue and decides, per message:

* **accepted**: it names an adapter (one of ``LOOP_ADAPTERS`` when that is set), has a score of at
  least ``LOOP_MIN_SCORE``, and (``LOOP_REQUIRE_VALID``) a response that passed the output checks.
  Its ``{"request": <the NPC request>, "response": <the response>}`` record joins the adapter's
  pending batch; the delivery is *not acknowledged* yet.
* **not used**: unscored, scored too low, invalid response, no or another adapter: acknowledged
  and counted (``npcbus_loop_experiences_total{outcome=...}``), never retried.
* **malformed**: dead-lettered with its reason (another message type, a record without an NPC
  request or response).

A batch becomes one :class:`npcbus.messages.TrainingTask` when it holds ``LOOP_BATCH_SIZE``
records, or when its oldest record has waited ``LOOP_MAX_WAIT_S`` (with at least
``LOOP_MIN_BATCH`` records). The task is published with a publisher confirm through the task API
(:mod:`npcbus.tasks`), and only then are the batch's experiences acknowledged: a crash before the
confirm loses nothing (the broker redelivers them), and a crash between the confirm and the acks
re-publishes a task with the same id (the id is a hash of the batch's experience ids), whose second
delta the aggregator rejects as a duplicate. The training workers and the aggregator do the rest:
a new adapter version, announced, which the inference consumers swap to; each chat turn's
``turn.final`` names the version that answered it.

``LOOP_MAX_WAIT_S`` stays well below RabbitMQ's consumer timeout (30 minutes by default), since a
pending record's delivery is held unacknowledged until its batch is published.

The loop runs as its own process (``npcbus loop``, the aggregator's broker user) or inside
``npcbus aggregator`` with ``LOOP_IN_AGGREGATOR=true``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import ClassVar

from npcbus.settings import Settings, env_field


def _json_object(s: str) -> bool:
    return s.strip() == "" or isinstance(json.loads(s), dict)


@dataclass
class LoopSettings(Settings):
    """The feedback loop (``npcbus loop``): which experience becomes training tasks."""

    title: ClassVar[str] = "loop"

    adapters: list[str] = env_field("LOOP_ADAPTERS", [], "Adapters whose experience becomes tasks (comma-separated; empty: any adapter).")
    min_score: float = env_field(
        "LOOP_MIN_SCORE", 0.5, "Experience becomes training data when its score is at least this (-1..1; thumbs up is 1). "
        "Unscored experience never does.", check=lambda x: -1 <= x <= 1, check_msg="must be between -1 and 1")
    require_valid: bool = env_field("LOOP_REQUIRE_VALID", True, "Use only responses that passed the output checks (not fallback lines).")
    batch_size: int = env_field("LOOP_BATCH_SIZE", 8, "Accepted experiences per training task.",
                                check=lambda n: 1 <= n <= 10_000, check_msg="must be between 1 and 10000")
    min_batch: int = env_field("LOOP_MIN_BATCH", 1, "A batch that waited LOOP_MAX_WAIT_S becomes a task if it has at least this many records.",
                               check=lambda n: n >= 1, check_msg="must be >= 1")
    max_wait_s: float = env_field(
        "LOOP_MAX_WAIT_S", 300.0, "Longest time an accepted experience waits for its batch to fill; keep well below "
        "RabbitMQ's consumer timeout.", check=lambda x: 0 < x <= 1200, check_msg="must be > 0 and <= 1200")
    steps: int = env_field("LOOP_STEPS", 10, "Optimizer steps of each task.", check=lambda n: n >= 1, check_msg="must be >= 1")
    hyperparams: str = env_field("LOOP_HYPERPARAMS", "", "JSON object of training hyperparameters for the tasks (e.g. {\"lr\": 0.005}).",
                                 check=_json_object, check_msg="must be a JSON object")
    lease_s: float = env_field("LOOP_LEASE_S", 600.0, "Lease of each task: a worker that takes longer gets it re-issued.",
                               check=lambda x: x > 0, check_msg="must be > 0")
    task_deadline_s: float = env_field("LOOP_TASK_DEADLINE_S", 0.0, "Tasks not trained within this many seconds are dropped (0: no deadline).",
                                       check=lambda x: x >= 0, check_msg="must be >= 0")
    in_aggregator: bool = env_field("LOOP_IN_AGGREGATOR", False, "Run the loop inside `npcbus aggregator` instead of as `npcbus loop`.")
    rehearsal: float = env_field(
        "LOOP_REHEARSAL", 0.0, "Written turns added to each task per accepted experience (rehearsal): the adapter's "
        "persona's turns from LOOP_REHEARSAL_DATA, so that training on the model's own well-rated replies does not "
        "narrow it to them. 0: experience only.", check=lambda x: 0 <= x <= 10, check_msg="must be between 0 and 10")
    rehearsal_data: str = env_field(
        "LOOP_REHEARSAL_DATA", "", "JSONL of {request, response} turns to rehearse; empty: the shipped fine-tuning turns "
        "(npcbus/data_files/npc_sft.jsonl). A persona adapter (named by its persona id) rehearses that persona's turns, "
        "any other adapter all of them.")
    tick_s: float = env_field("LOOP_TICK_S", 1.0, "How often waiting batches are checked.", check=lambda x: 0 < x <= 60,
                              check_msg="must be > 0 and <= 60")

    def validate(self) -> None:
        super().validate()
        if self.min_batch > self.batch_size:
            from npcbus.settings import SettingsError

            raise SettingsError(f"LOOP_MIN_BATCH={self.min_batch}: must be <= LOOP_BATCH_SIZE={self.batch_size}")

    def hyperparams_dict(self) -> dict:
        return json.loads(self.hyperparams) if self.hyperparams.strip() else {}

    @property
    def prefetch(self) -> int:
        return 2 * self.batch_size * max(1, len(self.adapters)) + 16


# ------------------------------------------------------------------------------------------------
# the decision (pure)
# ------------------------------------------------------------------------------------------------


def judge(exp, settings: LoopSettings) -> str:
    """``accepted`` or why an experience is not used (``no_adapter``, ``other_adapter``, ``unscored``,
    ``low_score``, ``invalid_response``, ``malformed``)."""
    if not isinstance(exp.npc, dict) or not exp.npc or not isinstance(exp.response, dict) or not exp.response:
        return "malformed"
    if not exp.adapter:
        return "no_adapter"
    if settings.adapters and exp.adapter not in settings.adapters:
        return "other_adapter"
    if exp.score is None:
        return "unscored"
    if exp.score < settings.min_score:
        return "low_score"
    if settings.require_valid and not exp.valid:
        return "invalid_response"
    return "accepted"


def training_record(exp) -> dict:
    """The training example of an accepted experience: the NPC request and the response given."""
    return {"request": exp.npc, "response": exp.response}


def load_rehearsal(path: str = "") -> dict[str, list[dict]]:
    """Turns to rehearse by persona id (``path``, or the shipped fine-tuning turns); raises ``ValueError``
    on a file that holds no ``{request, response}`` record."""
    from pathlib import Path

    from npcbus.model import DATA_DIR, SFT_FILE, persona_of

    src = Path(path) if path else DATA_DIR / SFT_FILE
    pool: dict[str, list[dict]] = {}
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            record = {"request": rec["request"], "response": rec["response"]}
            pool.setdefault(persona_of(record), []).append(record)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{src}:{n}: not a {{request, response}} NPC turn ({type(e).__name__}: {e})") from None
    if not pool:
        raise ValueError(f"{src}: no turns to rehearse")
    return pool


def rehearsal_records(pool: dict[str, list[dict]], adapter: str, count: int, seed: str) -> list[dict]:
    """``count`` turns for ``adapter``'s task: its persona's when the adapter is named by a persona id, else
    any persona's; drawn without repeats (while they last) in an order fixed by ``seed``."""
    import random

    if count <= 0 or not pool:
        return []
    source = pool.get(adapter) or [r for group in pool.values() for r in group]
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < count:
        out += rng.sample(source, min(len(source), count - len(out)))
    return out


def batch_task_id(experience_ids) -> str:
    """A task id fixed by the batch's experience ids (a re-published batch gets the same id)."""
    return hashlib.sha256("\n".join(sorted(experience_ids)).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# the service
# ------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    record: dict
    delivery: object
    since: float  # monotonic


@dataclass
class _Batch:
    items: dict[str, _Pending] = field(default_factory=dict)  # experience id -> pending

    def oldest(self) -> float | None:
        return min((p.since for p in self.items.values()), default=None)


class ExperienceLoop:
    """Consumes experience on ``bus`` and publishes training tasks. ``start()``, then ``stop()``."""

    def __init__(self, bus, settings: LoopSettings):
        from npcbus.logs import get_logger

        self.bus = bus
        self.settings = settings
        self.batches: dict[str, _Batch] = {}
        self.lock = asyncio.Lock()
        self.log = get_logger("aggregator.loop")
        self.tasks_published: list = []
        self._rehearsal: dict[str, list[dict]] | None = None
        self._tick: asyncio.Task | None = None
        self._consumer = None
        _metrics()

    async def start(self) -> None:
        topo = self.bus.topology
        if self.settings.rehearsal > 0:
            self._rehearsal = await asyncio.to_thread(load_rehearsal, self.settings.rehearsal_data)
        await self.bus.declare_topology(queues=[topo.experience_queue, topo.tasks_queue])
        self._consumer = await self.bus.consume(topo.experience_queue, self._on_experience, prefetch=self.settings.prefetch)
        self._tick = asyncio.create_task(self._tick_loop(), name="loop-tick")
        s = self.settings
        self.log.info("feedback loop ready", adapters=s.adapters or "any", min_score=s.min_score, batch_size=s.batch_size,
                      max_wait_s=s.max_wait_s, steps=s.steps)

    async def stop(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._tick
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.cancel()
        # pending deliveries stay unacknowledged: the broker hands them to the next loop

    async def _on_experience(self, msg, d):
        from npcbus.bus import Ack, Defer, Reject
        from npcbus.messages import Experience

        if not isinstance(msg, Experience):
            M.experiences.labels("wrong_type").inc()
            return Reject(f"expected experience, got {msg.TYPE}", "wrong_type")
        verdict = judge(msg, self.settings)
        log = self.log.bind(experience_id=msg.experience_id, adapter=msg.adapter, version=msg.adapter_version,
                            turn_id=msg.turn_id, message_id=d.message_id)
        M.experiences.labels(verdict).inc()
        if verdict == "malformed":
            log.warning("experience without an NPC request or response; dead-lettered")
            return Reject("experience without an NPC request or response", "malformed")
        if verdict != "accepted":
            log.debug("experience not used", outcome=verdict, score=msg.score)
            return Ack()
        async with self.lock:
            batch = self.batches.setdefault(msg.adapter, _Batch())
            held = batch.items.get(msg.experience_id)
            if held is not None:
                # redelivered while pending (the channel dropped): settle the new copy later
                held.delivery = d
                return Defer()
            batch.items[msg.experience_id] = _Pending(training_record(msg), d, time.monotonic())
            M.pending.labels(msg.adapter).set(len(batch.items))
            log.info("experience accepted", score=msg.score, pending=len(batch.items),
                     batch_size=self.settings.batch_size)
            if len(batch.items) >= self.settings.batch_size:
                await self._flush(msg.adapter, "full")
        return Defer()

    async def _flush(self, adapter: str, why: str) -> bool:
        """Publish the adapter's batch as a task (confirmed), then ack its experiences. Caller holds the lock."""
        from npcbus.bus import Ack
        from npcbus.tasks import build_tasks, publish_task_messages

        batch = self.batches.get(adapter)
        if batch is None or not batch.items:
            return False
        s = self.settings
        items = list(batch.items.items())[: s.batch_size]
        ids = [eid for eid, _ in items]
        task_id = batch_task_id(ids)
        rehearse = rehearsal_records(self._rehearsal or {}, adapter, round(s.rehearsal * len(items)), task_id)
        task = build_tasks(adapter, examples=[p.record for _, p in items] + rehearse, num_tasks=1, steps=s.steps,
                           hyperparams=s.hyperparams_dict(), lease_s=s.lease_s,
                           deadline_s=s.task_deadline_s or None, task_ids=[task_id])[0]
        log = self.log.bind(adapter=adapter, task_id=task.task_id)
        try:
            await publish_task_messages(self.bus, [task])
        except Exception as e:  # noqa: BLE001 - the experiences stay pending; tried again on the next tick
            log.warning("could not publish the task; will retry", error=f"{type(e).__name__}: {e}")
            return False
        for eid, p in items:
            batch.items.pop(eid, None)
            await self.bus.settle(p.delivery, Ack())
        M.pending.labels(adapter).set(len(batch.items))
        M.tasks.labels(adapter, why).inc()
        self.tasks_published.append(task)
        log.info("training task published from experience", examples=len(items), rehearsal=len(rehearse), why=why,
                 steps=task.steps)
        return True

    async def _tick_loop(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.tick_s)
            try:
                async with self.lock:
                    now = time.monotonic()
                    for adapter, batch in list(self.batches.items()):
                        oldest = batch.oldest()
                        if oldest is None:
                            continue
                        if len(batch.items) >= s.batch_size:
                            await self._flush(adapter, "full")
                        elif now - oldest >= s.max_wait_s and len(batch.items) >= s.min_batch:
                            await self._flush(adapter, "waited")
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the tick must keep running
                self.log.exception("loop tick failed")


class _Metrics:
    def __init__(self) -> None:
        from npcbus import metrics

        self.experiences = metrics.counter("loop_experiences_total", "Experience messages by outcome (accepted, unscored, "
                                           "low_score, invalid_response, no_adapter, other_adapter, malformed).", ("outcome",))
        self.tasks = metrics.counter("loop_tasks_published_total", "Training tasks built from experience, by adapter and "
                                     "why the batch closed (full, waited).", ("adapter", "why"))
        self.pending = metrics.gauge("loop_pending_experiences", "Accepted experiences waiting for their batch.", ("adapter",))


M: _Metrics = None  # type: ignore[assignment]


def _metrics() -> _Metrics:
    global M
    if M is None:
        M = _Metrics()
    return M


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from npcbus.service import add_print_settings

    add_print_settings(parser)


def run(args) -> int:
    from npcbus.service import prepare
    from npcbus.settings import BusSettings

    settings = LoopSettings.from_env()
    bus_settings = BusSettings.from_env()
    if not prepare(args, bus_settings, loop=settings):
        return 0

    async def main() -> None:
        from npcbus.bus import Bus, run_forever
        from npcbus.health import mark_ready
        from npcbus.metrics import start_metrics_server

        start_metrics_server(bus_settings.metrics_port)
        bus = Bus(bus_settings, name="loop")
        await bus.connect()
        loop = ExperienceLoop(bus, settings)
        await loop.start()
        mark_ready("loop")
        await run_forever(loop.stop, bus.close)

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggregator.loop", description="The feedback loop: experience in, training tasks out.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())


__all__ = ["LoopSettings", "ExperienceLoop", "judge", "training_record", "batch_task_id", "add_arguments", "run"]
