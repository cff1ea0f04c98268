"""Distributed training end to end: the aggregator and training workers as separate processes,
talking only through the real local RabbitMQ, on the offline default model and shipped NPC data.

* ``test_distributed_training_end_to_end``: tasks published with ``npcbus task publish``; three
  workers (one sending int8 deltas) and the aggregator run several rounds; versions increase, every announced version is
  fetched through the bus and loads with PEFT, and the held-out loss goes down from version 0.
* ``test_kill9_worker_mid_task_and_aggregator_mid_round``: ``kill -9`` of a worker while it trains
  and of the aggregator while a round is open; the run still completes, the manifests count every
  task's delta exactly once, and the lost task is done by another worker after its lease expired.

The workers share this machine's disk only because they run here: versions still travel through
the bus (each worker has its own cache folder). Training is tiny (a few steps, short sequences,
one torch thread per process).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npcbus.tasks import DATA_FILES, read_jsonl

from .conftest import ROOT

pytestmark = pytest.mark.broker

ADAPTER = "npc"
HYPER = {"lr": 5e-3, "batch_size": 2, "max_length": 192, "lr_schedule": "constant", "dropout": 0.0}


def split_data() -> tuple[list[dict], list[dict]]:
    """The shipped alignment turns (behaviour the default model was not fine-tuned on, so training has
    something to learn): every 10th record held out, the rest for training."""
    records = read_jsonl(DATA_FILES / "npc_alignment.jsonl")
    held = records[::10]
    train = [r for i, r in enumerate(records) if i % 10]
    return train, held


class Proc:
    """A service process with its JSON log in a file."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._fh = open(self.log_path, "wb")
        self.p = subprocess.Popen([sys.executable, "-m", "npcbus.cli", *args], env=env, cwd=ROOT,
                                  stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    def events(self) -> list[dict]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def find(self, event: str, **match) -> list[dict]:
        return [e for e in self.events() if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._fh.close()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def base_env(bus_settings, model_dir: str, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "AMQP_URL": bus_settings.amqp_url, "NPCBUS_NAMESPACE": bus_settings.namespace, "MODEL_DIR": model_dir,
        "BASE_MODEL": "", "LOG_FORMAT": "json", "LOG_LEVEL": "info", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1", "TRAIN_THREADS": "1", "METRICS_PORT": "0", "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_worker(name: str, bus_settings, model_dir: str, tmp_path: Path, quant: str = "fp16") -> Proc:
    env = base_env(bus_settings, model_dir, WORKER_ID=name, ADAPTER_CACHE_DIR=tmp_path / f"cache-{name}",
                   FETCH_RETRY_S=120, DELTA_QUANT=quant, VERSION_WAIT_S=15)
    return Proc(name, ["worker", "train"], env, tmp_path)


def start_aggregator(name: str, bus_settings, model_dir: str, tmp_path: Path, **extra) -> Proc:
    env = base_env(bus_settings, model_dir, ADAPTERS=ADAPTER, CHECKPOINT_DIR=tmp_path / "ckpt",
                   TICK_INTERVAL_SEC=0.3, MAX_STALENESS=3, DELTA_NORM_MAX=50, **extra)
    return Proc(name, ["aggregator"], env, tmp_path)


async def wait_until(pred, timeout: float, what: str, procs: list[Proc]):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        for p in procs:
            if not p.alive() and getattr(p, "must_live", True):
                raise AssertionError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")
        await asyncio.sleep(0.1)
    logs = "\n\n".join(f"--- {p.name}\n{p.tail(15)}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def manifests(ckpt: Path) -> list[dict]:
    from aggregator.state import CheckpointStore

    store = CheckpointStore(ckpt)
    return store.manifests(ADAPTER)


def applied_task_ids(ckpt: Path) -> list[str]:
    if not (ckpt / ADAPTER).is_dir():
        return []
    return [t for m in manifests(ckpt) for t in m.get("task_ids", [])]


def check_manifests(ms: list[dict]) -> None:
    assert [m["version"] for m in ms] == list(range(len(ms)))
    assert ms[0]["parent"] is None and all(m["parent"] == m["version"] - 1 for m in ms[1:])
    ids = [d for m in ms for d in m["delta_ids"]]
    assert len(ids) == len(set(ids)), "a delta was applied twice"
    for m in ms[1:]:
        assert m["metrics"]["num_deltas"] == len(m["delta_ids"]) == len(m["deltas"]) >= 1
        assert [d["delta_id"] for d in m["deltas"]] == m["delta_ids"]


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


@pytest.mark.timeout(480)
async def test_distributed_training_end_to_end(bus, bus_settings, model_dir, tmp_path, procs):
    from npcbus.messages import VersionAnnouncement

    train, held = split_data()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    held_path = tmp_path / "held.jsonl"
    held_path.write_text("".join(json.dumps(r) + "\n" for r in held))
    heard: list[VersionAnnouncement] = []

    async def on_version(m, d):
        heard.append(m)

    topo = bus.topology
    await bus.consume(topo.listener_queue("versions", "test-" + bus.client_id, topo.versions_exchange), on_version)

    agg = start_aggregator("aggregator", bus_settings, model_dir, tmp_path, NUM_TASKS_PER_ROUND=2,
                           ROUND_TIMEOUT_SEC=120, HELDOUT_DATA=held_path, HELDOUT_MAX_LENGTH=HYPER["max_length"])
    procs.append(agg)
    for i, quant in ((1, "fp16"), (2, "fp16"), (3, "int8")):
        procs.append(start_worker(f"w{i}", bus_settings, model_dir, tmp_path, quant))
    env = base_env(bus_settings, model_dir)
    cmd = [sys.executable, "-m", "npcbus.cli", "task", "publish", "--adapter", ADAPTER, "--data", str(data),
           "--num-tasks", "6", "--steps", "6", "--lease-s", "300"]
    for k, v in HYPER.items():
        cmd += ["--hp", f"{k}={v}"]
    out = await asyncio.to_thread(subprocess.run, cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    published = [json.loads(line)["task_id"] for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(published) == 6

    ckpt = tmp_path / "ckpt"
    await wait_until(lambda: sorted(applied_task_ids(ckpt)) == sorted(published), 360, "all six tasks applied", procs)
    ms = manifests(ckpt)
    check_manifests(ms)
    assert len(ms) == 4  # v0 + three rounds of two deltas
    workers = {d["worker_id"] for m in ms for d in m.get("deltas", [])}
    assert len(workers) >= 2, workers
    assert all(d["metrics"].get("steps") == 6 and d["num_samples"] >= 1 for m in ms for d in m.get("deltas", []))
    await wait_until(lambda: any(a.version == 3 for a in heard), 30, "announcement of v3", procs)
    announced = [a.version for a in heard if a.adapter == ADAPTER]
    assert announced == sorted(announced) and {1, 2, 3} <= set(announced)

    # every announced version comes through the bus (by content hash) and loads with PEFT
    from npcbus.adapter_store import AdapterCache, fetch_adapter

    cache = AdapterCache(tmp_path / "test-cache")
    fetched = {}
    for v in sorted(set(announced) | {0}):
        fa = await fetch_adapter(bus, cache, ADAPTER, v, timeout=30)
        assert fa.version == v and fa.content_hash == ms[v]["content_hash"]
        fetched[v] = fa.path
    losses = await asyncio.to_thread(_heldout_losses, model_dir, fetched, held)
    print("held-out loss by version:", {v: round(x, 4) for v, x in losses.items()})
    assert losses[3] < losses[0] - 0.05, losses
    # the aggregator scored each version the same way and kept it in the manifest
    for v, loss in losses.items():
        assert abs(ms[v]["metrics"]["heldout_loss"] - loss) < 1e-3, (v, ms[v]["metrics"], loss)


def _heldout_losses(model_dir: str, paths: dict[int, Path], held: list[dict]) -> dict[int, float]:
    import torch
    from peft import PeftModel

    from npcbus.model import load_model_and_tokenizer
    from npcbus.training import heldout_loss

    torch.set_num_threads(1)
    base, tok = load_model_and_tokenizer(model_dir)
    out = {}
    for v, path in sorted(paths.items()):
        model = PeftModel.from_pretrained(base, str(path))
        out[v] = heldout_loss(model, tok, held, max_length=HYPER["max_length"])
        base = model.unload()
    return out


@pytest.mark.timeout(480)
async def test_kill9_worker_mid_task_and_aggregator_mid_round(bus, bus_settings, model_dir, tmp_path, procs):
    from npcbus.tasks import publish_tasks

    train, _ = split_data()
    agg_env = dict(NUM_TASKS_PER_ROUND=3, MIN_UPDATES_PER_ROUND=1, ROUND_TIMEOUT_SEC=5)
    agg1 = start_aggregator("aggregator-1", bus_settings, model_dir, tmp_path, **agg_env)
    procs.append(agg1)
    workers = [start_worker(f"w{i}", bus_settings, model_dir, tmp_path) for i in (1, 2, 3)]
    procs.extend(workers)
    tasks = await publish_tasks(bus, ADAPTER, examples=train[:48], num_tasks=4, steps=5, hyperparams=HYPER,
                                lease_s=8)
    task_ids = {t.task_id for t in tasks}

    def first_training():
        for w in workers:
            ev = w.find("task accepted; training")
            if ev:
                return w, ev[0]
        return None

    victim, ev = await wait_until(first_training, 240, "a worker to start training", procs)
    victim.kill9()
    victim.must_live = False
    lost_task = ev["task_id"]
    assert not victim.find("delta published"), "the victim finished before it was killed"

    # kill the aggregator while a round is open (a delta in, quorum not reached)
    await wait_until(lambda: agg1.find("delta accepted into round"), 240, "a delta in the open round", procs)
    agg1.kill9()
    agg1.must_live = False
    assert not agg1.find("version written"), "the round closed before the kill"
    in_round_before = {e["delta_id"] for e in agg1.find("delta accepted into round")}

    agg2 = start_aggregator("aggregator-2", bus_settings, model_dir, tmp_path, **agg_env)
    procs.append(agg2)
    ckpt = tmp_path / "ckpt"
    await wait_until(lambda: len(applied_task_ids(ckpt)) >= 4, 300, "every task applied", procs)
    await asyncio.sleep(1.0)  # anything still in flight would show up as a second application

    ms = manifests(ckpt)
    check_manifests(ms)
    applied = [t for m in ms for t in m["task_ids"]]
    assert sorted(applied) == sorted(task_ids), "each task's delta counted exactly once"
    records = {d["task_id"]: d for m in ms for d in m.get("deltas", [])}
    assert records[lost_task]["worker_id"] != victim.name, "the lost task was done by another worker"
    assert agg2.find("lease expired without a delta; task re-issued", task_id=lost_task) or \
        agg1.find("lease expired without a delta; task re-issued", task_id=lost_task)
    # the deltas of the interrupted round were redelivered to the new aggregator and applied once
    applied_ids = {d for m in ms for d in m["delta_ids"]}
    assert in_round_before <= applied_ids
    # the restarted aggregator announced the version it found on disk again
    loaded = agg2.find("adapter loaded")
    assert loaded and agg2.find("version announced", version=loaded[0]["version"])


# ------------------------------------------------------------------------------------------------
# the worker in-process, with a stand-in trainer (no torch): task handling through the broker
# ------------------------------------------------------------------------------------------------


class _StubTrainer:
    """Returns a fixed small delta after ``delay`` seconds; records how many runs overlap."""

    def __init__(self, delay: float = 0.2):
        self.delay = delay
        self.running = 0
        self.max_running = 0
        self.calls: list[str] = []

    def train(self, adapter_path, examples, task):
        import numpy as np

        from npcbus.training import load_adapter_state
        from workers.train_worker import TaskResult

        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            time.sleep(self.delay)
            state = load_adapter_state(adapter_path)
            self.calls.append(task.task_id)
            return TaskResult(delta={k: np.full(v.shape, 0.01, np.float32) for k, v in state.items()},
                              num_samples=len(examples),
                              metrics={"loss_mean": 1.0, "loss_last": 0.9, "grad_norm_mean": 0.5,
                                       "steps": float(task.steps), "samples": float(len(examples))})
        finally:
            self.running -= 1


async def _in_process(bus_settings, tmp_path, workers: int, quant: str = "fp16", delay: float = 0.2, **agg_kw):
    from aggregator.service import Aggregator, AggregatorSettings
    from npcbus.settings import ModelSettings
    from workers.train_worker import TrainWorker, TrainWorkerSettings

    from .test_aggregator import synthetic_files

    agg = Aggregator(AggregatorSettings.from_env({}, adapters=[ADAPTER], checkpoint_dir=str(tmp_path / "ckpt"),
                                                 tick_interval_s=0.2, **agg_kw),
                     bus_settings, ModelSettings.from_env({}), initial_files=synthetic_files())
    await agg.start()
    out = []
    for i in range(workers):
        ws = TrainWorkerSettings.from_env({}, worker_id=f"iw{i}", cache_dir=str(tmp_path / f"c{i}"), delta_quant=quant)
        w = TrainWorker(ws, bus_settings, ModelSettings.from_env({}), trainer=_StubTrainer(delay))
        await w.start()
        out.append(w)
    return agg, out


async def test_worker_dead_letters_bad_tasks_and_trains_good_ones(bus, bus_settings, tmp_path):
    from npcbus.codec import decode
    from npcbus.tasks import build_tasks, publish_task_messages
    from npcbus.topology import H_REJECT_CODE

    from .test_aggregator import read_queue

    agg, (worker,) = await _in_process(bus_settings, tmp_path, 1, quant="int8", num_tasks_per_round=1)
    try:
        ex = [{"text": "hello there"}]
        expired = build_tasks(ADAPTER, examples=ex, steps=1, deadline=time.time() - 1)[0]
        missing = build_tasks(ADAPTER, path="no/such/file.jsonl", steps=1)[0]
        bad_hp = build_tasks(ADAPTER, examples=ex, steps=1, hyperparams={"not_a_knob": 3})[0]
        ok = build_tasks(ADAPTER, examples=ex * 3, steps=2)[0]
        await publish_task_messages(bus, [expired, missing, bad_hp, ok])
        # generous timeouts: on a loaded 2-core machine the worker may take a while to start
        dead = await read_queue(bus, bus.topology.dead_queue.name, 3, timeout=90)
        codes = {decode(m.body).task_id: m.headers[H_REJECT_CODE] for m in dead}
        assert codes == {expired.task_id: "expired", missing.task_id: "bad_data", bad_hp.task_id: "bad_hyperparams"}
        end = time.monotonic() + 60
        while agg.adapters[ADAPTER].state.version < 1 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        st = agg.adapters[ADAPTER].state
        assert st.version == 1 and st.manifest["task_ids"] == [ok.task_id]
        rec = st.manifest["deltas"][0]
        assert rec["worker_id"] == "iw0" and rec["num_samples"] == 3 and rec["metrics"]["steps"] == 2.0
        assert {"loss_mean", "loss_last", "grad_norm_mean", "duration_s", "samples", "fetch_s"} <= set(rec["metrics"])
        # the int8 delta of 0.01 everywhere moved every weight by 0.01
        from aggregator.state import safetensors_to_tensors

        _, _, files0 = agg.store.read_files(ADAPTER, 0)
        w0 = safetensors_to_tensors(files0["adapter_model.safetensors"])
        for k, v in st.tensors.items():
            assert abs(float((v - w0[k]).mean()) - 0.01) < 1e-4
        # the lease of the finished task is released when its delta is counted; give it a moment
        for _ in range(100):
            if len(agg.leases) == 0:
                break
            await asyncio.sleep(0.1)
        assert worker.tasks_done == 1 and len(agg.leases) == 0
    finally:
        await worker.stop()
        await agg.stop()


async def test_a_training_worker_holds_one_task_at_a_time(bus, bus_settings, tmp_path):
    from npcbus.tasks import build_tasks, publish_task_messages

    agg, workers = await _in_process(bus_settings, tmp_path, 2, delay=1.5, num_tasks_per_round=2)
    try:
        tasks = build_tasks(ADAPTER, examples=[{"text": f"t{i}"} for i in range(2)], num_tasks=2, steps=1)
        t0 = time.monotonic()
        await publish_task_messages(bus, tasks)
        end = time.monotonic() + 20
        while agg.adapters[ADAPTER].state.version < 1 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
        assert agg.adapters[ADAPTER].state.version == 1
        # both workers trained at once: neither kept the second task waiting behind its own
        assert [len(w._trainer.calls) for w in workers] == [1, 1]
        assert all(w._trainer.max_running == 1 for w in workers)
        assert elapsed < 2 * 1.5 + 1.0, elapsed
    finally:
        for w in workers:
            await w.stop()
        await agg.stop()


async def test_a_repeated_announcement_changes_nothing_for_a_worker(tmp_path):
    """The aggregator repeats its announcements (REANNOUNCE_INTERVAL_SEC): a worker takes a repeat
    as no news (no wake-up of waiters, no log line), a new version or new content as news."""
    from npcbus.messages import VersionAnnouncement
    from npcbus.settings import ModelSettings
    from workers.train_worker import TrainWorker, TrainWorkerSettings

    ms = ModelSettings.from_env({})
    w = TrainWorker(TrainWorkerSettings.from_env({}, worker_id="t", cache_dir=str(tmp_path / "c")), None, ms,
                    trainer=_StubTrainer(0.0))
    ann = VersionAnnouncement(adapter="npc", version=3, base_model=ms.model_id, content_hash="a" * 64)
    await w._on_announcement(ann, None)
    first = w._versions_changed
    await w._on_announcement(ann, None)
    assert w._versions_changed is first and w.announced["npc"] == (3, "a" * 64)
    await w._on_announcement(VersionAnnouncement(adapter="npc", version=4, base_model=ms.model_id,
                                                 content_hash="b" * 64), None)
    assert w._versions_changed is not first and w.announced["npc"] == (4, "b" * 64)
    await w._on_announcement(ann, None)  # an older version is no news either
    assert w.announced["npc"] == (4, "b" * 64)


async def test_an_idle_worker_subscribes_afresh_and_still_gets_its_task(bus, bus_settings, tmp_path, monkeypatch):
    """A worker waiting for a task subscribes afresh every RESUBSCRIBE_S (a subscription lost in a
    connection drop would otherwise leave it idle); a task that comes later still reaches it, and
    only one subscription is open at a time."""
    from npcbus.tasks import build_tasks, publish_task_messages
    from workers.train_worker import TrainWorker

    monkeypatch.setattr(TrainWorker, "RESUBSCRIBE_S", 0.3)
    agg, (worker,) = await _in_process(bus_settings, tmp_path, 1, num_tasks_per_round=1)
    try:
        await asyncio.sleep(1.5)  # several fresh subscriptions
        tasks_queue = bus.topology.tasks_queue.name
        assert len([c for c in worker.bus._consumers if c.name == tasks_queue]) == 1
        task = build_tasks(ADAPTER, examples=[{"text": "hello there"}] * 2, steps=1)[0]
        await publish_task_messages(bus, [task])
        end = time.monotonic() + 60
        while worker.tasks_done < 1 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        assert worker.tasks_done == 1
        end = time.monotonic() + 30
        while agg.adapters[ADAPTER].state.version < 1 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        assert agg.adapters[ADAPTER].state.manifest["task_ids"] == [task.task_id]
    finally:
        await worker.stop()
        await agg.stop()
