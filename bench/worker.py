"""Training worker: overhead around a task, and training-step throughput.

Runs an aggregator (serving adapter fetches, version 0 made fresh) and a training worker in this
process against the local RabbitMQ, under a throw-away namespace, on the offline default model.

* ``worker.overhead_frac``: one default task (``npcbus task publish`` defaults: 20 steps, the
  training module's default hyperparameters, a shard of the shipped NPC dialogue) handled by the
  real worker code path. ``value`` = fetch (cold: the version's files come through the bus into an
  empty cache) + accept (TaskAccepted publish and the task's ack) + encode (delta and fp16
  quantization) + publish (chunked, confirmed) seconds; ``baseline`` = the task's wall time from
  receipt to the delta's confirm; goal ``ratio <= 0.05``.
* ``worker.step_throughput``: optimizer steps per second of the worker's training function
  (:meth:`workers.train_worker.Trainer.train`, i.e. :func:`npcbus.training.train_lora` from the
  held version) against a plain PEFT loop (``get_peft_model``, AdamW, forward/backward, clip,
  step) on the very same batches (same tokenization, same order, same LoRA config and starting
  weights), timed over the step loop only, interleaved, best of ``--repeats``; goal ``>= 0.95``.

``--quick``: 4 steps, sequences cut to 256 tokens, one repeat (the overhead fraction then refers
to a shorter task than the default and is reported as such). Run: ``python -m bench.worker``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid

DEFAULT_STEPS = 20


def _model_settings():
    from npcbus.model import ensure_test_model
    from npcbus.settings import ModelSettings

    if os.environ.get("BASE_MODEL") or os.environ.get("MODEL_DIR"):
        return ModelSettings.from_env()
    return ModelSettings.from_env({}, model_dir=str(ensure_test_model()))


def plain_peft_steps(base_model, tokenizer, adapter_path, records, config) -> float:
    """Seconds for ``config.max_steps`` steps of a plain PEFT loop on the batches train_lora takes."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from npcbus.training import _collate, _Order, _pad_id, encode_examples, load_adapter_config, load_adapter_state

    cfg = load_adapter_config(adapter_path)
    known = set(LoraConfig.__dataclass_fields__)
    lcfg = LoraConfig(**{k: v for k, v in cfg.items() if k in known and k not in ("peft_type",)})
    lcfg.inference_mode = False
    examples = encode_examples(records, tokenizer, config.max_length)
    pad = _pad_id(tokenizer)
    torch.manual_seed(config.seed)
    model = get_peft_model(base_model, lcfg)
    try:
        set_peft_model_state_dict(model, {k: torch.as_tensor(v) for k, v in load_adapter_state(adapter_path).items()})
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        order = _Order(len(examples), config.seed)
        model.train()
        t0 = time.perf_counter()
        for _ in range(config.max_steps):
            opt.zero_grad(set_to_none=True)
            ids, mask, labels = _collate([examples[i] for i in order.take(config.batch_size)], pad)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
        return time.perf_counter() - t0
    finally:
        model.unload()


async def run(quick: bool, repeats: int) -> list[dict]:
    import torch

    from aggregator.service import Aggregator, AggregatorSettings
    from bench.common import figure
    from npcbus.bus import Bus
    from npcbus.settings import BusSettings
    from npcbus.tasks import build_tasks, publish_task_messages, task_examples
    from workers.train_worker import Trainer, TrainWorker, TrainWorkerSettings

    torch.set_num_threads(int(os.environ.get("TRAIN_THREADS", "1") or 1))
    steps = 4 if quick else DEFAULT_STEPS
    hyper = {"max_length": 256} if quick else {}
    ns = f"bench-worker-{uuid.uuid4().hex[:8]}"
    bus_settings = BusSettings.from_env(dict(os.environ, NPCBUS_NAMESPACE=ns))
    model_settings = _model_settings()
    tmp = tempfile.mkdtemp(prefix="npcbus-bench-worker-")
    agg = Aggregator(AggregatorSettings.from_env({}, adapters=["npc"], checkpoint_dir=f"{tmp}/ckpt",
                                                 num_tasks_per_round=100),
                     bus_settings, model_settings)
    ws = TrainWorkerSettings.from_env({}, worker_id="bench-w1", cache_dir=f"{tmp}/cache")
    trainer = await asyncio.to_thread(Trainer, model_settings, ws)
    worker = TrainWorker(ws, bus_settings, model_settings, trainer=trainer)
    client = Bus(bus_settings, name="bench")
    figures = []
    try:
        await agg.start()
        await client.connect()
        await client.declare_topology()
        await worker.start()
        task = build_tasks("npc", path="npc_dialogue.jsonl", num_tasks=4, steps=steps, hyperparams=hyper)[0]
        await publish_task_messages(client, [task])
        end = time.monotonic() + 1800
        while not worker.last_timings and time.monotonic() < end:
            await asyncio.sleep(0.05)
        t = worker.last_timings
        if not t:
            raise SystemExit("the worker did not finish the task")
        overhead = t["fetch_s"] + t["accept_s"] + t["encode_s"] + t["publish_s"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}), file=sys.stderr)
        figures.append(figure("worker.overhead_frac", overhead, t["wall_s"], "<=0.05", steps=steps,
                              default_task=not quick, **{k: round(v, 4) for k, v in t.items() if k.endswith("_s")}))

        # step throughput: the worker's training function vs a plain PEFT loop, same batches
        records = task_examples(task.data)
        held = worker.held["npc"].path
        config = Trainer.config_for(task)
        ours, plain = [], []
        for _ in range(repeats):
            res = await asyncio.to_thread(_worker_loop_seconds, trainer, held, records, task)
            ours.append(res)
            plain.append(await asyncio.to_thread(plain_peft_steps, trainer.model, trainer.tokenizer, held, records,
                                                 config))
        ours_sps, plain_sps = steps / min(ours), steps / min(plain)
        figures.append(figure("worker.step_throughput", ours_sps, plain_sps, ">=0.95", steps=steps, unit="steps/s",
                              repeats=repeats))
    finally:
        await worker.stop()
        await agg.stop()
        await _cleanup(client, ns)
    return figures


def _worker_loop_seconds(trainer, held, records, task) -> float:
    """Seconds of train_lora's step loop inside the worker's training function."""
    result = trainer.train(held, records, task)
    return float(result.metrics["duration_s"])


async def _cleanup(client, ns: str) -> None:
    topo = client.topology
    try:
        names = [q.name for q in topo.shared_queues()]
        ch = await client._conn.channel()
        for n in names:
            try:
                await ch.queue_delete(n)
            except Exception:  # noqa: BLE001
                ch = await client._conn.channel()
        for ex in topo.exchanges():
            try:
                await ch.exchange_delete(ex.name)
            except Exception:  # noqa: BLE001
                ch = await client._conn.channel()
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 steps, short sequences, one repeat")
    ap.add_argument("--repeats", type=int, default=None, help="throughput repeats (default 1 quick, 2 full)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    asyncio.run(run(args.quick, args.repeats or (1 if args.quick else 2)))
    return 0  # a missed goal is reported in the JSON lines, not an error


if __name__ == "__main__":
    sys.exit(main())
