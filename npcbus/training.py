"""Local LoRA fine-tuning with PEFT: the core that ``npcbus train`` and the training worker share.

* :func:`train_lora` trains a LoRA adapter over a base model on examples and returns the adapter's
  weights (names as PEFT saves them) and training metrics. The base model is wrapped for the run
  and unwrapped again afterwards, so one loaded model serves task after task.
* :func:`heldout_loss` scores a model (with or without an adapter) on records.
* :func:`save_adapter` / :func:`load_adapter_state` / :func:`new_adapter_files` read and write PEFT
  folders (``adapter_config.json`` + ``adapter_model.safetensors``), the format that
  ``PeftModel.from_pretrained`` and vLLM load.

Examples are dicts of one of three kinds:

* NPC turns ``{"request": ..., "response": ...}``: the prompt is exactly what inference builds
  (:func:`npcbus.npc.format_training_example`), the completion is the canonical JSON response
  plus the end-of-sequence token, and the loss covers the completion tokens only;
* ``{"prompt": ..., "completion": ...}``: the same, with the texts given;
* plain text ``{"text": ...}``: bos + text + eos, loss on every token.

:func:`load_examples` reads them from JSON-lines files (any of the kinds above) and ``.txt``
files (documents separated by blank lines) with ``datasets``, from local files only.

Heavy imports (torch, transformers, peft, datasets) happen inside the functions.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npcbus.logs import get_logger

log = get_logger("npcbus.training")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"
SCHEDULES = ("constant", "cosine", "linear")
IGNORE_INDEX = -100


class TrainingError(RuntimeError):
    """Training cannot run as asked (bad data, no GPU for quantized loading, a diverged loss...)."""


# --------------------------------------------------------------------------------------------
# configuration and results
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyperparameters of one LoRA fine-tuning run."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 2048
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    #: hyperparameter names accepted by :meth:`from_hyperparams` besides the field names
    ALIASES = {"lr": "learning_rate", "r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "targets": "target_modules", "schedule": "lr_schedule", "warmup": "warmup_steps",
               "steps": "max_steps", "gradient_accumulation_steps": "grad_accum", "grad_accumulation": "grad_accum",
               "max_seq_len": "max_length"}

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        self.target_modules = tuple(self.target_modules)
        checks = [
            (self.rank >= 1, "rank must be >= 1"),
            (self.alpha > 0, "alpha must be > 0"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (len(self.target_modules) > 0, "target_modules must not be empty"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0: no clipping)"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @classmethod
    def from_hyperparams(cls, hyperparams: Mapping[str, Any] | None = None, **overrides: Any) -> TrainConfig:
        """A config from a task's hyperparameters (field names or the aliases ``lr``, ``steps``, ...);
        unknown names raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in {**(hyperparams or {}), **overrides}.items():
            name = cls.ALIASES.get(key, key)
            if name not in names:
                raise ValueError(f"unknown hyperparameter {key!r}; known: {', '.join(sorted(names | set(cls.ALIASES)))}")
            kwargs[name] = value
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in list(kwargs.items()):
            if types[name] in ("int", int) and isinstance(value, float) and value.is_integer():
                kwargs[name] = int(value)
        return cls(**kwargs)

    def lora_config(self, base_model_name_or_path: str = ""):
        """The ``peft.LoraConfig`` of this run."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
                          base_model_name_or_path=base_model_name_or_path or None)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class TrainResult:
    """What :func:`train_lora` produced.

    ``adapter_state``: the trained LoRA tensors (float32 numpy arrays, named as in
    ``adapter_model.safetensors``). ``peft_config``: the adapter's ``adapter_config.json`` as a
    dict. ``metrics``: ``loss_mean``, ``loss_last``, ``grad_norm_mean``, ``steps``,
    ``duration_s``, ``samples``, ``tokens``, ``tokens_per_s``, ``lr_last`` (numbers only).
    """

    adapter_state: dict[str, np.ndarray]
    peft_config: dict[str, Any]
    metrics: dict[str, float]
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def load_examples(paths: str | os.PathLike | Sequence[str | os.PathLike]):
    """A ``datasets.Dataset`` of examples from local ``.jsonl`` / ``.json`` and ``.txt`` files.

    JSON-lines files hold NPC turns, prompt/completion or ``{"text": ...}`` records (one kind per
    file); a ``.txt`` file gives one ``{"text": ...}`` example per blank-line separated document.
    """
    from datasets import concatenate_datasets, load_dataset

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    parts = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise TrainingError(f"no data file at {path}")
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".json", ".txt"):
            raise TrainingError(f"{path}: unsupported data file (use .jsonl, .json or .txt)")
        # read as text, one record per line (JSON) or per blank-line separated document (.txt); a
        # JSON record stays a string, since NPC requests vary in shape and Arrow columns cannot
        ds = load_dataset("text", data_files=str(path), split="train",
                          sample_by="paragraph" if suffix == ".txt" else "line")
        ds = ds.filter(lambda r: bool(r["text"].strip()))
        if suffix == ".txt":
            ds = ds.map(lambda r: {"json": json.dumps({"text": r["text"].strip()}, ensure_ascii=False)},
                        remove_columns=ds.column_names)
        else:
            ds = ds.rename_column("text", "json")
            for n, line in enumerate(ds["json"], 1):
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise TrainingError(f"{path}: record {n}: not JSON: {e}") from None
                if not isinstance(rec, dict):
                    raise TrainingError(f"{path}: record {n} is not a JSON object")
        if len(ds) == 0:
            raise TrainingError(f"{path} holds no records")
        parts.append(ds)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def as_records(data: Any) -> list[dict]:
    """Examples as a list of dicts, from a list of dicts or a dataset made by :func:`load_examples`."""
    if hasattr(data, "column_names"):  # a datasets.Dataset
        if "json" in data.column_names:
            return [json.loads(s) for s in data["json"]]
        return [dict(r) for r in data]
    records = list(data)
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise TrainingError(f"example {i} is a {type(r).__name__}, not a record")
    return records


@dataclass
class _Example:
    input_ids: list[int]
    labels: list[int]


def _encode_example(record: Mapping[str, Any], tokenizer, max_length: int) -> _Example:
    eos = tokenizer.eos_token_id
    if "request" in record and "response" in record:
        from npcbus.npc import format_training_example

        prompt, completion = format_training_example(dict(record), tokenizer)
    elif "prompt" in record and "completion" in record:
        prompt, completion = str(record["prompt"]), str(record["completion"])
    elif "text" in record:
        ids = tokenizer(str(record["text"]), add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = (bos + ids + ([eos] if eos is not None else []))[:max_length]
        return _Example(ids, list(ids))
    else:
        raise TrainingError(f"unknown example kind (keys {sorted(record)[:5]}): want request/response, "
                            "prompt/completion or text")
    # prompts are tokenized as the inference engines do: as is, no special tokens added (a chat
    # template writes its own bos)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    if len(c_ids) >= max_length:
        raise _TooLong(f"a completion of {len(c_ids)} tokens does not fit max_length {max_length}")
    keep = max_length - len(c_ids)
    if len(p_ids) > keep:
        p_ids = p_ids[len(p_ids) - keep:]  # keep the prompt's end, next to the completion
    return _Example(p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids)


class _TooLong(ValueError):
    pass


def encode_examples(records: Iterable[Mapping[str, Any]], tokenizer, max_length: int = 2048) -> list[_Example]:
    """Tokenize examples: input ids and labels (``-100`` where no loss is taken). A prompt too long
    for ``max_length`` loses its beginning; an example whose completion alone does not fit is
    skipped (with a warning)."""
    out = []
    skipped = 0
    for i, r in enumerate(records):
        try:
            out.append(_encode_example(r, tokenizer, max_length))
        except _TooLong:
            skipped += 1
        except TrainingError:
            raise
        except ValueError as e:
            raise TrainingError(f"example {i}: {e}") from e
    if skipped:
        log.warning("examples skipped: completion longer than max_length", skipped=skipped, max_length=max_length)
    if not out:
        raise TrainingError(f"no usable examples (skipped {skipped} whose completion exceeds max_length "
                            f"{max_length})" if skipped else "no examples")
    if not any(any(t != IGNORE_INDEX for t in e.labels) for e in out):
        raise TrainingError("no example has a token to learn")
    return out


def _collate(batch: Sequence[_Example], pad_id: int):
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids, mask, labels


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


class _Order:
    """Deterministic, resumable example order: a fresh permutation per epoch from the seed."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.n).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
            out.append(self._perm[self.pos])
            self.pos += 1
        return out


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): a linear warmup to 1 over
    ``warmup_steps``, then constant, or a cosine or linear decay that would reach 0 at ``max_steps``."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _state_to_numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from npcbus.lora import as_numpy

    return {k: np.ascontiguousarray(as_numpy(v), dtype=np.float32) for k, v in state.items()}


