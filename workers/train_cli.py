"""``npcbus train``: fine-tune a LoRA adapter locally on a data set.

Examples::

    # the shipped NPC dialogue data on the offline default model
    npcbus train --adapter-name innkeeper --max-steps 50

    # your own data, resumable checkpoints, TensorBoard logs
    npcbus train --data turns.jsonl lore.txt --adapter-name guard --output-dir runs/guard \\
        --checkpoint-every 20 --tensorboard-dir runs/tb --lr 5e-4 --lr-schedule cosine --warmup-steps 10
    npcbus train ... --resume-latest        # continue from the newest checkpoint in OUTPUT_DIR/checkpoints

Data files: JSON lines of NPC turns (``{"request": ..., "response": ...}``), of
``{"prompt": ..., "completion": ...}`` or of ``{"text": ...}``, and ``.txt`` files (documents
separated by blank lines). A slice of the data is held out (``--heldout``) and scored before and
after training. The adapter is saved in PEFT format (``adapter_config.json`` +
``adapter_model.safetensors``) in ``--output-dir``, which ``PeftModel.from_pretrained`` and vLLM
load. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_DATA = "npc_dialogue.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--data", nargs="+", default=[DEFAULT_DATA], metavar="PATH",
                        help="Data files (.jsonl/.json/.txt); a name not found as a path is looked up in the "
                             "package's data_files.")
    parser.add_argument("--base-model", default="",
                        help="Base model name or path (default: BASE_MODEL, else the offline default model in "
                             "MODEL_DIR, built on demand).")
    parser.add_argument("--adapter-name", default="npc", help="Name of the adapter (also names the output folder).")
    parser.add_argument("--output-dir", default="",
                        help="Where the adapter is saved (default: runs/adapters/ADAPTER_NAME); checkpoints go "
                             "to OUTPUT_DIR/checkpoints.")
    parser.add_argument("--init-adapter", default="",
                        help="Start from this PEFT adapter folder (its LoRA config wins over --rank/--alpha/...).")
    g = parser.add_argument_group("LoRA")
    g.add_argument("--target-modules", default="q_proj,v_proj", help="Comma-separated module names to adapt.")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r.")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r).")
    g.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout.")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=1e-3, help="Peak learning rate (AdamW).")
    g.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="cosine",
                   help="Schedule after the warmup.")
    g.add_argument("--warmup-steps", type=int, default=0, help="Linear warmup steps.")
    g.add_argument("--max-steps", type=int, default=100, help="Optimizer steps.")
    g.add_argument("--batch-size", type=int, default=4, help="Examples per micro-batch.")
    g.add_argument("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--max-length", type=int, default=2048,
                   help="Tokens per example; longer prompts lose their beginning.")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay.")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="Gradient clipping (0: none).")
    g.add_argument("--seed", type=int, default=0, help="Seed of the LoRA init, data order and dropout.")
    g = parser.add_argument_group("run")
    g.add_argument("--heldout", type=float, default=0.1,
                   help="Fraction of the records held out for evaluation (0: none; at most 200 records).")
    g.add_argument("--checkpoint-every", type=int, default=0, help="Save a resumable checkpoint every N steps (0: never).")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="How many checkpoints to keep.")
    g.add_argument("--resume-latest", action="store_true",
                   help="Continue from the newest checkpoint in OUTPUT_DIR/checkpoints (fresh start when there is none).")
    g.add_argument("--tensorboard-dir", default="", help="Write TensorBoard logs here.")
    g.add_argument("--no-progress", action="store_true", help="No progress bar.")
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available).")
    g.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, float16 or auto (bfloat16 on a GPU that supports it, else float32).")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-in-4bit", action="store_true", help="Load the base model 4-bit (NF4, bitsandbytes; CUDA only).")
    q.add_argument("--load-in-8bit", action="store_true", help="Load the base model 8-bit (bitsandbytes; CUDA only).")


def _resolve_data(paths: list[str]) -> list[Path]:
    from npcbus.tasks import DATA_FILES

    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists() and not path.is_absolute() and (DATA_FILES / p).exists():
            path = DATA_FILES / p
        out.append(path)
    return out


def _split_heldout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    import numpy as np

    if fraction <= 0 or len(records) < 2:
        return records, []
    n = min(200, max(1, int(round(len(records) * fraction))), len(records) - 1)
    order = np.random.default_rng(seed).permutation(len(records))
    held = set(order[:n].tolist())
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def run(args: argparse.Namespace) -> int:
    from npcbus.logs import get_logger, setup_logging
    from npcbus.settings import BusSettings
    from npcbus.training import TrainingError, quantization_unavailable

    bus = BusSettings.from_env()
    setup_logging(bus.log_format, bus.log_level)
    log = get_logger("npcbus.train", adapter=args.adapter_name)

    # refuse quantized loading without a GPU before loading anything
    why = quantization_unavailable(args.load_in_4bit, args.load_in_8bit)
    if why is not None:
        print(f"npcbus train: error: {why}", file=sys.stderr)
        return 2
    try:
        return _run(args, log)
    except TrainingError as e:
        print(f"npcbus train: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, log) -> int:
    from npcbus.model import resolve_base_model
    from npcbus.settings import ModelSettings
    from npcbus.training import (
        TrainConfig,
        TrainingError,
        as_records,
        heldout_loss,
        load_adapter_config,
        load_adapter_state,
        load_base_model_for_training,
        load_examples,
        save_adapter,
        train_lora,
    )

    try:
        config = TrainConfig(
            rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=args.target_modules,
            learning_rate=args.lr, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
            max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
            max_length=args.max_length, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
            seed=args.seed, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    output_dir = Path(args.output_dir or Path("runs") / "adapters" / args.adapter_name)
    records = as_records(load_examples(_resolve_data(args.data)))
    train_records, held = _split_heldout(records, args.heldout, args.seed)

    init_state = peft_config = None
    if args.init_adapter:
        init_state = load_adapter_state(args.init_adapter)
        peft_config = load_adapter_config(args.init_adapter)

    base = args.base_model or resolve_base_model(ModelSettings.from_env())
    device, dtype = _device_and_dtype(args.device, args.dtype)
    log.info("loading base model", base_model=base, device=device, dtype=dtype,
             quantized="4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None)
    model, tokenizer = load_base_model_for_training(base, load_in_4bit=args.load_in_4bit,
                                                    load_in_8bit=args.load_in_8bit, dtype=dtype, device=device)
    before = heldout_loss(model, tokenizer, held, max_length=config.max_length) if held else None
    log.info("training", examples=len(train_records), heldout=len(held), steps=config.max_steps,
             heldout_loss_before=before, output_dir=str(output_dir))
    result = train_lora(model, tokenizer, train_records, config, init_adapter_state=init_state,
                        peft_config=peft_config, checkpoint_dir=output_dir / "checkpoints",
                        resume=args.resume_latest, tensorboard_dir=args.tensorboard_dir or None,
                        progress_bar=not args.no_progress)
    peft_cfg = dict(result.peft_config)
    peft_cfg["base_model_name_or_path"] = str(base)
    save_adapter(output_dir, result.adapter_state, peft_cfg)
    after = None
    if held:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, str(output_dir), is_trainable=False)
        try:
            after = heldout_loss(tuned, tokenizer, held, max_length=config.max_length)
        finally:
            tuned.unload()
    summary = {"adapter": args.adapter_name, "output_dir": str(output_dir), "base_model": str(base),
               "heldout_loss_before": before, "heldout_loss_after": after, **result.metrics}
    log.info("adapter saved", **summary)
    print(json.dumps(summary))
    return 0
