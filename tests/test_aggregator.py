"""The aggregator against the real local RabbitMQ: bad deltas, rounds, leases, fetches.

Version 0 is a small synthetic adapter (PEFT file layout, made with numpy), so these tests need no
base model and no torch; the end-to-end flow with real training is in test_training_flow.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import aio_pika
import numpy as np
import pytest

from aggregator.service import Aggregator, AggregatorSettings
from aggregator.state import CheckpointStore, LeaseBook, safetensors_to_tensors, tensors_to_safetensors
from npcbus import lora
from npcbus.adapter_store import AdapterCache, content_hash, fetch_adapter
from npcbus.bus import Bus
from npcbus.codec import decode, encode
from npcbus.messages import TaskAccepted, TrainingTask
from npcbus.settings import ModelSettings
from npcbus.tasks import build_tasks, reissue, task_examples
from npcbus.topology import H_REJECT_CODE, H_REJECT_REASON

from .conftest import read_queue as read_queue_at

ADAPTER = "npc"
NAMES = [f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"
         for i in range(2) for m in ("q", "v") for ab in ("A", "B")]
RANK, HIDDEN = 4, 48


def synthetic_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for n in NAMES:
        shape = (RANK, HIDDEN) if "lora_A" in n else (HIDDEN, RANK)
        out[n] = (rng.standard_normal(shape) * 0.1).astype(np.float32) if "lora_A" in n else np.zeros(shape, np.float32)
    return out


def synthetic_files() -> dict[str, bytes]:
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": "synthetic", "task_type": "CAUSAL_LM"}
    return {"adapter_config.json": json.dumps(cfg).encode(),
            "adapter_model.safetensors": tensors_to_safetensors(synthetic_state())}


def rand_delta(seed: int, scale: float = 1e-2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return {n: (rng.standard_normal(s.shape) * scale).astype(np.float32) for n, s in synthetic_state().items()}


def settings(tmp_path, **kw) -> AggregatorSettings:
    base = dict(adapters=[ADAPTER], checkpoint_dir=str(tmp_path / "ckpt"), num_tasks_per_round=2,
                min_updates_per_round=1, round_timeout_s=60.0, tick_interval_s=0.2, max_staleness=0,
                delta_norm_max=5.0, server_optimizer="none")  # exact aggregates; the server optimizer is tested apart
    base.update(kw)
    return AggregatorSettings.from_env({}, **base)


async def start_aggregator(bus_settings, tmp_path, **kw) -> Aggregator:
    agg = Aggregator(settings(tmp_path, **kw), bus_settings, ModelSettings.from_env({}), initial_files=synthetic_files())
    await agg.start()
    return agg


async def read_queue(bus: Bus, queue: str, n: int, timeout: float = 15.0) -> list:
    return await read_queue_at(bus.settings.amqp_url, queue, n, timeout)


async def wait_for(pred, timeout: float = 15.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def publish_delta(bus, d):
    return bus.publish(bus.topology.train_exchange, "delta", d)


def good(seed: int, *, base_version: int = 0, quant: str = "fp16", delta_id: str | None = None,
         task_id: str | None = None, num_samples: int = 8) -> lora.Delta:
    return lora.make_delta(rand_delta(seed), adapter=ADAPTER, base_version=base_version, num_samples=num_samples,
                           quant=quant, delta_id=delta_id or f"good-{seed}", task_id=task_id or f"task-{seed}",
                           worker_id=f"w{seed}", metrics={"loss_mean": 2.0, "loss_last": 1.9, "steps": 3})


def bad_deltas() -> list[tuple[str, lora.Delta]]:
    """(expected reason code, delta) for every check that does not need a newer version."""
    out = []
    d = good(1, delta_id="unknown-adapter")
    d.adapter = "nobody"
    out.append(("unknown_adapter", d))
    d = good(2, delta_id="names")
    d.tensors = dict(d.tensors)
    d.tensors["base_model.model.extra.weight"] = d.tensors.pop(NAMES[0])
    out.append(("tensor_names", d))
    d = good(3, delta_id="shape")
    d.tensors = dict(d.tensors)
    d.tensors[NAMES[0]] = np.zeros((RANK + 1, HIDDEN), np.float16)
    out.append(("tensor_shape", d))
    d = good(4, delta_id="dtype")
    d.tensors = {k: v.astype(np.float32) for k, v in d.tensors.items()}  # fp32 values under quant=fp16
    out.append(("tensor_dtype", d))
    bad = rand_delta(5)
    bad[NAMES[1]][0, 0] = np.nan
    out.append(("non_finite", lora.make_delta(bad, adapter=ADAPTER, base_version=0, num_samples=8, quant="fp32",
                                              delta_id="nan", task_id="task-nan", worker_id="w")))
    d = good(6, delta_id="metric-nan")
    d.metrics = {"loss_mean": math.nan}
    out.append(("non_finite_metrics", d))
    out.append(("norm_too_large", lora.make_delta(rand_delta(7, scale=1.0), adapter=ADAPTER, base_version=0,
                                                  num_samples=8, delta_id="huge", task_id="task-huge")))
    out.append(("unknown_base_version", good(8, base_version=5, delta_id="future")))
    d = good(9, delta_id="zero-samples")
    d.num_samples = 0
    out.append(("bad_num_samples", d))
    d = good(10, delta_id="bad-quant", quant="int8")
    d.scales = {}
    out.append(("bad_quant", d))
    return out


async def dead_by_id(bus, n: int, timeout: float = 20.0) -> dict[str, dict]:
    msgs = await read_queue(bus, bus.topology.dead_queue.name, n, timeout)
    out = {}
    for m in msgs:
        d = decode(m.body)
        out[d.delta_id] = {"code": m.headers.get(H_REJECT_CODE), "reason": m.headers.get(H_REJECT_REASON)}
    return out


# ------------------------------------------------------------------------------------------------
# pure state (no broker)
# ------------------------------------------------------------------------------------------------


def test_checkpoint_store_commit_reload_and_pointer(tmp_path):
    store = CheckpointStore(tmp_path)
    st0 = store.create_initial(ADAPTER, synthetic_files(), base_model="synthetic")
    assert st0.version == 0 and st0.applied_delta_ids == set()
    new = lora.apply_delta(st0.tensors, rand_delta(1))
    st1 = store.commit(st0, new, delta_ids=["a", "b"], task_ids=["t1", ""], deltas=[], metrics={"x": 1.0})
    assert st1.version == 1 and st1.applied_delta_ids == {"a", "b"} and st1.applied_task_ids == {"t1"}
    m = store.manifest(ADAPTER, 1)
    assert m["parent"] == 0 and m["delta_ids"] == ["a", "b"] and m["content_hash"] == st1.content_hash
    v, _, files = store.read_files(ADAPTER)
    assert v == 1 and content_hash(files) == st1.content_hash
    # a crash after the folder rename but before the pointer: the folder wins, the pointer is fixed
    (tmp_path / ADAPTER / "current").write_text(json.dumps({"version": 0}))
    again = store.load(ADAPTER)
    assert again.version == 1 and again.applied_delta_ids == {"a", "b"}
    assert json.loads((tmp_path / ADAPTER / "current").read_text())["version"] == 1
    np.testing.assert_array_equal(again.tensors[NAMES[0]], st1.tensors[NAMES[0]])
    # leftovers of an interrupted folder write are ignored; versions are immutable
    (tmp_path / ADAPTER / ".v2.tmpabc").mkdir()
    assert store.versions(ADAPTER) == [0, 1]
    with pytest.raises(Exception, match="immutable"):
        store._commit(ADAPTER, 1, 0, files, {})


def _fp32(delta: lora.Delta) -> dict[str, np.ndarray]:
    return lora.delta_tensors_fp32(delta)


def test_checkpoint_store_keeps_server_optimizer_state_with_each_version(tmp_path):
    from aggregator.state import SERVER_STATE_FILE, StateError

    store = CheckpointStore(tmp_path)
    st0 = store.create_initial(ADAPTER, synthetic_files(), base_model="synthetic")
    assert st0.server_state == {} and st0.server_kind == ""
    opt = lora.ServerOptimizer("adam", lr=0.01)
    upd = opt.step(rand_delta(1))
    st1 = store.commit(st0, lora.apply_delta(st0.tensors, upd), delta_ids=["a"], task_ids=["t1"], deltas=[],
                       metrics={}, server_config=opt.config(), server_state=opt.state_dict())
    m = store.manifest(ADAPTER, 1)
    block = m["server_optimizer"]
    assert block["kind"] == "adam" and block["step"] == 1 and block["lr"] == 0.01 and block["file"] == SERVER_STATE_FILE
    assert (tmp_path / ADAPTER / "v1" / SERVER_STATE_FILE).is_file()
    # the state is kept beside the adapter, not in it: fetched files and content hash are the adapter's
    v, _, files = store.read_files(ADAPTER)
    assert v == 1 and set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert content_hash(files) == st1.content_hash == m["content_hash"] and SERVER_STATE_FILE not in m["hashes"]
    again = store.load(ADAPTER)
    assert again.server_kind == "adam" and again.server_state.keys() == opt.state_dict().keys()
    for k, arr in opt.state_dict().items():
        np.testing.assert_array_equal(again.server_state[k], arr)
    # resuming from disk continues exactly where the optimizer in memory would
    resumed = lora.ServerOptimizer("adam", lr=0.01)
    resumed.load_state_dict(again.server_state)
    nxt = rand_delta(2)
    want, got = opt.copy().step(nxt), resumed.step(nxt)
    for n in NAMES:
        np.testing.assert_array_equal(got[n], want[n])

    # a kind without per-tensor state records its step count only
    plain = lora.ServerOptimizer("none")
    plain.load_state_dict({"step": np.array([1], np.int64)})
    st2 = store.commit(again, lora.apply_delta(again.tensors, plain.step(nxt)), delta_ids=["b"], task_ids=[],
                       deltas=[], metrics={}, server_config=plain.config(), server_state=plain.state_dict())
    assert not (tmp_path / ADAPTER / "v2" / SERVER_STATE_FILE).exists()
    assert store.manifest(ADAPTER, 2)["server_optimizer"] == {"kind": "none", "lr": 1.0, "step": 2}
    back = store.load(ADAPTER)
    assert back.server_kind == "none" and back.server_state["step"].tolist() == [2]

    # a version folder whose state file fails its hash is refused, like its weights would be
    mom = lora.ServerOptimizer("momentum")
    mom.step(nxt)
    store.commit(st2, lora.apply_delta(st2.tensors, nxt), delta_ids=["c"], task_ids=[], deltas=[], metrics={},
                 server_config=mom.config(), server_state=mom.state_dict())
    bad = tmp_path / ADAPTER / "v3" / SERVER_STATE_FILE
    bad.write_bytes(bad.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(StateError, match="server_optimizer"):
        store.load(ADAPTER)
    bad.unlink()
    with pytest.raises(StateError, match="missing"):
        store.load(ADAPTER)


def test_aggregator_resumes_its_server_optimizer_or_starts_fresh(tmp_path):
    from npcbus.settings import BusSettings

    store = CheckpointStore(tmp_path / "ckpt")
    st0 = store.create_initial(ADAPTER, synthetic_files(), base_model="synthetic")
    opt = lora.ServerOptimizer("momentum", momentum=0.5)
    opt.step(rand_delta(1))
    st1 = store.commit(st0, st0.tensors, delta_ids=["a"], task_ids=[], deltas=[], metrics={},
                       server_config=opt.config(), server_state=opt.state_dict())

    def resume(**kw):
        agg = Aggregator(settings(tmp_path, **kw), BusSettings.from_env({}), ModelSettings.from_env({}))
        return agg._resume_optimizer(store.load(ADAPTER))

    same = resume(server_optimizer="momentum", server_momentum=0.5)
    assert same.steps == 1
    np.testing.assert_array_equal(same.state_dict()[f"m/{NAMES[0]}"], rand_delta(1)[NAMES[0]])
    for kind in ("adam", "none"):
        other = resume(server_optimizer=kind)
        assert other.kind == kind and other.steps == 0  # another optimizer: its own fresh state
    assert resume(server_optimizer="momentum").steps == 1 and st1.server_kind == "momentum"
    s = AggregatorSettings.from_env({"SERVER_OPTIMIZER": "adam", "SERVER_LR": "0.02", "SERVER_MOMENTUM": "0.8",
                                     "SERVER_BETA2": "0.9", "SERVER_EPS": "1e-7"})
    assert s.make_server_optimizer().config() == {"kind": "adam", "lr": 0.02, "momentum": 0.8, "beta2": 0.9,
                                                  "eps": 1e-7}
    from npcbus.settings import SettingsError

    # SERVER_LR 0 (the default): the kind's own scale, a factor of 1 or adam's 0.01 in weight units
    assert AggregatorSettings.from_env({}).make_server_optimizer().config() == {"kind": "none", "lr": 1.0}
    assert AggregatorSettings.from_env({"SERVER_OPTIMIZER": "adam"}).make_server_optimizer().lr == 0.01
    assert AggregatorSettings.from_env({"SERVER_OPTIMIZER": "momentum"}).make_server_optimizer().config() == {
        "kind": "momentum", "lr": 1.0, "momentum": 0.3, "nesterov": False}
    for env in ({"SERVER_OPTIMIZER": "sgd"}, {"SERVER_LR": "-1"}, {"SERVER_MOMENTUM": "1"}, {"SERVER_BETA2": "-0.1"},
                {"SERVER_EPS": "0"}):
        with pytest.raises(SettingsError, match=next(iter(env))):
            AggregatorSettings.from_env(env)


def test_lease_book_roundtrip(tmp_path):
    from aggregator.state import Lease

    book = LeaseBook(tmp_path / "leases.json")
    book.put(Lease("t1", ADAPTER, "w1", 0, 1.0, 2.0, {"task_id": "t1"}))
    book.save()
    again = LeaseBook(tmp_path / "leases.json")
    assert again.get("t1").worker_id == "w1" and [x.task_id for x in again.expired(3.0)] == ["t1"]
    assert again.expired(1.5) == []


def test_build_tasks_split_and_reissue():
    ex = [{"text": f"line {i}"} for i in range(7)]
    tasks = build_tasks(ADAPTER, examples=ex, num_tasks=3, steps=5, hyperparams={"lr": 1e-3}, deadline_s=60)
    got = [r["text"] for t in tasks for r in task_examples(t.data)]
    assert sorted(got) == sorted(r["text"] for r in ex) and len({t.task_id for t in tasks}) == 3
    assert all(t.deadline and t.deadline > time.time() for t in tasks)
    again = reissue(tasks[0])
    assert again.task_id == tasks[0].task_id and again.attempt == 1 and again.data == tasks[0].data
    refs = build_tasks(ADAPTER, path="x.jsonl", num_tasks=2, steps=1)
    assert [t.data for t in refs] == [{"path": "x.jsonl", "shard": 0, "num_shards": 2},
                                      {"path": "x.jsonl", "shard": 1, "num_shards": 2}]


def test_settings_validation():
    from npcbus.settings import SettingsError

    with pytest.raises(SettingsError, match="ROUND_TIMEOUT_SEC"):
        AggregatorSettings.from_env({"ROUND_TIMEOUT_SEC": "3600"})
    with pytest.raises(SettingsError, match="MIN_UPDATES_PER_ROUND"):
        AggregatorSettings.from_env({"NUM_TASKS_PER_ROUND": "2", "MIN_UPDATES_PER_ROUND": "3"})
    with pytest.raises(SettingsError, match="AGGREGATION"):
        AggregatorSettings.from_env({"AGGREGATION": "max"})
    s = AggregatorSettings.from_env({"ADAPTERS": "a,b", "AGGREGATION": "mean", "NUM_TASKS_PER_ROUND": "3"})
    assert s.adapters == ["a", "b"] and s.method == "weighted_mean" and s.prefetch >= 2 * 3 * 8


# ------------------------------------------------------------------------------------------------
# through the broker
# ------------------------------------------------------------------------------------------------


@pytest.mark.broker
async def test_bad_deltas_are_rejected_with_reasons_and_do_not_change_the_adapter(bus, bus_settings, tmp_path):
    agg = await start_aggregator(bus_settings, tmp_path)
    try:
        v0 = agg.adapters[ADAPTER].state
        cases = bad_deltas()
        for _code, d in cases:
            await publish_delta(bus, d)
        # a delta whose sender the broker did not authenticate: published without a user id
        unauth = good(11, delta_id="no-user")
        conn = await aio_pika.connect(bus_settings.amqp_url)
        try:
            ch = await conn.channel()
            ex = await ch.get_exchange(bus.topology.train_exchange)
            await ex.publish(aio_pika.Message(encode(unauth), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                             routing_key="delta")
        finally:
            await conn.close()
        expected = {d.delta_id: code for code, d in cases} | {"no-user": "unauthorized_sender"}
        dead = await dead_by_id(bus, len(expected))
        assert {k: v["code"] for k, v in dead.items()} == expected
        assert all(v["reason"] for v in dead.values())
        assert "L2 norm" in dead["huge"]["reason"] and "user id" in dead["no-user"]["reason"]
        ad = agg.adapters[ADAPTER]
        assert ad.state.version == 0 and not ad.round.entries and ad.state.content_hash == v0.content_hash
        assert agg.store.versions(ADAPTER) == [0]
        from prometheus_client import REGISTRY

        assert REGISTRY.get_sample_value("npcbus_aggregator_deltas_rejected_total",
                                         {"adapter": ADAPTER, "reason": "norm_too_large"}) >= 1

        # two good deltas (chunked on the wire) close a round: v1 = v0 + their weighted mean, only
        chunky = Bus(bus_settings.__class__.from_env({"AMQP_URL": bus_settings.amqp_url,
                                                      "NPCBUS_NAMESPACE": bus_settings.namespace,
                                                      "CHUNK_BYTES": "1024"}), name="chunky")
        await chunky.connect()
        try:
            g1, g2 = good(21, num_samples=10), good(22, num_samples=30, quant="int8")
            await publish_delta(chunky, g1)
            await publish_delta(chunky, g2)
        finally:
            await chunky.close()
        await wait_for(lambda: agg.adapters[ADAPTER].state.version == 1, what="version 1")
        st1 = agg.adapters[ADAPTER].state
        m = agg.store.manifest(ADAPTER, 1)
        assert sorted(m["delta_ids"]) == ["good-21", "good-22"] and m["parent"] == 0
        assert m["metrics"]["num_deltas"] == 2 and m["metrics"]["num_samples"] == 40
        want = lora.apply_delta(v0.tensors, lora.aggregate([g1, g2], [10, 30]))
        for n in NAMES:
            np.testing.assert_allclose(st1.tensors[n], want[n], rtol=1e-5, atol=1e-6)

        # now: stale base (MAX_STALENESS=0), a redelivered applied delta, a second delta for a task
        await publish_delta(bus, good(31, base_version=0, delta_id="stale"))
        await publish_delta(bus, g1)
        await publish_delta(bus, good(32, base_version=1, delta_id="same-task", task_id=g2.task_id))
        dead = await dead_by_id(bus, 3)
        assert {k: v["code"] for k, v in dead.items()} == {"stale": "stale", g1.delta_id: "duplicate",
                                                           "same-task": "duplicate"}
        assert agg.adapters[ADAPTER].state.version == 1 and not agg.adapters[ADAPTER].round.entries

        # the bus serves both versions by content hash
        cache = AdapterCache(tmp_path / "cache")
        got = await fetch_adapter(bus, cache, ADAPTER, None, timeout=10)
        assert got.version == 1 and got.content_hash == st1.content_hash
        raw = safetensors_to_tensors((got.path / "adapter_model.safetensors").read_bytes())
        np.testing.assert_array_equal(raw[NAMES[0]], st1.tensors[NAMES[0]])
        got0 = await fetch_adapter(bus, cache, ADAPTER, 0, timeout=10)
        assert got0.content_hash == v0.content_hash
    finally:
        await agg.stop()


@pytest.mark.broker
async def test_sender_allow_list(bus, bus_settings, tmp_path):
    agg = await start_aggregator(bus_settings, tmp_path, allowed_senders=["trainer-svc"])
    try:
        await publish_delta(bus, good(1))
        dead = await dead_by_id(bus, 1)
        assert dead["good-1"]["code"] == "unauthorized_sender" and "ALLOWED_SENDERS" in dead["good-1"]["reason"]
    finally:
        await agg.stop()


@pytest.mark.broker
async def test_timeout_closes_round_at_minimum_and_median(bus, bus_settings, tmp_path):
    agg = await start_aggregator(bus_settings, tmp_path, num_tasks_per_round=3, min_updates_per_round=2,
                                 round_timeout_s=1.0, aggregation="median")
    try:
        ds = [good(i) for i in (1, 2)]
        for d in ds:
            await publish_delta(bus, d)
        await wait_for(lambda: agg.adapters[ADAPTER].state.version == 1, what="timeout close")
        m = agg.store.manifest(ADAPTER, 1)
        assert m["metrics"]["closed_by"] == "timeout" and m["aggregation"] == "median"
        want = lora.apply_delta(synthetic_state(), lora.coordinate_median(ds))
        np.testing.assert_allclose(agg.adapters[ADAPTER].state.tensors[NAMES[0]], want[NAMES[0]], atol=1e-6)
    finally:
        await agg.stop()


@pytest.mark.broker
async def test_expired_round_dead_letters_and_expired_lease_reissues_task(bus, bus_settings, tmp_path):
    agg = await start_aggregator(bus_settings, tmp_path, num_tasks_per_round=3, min_updates_per_round=2,
                                 round_timeout_s=0.5)
    try:
        task = build_tasks(ADAPTER, examples=[{"text": "hello"}], steps=1, lease_s=0.5)[0]
        other = build_tasks(ADAPTER, examples=[{"text": "bye"}], steps=1, lease_s=0.5)[0]
        for t in (task, other):
            acc = TaskAccepted(task_id=t.task_id, adapter=ADAPTER, worker_id="w-dead", base_version=0,
                               lease_s=t.lease_s, task={k: v for k, v in vars(t).items()})
            await bus.publish(bus.topology.train_exchange, "accepted", acc)
        # a delta arrives for `other`, but the round expires below its minimum of 2
        await publish_delta(bus, good(1, task_id=other.task_id))
        reissued = await read_queue(bus, bus.topology.tasks_queue.name, 2, timeout=20)
        got = sorted((decode(m.body) for m in reissued), key=lambda t: t.task_id)
        assert {t.task_id for t in got} == {task.task_id, other.task_id}
        assert all(isinstance(t, TrainingTask) and t.attempt == 1 for t in got)
        assert all(t.data in (task.data, other.data) for t in got)
        dead = await read_queue(bus, bus.topology.dead_queue.name, 1)
        assert decode(dead[0].body).delta_id == "good-1"
        assert agg.adapters[ADAPTER].state.version == 0 and len(agg.leases) == 0
    finally:
        await agg.stop()


@pytest.mark.broker
async def test_restart_recognises_applied_deltas_and_reannounces(bus, bus_settings, tmp_path):
    from npcbus.messages import VersionAnnouncement

    agg = await start_aggregator(bus_settings, tmp_path, num_tasks_per_round=1)
    try:
        await publish_delta(bus, good(1))
        await wait_for(lambda: agg.adapters[ADAPTER].state.version == 1, what="version 1")
    finally:
        await agg.stop()
    heard: list[VersionAnnouncement] = []
    spec = bus.topology.listener_queue("versions", "t" + bus.client_id, bus.topology.versions_exchange)
    await bus.consume(spec, lambda m, d: _collect(heard, m), prefetch=10)
    agg2 = await start_aggregator(bus_settings, tmp_path, num_tasks_per_round=1)
    try:
        await wait_for(lambda: any(a.version == 1 for a in heard), what="re-announcement")
        assert agg2.adapters[ADAPTER].state.version == 1
        await publish_delta(bus, good(1))  # the same delta again (as after a lost ack)
        dead = await dead_by_id(bus, 1)
        assert dead["good-1"]["code"] == "duplicate"
        assert agg2.store.versions(ADAPTER) == [0, 1]
    finally:
        await agg2.stop()


@pytest.mark.broker
async def test_current_versions_are_announced_again_for_late_listeners(bus, bus_settings, tmp_path):
    """A consumer that starts after the aggregator announced (an inference engine that takes its time)
    still hears of every adapter within REANNOUNCE_INTERVAL_SEC; 0 turns the repeats off."""
    from npcbus.messages import VersionAnnouncement

    agg = await start_aggregator(bus_settings, tmp_path, reannounce_interval_s=0.5)
    try:
        await asyncio.sleep(0.3)  # the start's announcement has gone by; this listener comes later
        heard: list[VersionAnnouncement] = []
        spec = bus.topology.listener_queue("versions", "late" + bus.client_id, bus.topology.versions_exchange)
        await bus.consume(spec, lambda m, d: _collect(heard, m), prefetch=10)
        await wait_for(lambda: len(heard) >= 2, timeout=5, what="two announcements of version 0")
        assert {(a.adapter, a.version) for a in heard} == {(ADAPTER, 0)}
        assert len({a.content_hash for a in heard}) == 1
    finally:
        await agg.stop()
    agg = await start_aggregator(bus_settings, tmp_path, reannounce_interval_s=0.0)
    try:
        quiet: list[VersionAnnouncement] = []
        spec = bus.topology.listener_queue("versions", "quiet" + bus.client_id, bus.topology.versions_exchange)
        await asyncio.sleep(0.3)
        await bus.consume(spec, lambda m, d: _collect(quiet, m), prefetch=10)
        await asyncio.sleep(1.5)
        assert quiet == []
    finally:
        await agg.stop()


async def _collect(out, m):
    out.append(m)


@pytest.mark.broker
async def test_stale_deltas_are_damped_by_their_staleness(bus, bus_settings, tmp_path):
    agg = await start_aggregator(bus_settings, tmp_path, num_tasks_per_round=1, max_staleness=1, staleness_alpha=1.0)
    try:
        a, b = good(1), good(2, base_version=0)
        await publish_delta(bus, a)
        await wait_for(lambda: agg.adapters[ADAPTER].state.version == 1, what="version 1")
        v1 = {k: v.copy() for k, v in agg.adapters[ADAPTER].state.tensors.items()}
        await publish_delta(bus, b)  # based on v0 while v1 is current: half its weight (alpha 1)
        await wait_for(lambda: agg.adapters[ADAPTER].state.version == 2, what="version 2")
        m = agg.store.manifest(ADAPTER, 2)
        assert m["deltas"][0]["staleness"] == 1 and m["deltas"][0]["weight"] == pytest.approx(4.0)
        want = lora.apply_delta(v1, lora.delta_tensors_fp32(b), scale=0.5)
        for n in NAMES:
            np.testing.assert_allclose(agg.adapters[ADAPTER].state.tensors[n], want[n], rtol=1e-5, atol=1e-6)
    finally:
        await agg.stop()


@pytest.mark.broker
async def test_server_momentum_survives_a_restart_and_steps_once_per_round(bus, bus_settings, tmp_path):
    kw = dict(num_tasks_per_round=1, max_staleness=1, server_optimizer="momentum", server_momentum=0.5, server_lr=0.8)
    agg = await start_aggregator(bus_settings, tmp_path, **kw)
    a, b = good(1), good(2, base_version=1)
    try:
        v0 = {k: v.copy() for k, v in agg.adapters[ADAPTER].state.tensors.items()}
        await publish_delta(bus, a)
        await wait_for(lambda: agg.adapters[ADAPTER].state.version == 1, what="version 1")
        v1 = agg.adapters[ADAPTER].state.tensors
        for n in NAMES:  # first round: velocity = a, update = lr * a
            np.testing.assert_allclose(v1[n], v0[n] + 0.8 * _fp32(a)[n], rtol=1e-5, atol=1e-7)
        m = agg.store.manifest(ADAPTER, 1)
        assert m["server_optimizer"]["step"] == 1 and m["metrics"]["update_norm"] == pytest.approx(
            0.8 * m["metrics"]["aggregate_norm"], rel=1e-5)
    finally:
        await agg.stop()
    agg2 = await start_aggregator(bus_settings, tmp_path, **kw)
    try:
        ad = agg2.adapters[ADAPTER]
        assert ad.state.version == 1 and ad.optimizer.steps == 1
        np.testing.assert_array_equal(ad.optimizer.state_dict()[f"m/{NAMES[0]}"], _fp32(a)[NAMES[0]])
        await publish_delta(bus, a)  # the first round's delta again, as after a lost ack: not applied, not stepped
        dead = await dead_by_id(bus, 1)
        assert dead["good-1"]["code"] == "duplicate"
        assert ad.state.version == 1 and ad.optimizer.steps == 1
        v1 = {k: v.copy() for k, v in ad.state.tensors.items()}
        await publish_delta(bus, b)
        await wait_for(lambda: agg2.adapters[ADAPTER].state.version == 2, what="version 2")
        st2 = agg2.adapters[ADAPTER].state
        for n in NAMES:  # second round: velocity = 0.5 * a + b
            want = v1[n] + 0.8 * (0.5 * _fp32(a)[n] + _fp32(b)[n])
            np.testing.assert_allclose(st2.tensors[n], want, rtol=1e-5, atol=1e-6)
        assert agg2.store.manifest(ADAPTER, 2)["server_optimizer"]["step"] == 2 and agg2.adapters[ADAPTER].optimizer.steps == 2
    finally:
        await agg2.stop()
