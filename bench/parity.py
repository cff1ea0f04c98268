"""Learning parity: rounds of three workers against one process training centrally.

Both sides start from the same fresh version 0 of an adapter over the offline default model and
train on the shipped NPC dialogue (every 10th record held out for scoring, the rest for training).

* **Distributed**: ``--rounds`` rounds; in each, three workers each train ``--local-steps`` steps on
  their own third of the training records from the current version, with the training worker's
  own function (:meth:`workers.train_worker.Trainer.train`); each delta is made, quantized to
  fp16, encoded and decoded as on the wire, validated, and folded into the aggregator's streaming
  weighted mean (:class:`npcbus.lora.WeightedMeanAccumulator`, weights by sample count and
  staleness); the mean is applied to give the next version, exactly as the aggregator does.
* **Central**: one :func:`npcbus.training.train_lora` run over all training records for the same
  total number of optimizer steps (rounds x 3 x local steps), same hyperparameters.

This runs in one process, without the broker: the broker only moves these same bytes between the
same functions (the end-to-end test covers that path), and leaving it out keeps the comparison
about learning, not scheduling. The three workers run one after another, which is what parallel
workers compute within a round (they all start from the round's version).

Figure: ``parity.heldout_loss_ratio``: ``value`` = the distributed run's held-out loss (mean per
completion token), ``baseline`` = the central run's, goal ``ratio <= 1.10``; the version-0 loss is
reported beside them. ``--quick``: fewer rounds and shorter sequences. ``--warmup-steps N``
starts both sides from a version already trained centrally for N steps (an adapter in service)
instead of the fresh version 0.

What to expect: from a fresh adapter on this small offline model the loss is still falling
steeply, and there a round of three workers' averaged deltas moves about as far as one worker's
``local_steps`` would (each worker restarts its optimizer from the round's version, and Adam's
steps have a fixed size whatever the batch), while the central run takes three times as many
sequential steps. The ratio then sits near 1.15-1.25 and shrinks only as the central run
flattens; scaling the averaged update up (a server learning rate of 2-3) overshot in trials. A
server-side optimizer (momentum or Adam over rounds, with its state persisted beside each version)
would be the next step if this gap matters.
Run: ``python -m bench.parity``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

WORKERS = 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 3 local steps, 160-token sequences")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--local-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=0,
                    help="start both sides from a version trained centrally for this many steps (0: the fresh v0)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rounds = args.rounds or (3 if args.quick else 6)
    local = args.local_steps or (3 if args.quick else 5)
    max_length = 160 if args.quick else 256

    import torch

    from bench.common import figure
    from bench.worker import _model_settings
    from npcbus import codec, lora
    from npcbus.messages import TrainingTask
    from npcbus.tasks import DATA_FILES, read_jsonl
    from npcbus.training import (
        TrainConfig,
        adapter_files,
        heldout_loss,
        load_adapter_config,
        load_adapter_state,
        new_adapter_files,
        train_lora,
    )
    from workers.train_worker import Trainer, TrainWorkerSettings

    torch.set_num_threads(int(os.environ.get("TRAIN_THREADS", "1") or 1))
    model_settings = _model_settings()
    trainer = Trainer(model_settings, TrainWorkerSettings.from_env({}, worker_id="parity"))
    model, tok = trainer.model, trainer.tokenizer

    records = read_jsonl(DATA_FILES / "npc_dialogue.jsonl")
    held = records[::10]
    train = [r for i, r in enumerate(records) if i % 10]
    shards = [train[w::WORKERS] for w in range(WORKERS)]
    hyper = {"lr": args.lr, "batch_size": args.batch_size, "max_length": max_length, "lr_schedule": "constant"}

    tmp = Path(tempfile.mkdtemp(prefix="npcbus-parity-"))

    def write_version(n: int, files: dict[str, bytes]) -> Path:
        d = tmp / f"v{n}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        return d

    v0 = write_version(0, new_adapter_files(trainer.base_path, seed=7))
    cfg = load_adapter_config(v0)
    state0 = load_adapter_state(v0)
    spec = lora.AdapterSpec.from_state("npc", state0)

    def score(state) -> float:
        from peft import PeftModel

        d = tempfile.mkdtemp(dir=tmp)
        for name, data in adapter_files(state, cfg).items():
            (Path(d) / name).write_bytes(data)
        nonlocal model
        pm = PeftModel.from_pretrained(model, d)
        try:
            return heldout_loss(pm, tok, held, max_length=max_length)
        finally:
            model = pm.unload()
            trainer.model = model

    if args.warmup_steps:
        warm = train_lora(model, tok, train, TrainConfig.from_hyperparams(hyper, max_steps=args.warmup_steps, seed=2),
                          init_adapter_state=state0, peft_config=cfg)
        state0 = warm.adapter_state
        v0 = write_version(100, adapter_files(state0, cfg))
    loss0 = score(state0)
    t0 = time.perf_counter()
    state, path = state0, v0
    for r in range(rounds):
        acc = lora.WeightedMeanAccumulator(spec.shapes)
        for w in range(WORKERS):
            task = TrainingTask(task_id=f"parity-r{r}-w{w}", adapter="npc", data={"examples": shards[w]}, steps=local,
                                hyperparams=hyper)
            res = trainer.train(path, shards[w], task)
            wire = codec.encode(lora.make_delta(res.delta, adapter="npc", base_version=r, num_samples=res.num_samples,
                                                task_id=task.task_id, worker_id=f"w{w}", metrics=res.metrics))
            delta = codec.decode(wire)
            rej = lora.validate_delta(delta, spec, current_version=r, max_staleness=0)
            if rej is not None:
                raise SystemExit(f"delta rejected: {rej}")
            acc.add(delta, lora.delta_weight(delta.num_samples, r, delta.base_version))
        state = lora.apply_delta(state, acc.result())
        path = write_version(r + 1, adapter_files(state, cfg))
        print(f"# round {r + 1}: held-out {score(state):.4f}", file=sys.stderr)
    fed_s = time.perf_counter() - t0
    fed_loss = score(state)

    total = rounds * WORKERS * local
    t1 = time.perf_counter()
    central = train_lora(model, tok, train, TrainConfig.from_hyperparams(hyper, max_steps=total, seed=1),
                         init_adapter_state=state0, peft_config=cfg)
    central_s = time.perf_counter() - t1
    central_loss = score(central.adapter_state)
    print(json.dumps({"v0_loss": round(loss0, 4), "distributed_loss": round(fed_loss, 4),
                      "central_loss": round(central_loss, 4), "distributed_s": round(fed_s, 1),
                      "central_s": round(central_s, 1)}), file=sys.stderr)
    f = figure("parity.heldout_loss_ratio", fed_loss, central_loss, "<=1.10", v0_loss=round(loss0, 6),
               rounds=rounds, workers=WORKERS, local_steps=local, total_steps=total,
               warmup_steps=args.warmup_steps,
               mode="in-process: worker training function + aggregator's streaming weighted mean, fp16 wire, no broker")
    return 0 if f["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
