"""Learning parity: rounds of three workers against one process training centrally.

Both sides start from the same fresh version 0 of an adapter over the offline default model and
train on the shipped NPC dialogue (every 10th record held out for scoring, the rest for training).

* **Distributed**: ``--rounds`` rounds; in each, three workers each train ``--local-steps`` steps on
  their own third of the training records from the current version, with the training worker's
  own function (:meth:`workers.train_worker.Trainer.train`); each delta is made, quantized to
  fp16, encoded and decoded as on the wire, validated, and folded into the aggregator's streaming
  weighted mean (:class:`npcbus.lora.WeightedMeanAccumulator`, weights by sample count and
  staleness); the mean goes through the aggregator's server optimizer and the update is applied
  to give the next version, with the aggregator's own function
  (:func:`aggregator.service.round_update`) and settings (``SERVER_OPTIMIZER``, ``SERVER_LR``,
  ``SERVER_MOMENTUM``, ... from the environment, or ``--server-optimizer``, ``--server-lr``,
  ``--server-momentum``).
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

What to expect (see also the aggregator's ``SERVER_OPTIMIZER``): from a fresh adapter on this
small offline model the loss is still falling steeply, and there the distributed run after ``r``
rounds scores what the central run scores after ``r x local_steps`` steps, i.e. after as many
*sequential* steps (full run, held-out loss: central after 5 / 10 / 15 / 30 steps 7.93 / 7.17 /
6.82 / 6.15; distributed after rounds 1 / 2 / 3 / 6: 7.99 / 7.15 / 6.64 / 6.21). Three workers'
averaged deltas move about as far as one worker's task, and what is missing is the central
run's other two thirds of sequential steps, not the restarts of the workers' optimizer (one
worker alone, restarting Adam every 5 steps for 90 steps, ends within 1.04 of central). The
deltas cannot stand in for those steps: scaling the aggregate (``SERVER_LR`` 1.5, 2) overshoots,
and the server optimizers, momentum 0.3-0.9 (plain or Nesterov) and adam (lr 0.005-0.02), give
ratios from 1.20 to 1.43, against 1.20-1.23 for ``none`` over three seeds of the workers'
batches (momentum 0.3 and Nesterov 0.5 average 1.21, ``none`` 1.22: within the seeds' spread).
From an adapter already trained for 60 steps (``--warmup-steps 60``) the ratio is 1.121 with
``none`` and 1.103 with momentum 0.3 (one seed). So the goal of 1.10 is out of the aggregator's
reach here: it would take more sequential steps per worker than a third of the central run's,
or a larger learning rate for the larger combined batch, and this comparison allows neither.
Run: ``python -m bench.parity``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

WORKERS = 3


@dataclass
class Setup:
    """What both sides share: the model, the data split, version 0 and the scoring."""

    trainer: object  # workers.train_worker.Trainer (holds the loaded base model)
    train: list
    held: list
    shards: list
    hyper: dict
    max_length: int
    cfg: dict
    spec: object  # npcbus.lora.AdapterSpec
    state0: dict
    tmp: Path
    _n: list = field(default_factory=lambda: [0])

    def write_version(self, files: dict[str, bytes]) -> Path:
        self._n[0] += 1
        d = self.tmp / f"v{self._n[0]}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        return d

    def score(self, state) -> float:
        from peft import PeftModel

        from npcbus.training import adapter_files, heldout_loss

        d = tempfile.mkdtemp(dir=self.tmp)
        for name, data in adapter_files(state, self.cfg).items():
            (Path(d) / name).write_bytes(data)
        pm = PeftModel.from_pretrained(self.trainer.model, d)
        try:
            return heldout_loss(pm, self.trainer.tokenizer, self.held, max_length=self.max_length)
        finally:
            self.trainer.model = pm.unload()


def setup(*, max_length: int, lr: float, batch_size: int, warmup_steps: int = 0) -> Setup:
    import torch

    from bench.worker import _model_settings
    from npcbus import lora
    from npcbus.tasks import DATA_FILES, read_jsonl
    from npcbus.training import (
        TrainConfig,
        load_adapter_config,
        load_adapter_state,
        new_adapter_files,
        train_lora,
    )
    from workers.train_worker import Trainer, TrainWorkerSettings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(int(os.environ.get("TRAIN_THREADS", "1") or 1))
    trainer = Trainer(_model_settings(), TrainWorkerSettings.from_env({}, worker_id="parity"))
    records = read_jsonl(DATA_FILES / "npc_dialogue.jsonl")
    held = records[::10]
    train = [r for i, r in enumerate(records) if i % 10]
    shards = [train[w::WORKERS] for w in range(WORKERS)]
    hyper = {"lr": lr, "batch_size": batch_size, "max_length": max_length, "lr_schedule": "constant"}
    tmp = Path(tempfile.mkdtemp(prefix="npcbus-parity-"))
    v0 = tmp / "v0"
    v0.mkdir()
    for name, data in new_adapter_files(trainer.base_path, seed=7).items():
        (v0 / name).write_bytes(data)
    cfg = load_adapter_config(v0)
    state0 = load_adapter_state(v0)
    if warmup_steps:
        warm = train_lora(trainer.model, trainer.tokenizer, train,
                          TrainConfig.from_hyperparams(hyper, max_steps=warmup_steps, seed=2),
                          init_adapter_state=state0, peft_config=cfg)
        state0 = warm.adapter_state
    return Setup(trainer=trainer, train=train, held=held, shards=shards, hyper=hyper, max_length=max_length, cfg=cfg,
                 spec=lora.AdapterSpec.from_state("npc", state0), state0=state0, tmp=tmp)


def distributed(ctx: Setup, rounds: int, local: int, agg_settings, log=None, tag: str = "") -> tuple[dict, list[float]]:
    """``rounds`` rounds of ``WORKERS`` workers from ``ctx.state0``, aggregated as the aggregator
    does (``agg_settings``: an :class:`aggregator.service.AggregatorSettings`). Returns the final
    weights and the held-out loss after each round. ``tag`` goes into the task ids, from which the
    workers' seeds derive (another tag: another draw of the workers' batches)."""
    from aggregator.service import round_update
    from npcbus import codec, lora
    from npcbus.messages import TrainingTask
    from npcbus.training import adapter_files

    optimizer = agg_settings.make_server_optimizer()
    state = ctx.state0
    path = ctx.write_version(adapter_files(state, ctx.cfg))
    losses = []
    for r in range(rounds):
        acc = lora.WeightedMeanAccumulator(ctx.spec.shapes)
        n_samples = 0
        for w in range(WORKERS):
            task = TrainingTask(task_id=f"parity{tag}-r{r}-w{w}", adapter="npc", data={"examples": ctx.shards[w]},
                                steps=local, hyperparams=ctx.hyper)
            res = ctx.trainer.train(path, ctx.shards[w], task)
            wire = codec.encode(lora.make_delta(res.delta, adapter="npc", base_version=r, num_samples=res.num_samples,
                                                task_id=task.task_id, worker_id=f"w{w}", metrics=res.metrics))
            delta = codec.decode(wire)
            rej = lora.validate_delta(delta, ctx.spec, current_version=r, max_staleness=0,
                                      max_norm=agg_settings.delta_norm_max or None)
            if rej is not None:
                raise SystemExit(f"delta rejected: {rej}")
            acc.add(delta, lora.delta_weight(delta.num_samples, r, delta.base_version, agg_settings.staleness_alpha))
            n_samples += delta.num_samples
        state, _ = round_update(state, optimizer, method="weighted_mean", acc=acc, num_samples=n_samples)
        path = ctx.write_version(adapter_files(state, ctx.cfg))
        losses.append(ctx.score(state))
        if log is not None:
            log(f"# round {r + 1}: held-out {losses[-1]:.4f}")
    return state, losses


def central(ctx: Setup, total_steps: int) -> dict:
    """One :func:`npcbus.training.train_lora` run over all training records for ``total_steps``."""
    from npcbus.training import TrainConfig, train_lora

    res = train_lora(ctx.trainer.model, ctx.trainer.tokenizer, ctx.train,
                     TrainConfig.from_hyperparams(ctx.hyper, max_steps=total_steps, seed=1),
                     init_adapter_state=ctx.state0, peft_config=ctx.cfg)
    return res.adapter_state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 3 local steps, 160-token sequences")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--local-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=0,
                    help="start both sides from a version trained centrally for this many steps (0: the fresh v0)")
    ap.add_argument("--server-optimizer", choices=("none", "momentum", "adam"), default=None,
                    help="override SERVER_OPTIMIZER (default: the aggregator's setting, from the environment)")
    ap.add_argument("--server-lr", type=float, default=None, help="override SERVER_LR")
    ap.add_argument("--server-momentum", type=float, default=None, help="override SERVER_MOMENTUM")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 6)
    local = args.local_steps or (3 if args.quick else 5)
    max_length = 160 if args.quick else 256

    from aggregator.service import AggregatorSettings
    from bench.common import figure

    overrides = {k: v for k, v in (("server_optimizer", args.server_optimizer), ("server_lr", args.server_lr),
                                   ("server_momentum", args.server_momentum)) if v is not None}
    agg_settings = AggregatorSettings.from_env(**overrides)
    opt_config = agg_settings.make_server_optimizer().config()
    ctx = setup(max_length=max_length, lr=args.lr, batch_size=args.batch_size, warmup_steps=args.warmup_steps)
    loss0 = ctx.score(ctx.state0)
    t0 = time.perf_counter()
    _, losses = distributed(ctx, rounds, local, agg_settings, log=lambda s: print(s, file=sys.stderr))
    fed_s = time.perf_counter() - t0
    fed_loss = losses[-1]

    total = rounds * WORKERS * local
    t1 = time.perf_counter()
    central_state = central(ctx, total)
    central_s = time.perf_counter() - t1
    central_loss = ctx.score(central_state)
    print(json.dumps({"v0_loss": round(loss0, 4), "distributed_loss": round(fed_loss, 4),
                      "central_loss": round(central_loss, 4), "distributed_s": round(fed_s, 1),
                      "central_s": round(central_s, 1)}), file=sys.stderr)
    figure("parity.heldout_loss_ratio", fed_loss, central_loss, "<=1.10", v0_loss=round(loss0, 6),
               rounds=rounds, workers=WORKERS, local_steps=local, total_steps=total,
               warmup_steps=args.warmup_steps, server_optimizer=opt_config,
               mode="in-process: worker training function + aggregator's streaming weighted mean and server "
                    "optimizer (aggregator.service.round_update), fp16 wire, no broker")
    return 0  # a missed goal is reported in the JSON line, not an error


if __name__ == "__main__":
    sys.exit(main())
