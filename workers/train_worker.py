"""``npcbus worker train``: a training worker. Tasks in, LoRA deltas out.

One task at a time:

1. **Take** a task from the tasks queue (prefetch 1). The worker stops consuming (``basic.cancel``)
   as soon as a task arrives, so it never holds a second task while it trains; it consumes again
   when the task is finished.
2. **Check** it: a task not sent by a broker user in ``ALLOWED_TASK_SENDERS`` (the broker-validated
   user id; the default exchange lets any user that may reply put a message in the tasks queue),
   past its deadline or with unreadable data is dead-lettered with its reason; a task for another
   base model is handed back (requeued) for another worker.
3. **Hold the adapter's current version**: the newest version heard on the versions fanout (a
   per-process listener queue) when its files are in the local cache (by content hash), else
   fetched through the bus from whoever serves adapter fetches (the aggregator). No shared disk.
   While the fetch fails (the aggregator restarting), the task stays unacknowledged and is
   retried; after ``FETCH_RETRY_S`` it goes back to the queue.
4. **Accept** it: publish :class:`npcbus.messages.TaskAccepted` (task, lease, base version) with a
   publisher confirm, *then* acknowledge the task. From here on the issuer (the aggregator) owns
   the task's fate: if this worker dies, the lease expires and the task is re-issued, so nothing is
   lost and the task never sits unacknowledged past the broker's consumer timeout.
5. **Train** in a thread (:func:`npcbus.training.train_lora`), so that the event loop keeps the
   connection's heartbeats flowing however long the training takes.
6. **Publish the delta**: trained weights minus the weights of the version it started from,
   quantized (``DELTA_QUANT``: fp16 by default, int8 with per-block scales, or fp32), chunked by
   the bus when large, with base version, sample count, worker id and training metrics
   (``loss_mean``, ``loss_last``, ``grad_norm_mean``, ``steps``, ``duration_s``, ``samples``,
   plus the fetch time). A publish that keeps failing gives up; the lease then re-issues the task.
7. **Wait briefly for a newer version** (``VERSION_WAIT_S``, default 5 s): the delta just sent
   may close a round, and the next task should start from the version that round produces, not
   from the one the worker already trained on (its next delta would be stale, and a stale delta
   pushes the adapter again along a direction it already moved). Skipped when a newer version was
   announced during the task; the wait ends as soon as one is.

Hyperparameters come from the task (``task.hyperparams``) over the worker's defaults
(:class:`npcbus.training.TrainConfig` or whatever the training module takes); the worker id from
``WORKER_ID`` (default ``<hostname>-<pid>``). Every log line carries worker, adapter, version and
task ids; Prometheus metrics on ``METRICS_PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from npcbus.settings import Settings, env_field


@dataclass
class TrainWorkerSettings(Settings):
    """The training worker."""

    title: ClassVar[str] = "worker train"

    worker_id: str = env_field("WORKER_ID", "", "Id of this training worker in deltas and logs (empty: <hostname>-<pid>).")
    cache_dir: str = env_field("ADAPTER_CACHE_DIR", ".npcbus/adapter-cache",
                               "Where fetched adapter versions are cached, by content hash.")
    delta_quant: str = env_field("DELTA_QUANT", "fp16", "Wire format of deltas: fp16, int8 (per-block scales) or fp32.",
                                 check=lambda s: s in ("fp16", "int8", "fp32"), check_msg="must be fp16, int8 or fp32")
    int8_block: int = env_field("INT8_BLOCK", 256, "Values per int8 quantization block (one float32 scale each).",
                                check=lambda n: n >= 1, check_msg="must be >= 1")
    train_threads: int = env_field("TRAIN_THREADS", 0, "torch CPU threads for training (0: torch's default).",
                                   check=lambda n: n >= 0, check_msg="must be >= 0")
    device: str = env_field("TRAIN_DEVICE", "auto", "Training device: auto (cuda when available), cpu or cuda[:N].")
    fetch_timeout_s: float = env_field("FETCH_TIMEOUT_S", 30.0, "Timeout of one adapter fetch through the bus.",
                                       check=lambda x: x > 0, check_msg="must be > 0")
    fetch_retry_s: float = env_field(
        "FETCH_RETRY_S", 120.0, "How long a task waits for its adapter to be fetchable before it goes back to the queue.",
        check=lambda x: x > 0, check_msg="must be > 0")
    max_tasks: int = env_field("WORKER_MAX_TASKS", 0, "Stop after this many tasks (0: run until stopped).",
                               check=lambda n: n >= 0, check_msg="must be >= 0")
    allowed_task_senders: list[str] = env_field(
        "ALLOWED_TASK_SENDERS", ["npcbus-aggregator", "guest"],
        "Broker user ids allowed to issue training tasks (the broker-validated user id of the message); a task from "
        "anyone else is dead-lettered (unauthorized_sender). Default: the aggregator role's user (aggregator, loop, "
        "`npcbus task publish`) and the single-user setup's guest; compose.yaml sets AMQP_USER_PREFIX + aggregator. "
        "Empty: any user the broker authenticated.")
    version_wait_s: float = env_field(
        "VERSION_WAIT_S", 5.0, "After sending a delta, wait up to this long for a newer version of the adapter before "
        "taking the next task, so that the next delta starts from it (0: do not wait).",
        check=lambda x: x >= 0, check_msg="must be >= 0")

    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from npcbus.service import add_print_settings

    parser.add_argument("--worker-id", default=None, help="Override WORKER_ID.")
    parser.add_argument("--max-tasks", type=int, default=None, help="Override WORKER_MAX_TASKS.")
    add_print_settings(parser)


def run(args: argparse.Namespace) -> int:
    from npcbus.service import prepare
    from npcbus.settings import BusSettings, ModelSettings

    overrides: dict[str, Any] = {}
    if args.worker_id:
        overrides["worker_id"] = args.worker_id
    if args.max_tasks is not None:
        overrides["max_tasks"] = args.max_tasks
    settings = TrainWorkerSettings.from_env(**overrides)
    bus_settings = BusSettings.from_env()
    model_settings = ModelSettings.from_env()
    if not prepare(args, bus_settings, worker=settings):
        return 0

    async def main() -> None:
        import signal

        from npcbus.metrics import start_metrics_server

        start_metrics_server(bus_settings.metrics_port)
        worker = TrainWorker(settings, bus_settings, model_settings)
        await worker.start()
        from npcbus.health import mark_ready

        mark_ready("train")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, worker.request_stop)
        await worker.wait()
        await worker.stop()

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """What one training run gives back: the delta tensors and metrics."""

    delta: dict
    num_samples: int
    metrics: dict = field(default_factory=dict)


class TrainWorker:
    #: while waiting for a task, subscribe afresh this often (see :meth:`_next_task`)
    RESUBSCRIBE_S = 30.0

    def __init__(self, settings: TrainWorkerSettings, bus_settings=None, model_settings=None, *, bus=None,
                 trainer=None):
        from npcbus.adapter_store import AdapterCache
        from npcbus.logs import get_logger
        from npcbus.settings import BusSettings, ModelSettings

        self.settings = settings
        self.bus_settings = bus_settings or BusSettings.from_env()
        self.model_settings = model_settings or ModelSettings.from_env()
        self.worker_id = settings.resolved_worker_id()
        self.cache = AdapterCache(settings.cache_dir)
        self.bus = bus
        self._own_bus = bus is None
        self.log = get_logger("worker.train", worker=self.worker_id)
        self.announced: dict[str, tuple[int, str]] = {}  # adapter -> (version, content hash)
        self.held: dict[str, Any] = {}  # adapter -> FetchedAdapter of the version we hold
        self.tasks_done = 0
        self.last_timings: dict = {}
        self._versions_changed = asyncio.Event()  # replaced after each set: waiters hold the old one
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._trainer = trainer  # built at start() unless given (tests, benchmarks)
        self._prefetch: dict[str, asyncio.Task] = {}
        _metrics()

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        from npcbus.bus import Bus

        if self.bus is None:
            self.bus = Bus(self.bus_settings, name="train-worker", client_id=None)
        await self.bus.connect()
        topo = self.bus.topology
        # only the training queues: a training worker's broker user may declare the tasks queue it
        # consumes, and checks that the other two exist (the broker definitions declare them)
        await self.bus.declare_topology(queues=[topo.tasks_queue, topo.deltas_queue, topo.leases_queue])
        spec = topo.listener_queue("versions", f"train-{self.bus.client_id}", topo.versions_exchange)
        await self.bus.consume(spec, self._on_announcement, prefetch=64)
        if self._trainer is None:
            self._trainer = await asyncio.to_thread(self._make_trainer)
        self.log.info("training worker ready", base_model=self.model_settings.model_id,
                      quant=self.settings.delta_quant, namespace=self.bus_settings.namespace)
        self._loop_task = asyncio.create_task(self._task_loop())

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        for t in self._prefetch.values():
            t.cancel()
        if self.bus is not None and self._own_bus:
            await self.bus.close()
        self.log.info("training worker stopped", tasks_done=self.tasks_done)

    def _make_trainer(self):
        t = Trainer(self.model_settings, self.settings)
        t.should_stop = self._stop.is_set
        return t

    # versions -----------------------------------------------------------------------------------
    async def _on_announcement(self, msg, d):
        from npcbus.messages import VersionAnnouncement

        if not isinstance(msg, VersionAnnouncement):
            return None
        if msg.base_model and msg.base_model != self.model_settings.model_id:
            return None
        old = self.announced.get(msg.adapter)
        if old == (msg.version, msg.content_hash):  # the aggregator repeats its announcements
            return None
        if old is None or msg.version >= old[0]:
            self.announced[msg.adapter] = (msg.version, msg.content_hash)
            self._versions_changed.set()
            self._versions_changed = asyncio.Event()
            self.log.info("version announced", adapter=msg.adapter, version=msg.version, hash=msg.content_hash[:12])
            # refresh ahead of the next task, for adapters this worker trains
            if msg.adapter in self.held and not self.cache.has(msg.content_hash):
                prev = self._prefetch.get(msg.adapter)
                if prev is None or prev.done():
                    self._prefetch[msg.adapter] = asyncio.create_task(self._refresh(msg.adapter))
        return None

    async def _refresh(self, adapter: str) -> None:
        with contextlib.suppress(Exception):
            await self.current_adapter(adapter)

    async def current_adapter(self, adapter: str):
        """The adapter's newest version we know of, from the cache when possible, else the bus."""
        from npcbus.adapter_store import FetchedAdapter, fetch_adapter

        known = self.announced.get(adapter)
        held = self.held.get(adapter)
        if known is not None:
            version, chash = known
            if held is not None and held.version == version:
                return held
            if chash and self.cache.has(chash):
                fa = FetchedAdapter(adapter, version, chash, "", self.cache.path_for(chash))
                self.held[adapter] = fa
                return fa
        fa = await fetch_adapter(self.bus, self.cache, adapter, None, timeout=self.settings.fetch_timeout_s)
        if known is None or fa.version >= known[0]:
            self.announced[adapter] = (fa.version, fa.content_hash)
        if held is None or fa.version >= held.version:
            self.held[adapter] = fa
        return fa

    # tasks --------------------------------------------------------------------------------------
    async def _next_task(self):
        """Consume until one task arrives, then stop consuming. Returns (msg, delivery, consumer).

        While no task comes, the subscription is made afresh every ``RESUBSCRIBE_S`` seconds: a
        connection drop can leave a subscription that the robust channel did not restore, and a
        worker that waits on it would idle while tasks queue up."""
        from npcbus.bus import Defer, Retry

        loop = asyncio.get_running_loop()

        def handler_for(got: asyncio.Future):
            async def handler(msg, d):
                if got.done():  # not expected with prefetch 1 and an unacked task; hand it back
                    return Retry("worker busy")
                got.set_result((msg, d))
                return Defer()
            return handler

        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                # each subscription has its own future: a delivery to a closed one never counts
                got = loop.create_future()
                c = await self.bus.consume(self.bus.topology.tasks_queue, handler_for(got), prefetch=1)
                try:
                    done, _ = await asyncio.wait({got, stop}, timeout=self.RESUBSCRIBE_S,
                                                 return_when=asyncio.FIRST_COMPLETED)
                except BaseException:
                    await self._close_consumer(c)
                    raise
                if done:
                    break
                # nothing came: subscribe afresh (a task that arrives as this channel closes is
                # unacknowledged on it, so the broker hands it out again)
                await self._close_consumer(c)
        finally:
            stop.cancel()
        # stop deliveries but keep the channel: the task is settled on it
        await c.pause()
        if got not in done:
            await self._close_consumer(c)
            return None
        msg, d = got.result()
        return msg, d, c

    async def _close_consumer(self, c) -> None:
        await c.cancel()

    async def _task_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = await self._next_task()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. a connection drop while subscribing
                self.log.warning("could not consume tasks; retrying", error=f"{type(e).__name__}: {e}")
                await asyncio.sleep(1.0)
                continue
            if item is None:
                break
            msg, d, c = item
            try:
                await self.handle_task(msg, d)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad task must not stop the worker
                self.log.exception("task failed", message_id=d.message_id)
                if not d.settled:
                    from npcbus.bus import Retry

                    await self.bus.settle(d, Retry("worker error"))
            finally:
                await self._close_consumer(c)
            if self.settings.max_tasks and self.tasks_done >= self.settings.max_tasks:
                self.log.info("task limit reached", tasks_done=self.tasks_done)
                self._stop.set()

    def sender_refusal(self, d) -> str | None:
        """Why a task delivery's sender may not issue tasks (``ALLOWED_TASK_SENDERS``), or None."""
        if not d.user_id:
            return "the task carries no broker-validated user id"
        allowed = self.settings.allowed_task_senders
        if allowed and d.user_id not in allowed:
            return f"sender {d.user_id!r} is not in ALLOWED_TASK_SENDERS"
        return None

    async def handle_task(self, task, d) -> None:
        """Check, accept, train and publish one task (``d`` is settled here)."""
        from npcbus import lora
        from npcbus.adapter_store import AdapterUnavailable
        from npcbus.bus import Ack, BusError, Reject, Retry
        from npcbus.messages import TaskAccepted, TrainingTask
        from npcbus.tasks import TaskDataError, task_examples

        refusal = self.sender_refusal(d)
        if refusal is not None:
            self.log.warning("task from a sender not allowed to issue tasks; dead-lettered", sender=d.user_id,
                             message_id=d.message_id, task_id=getattr(task, "task_id", None))
            M.tasks.labels("unauthorized_sender").inc()
            await self.bus.settle(d, Reject(refusal, "unauthorized_sender"))
            return
        if not isinstance(task, TrainingTask):
            await self.bus.settle(d, Reject(f"expected training_task, got {task.TYPE}", "wrong_type"))
            return
        log = self.log.bind(adapter=task.adapter, task_id=task.task_id, attempt=task.attempt)
        if task.deadline is not None and task.deadline <= time.time():
            log.warning("task deadline passed; dropped")
            M.tasks.labels("expired").inc()
            await self.bus.settle(d, Reject("the task's deadline passed before a worker took it", "expired"))
            return
        if task.base_model and task.base_model not in (self.model_settings.model_id, self.model_settings.resolve()):
            log.info("task is for another base model; handing it back", task_base_model=task.base_model)
            await asyncio.sleep(0.5)
            await self.bus.settle(d, Retry("another base model"))
            return
        try:
            examples = await asyncio.to_thread(task_examples, task.data)
        except TaskDataError as e:
            log.warning("task data unusable; dead-lettered", error=str(e))
            M.tasks.labels("bad_data").inc()
            await self.bus.settle(d, Reject(f"task data: {e}", "bad_data"))
            return
        try:
            Trainer.config_for(task)
        except (ValueError, TypeError) as e:
            log.warning("task hyperparameters invalid; dead-lettered", error=str(e))
            M.tasks.labels("bad_hyperparams").inc()
            await self.bus.settle(d, Reject(f"hyperparameters: {e}", "bad_hyperparams"))
            return

        t_start = t_fetch = time.perf_counter()
        fetched = None
        give_up = time.monotonic() + self.settings.fetch_retry_s
        delay = 0.5
        while fetched is None:
            try:
                fetched = await self.current_adapter(task.adapter)
            except (AdapterUnavailable, BusError, TimeoutError) as e:
                if time.monotonic() > give_up or self._stop.is_set():
                    log.warning("adapter unavailable; task handed back", error=str(e))
                    await self.bus.settle(d, Retry("adapter unavailable"))
                    return
                log.info("adapter not fetchable yet; retrying", error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        fetch_s = time.perf_counter() - t_fetch
        log = log.bind(version=fetched.version)

        t_acc = time.perf_counter()
        accepted = TaskAccepted(task_id=task.task_id, adapter=task.adapter, worker_id=self.worker_id,
                                base_version=fetched.version, lease_s=task.lease_s, task=dict(vars(task)))
        await self.bus.publish(self.bus.topology.train_exchange, "accepted", accepted)
        if not await self.bus.settle(d, Ack()):
            # the channel dropped: the broker hands the task to a worker again; training it here
            # too would only give a second delta for the same task (rejected as duplicate)
            log.warning("could not acknowledge the task; leaving it to its redelivery")
            return
        accept_s = time.perf_counter() - t_acc
        log.info("task accepted; training", steps=task.steps, examples=len(examples), fetch_s=round(fetch_s, 3))

        t0 = time.perf_counter()
        try:
            result: TaskResult = await asyncio.to_thread(self._trainer.train, fetched.path, examples, task)
        except _Stopped:
            log.info("training interrupted by shutdown; the task's lease will re-issue it")
            M.tasks.labels("interrupted").inc()
            return
        except Exception as e:  # noqa: BLE001 - no delta; the lease re-issues the task
            log.error("training failed; no delta published", error=f"{type(e).__name__}: {e}")
            M.tasks.labels("train_failed").inc()
            return
        train_s = time.perf_counter() - t0

        t_enc = time.perf_counter()
        metrics = dict(result.metrics)
        metrics.setdefault("duration_s", train_s)
        metrics["fetch_s"] = fetch_s
        delta = await asyncio.to_thread(
            lora.make_delta, result.delta, adapter=task.adapter, base_version=fetched.version,
            num_samples=result.num_samples, quant=self.settings.delta_quant, block=self.settings.int8_block,
            task_id=task.task_id, worker_id=self.worker_id, metrics=metrics)
        encode_s = time.perf_counter() - t_enc
        t_pub = time.perf_counter()
        for attempt in range(5):
            try:
                await self.bus.publish(self.bus.topology.train_exchange, "delta", delta)
                break
            except BusError as e:
                log.warning("delta publish failed", error=str(e), attempt=attempt)
                if attempt == 4:
                    M.tasks.labels("publish_failed").inc()
                    log.error("delta not published; the task's lease will re-issue it", delta_id=delta.delta_id)
                    return
                await asyncio.sleep(1.0 + attempt)
        publish_s = time.perf_counter() - t_pub
        self.tasks_done += 1
        self.last_timings = {"fetch_s": fetch_s, "accept_s": accept_s, "train_s": train_s, "encode_s": encode_s,
                             "publish_s": publish_s, "wall_s": time.perf_counter() - t_start,
                             "delta_id": delta.delta_id}
        M.tasks.labels("done").inc()
        M.train_seconds.observe(train_s)
        M.overhead_seconds.observe(fetch_s + accept_s + encode_s + publish_s)
        log.info("delta published", delta_id=delta.delta_id, samples=result.num_samples,
                 loss_mean=_r(metrics.get("loss_mean")), loss_last=_r(metrics.get("loss_last")),
                 train_s=round(train_s, 3), encode_s=round(encode_s, 3), publish_s=round(publish_s, 3))
        await self.wait_for_newer_version(task.adapter, fetched.version, self.settings.version_wait_s)

    async def wait_for_newer_version(self, adapter: str, version: int, timeout: float) -> bool:
        """Wait up to ``timeout`` s until a version newer than ``version`` is announced.

        The delta just sent may close a round; the next task then starts from the new version
        instead of the one this delta was based on (which would make the next delta stale)."""
        end = time.monotonic() + timeout
        while True:
            known = self.announced.get(adapter)
            if known is not None and known[0] > version:
                return True
            remaining = end - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._versions_changed.wait(), remaining)