def _peft_config_dict(peft_config) -> dict[str, Any]:
    if isinstance(peft_config, Mapping):
        return dict(peft_config)
    d = peft_config.to_dict()
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def _as_lora_config(peft_config):
    if isinstance(peft_config, Mapping):
        from peft import LoraConfig

        d = {k: v for k, v in peft_config.items() if k not in ("peft_type", "auto_mapping", "peft_version")}
        known = {f.name for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{k: v for k, v in d.items() if k in known})
    return peft_config


def train_lora(
    base_model,
    tokenizer,
    data: Any,
    config: TrainConfig | None = None,
    *,
    init_adapter_state: Mapping[str, Any] | None = None,
    peft_config: Any = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    tensorboard_dir: str | os.PathLike | None = None,
    progress_bar: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter over ``base_model`` on ``data``; return its weights and metrics.

    ``data``: example records (see the module docstring) or a dataset from :func:`load_examples`.
    ``init_adapter_state``: start from these LoRA weights (an adapter's current version) instead of
    a fresh initialisation; ``peft_config`` (a ``LoraConfig`` or an ``adapter_config.json`` dict)
    then describes them, else ``config`` does. ``progress`` is called after every optimizer step
    with ``step``, ``steps``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``elapsed_s``.
    ``checkpoint_dir`` with ``config.checkpoint_every`` saves resumable checkpoints; ``resume``
    continues from the latest one there. ``should_stop`` is polled between steps: True ends the run
    early (``TrainResult.stopped_early``). ``base_model`` is left as it was (the LoRA layers are
    removed again at the end), with its parameters frozen.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = config or TrainConfig()
    if getattr(base_model, "peft_config", None):
        raise TrainingError("base_model already carries adapters; pass the plain base model")
    records = as_records(data)
    examples = encode_examples(records, tokenizer, config.max_length)
    pad_id = _pad_id(tokenizer)
    lora_cfg = copy.deepcopy(_as_lora_config(peft_config)) if peft_config is not None else config.lora_config(
        str(getattr(base_model, "name_or_path", "") or ""))
    lora_cfg.inference_mode = False
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume_from = latest_checkpoint(ckpt_root) if (resume and ckpt_root is not None) else None
    if resume and ckpt_root is not None and resume_from is None:
        log.info("no checkpoint to resume from; starting fresh", checkpoint_dir=str(ckpt_root))

    device = next(base_model.parameters()).device
    was_training = base_model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        model = _wrap(get_peft_model, base_model, lora_cfg)
        try:
            if init_adapter_state is not None:
                _load_into(model, init_adapter_state, set_peft_model_state_dict)
            return _train_loop(model, examples, config, pad_id, device, progress=progress, ckpt_root=ckpt_root,
                               resume_from=resume_from, tensorboard_dir=tensorboard_dir, progress_bar=progress_bar,
                               should_stop=should_stop, n_records=len(records),
                               get_state=lambda: get_peft_model_state_dict(model),
                               set_state=lambda s: _load_into(model, s, set_peft_model_state_dict),
                               config_dict=_peft_config_dict(lora_cfg))
        finally:
            model.unload()
            base_model.train(was_training)


def _wrap(get_peft_model, model, lora_cfg):
    try:
        return get_peft_model(model, lora_cfg)
    except ValueError as e:  # peft's errors for targets that match nothing, bad ranks, ...
        raise TrainingError(f"cannot add LoRA layers {sorted(lora_cfg.target_modules or [])}: {e}") from e


def _load_into(model, state: Mapping[str, Any], setter) -> None:
    import torch

    expected = {k: tuple(v.shape) for k, v in _current_lora_state(model).items()}
    given = {k: tuple(np.shape(v)) for k, v in state.items()}
    if given != expected:
        missing = sorted(set(expected) - set(given))[:3]
        extra = sorted(set(given) - set(expected))[:3]
        wrong = [k for k in set(given) & set(expected) if given[k] != expected[k]][:3]
        raise TrainingError(f"adapter weights do not match the LoRA config: missing {missing}, unexpected {extra}, "
                            f"wrong shape {wrong}")
    tensors = {k: torch.as_tensor(np.asarray(v)) if not hasattr(v, "detach") else v for k, v in state.items()}
    setter(model, tensors)


def _current_lora_state(model) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _train_loop(model, examples, config: TrainConfig, pad_id: int, device, *, progress, ckpt_root, resume_from,
                tensorboard_dir, progress_bar, should_stop, n_records, get_state, set_state,
                config_dict) -> TrainResult:
    import torch
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the LoRA config selects no trainable parameters (check target_modules)")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    order = _Order(len(examples), config.seed)
    step = 0
    totals = {"loss_sum": 0.0, "grad_norm_sum": 0.0, "samples": 0, "tokens": 0, "elapsed": 0.0}
    losses: list[float] = []
    if resume_from is not None:
        state = torch.load(resume_from / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)
        saved = state.get("peft_config", {})
        for key in ("r", "target_modules"):
            a, b = saved.get(key), config_dict.get(key)
            if (sorted(a) if isinstance(a, list) else a) != (sorted(b) if isinstance(b, list) else b):
                raise TrainingError(f"checkpoint {resume_from} was made with {key}={a!r}, this run has {b!r}")
        set_state(load_adapter_state(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        order = _Order(len(examples), config.seed, state["order"]["epoch"], state["order"]["pos"])
        totals = dict(state["totals"])
        losses = list(state["losses"])
        log.info("resumed from checkpoint", checkpoint=str(resume_from), step=step)

    writer = None
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tensorboard_dir))
    bar = tqdm(total=config.max_steps, initial=step, disable=not progress_bar, unit="step", dynamic_ncols=True,
               desc="train")
    model.train()
    t_start = time.monotonic() - totals["elapsed"]
    last_loss = losses[-1] if losses else math.nan
    last_lr = scheduler.get_last_lr()[0]
    stopped = False
    try:
        while step < config.max_steps:
            if should_stop is not None and should_stop():
                stopped = True
                log.info("training stopped early", step=step)
                break
            t_step = time.monotonic()
            optimizer.zero_grad(set_to_none=True)
            micro = [order.take(config.batch_size) for _ in range(config.grad_accum)]
            # loss = mean over the learned tokens of the whole optimizer step
            n_learn = sum(sum(1 for t in examples[i].labels[1:] if t != IGNORE_INDEX) for m in micro for i in m)
            step_loss = 0.0
            step_tokens = 0
            for idx in micro:
                ids, mask, labels = _collate([examples[i] for i in idx], pad_id)
                ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                loss_sum = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="sum")
                (loss_sum / max(1, n_learn)).backward()
                step_loss += float(loss_sum.detach())
                step_tokens += int(mask.sum())
            loss = step_loss / max(1, n_learn)
            if not math.isfinite(loss):
                raise TrainingError(f"the loss became {loss} at step {step + 1}; lower the learning rate")
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            last_lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            losses.append(loss)
            last_loss = loss
            totals["loss_sum"] += loss
            totals["grad_norm_sum"] += grad_norm if math.isfinite(grad_norm) else 0.0
            totals["samples"] += sum(len(m) for m in micro)
            totals["tokens"] += step_tokens
            now = time.monotonic()
            totals["elapsed"] = now - t_start
            tok_s = step_tokens / max(now - t_step, 1e-9)
            info = {"step": step, "steps": config.max_steps, "loss": round(loss, 5), "lr": last_lr,
                    "grad_norm": round(grad_norm, 5), "tokens_per_s": round(tok_s, 1),
                    "elapsed_s": round(totals["elapsed"], 2)}
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
            if writer is not None:
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", last_lr, step)
                writer.add_scalar("train/grad_norm", grad_norm, step)
                writer.add_scalar("train/tokens_per_s", tok_s, step)
            if progress is not None:
                progress(info)
            if ckpt_root is not None and config.checkpoint_every and (
                    step % config.checkpoint_every == 0 or step == config.max_steps):
                _save_checkpoint(ckpt_root, step, get_state(), config_dict, config, optimizer, scheduler, order,
                                 totals, losses)
    finally:
        bar.close()
        if writer is not None:
            writer.flush()
            writer.close()
        model.eval()

    done = len(losses)
    duration = totals["elapsed"]
    metrics = {
        "loss_mean": totals["loss_sum"] / done if done else math.nan,
        "loss_last": last_loss,
        "grad_norm_mean": totals["grad_norm_sum"] / done if done else math.nan,
        "steps": float(step),
        "duration_s": round(duration, 3),
        "samples": float(totals["samples"]),
        "tokens": float(totals["tokens"]),
        "tokens_per_s": round(totals["tokens"] / duration, 1) if duration > 0 else 0.0,
        "lr_last": float(last_lr),
        "num_examples": float(n_records),
    }
    return TrainResult(adapter_state=_state_to_numpy(get_state()), peft_config=config_dict, metrics=metrics,
                       losses=losses, stopped_early=stopped)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    try:
        return int(name[len(CHECKPOINT_PREFIX):])
    except ValueError:
        return None


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = _checkpoint_step(p)
        if step is not None and p.is_dir() and (p / TRAINER_STATE_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
            found.append((step, p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """The newest complete checkpoint under ``checkpoint_dir`` (None when there is none)."""
    if checkpoint_dir is None:
        return None
    ckpts = list_checkpoints(checkpoint_dir)
    return ckpts[-1] if ckpts else None


def _save_checkpoint(root: Path, step: int, state, config_dict, config: TrainConfig, optimizer, scheduler,
                     order: _Order, totals, losses) -> Path:
    import torch

    dest = root / f"{CHECKPOINT_PREFIX}{step:06d}"

    def write_state(tmp: Path) -> None:
        torch.save({
            "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "order": {"epoch": order.epoch, "pos": order.pos},
            "totals": dict(totals), "losses": list(losses), "train_config": config.as_dict(),
            "peft_config": config_dict,
        }, tmp / TRAINER_STATE_FILE)

    save_adapter(dest, state, config_dict, extra=write_state)
    for old in list_checkpoints(root)[:-config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint saved", path=str(dest), step=step)
    return dest


# --------------------------------------------------------------------------------------------
# PEFT folders
# --------------------------------------------------------------------------------------------


def adapter_files(state: Mapping[str, Any], peft_config: Any) -> dict[str, bytes]:
    """The two files of a PEFT adapter folder, as bytes: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (float32 tensors)."""
    from safetensors.numpy import save

    cfg = _peft_config_dict(peft_config)
    cfg.setdefault("peft_type", "LORA")
    tensors = _state_to_numpy(state)
    return {
        CONFIG_FILE: (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(),
        WEIGHTS_FILE: save(tensors, metadata={"format": "pt"}),
    }


def save_adapter(path: str | os.PathLike, state: Mapping[str, Any], peft_config: Any,
                 extra: Callable[[Path], None] | None = None) -> Path:
    """Write a PEFT adapter folder at ``path`` from LoRA tensors and their config.

    ``state`` maps names as in ``adapter_model.safetensors`` to numpy arrays or torch tensors;
    ``peft_config`` is a ``LoraConfig`` or an ``adapter_config.json`` dict. A new folder is written
    beside ``path`` and renamed into place, so a reader never sees half of it; in an existing
    folder each file is replaced atomically (other files there, e.g. checkpoints, stay). ``extra``
    may add files before they move into place.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name, data in adapter_files(state, peft_config).items():
            (tmp / name).write_bytes(data)
        if extra is not None:
            extra(tmp)
        if dest.is_dir():
            for f in tmp.iterdir():
                os.replace(f, dest / f.name)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_adapter_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The LoRA tensors of a PEFT adapter folder, as float32 numpy arrays."""
    from safetensors.numpy import load_file

    p = Path(path) / WEIGHTS_FILE
    if not p.is_file():
        raise TrainingError(f"{Path(path)} is not a PEFT adapter folder (no {WEIGHTS_FILE})")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in load_file(str(p)).items()}


def load_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT adapter folder, as a dict."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise TrainingError(f"{Path(path)} is not a PEFT adapter folder (no {CONFIG_FILE})")
    return json.loads(p.read_text(encoding="utf-8"))


def new_adapter_files(base_model: str, *, rank: int = 8, alpha: float = 16.0,
                      targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0,
                      dropout: float = 0.05) -> dict[str, bytes]:
    """The PEFT files of a fresh LoRA adapter over ``base_model`` (a local folder or hub name).

    The base model is built on torch's meta device (its weights are never read), so this is cheap
    for any size. Initialised as PEFT does by default, from ``seed``: ``lora_A`` uniform in
    ``+-1/sqrt(fan_in)`` (Kaiming-uniform with a=sqrt(5)), ``lora_B`` zero, so the fresh adapter
    leaves the model's output unchanged.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    src = str(base_model)
    local = Path(src).expanduser().is_dir()
    model_config = AutoConfig.from_pretrained(str(Path(src).expanduser()) if local else src, local_files_only=local)
    cfg = TrainConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=tuple(targets))
    lora_cfg = cfg.lora_config(src)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
        peft_model = _wrap(get_peft_model, skeleton, lora_cfg)
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if "lora_embedding_A" in name:
            t = torch.zeros(shape)
        elif "lora_embedding_B" in name:
            t = torch.randn(shape, generator=gen)
        elif "lora_A" in name:
            bound = 1.0 / math.sqrt(shape[1])
            t = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        else:
            t = torch.zeros(shape)
        state[name] = t.numpy()
    return adapter_files(state, lora_cfg)


# --------------------------------------------------------------------------------------------
# evaluation and loading
# --------------------------------------------------------------------------------------------


def heldout_loss(model, tokenizer, records: Any, *, max_length: int = 2048, batch_size: int = 8) -> float:
    """Mean loss per learned token of ``model`` on ``records`` (completion tokens for NPC and
    prompt/completion records, every token for text), without gradients."""
    import torch

    examples = encode_examples(as_records(records), tokenizer, max_length)
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                ids, mask, labels = _collate(examples[i:i + batch_size], pad_id)
                ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                total += float(torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="sum"))
                count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise TrainingError("no tokens to score")
    return total / count


def quantization_unavailable(load_in_4bit: bool = False, load_in_8bit: bool = False) -> str | None:
    """Why 4-bit / 8-bit loading cannot run here (None when it can, or when neither is asked)."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        return "choose one of --load-in-4bit and --load-in-8bit"
    what = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return (f"{what} needs a CUDA GPU (bitsandbytes quantization runs on CUDA only), and torch sees none here; "
                "drop the flag to train in full precision on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{what} needs the bitsandbytes package: pip install 'npcbus[quant]'"
    return None


def load_base_model_for_training(name_or_path: str, *, load_in_4bit: bool = False, load_in_8bit: bool = False,
                                 dtype: Any = "float32", device: str = "cpu"):
    """``(model, tokenizer)`` for :func:`train_lora`; optionally 4-bit (NF4) or 8-bit quantized with
    bitsandbytes, which needs a CUDA GPU: without one this raises :class:`TrainingError` saying so,
    before anything is loaded."""
    why = quantization_unavailable(load_in_4bit, load_in_8bit)
    if why is not None:
        raise TrainingError(why)
    from npcbus.model import load_model_and_tokenizer, load_tokenizer

    if not (load_in_4bit or load_in_8bit):
        return load_model_and_tokenizer(name_or_path, dtype=dtype, device=device)

    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = str(name_or_path)
    local = Path(src).expanduser().is_dir()
    if load_in_4bit:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    tokenizer = load_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(str(Path(src).expanduser()) if local else src,
                                                 quantization_config=qcfg, device_map={"": 0},
                                                 local_files_only=local, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer
