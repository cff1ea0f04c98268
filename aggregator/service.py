"""``npcbus aggregator``: rounds over LoRA deltas, new adapter versions, task leases, adapter fetches.

What it does, per adapter in ``ADAPTERS``:

* **Version 0.** At first start (no version under ``CHECKPOINT_DIR/<adapter>``) it creates a
  fresh PEFT LoRA adapter over the base model with ``LORA_RANK``/``LORA_ALPHA``/``LORA_TARGETS``
  and a seed derived from ``ADAPTER_SEED`` and the adapter name (deterministic).
* **Validation.** Every delta on the deltas queue is checked (:func:`npcbus.lora.validate_delta`):
  unknown adapter, a sender the broker did not authenticate or that ``ALLOWED_SENDERS`` does not
  list (``Delivery.user_id``, which RabbitMQ validates against the publishing connection's login;
  with ``ALLOWED_SENDERS`` empty any authenticated user may send), duplicate delta id (already
  applied in a manifest or in the open round), a second delta for a task that already has one,
  unknown or too stale base version (``MAX_STALENESS``), quantization format, tensor names, shapes
  and dtypes, sample count, non-finite metrics or values, L2 norm above ``DELTA_NORM_MAX``
  (reason codes as in :mod:`npcbus.lora`, plus ``wrong_type`` for another message type and
  ``invalid`` for a delta the checks cannot even read). A bad delta is dead-lettered with its
  reason code and text in headers, logged and counted in
  ``npcbus_aggregator_deltas_rejected_total{reason=...}``.
* **Rounds.** An accepted delta joins the adapter's open round and is *not acknowledged* (the
  handler returns ``Defer``). The round closes at quorum (``NUM_TASKS_PER_ROUND`` deltas), or once
  ``ROUND_TIMEOUT_SEC`` passed since its first delta with at least ``MIN_UPDATES_PER_ROUND``
  deltas (checked every ``TICK_INTERVAL_SEC``); with fewer, it expires and its deltas are
  dead-lettered (``round_expired``) and their tasks re-issued. See :class:`npcbus.lora.RoundPolicy`.
* **Aggregation** (``AGGREGATION``): ``mean`` (default) is the mean weighted by sample count in
  which each delta is also damped by its staleness factor ``f = 1 / (1 + staleness) **
  STALENESS_ALPHA``: update = ``sum(n_i * f_i * delta_i) / sum(n_i)``, accumulated in float32 as
  each delta arrives (:class:`npcbus.lora.WeightedMeanAccumulator` with weights ``n_i * f_i``,
  then scaled by ``sum(n_i * f_i) / sum(n_i)``). The damping is absolute, not only relative to the
  round's fresher deltas: a round made only of stale deltas (workers that took their next task
  before the version they contributed to was announced) moves the adapter less, instead of
  applying an old direction again at full strength. With every delta fresh it is the plain
  weighted mean. ``median`` and ``trimmed_mean`` (``TRIM_RATIO``) are coordinate-wise, unweighted
  and undamped, and need every delta of the round at once.
* **Server optimizer** (``SERVER_OPTIMIZER``, :class:`npcbus.lora.ServerOptimizer`): how the
  round's aggregate becomes the update. ``none`` (default) applies ``SERVER_LR`` times it (by
  default 1: the aggregate as is); ``momentum`` keeps a heavy-ball velocity across rounds
  (``m = SERVER_MOMENTUM * m + aggregate``, update ``SERVER_LR * m``; ``SERVER_NESTEROV``: update
  ``SERVER_LR * (SERVER_MOMENTUM * m + aggregate)``); ``adam`` keeps per-element first and second
  moments (``SERVER_MOMENTUM``, ``SERVER_BETA2``, ``SERVER_EPS``) and moves each element by about
  ``SERVER_LR`` per round (by default 0.01). The state after each round is written inside the
  folder of the version the round produced (see :mod:`aggregator.state`), so a restart resumes it
  and a crash never steps it twice; a restart with another ``SERVER_OPTIMIZER`` starts that
  optimizer's state fresh (logged). ``none`` is the default because neither momentum nor adam
  beat it beyond seed noise on ``bench.parity`` (see there): from a fresh adapter, three
  workers' averaged deltas progress like one worker's sequential steps, and extrapolating along
  earlier rounds' directions does not replace the sequential steps the workers did not take. In
  a run of the end-to-end training test (quorum 2, three workers, so some deltas are a version
  stale) momentum 0.3 even raised the held-out loss after the first round (9.73, 7.72, 8.47, 8.81
  against 9.73, 7.72, 7.52, 7.22 with ``none``): the first round's large step is pushed again.
* **Commit order.** New weights = current + the server optimizer's update. Then: write ``v<N+1>``
  atomically with its manifest and the optimizer's state (:mod:`aggregator.state`), then announce
  it on the versions fanout, then acknowledge the round's deltas. A crash anywhere leaves either
  no new version (the unacknowledged deltas are redelivered and aggregated again) or a persisted
  version whose manifest lists the deltas (the redelivered copies are rejected as ``duplicate``,
  never applied twice). On start, and every ``REANNOUNCE_INTERVAL_SEC`` after, the current version of
  every adapter is announced again (a consumer that started later learns of it). If the
  connection drops while a round is open, the broker redelivers its deltas: a copy arriving while
  the round is still open replaces the dead delivery handle (it is acknowledged when the round
  closes); one arriving after the version was written is a ``duplicate``.
* **Leases.** A worker that accepts a task publishes ``TaskAccepted``; the aggregator records a
  lease (persisted in ``CHECKPOINT_DIR/leases.json``, then acknowledged). A lease whose time runs
  out with no delta for its task is re-issued as a new attempt of the same task (same task id, so
  only one delta per task is ever applied), up to ``MAX_TASK_ATTEMPTS``; a task past its deadline
  is dropped.
* **Adapter fetches.** It answers :class:`npcbus.messages.AdapterFetchRequest` from its
  checkpoint folder, so workers and inference consumers need no shared disk.

Memory: with ``mean``, a delta is folded into the running float32 sum when it arrives and its
received bytes are then released (the broker delivery object is kept only to acknowledge it), so
a round holds one float32 copy of the adapter however many deltas it has. The price: an expired
round's deltas are rejected with a plain ``nack`` (the broker dead-letters its own stored copy,
with ``x-death`` instead of the npcbus reason headers; the reason is logged and counted). The
robust methods keep every decoded delta of the round in memory (their wire bytes: fp16 halves it).

Broker limits: deltas stay unacknowledged until their round closes, so ``ROUND_TIMEOUT_SEC`` is
bounded well below RabbitMQ's consumer timeout (30 minutes by default; at most 1200 s here), and
the deltas consumer's prefetch (``DELTAS_PREFETCH``, default: enough pieces for a full round of
every adapter) must exceed the pieces of a round's chunked deltas, or the round could never fill.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from npcbus.settings import Settings, env_field

AGGREGATIONS = ("mean", "weighted_mean", "median", "trimmed_mean")
SERVER_OPTIMIZERS = ("none", "momentum", "adam")  # as npcbus.lora.SERVER_OPTIMIZERS (kept light here)


@dataclass
class AggregatorSettings(Settings):
    """The aggregator service."""

    title: ClassVar[str] = "aggregator"

    adapters: list[str] = env_field(
        "ADAPTERS", ["npc"], "Comma-separated adapters this aggregator manages (version 0 of each is created at first start).",
        check=lambda xs: bool(xs) and all(x and "/" not in x and not x.startswith(".") for x in xs),
        check_msg="give at least one adapter name without '/' or a leading '.'")
    persona_adapters: bool = env_field(
        "PERSONA_ADAPTERS", True, "Also manage one adapter per persona that the offline default model was built "
        "with (named by the persona id, as GET /v1/personas lists them): version 0 is the adapter `npcbus model init` "
        "trained on that persona's turns, so persona sessions use it from the first start. Ignored with BASE_MODEL.")
    checkpoint_dir: str = env_field(
        "CHECKPOINT_DIR", ".npcbus/checkpoints", "Where adapter versions (PEFT folders + manifest.json) and leases are kept.")
    num_tasks_per_round: int = env_field(
        "NUM_TASKS_PER_ROUND", 4, "Quorum: a round closes as soon as it has this many accepted deltas.",
        check=lambda n: n >= 1, check_msg="must be >= 1")
    min_updates_per_round: int = env_field(
        "MIN_UPDATES_PER_ROUND", 1, "At the round timeout, close with at least this many deltas (else the round expires).",
        check=lambda n: n >= 1, check_msg="must be >= 1")
    round_timeout_s: float = env_field(
        "ROUND_TIMEOUT_SEC", 300.0, "Seconds after a round's first delta when it closes (or expires) without quorum; "
        "keep well below RabbitMQ's consumer timeout.",
        check=lambda x: 0 < x <= 1200, check_msg="must be > 0 and <= 1200 (deltas stay unacked for a round)")
    tick_interval_s: float = env_field(
        "TICK_INTERVAL_SEC", 1.0, "How often round timeouts and task leases are checked, in seconds.",
        check=lambda x: 0 < x <= 60, check_msg="must be > 0 and <= 60")
    reannounce_interval_s: float = env_field(
        "REANNOUNCE_INTERVAL_SEC", 15.0, "Seconds between announcements of every adapter's current version again, so "
        "that inference consumers and workers that started (or reconnected) after an announcement learn of it; 0: "
        "announce each version only when it is made and when the aggregator starts.",
        check=lambda x: x >= 0, check_msg="must be >= 0")
    max_staleness: int = env_field(
        "MAX_STALENESS", 2, "A delta based on a version more than this many versions old is rejected as stale.",
        check=lambda n: n >= 0, check_msg="must be >= 0")
    staleness_alpha: float = env_field(
        "STALENESS_ALPHA", 0.5, "A delta `s` versions stale counts 1 / (1 + s) ** STALENESS_ALPHA of its sample-weighted share.",
        check=lambda x: x >= 0, check_msg="must be >= 0")
    delta_norm_max: float = env_field(
        "DELTA_NORM_MAX", 100.0, "Deltas with a larger L2 norm are rejected (0: no bound).",
        check=lambda x: x >= 0, check_msg="must be >= 0")
    aggregation: str = env_field(
        "AGGREGATION", "mean", "How a round's deltas combine: mean (weighted by samples and staleness), median or trimmed_mean.",
        check=lambda s: s in AGGREGATIONS, check_msg="must be mean, median or trimmed_mean")
    trim_ratio: float = env_field(
        "TRIM_RATIO", 0.1, "Fraction trimmed at each end by AGGREGATION=trimmed_mean.",
        check=lambda x: 0 <= x < 0.5, check_msg="must be in [0, 0.5)")
    server_optimizer: str = env_field(
        "SERVER_OPTIMIZER", "none",
        "How a round's aggregate becomes the update: none (SERVER_LR times it), momentum (heavy-ball velocity across "
        "rounds) or adam (per-element adaptive steps across rounds); their state is kept with each version.",
        check=lambda s: s in SERVER_OPTIMIZERS, check_msg="must be none, momentum or adam")
    server_lr: float = env_field(
        "SERVER_LR", 0.0, "Server learning rate: multiplies the update of none and momentum; for adam, the size of "
        "each element's step per round in weight units. 0: 1.0 for none and momentum, 0.01 for adam.",
        check=lambda x: math.isfinite(x) and x >= 0, check_msg="must be >= 0")
    server_momentum: float = env_field(
        "SERVER_MOMENTUM", 0.3, "Momentum of SERVER_OPTIMIZER=momentum (velocity = SERVER_MOMENTUM * velocity + "
        "aggregate; 0.3 did best of 0.3-0.9 in bench.parity, 0.9 worst); adam's first-moment decay.",
        check=lambda x: 0 <= x < 1, check_msg="must be in [0, 1)")
    server_nesterov: bool = env_field(
        "SERVER_NESTEROV", False, "SERVER_OPTIMIZER=momentum with a Nesterov look-ahead (update = SERVER_LR * "
        "(SERVER_MOMENTUM * velocity + aggregate)).")
    server_beta2: float = env_field(
        "SERVER_BETA2", 0.99, "Second-moment decay of SERVER_OPTIMIZER=adam.",
        check=lambda x: 0 <= x < 1, check_msg="must be in [0, 1)")
    server_eps: float = env_field(
        "SERVER_EPS", 1e-6, "SERVER_OPTIMIZER=adam's epsilon (an element whose aggregates stay well below it moves "
        "less than SERVER_LR).",
        check=lambda x: math.isfinite(x) and x > 0, check_msg="must be > 0")
    allowed_senders: list[str] = env_field(
        "ALLOWED_SENDERS", [], "Broker user ids allowed to send deltas; empty: any user the broker authenticated.")
    max_task_attempts: int = env_field(
        "MAX_TASK_ATTEMPTS", 3, "A task whose lease expired is re-issued until it has been tried this many times.",
        check=lambda n: n >= 1, check_msg="must be >= 1")
    deltas_prefetch: int = env_field(
        "DELTAS_PREFETCH", 0, "Prefetch of the deltas consumer, in message pieces (0: 8 per delta of a full round, per adapter, plus 16).",
        check=lambda n: n >= 0, check_msg="must be >= 0")
    lora_rank: int = env_field("LORA_RANK", 8, "LoRA rank of a new adapter's version 0.",
                               check=lambda n: n >= 1, check_msg="must be >= 1")
    lora_alpha: float = env_field("LORA_ALPHA", 16.0, "LoRA alpha of a new adapter's version 0.",
                                  check=lambda x: x > 0, check_msg="must be > 0")
    lora_targets: list[str] = env_field("LORA_TARGETS", ["q_proj", "v_proj"],
                                        "Module names a new adapter's LoRA layers wrap.",
                                        check=bool, check_msg="give at least one module name")
    adapter_seed: int = env_field("ADAPTER_SEED", 0, "Seed of a new adapter's initial weights (mixed with its name).")
    heldout_data: str = env_field(
        "HELDOUT_DATA", "", "JSON-lines records to score each new version on (held-out loss in its manifest; "
        "loads the base model in the aggregator); empty: no scoring.")
    heldout_max_records: int = env_field("HELDOUT_MAX_RECORDS", 64, "At most this many HELDOUT_DATA records are scored.",
                                         check=lambda n: n >= 1, check_msg="must be >= 1")
    heldout_max_length: int = env_field("HELDOUT_MAX_LENGTH", 512, "Token limit per scored record.",
                                        check=lambda n: n >= 8, check_msg="must be >= 8")

    def validate(self) -> None:
        super().validate()
        if self.min_updates_per_round > self.num_tasks_per_round:
            from npcbus.settings import SettingsError

            raise SettingsError(
                f"MIN_UPDATES_PER_ROUND={self.min_updates_per_round}: must be <= NUM_TASKS_PER_ROUND="
                f"{self.num_tasks_per_round}")

    @property
    def method(self) -> str:
        return "weighted_mean" if self.aggregation in ("mean", "weighted_mean") else self.aggregation

    @property
    def prefetch(self) -> int:
        return self.deltas_prefetch or (8 * self.num_tasks_per_round * len(self.adapters) + 16)

    @property
    def effective_server_lr(self) -> float:
        """``SERVER_LR``, or the kind's default when it is 0 (adam's lr is in weight units, not a factor)."""
        if self.server_lr > 0:
            return self.server_lr
        return 0.01 if self.server_optimizer == "adam" else 1.0

    def make_server_optimizer(self):
        """A fresh :class:`npcbus.lora.ServerOptimizer` with these settings."""
        from npcbus.lora import ServerOptimizer

        return ServerOptimizer(self.server_optimizer, lr=self.effective_server_lr, momentum=self.server_momentum,
                               beta2=self.server_beta2, eps=self.server_eps, nesterov=self.server_nesterov)


def round_update(current, optimizer, *, method: str = "weighted_mean", acc=None, held=(), num_samples: int = 0,
                 trim_ratio: float = 0.1):
    """The new weights at the end of a round, as the aggregator computes them (pure numpy).

    ``weighted_mean``: the aggregate is ``acc`` (a :class:`npcbus.lora.WeightedMeanAccumulator`
    with weights ``n_i * f_i``) scaled by ``sum(n_i * f_i) / num_samples`` (the staleness damping);
    ``median`` / ``trimmed_mean``: :func:`npcbus.lora.aggregate` over the ``held`` deltas. The
    aggregate goes through ``optimizer`` (a :class:`npcbus.lora.ServerOptimizer`, stepped: pass a
    copy to keep the original) and its update is added to ``current``.
    Returns ``(new tensors, {"aggregate_norm": ..., "update_norm": ...})``.
    """
    import numpy as np

    from npcbus import lora

    if method == "weighted_mean":
        agg = acc.result()
        scale = acc.total_weight / max(1, num_samples)
        if scale != 1.0:
            for v in agg.values():
                v *= np.float32(scale)
    else:
        agg = lora.aggregate(list(held), method=method, trim_ratio=trim_ratio)
    update = optimizer.step(agg)
    new = lora.apply_delta(current, update)
    return new, {"aggregate_norm": lora.delta_norm(agg), "update_norm": lora.delta_norm(update)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from npcbus.service import add_print_settings

    parser.add_argument("--adapters", default=None, help="Override ADAPTERS (comma-separated).")
    parser.add_argument("--checkpoint-dir", default=None, help="Override CHECKPOINT_DIR.")
    add_print_settings(parser)


def run(args: argparse.Namespace) -> int:
    from npcbus.service import prepare
    from npcbus.settings import BusSettings, ModelSettings

    overrides = {}
    if args.adapters:
        overrides["adapters"] = [a.strip() for a in args.adapters.split(",") if a.strip()]
    if args.checkpoint_dir:
        overrides["checkpoint_dir"] = args.checkpoint_dir
    settings = AggregatorSettings.from_env(**overrides)
    bus_settings = BusSettings.from_env()
    model_settings = ModelSettings.from_env()
    if not prepare(args, bus_settings, aggregator=settings):
        return 0

    async def main() -> None:
        from npcbus.bus import run_forever
        from npcbus.metrics import start_metrics_server

        start_metrics_server(bus_settings.metrics_port)
        agg = Aggregator(settings, bus_settings, model_settings)
        await agg.start()
        closers = [agg.stop]
        from aggregator.loop import ExperienceLoop, LoopSettings

        loop_settings = LoopSettings.from_env()
        if loop_settings.in_aggregator:  # the feedback loop on the aggregator's connection
            loop = ExperienceLoop(agg.bus, loop_settings)
            await loop.start()
            closers.insert(0, loop.stop)
        from npcbus.health import mark_ready

        mark_ready("aggregator")
        await run_forever(*closers)

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------------------------------------
# the service
# ------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """A delta in an open round."""

    delta_id: str
    task_id: str
    worker_id: str
    sender: str
    base_version: int
    staleness: int
    num_samples: int
    weight: float
    metrics: dict
    delivery: object  # npcbus.bus.Delivery
    released: bool = False  # its received bytes were dropped (see the module docstring)

    def record(self) -> dict:
        return {"delta_id": self.delta_id, "task_id": self.task_id, "worker_id": self.worker_id,
                "sender": self.sender, "base_version": self.base_version, "staleness": self.staleness,
                "num_samples": self.num_samples, "weight": self.weight, "metrics": self.metrics}


@dataclass
class _Round:
    number: int  # the version this round will produce
    opened_at: float | None = None
    entries: dict[str, _Entry] = field(default_factory=dict)
    acc: object = None  # WeightedMeanAccumulator (mean)
    held: list = field(default_factory=list)  # decoded deltas (median / trimmed mean)

    @property
    def task_ids(self) -> set[str]:
        return {e.task_id for e in self.entries.values() if e.task_id}


@dataclass
class _Adapter:
    state: object  # aggregator.state.AdapterState
    round: _Round
    optimizer: object  # npcbus.lora.ServerOptimizer, in the state of `state`'s version
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    announce_pending: bool = True
    announced_version: int | None = None  # the version last announced, and when (monotonic)
    announced_at: float = 0.0


class Aggregator:
    """The aggregator on one bus connection. ``start()``, then ``stop()``."""

    def __init__(self, settings: AggregatorSettings, bus_settings=None, model_settings=None, *,
                 bus=None, initial_files=None):
        from aggregator.state import CheckpointStore, LeaseBook
        from npcbus import lora
        from npcbus.logs import get_logger
        from npcbus.settings import BusSettings, ModelSettings

        self.settings = settings
        self.bus_settings = bus_settings or BusSettings.from_env()
        self.model_settings = model_settings or ModelSettings.from_env()
        self.bus = bus
        self._own_bus = bus is None
        self.store = CheckpointStore(settings.checkpoint_dir)
        self.leases = LeaseBook(self.store.root / "leases.json")
        self.policy = lora.RoundPolicy(settings.num_tasks_per_round, settings.min_updates_per_round,
                                       settings.round_timeout_s)
        self.adapters: dict[str, _Adapter] = {}
        self.log = get_logger("aggregator")
        # tests may supply version-0 files instead of building them from the base model
        self._initial_files = initial_files
        self._personas: dict[str, Path] = {}  # persona adapter name -> its trained folder in the default model
        self._eval = None  # (base model, tokenizer, records) for HELDOUT_DATA
        self._tick_task: asyncio.Task | None = None
        self._reannounce_task: asyncio.Task | None = None
        self._leases_lock = asyncio.Lock()
        self._started_at = 0.0
        self._stopping = False
        _metrics()

    @property
    def base_model_id(self) -> str:
        return self.model_settings.model_id

    # start / stop -------------------------------------------------------------------------------
    async def start(self) -> None:
        from npcbus.adapter_store import serve_adapter_fetches
        from npcbus.bus import Bus

        s = self.settings
        self._personas = await asyncio.to_thread(self._persona_adapter_dirs)
        names = list(dict.fromkeys([*s.adapters, *self._personas]))
        self.log.info("aggregator starting", adapters=names, checkpoint_dir=str(self.store.root),
                      quorum=s.num_tasks_per_round, min_updates=s.min_updates_per_round,
                      round_timeout_s=s.round_timeout_s, aggregation=s.method, max_staleness=s.max_staleness,
                      server_optimizer=s.make_server_optimizer().config())
        for name in names:
            state = await asyncio.to_thread(self.store.load, name)
            if state is None:
                state = await self._create_version0(name)
            self.adapters[name] = _Adapter(state=state, round=_Round(state.version + 1),
                                           optimizer=self._resume_optimizer(state))
            M.version.labels(name).set(state.version)
            self.log.info("adapter loaded", adapter=name, version=state.version, hash=state.content_hash[:12],
                          applied_deltas=len(state.applied_delta_ids))
        # leases of tasks already applied are done; delivered ones wait for their redelivered deltas
        now = time.time()
        for lease in list(self.leases.leases.values()):
            ad = self.adapters.get(lease.adapter)
            if ad is not None and lease.task_id in ad.state.applied_task_ids:
                self.leases.drop([lease.task_id])
            elif lease.state != "leased":
                lease.state = "leased"
                lease.expires_at = max(lease.expires_at, now + 2 * s.tick_interval_s + 5)
        await asyncio.to_thread(self.leases.save)
        M.leases.set(len(self.leases))

        if self.bus is None:
            self.bus = Bus(self.bus_settings, name="aggregator", chunk_timeout_s=max(120.0, s.round_timeout_s))
        await self.bus.connect()
        await self.bus.declare_topology()
        for name in self.adapters:
            await self._announce(name)
        topo = self.bus.topology
        await serve_adapter_fetches(self.bus, self._resolve_fetch, lister=self._list_adapters, prefetch=8)
        await self.bus.consume(topo.leases_queue, self._on_accepted, prefetch=32)
        await self.bus.consume(topo.deltas_queue, self._on_delta, prefetch=s.prefetch)
        self._started_at = time.time()
        self._tick_task = asyncio.create_task(self._tick_loop())
        if s.reannounce_interval_s > 0:
            self._reannounce_task = asyncio.create_task(self._reannounce_loop(), name="reannounce")
        self.log.info("aggregator ready", namespace=self.bus_settings.namespace, deltas_prefetch=s.prefetch)

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._tick_task, self._reannounce_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.bus is not None and self._own_bus:
            await self.bus.close()
        self.log.info("aggregator stopped")

    def _resume_optimizer(self, state):
        """The server optimizer in the state kept with ``state``'s version (fresh when there is none,
        or when it belongs to another SERVER_OPTIMIZER or does not fit)."""
        opt = self.settings.make_server_optimizer()
        log = self.log.bind(adapter=state.adapter, version=state.version)
        if not state.server_state:
            return opt
        if state.server_kind != opt.kind:
            log.warning("server optimizer changed; its state starts fresh", was=state.server_kind, now=opt.kind)
            return opt
        try:
            opt.load_state_dict(state.server_state)
        except ValueError as e:
            log.warning("server optimizer state does not fit; starting fresh", error=str(e))
            return opt
        log.info("server optimizer resumed", kind=opt.kind, step=opt.steps)
        return opt

    # version 0 ----------------------------------------------------------------------------------
    def _persona_adapter_dirs(self) -> dict[str, Path]:
        """The persona adapters the offline default model was built with (PERSONA_ADAPTERS; none when
        version-0 files are supplied, as tests do for the adapters they name)."""
        if not self.settings.persona_adapters or self.model_settings.base_model or self._initial_files is not None:
            return {}
        from npcbus.model import PERSONAS_DIR, resolve_base_model

        root = Path(resolve_base_model(self.model_settings)) / PERSONAS_DIR
        if not root.is_dir():
            return {}
        return {d.name: d for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()}

    async def _create_version0(self, adapter: str):
        if self._initial_files is not None:
            files = self._initial_files(adapter) if callable(self._initial_files) else self._initial_files
            extra = {"init": "supplied"}
        elif adapter in self._personas:
            from npcbus.adapter_store import read_adapter_files

            files = await asyncio.to_thread(read_adapter_files, self._personas[adapter])
            extra = {"init": {"persona": adapter, "path": str(self._personas[adapter])}}
        else:
            files, extra = await asyncio.to_thread(self._fresh_adapter_files, adapter)
        metrics = {}
        if self.settings.heldout_data:
            from aggregator.state import safetensors_to_tensors

            tensors = safetensors_to_tensors(files["adapter_model.safetensors"])
            loss = await asyncio.to_thread(self._heldout_loss, files["adapter_config.json"], tensors, adapter)
            if loss is not None:
                metrics["heldout_loss"] = loss
        state = await asyncio.to_thread(self.store.create_initial, adapter, files, base_model=self.base_model_id,
                                        metrics=metrics, extra=extra)
        self.log.info("version 0 created", adapter=adapter, hash=state.content_hash[:12], **extra)
        return state

    def adapter_seed(self, adapter: str) -> int:
        import zlib

        return (self.settings.adapter_seed * 1_000_003 + zlib.crc32(adapter.encode())) % (2 ** 31)

    def _fresh_adapter_files(self, adapter: str) -> tuple[dict[str, bytes], dict]:
        """PEFT files of a fresh LoRA adapter over the base model (deterministic seed)."""
        from npcbus.model import resolve_base_model
        from npcbus.training import new_adapter_files

        s = self.settings
        base = resolve_base_model(self.model_settings)
        seed = self.adapter_seed(adapter)
        files = new_adapter_files(base, rank=s.lora_rank, alpha=s.lora_alpha, targets=list(s.lora_targets), seed=seed)
        return files, {"init": {"rank": s.lora_rank, "alpha": s.lora_alpha, "targets": list(s.lora_targets),
                                "seed": seed, "base_model_path": base}}

    def _heldout_loss(self, config: bytes, tensors, adapter: str) -> float | None:
        """Held-out loss of weights ``tensors`` on ``HELDOUT_DATA`` (None when scoring fails)."""
        import shutil
        import tempfile

        try:
            from peft import PeftModel

            from aggregator.state import tensors_to_safetensors
            from npcbus.model import load_model_and_tokenizer, resolve_base_model
            from npcbus.tasks import task_examples
            from npcbus.training import heldout_loss

            if self._eval is None:
                model, tok = load_model_and_tokenizer(resolve_base_model(self.model_settings))
                records = task_examples({"path": self.settings.heldout_data})[: self.settings.heldout_max_records]
                self._eval = (model, tok, records)
            model, tok, records = self._eval
            d = tempfile.mkdtemp(prefix=".heldout-", dir=self.store.root)
            try:
                with open(f"{d}/adapter_config.json", "wb") as fh:
                    fh.write(config)
                with open(f"{d}/adapter_model.safetensors", "wb") as fh:
                    fh.write(tensors_to_safetensors(tensors))
                pm = PeftModel.from_pretrained(model, d)
                try:
                    return float(heldout_loss(pm, tok, records, max_length=self.settings.heldout_max_length))
                finally:
                    self._eval = (pm.unload(), tok, records)
            finally:
                shutil.rmtree(d, ignore_errors=True)
        except Exception as e:  # noqa: BLE001 - scoring is informative only; never block a round
            self.log.warning("held-out scoring failed", adapter=adapter, error=f"{type(e).__name__}: {e}")
            return None

    # announcements and fetches ------------------------------------------------------------------
    async def _announce(self, adapter: str) -> bool:
        from npcbus.messages import VersionAnnouncement

        ad = self.adapters[adapter]
        st = ad.state
        msg = VersionAnnouncement(adapter=adapter, version=st.version, base_model=self.base_model_id,
                                  content_hash=st.content_hash, parent=st.manifest.get("parent"),
                                  metrics=dict(st.manifest.get("metrics", {})))
        try:
            await self.bus.publish(self.bus.topology.versions_exchange, "", msg, persistent=False, mandatory=False)
        except Exception as e:  # noqa: BLE001 - retried on the next tick
            self.log.warning("announcement failed; will retry", adapter=adapter, version=st.version, error=str(e))
            ad.announce_pending = True
            return False
        ad.announce_pending = False
        again = ad.announced_version == st.version
        ad.announced_version, ad.announced_at = st.version, time.monotonic()
        (self.log.debug if again else self.log.info)("version announced", adapter=adapter, version=st.version,
                                                     hash=st.content_hash[:12], again=again)
        return True

    async def _reannounce_loop(self) -> None:
        """Announce every adapter's current version again every ``REANNOUNCE_INTERVAL_SEC``, apart
        from the tick loop so that a publish held up by a connection drop never delays the lease
        checks; each publish is bounded in time (it holds its adapter's lock, so that it never
        follows a newer version's announcement)."""
        every = self.settings.reannounce_interval_s
        while not self._stopping:
            await asyncio.sleep(every)
            for name, ad in list(self.adapters.items()):
                if time.monotonic() - ad.announced_at < every:
                    continue
                try:
                    async with ad.lock:  # never after a newer version's announcement
                        await asyncio.wait_for(self._announce(name), timeout=max(1.0, every / 2))
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the next pass tries again
                    self.log.debug("repeat announcement not sent", adapter=name, error=f"{type(e).__name__}: {e}")

    async def _list_adapters(self):
        """Every adapter's current version (an adapter list request: processes that start between
        two announcements learn every adapter at once)."""
        from npcbus.messages import AdapterListReply

        return AdapterListReply([{"adapter": name, "version": ad.state.version, "base_model": self.base_model_id,
                                  "content_hash": ad.state.content_hash, "parent": ad.state.manifest.get("parent")}
                                 for name, ad in sorted(self.adapters.items())])

    async def _resolve_fetch(self, adapter: str, version: int | None):
        from npcbus.messages import AdapterFetchReply

        if adapter not in self.adapters:
            return AdapterFetchReply(adapter, error=f"unknown adapter {adapter!r}")
        try:
            v, manifest, files = await asyncio.to_thread(self.store.read_files, adapter, version)
        except FileNotFoundError as e:
            return AdapterFetchReply(adapter, error=str(e))
        M.fetches.labels(adapter).inc()
        return AdapterFetchReply(adapter, version=v, content_hash=manifest.get("content_hash", ""),
                                 base_model=manifest.get("base_model", self.base_model_id), files=files)

    # leases -------------------------------------------------------------------------------------
    async def _on_accepted(self, msg, d):
        from aggregator.state import Lease
        from npcbus.bus import Ack, Reject
        from npcbus.messages import TaskAccepted

        if not isinstance(msg, TaskAccepted):
            return Reject(f"expected task_accepted, got {msg.TYPE}", "wrong_type")
        ad = self.adapters.get(msg.adapter)
        if ad is None:
            return Reject(f"unknown adapter {msg.adapter!r}", "unknown_adapter")
        log = self.log.bind(adapter=msg.adapter, task_id=msg.task_id, worker=msg.worker_id)
        if msg.task_id in ad.state.applied_task_ids or msg.task_id in ad.round.task_ids:
            log.info("acceptance of a task that already has a delta; ignored")
            return Ack()
        attempt = int((msg.task or {}).get("attempt", 0) or 0)
        async with self._leases_lock:
            old = self.leases.get(msg.task_id)
            if old is not None and old.attempt > attempt:
                log.info("acceptance of an older attempt; ignored", attempt=attempt, lease_attempt=old.attempt)
                return Ack()
            lease_s = float(msg.lease_s) if msg.lease_s and msg.lease_s > 0 else 600.0
            now = time.time()
            self.leases.put(Lease(task_id=msg.task_id, adapter=msg.adapter, worker_id=msg.worker_id, attempt=attempt,
                                  accepted_at=now, expires_at=now + lease_s, task=dict(msg.task or {})))
            await asyncio.to_thread(self.leases.save)
            M.leases.set(len(self.leases))
        log.info("lease recorded", attempt=attempt, lease_s=lease_s, base_version=msg.base_version)
        return Ack()

    async def _mark_leases(self, task_ids, state: str, expires_at: float | None = None) -> None:
        async with self._leases_lock:
            changed = False
            for t in task_ids:
                lease = self.leases.get(t)
                if lease is not None:
                    lease.state = state
                    if expires_at is not None:
                        lease.expires_at = expires_at
                    changed = True
            if changed:
                await asyncio.to_thread(self.leases.save)

    async def _check_leases(self, now: float) -> None:
        from npcbus.tasks import publish_task_messages, reissue

        async with self._leases_lock:
            expired = self.leases.expired(now)
            if not expired:
                return
            changed = False
            for lease in expired:
                log = self.log.bind(adapter=lease.adapter, task_id=lease.task_id, worker=lease.worker_id,
                                    attempt=lease.attempt)
                deadline = lease.task.get("deadline")
                if not lease.task or "data" not in lease.task:
                    log.warning("lease expired but the acceptance carried no task; cannot re-issue")
                    self.leases.drop([lease.task_id])
                    M.tasks_dropped.labels(lease.adapter, "no_task").inc()
                elif isinstance(deadline, (int, float)) and deadline <= now:
                    log.warning("lease expired after the task's deadline; dropped")
                    self.leases.drop([lease.task_id])
                    M.tasks_dropped.labels(lease.adapter, "deadline").inc()
                elif lease.attempt + 1 >= self.settings.max_task_attempts:
                    log.warning("lease expired; task gave up after its last attempt",
                                max_attempts=self.settings.max_task_attempts)
                    self.leases.drop([lease.task_id])
                    M.tasks_dropped.labels(lease.adapter, "attempts").inc()
                else:
                    task = reissue(lease.task)
                    try:
                        await publish_task_messages(self.bus, [task])
                    except Exception as e:  # noqa: BLE001 - try again next tick
                        log.warning("re-issue failed; will retry", error=str(e))
                        continue
                    self.leases.drop([lease.task_id])
                    M.tasks_reissued.labels(lease.adapter).inc()
                    log.info("lease expired without a delta; task re-issued", new_attempt=task.attempt)
                changed = True
            if changed:
                await asyncio.to_thread(self.leases.save)
                M.leases.set(len(self.leases))

    # deltas -------------------------------------------------------------------------------------
    def _sender_check(self, d):
        allowed = set(self.settings.allowed_senders)

        def check(_delta) -> str | None:
            if not d.user_id:
                return "the message carries no broker-validated user id"
            if allowed and d.user_id not in allowed:
                return f"sender {d.user_id!r} is not in ALLOWED_SENDERS"
            return None

        return check

    async def _on_delta(self, msg, d):
        from npcbus import lora
        from npcbus.bus import Defer
        from npcbus.messages import Delta

        if not isinstance(msg, Delta):
            return self._rejected(None, d, lora.Rejection("wrong_type", f"expected a delta, got {msg.TYPE}"))
        ad = self.adapters.get(msg.adapter)
        if ad is None:
            return self._rejected(msg, d, lora.Rejection("unknown_adapter", f"unknown adapter {msg.adapter!r}"))
        async with ad.lock:
            st, rnd = ad.state, ad.round
            log = self.log.bind(adapter=msg.adapter, version=st.version, round=rnd.number, delta_id=msg.delta_id,
                                task_id=msg.task_id, worker=msg.worker_id)
            held = rnd.entries.get(msg.delta_id)
            if held is not None:
                # the same delta again while its round is open: the broker redelivered it (our
                # channel dropped); settle the new copy when the round closes
                log.info("delta redelivered while its round is open; keeping the new delivery")
                held.delivery = d
                held.released = False
                return Defer()
            seen = _Union(st.applied_delta_ids, rnd.entries)
            try:
                rej = await asyncio.to_thread(
                    lora.validate_delta, msg, st.spec, current_version=st.version,
                    max_staleness=self.settings.max_staleness,
                    max_norm=self.settings.delta_norm_max or None, seen_ids=seen, sender_check=self._sender_check(d))
            except Exception as e:  # noqa: BLE001 - malformed beyond what the checks expect
                rej = lora.Rejection("invalid", f"delta cannot be checked: {type(e).__name__}: {e}")
            if rej is None and msg.task_id and (msg.task_id in st.applied_task_ids or msg.task_id in rnd.task_ids):
                rej = lora.Rejection("duplicate", f"task {msg.task_id} already has a delta")
            if rej is not None:
                return self._rejected(msg, d, rej, log)
            stale = lora.staleness(st.version, msg.base_version)
            weight = lora.delta_weight(msg.num_samples, st.version, msg.base_version, self.settings.staleness_alpha)
            entry = _Entry(delta_id=msg.delta_id, task_id=msg.task_id, worker_id=msg.worker_id, sender=d.user_id or "",
                           base_version=msg.base_version, staleness=stale, num_samples=msg.num_samples, weight=weight,
                           metrics=_clean_metrics(msg.metrics), delivery=d)
            if self.settings.method == "weighted_mean":
                if rnd.acc is None:
                    rnd.acc = lora.WeightedMeanAccumulator(st.spec.shapes)
                await asyncio.to_thread(rnd.acc.add, msg, weight)
                entry.released = _release_bodies(d)
            else:
                rnd.held.append(msg)
            rnd.entries[msg.delta_id] = entry
            if rnd.opened_at is None:
                rnd.opened_at = time.monotonic()
            M.accepted.labels(msg.adapter).inc()
            log.info("delta accepted into round", staleness=stale, weight=round(weight, 4),
                     num_samples=msg.num_samples, in_round=len(rnd.entries), quorum=self.settings.num_tasks_per_round)
            del msg  # the accumulator holds what it needs
            if entry.task_id:
                await self._mark_leases([entry.task_id], "delivered")
            if self.policy.decide(time.monotonic(), len(rnd.entries), rnd.opened_at) == "close":
                await self._close_round(ad, "quorum")
        return Defer()

    def _rejected(self, msg, d, rej, log=None):
        from npcbus.bus import Reject

        adapter = getattr(msg, "adapter", "") or "?"
        log = log or self.log.bind(adapter=adapter, delta_id=getattr(msg, "delta_id", None),
                                   worker=getattr(msg, "worker_id", None), message_id=d.message_id)
        log.warning("delta rejected", reason=rej.code, text=rej.text, sender=d.user_id)
        M.rejected.labels(adapter if adapter in self.adapters else "?", rej.code).inc()
        return Reject(rej.text, rej.code)

    # rounds -------------------------------------------------------------------------------------
    async def _close_round(self, ad: _Adapter, closed_by: str) -> None:
        """Aggregate, persist, announce, acknowledge. Caller holds ``ad.lock``."""
        from npcbus.bus import Ack

        st, rnd = ad.state, ad.round
        entries = list(rnd.entries.values())
        log = self.log.bind(adapter=st.adapter, round=rnd.number, version=st.version + 1)
        t0 = time.perf_counter()
        method = self.settings.method
        n_samples = sum(e.num_samples for e in entries)
        # step a copy: the adapter keeps the optimizer of the current version until the new one is written
        optimizer = ad.optimizer.copy()
        new_tensors, norms = await asyncio.to_thread(
            round_update, st.tensors, optimizer, method=method, acc=rnd.acc, held=rnd.held, num_samples=n_samples,
            trim_ratio=self.settings.trim_ratio)
        update_norm = norms["update_norm"]
        metrics = {
            "num_deltas": len(entries),
            "num_samples": n_samples,
            "total_weight": sum(e.weight for e in entries),
            "aggregate_norm": norms["aggregate_norm"],
            "update_norm": update_norm,
            "closed_by": closed_by,
            "round_duration_s": (time.monotonic() - rnd.opened_at) if rnd.opened_at else 0.0,
            "aggregation": method,
        }
        losses = [(e.metrics.get("loss_mean"), e.num_samples) for e in entries
                  if isinstance(e.metrics.get("loss_mean"), (int, float))]
        if losses:
            metrics["train_loss_mean"] = sum(x * n for x, n in losses) / max(1, sum(n for _, n in losses))
        if self.settings.heldout_data:
            loss = await asyncio.to_thread(self._heldout_loss, st.config, new_tensors, st.adapter)
            if loss is not None:
                metrics["heldout_loss"] = loss
        new_state = await asyncio.to_thread(
            self.store.commit, st, new_tensors, delta_ids=[e.delta_id for e in entries],
            task_ids=[e.task_id for e in entries], deltas=[e.record() for e in entries], metrics=metrics,
            extra={"round": rnd.number, "aggregation": method, "staleness_alpha": self.settings.staleness_alpha},
            server_config=optimizer.config(), server_state=optimizer.state_dict())
        ad.state = new_state
        ad.optimizer = optimizer
        ad.round = _Round(new_state.version + 1)
        log.info("version written", hash=new_state.content_hash[:12], deltas=len(entries), samples=n_samples,
                 update_norm=round(update_norm, 6), closed_by=closed_by)
        await self._announce(st.adapter)
        done_tasks = [e.task_id for e in entries if e.task_id]
        if done_tasks:
            async with self._leases_lock:
                self.leases.drop(done_tasks)
                await asyncio.to_thread(self.leases.save)
                M.leases.set(len(self.leases))
        for e in entries:
            await self.bus.settle(e.delivery, Ack())
        dt = time.perf_counter() - t0
        M.rounds.labels(st.adapter, closed_by).inc()
        M.round_seconds.labels(st.adapter).observe(metrics["round_duration_s"])
        M.version.labels(st.adapter).set(new_state.version)
        log.info("round closed", close_s=round(dt, 3), round_s=round(metrics["round_duration_s"], 3))

    async def _expire_round(self, ad: _Adapter) -> None:
        """The round timed out below the minimum: dead-letter its deltas, re-issue their tasks."""
        from npcbus.bus import Reject

        rnd = ad.round
        entries = list(rnd.entries.values())
        log = self.log.bind(adapter=ad.state.adapter, round=rnd.number, version=ad.state.version)
        log.warning("round expired below the minimum; its deltas are dead-lettered", deltas=len(entries),
                    min_updates=self.settings.min_updates_per_round)
        ad.round = _Round(rnd.number)
        for e in entries:
            M.rejected.labels(ad.state.adapter, "round_expired").inc()
            if e.released:
                for raw in e.delivery.raw:
                    with contextlib.suppress(Exception):
                        await raw.nack(requeue=False)
                e.delivery.settled = True
            else:
                await self.bus.settle(e.delivery, Reject("the round expired below the minimum number of updates",
                                                         "round_expired"))
        await self._mark_leases([e.task_id for e in entries if e.task_id], "leased", time.time())
        M.rounds.labels(ad.state.adapter, "expired").inc()

    async def _tick_loop(self) -> None:
        s = self.settings
        while not self._stopping:
            await asyncio.sleep(s.tick_interval_s)
            try:
                for ad in self.adapters.values():
                    async with ad.lock:
                        decision = self.policy.decide(time.monotonic(), len(ad.round.entries), ad.round.opened_at)
                        if decision == "close":
                            await self._close_round(ad, "timeout")
                        elif decision == "expire":
                            await self._expire_round(ad)
                        if ad.announce_pending:
                            await self._announce(ad.state.adapter)
                # give redelivered deltas a moment after a restart before leases count
                if time.time() - self._started_at >= 2 * s.tick_interval_s:
                    await self._check_leases(time.time())
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the tick must keep running
                self.log.exception("tick failed")


class _Union:
    """``x in _Union(a, b)``: in either container (avoids copying the applied-id set)."""

    def __init__(self, *parts):
        self.parts = parts

    def __contains__(self, x) -> bool:
        return any(x in p for p in self.parts)


def _release_bodies(d) -> bool:
    """Drop the received bytes of a delivery we only need to acknowledge (see module docstring)."""
    ok = True
    for raw in d.raw:
        try:
            raw.body = b""
        except (ValueError, AttributeError):
            ok = False
    return ok


def _clean_metrics(m: dict) -> dict:
    out = {}
    for k, v in (m or {}).items():
        if isinstance(v, bool) or isinstance(v, (int, str)):
            out[str(k)] = v
        elif isinstance(v, float) and math.isfinite(v):
            out[str(k)] = v
    return out


class _Metrics:
    def __init__(self) -> None:
        from npcbus import metrics

        self.rounds = metrics.counter("aggregator_rounds_closed_total",
                                      "Rounds ended, by adapter and how (quorum, timeout, expired).", ("adapter", "how"))
        self.accepted = metrics.counter("aggregator_deltas_accepted_total", "Deltas accepted into a round.", ("adapter",))
        self.rejected = metrics.counter("aggregator_deltas_rejected_total", "Deltas rejected, by reason code.",
                                        ("adapter", "reason"))
        self.round_seconds = metrics.histogram("aggregator_round_duration_seconds",
                                               "Time from a round's first delta to its close.", ("adapter",),
                                               buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200))
        self.version = metrics.gauge("aggregator_adapter_version", "Current version of each adapter.", ("adapter",))
        self.leases = metrics.gauge("aggregator_open_leases", "Task leases waiting for a delta.")
        self.tasks_reissued = metrics.counter("aggregator_tasks_reissued_total",
                                              "Tasks re-issued after their lease expired.", ("adapter",))
        self.tasks_dropped = metrics.counter("aggregator_tasks_dropped_total",
                                             "Expired tasks not re-issued (deadline, attempts, no task).",
                                             ("adapter", "reason"))
        self.fetches = metrics.counter("aggregator_adapter_fetches_total", "Adapter fetches served.", ("adapter",))


M: _Metrics = None  # type: ignore[assignment]


def _metrics() -> _Metrics:
    global M
    if M is None:
        M = _Metrics()
    return M


__all__ = ["AggregatorSettings", "Aggregator", "add_arguments", "run"]