def _r(x):
    return round(x, 4) if isinstance(x, float) else x


class Trainer:
    """The torch side of a worker: the base model, loaded once, and one training run per task.

    A task's run starts from the adapter version the worker holds (its PEFT config and weights),
    trains ``task.steps`` optimizer steps with ``task.hyperparams`` over the training module's
    defaults (seed: from the task id and attempt unless given), and returns trained minus starting
    weights. The sample count is the number of distinct examples the run saw.
    """

    def __init__(self, model_settings, settings: TrainWorkerSettings, *, model=None, tokenizer=None):
        import torch

        from npcbus.model import resolve_base_model
        from npcbus.training import load_base_model_for_training

        if settings.train_threads:
            torch.set_num_threads(settings.train_threads)
        self.settings = settings
        self.device = _device(settings.device)
        self.base_path = resolve_base_model(model_settings)
        if model is None:
            model, tokenizer = load_base_model_for_training(self.base_path, device=self.device)
        self.model, self.tokenizer = model, tokenizer
        self.should_stop = None

    @staticmethod
    def config_for(task):
        """The training config of a task (ValueError for unknown or invalid hyperparameters)."""
        import zlib

        from npcbus.training import TrainConfig

        hp = dict(task.hyperparams or {})
        if "seed" not in hp:
            hp["seed"] = zlib.crc32(f"{task.task_id}:{task.attempt}".encode()) % (2 ** 31)
        return TrainConfig.from_hyperparams(hp, max_steps=int(task.steps))

    def train(self, adapter_path, examples: list[dict], task) -> TaskResult:
        from npcbus import lora
        from npcbus.training import load_adapter_config, load_adapter_state, train_lora

        base_state = load_adapter_state(adapter_path)
        peft_config = load_adapter_config(adapter_path)
        res = train_lora(self.model, self.tokenizer, examples, self.config_for(task), init_adapter_state=base_state,
                         peft_config=peft_config, should_stop=self.should_stop)
        if res.stopped_early:
            raise _Stopped()
        delta = lora.compute_delta(res.adapter_state, base_state)
        seen = int(min(len(examples), res.metrics.get("samples", len(examples)) or len(examples)))
        metrics = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}
        return TaskResult(delta=delta, num_samples=max(1, seen), metrics=metrics)


class _Stopped(Exception):
    """Training was cut short because the worker is stopping; no delta is published."""


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class _Metrics:
    def __init__(self) -> None:
        from npcbus import metrics

        self.tasks = metrics.counter("worker_tasks_total", "Training tasks handled, by outcome.", ("outcome",))
        self.train_seconds = metrics.histogram("worker_train_seconds", "Training time per task.",
                                               buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600))
        self.overhead_seconds = metrics.histogram("worker_overhead_seconds",
                                                  "Fetch + accept + encode + publish time per task.",
                                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))


M: _Metrics = None  # type: ignore[assignment]


def _metrics() -> _Metrics:
    global M
    if M is None:
        M = _Metrics()
    return M
