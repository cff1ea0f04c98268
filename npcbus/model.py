"""The offline default base model, and loading of any base model.

npcbus never downloads weights in its default setup. Instead it builds a small model of its own,
offline and deterministically, from the corpus it ships (``npcbus/corpus/*.txt``):

1. a byte-level BPE tokenizer trained on the corpus (special tokens for bos/eos/pad and the
   chat roles), wrapped as a transformers fast tokenizer with a chat template;
2. a small Llama-architecture causal LM (head size 64, which vLLM's CPU attention needs),
   initialised from a seed;
3. a short, deterministic pre-training run on the corpus (CPU, about two minutes on two cores);
4. saved in Hugging Face format (safetensors, float32) with a stamp, ``npcbus_model.json``, that
   records the seed, the parameters, the corpus hash and a hash of the weights.

Same seed, parameters, corpus and software on the same kind of CPU give identical weights. Floating
point reductions differ between CPU kinds, thread counts and library versions, so machines that
must share one base model (workers whose LoRA deltas are merged) should share one build, or
compare ``weights_sha256`` in the stamp.

Any Hugging Face model name or local path can replace the default (``BASE_MODEL``); see
:func:`resolve_base_model` and :func:`load_model_and_tokenizer`.

Heavy imports (torch, transformers, tokenizers) happen inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npcbus.logs import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from npcbus.settings import ModelSettings

log = get_logger("npcbus.model")

#: Bump when the build changes in a way that changes the weights; stale stamps then rebuild.
BUILDER_VERSION = 7
STAMP_FILE = "npcbus_model.json"
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_FILES = ("lore.txt", "dialogue.txt", "chat.txt")
#: The chat file's documents are conversations, one ``role: content`` line per message.
CHAT_FILE = "chat.txt"
DATA_DIR = Path(__file__).resolve().parent / "data_files"
#: The NPC turns of the fine-tuning and the persona adapters, and the personas they use.
SFT_FILE = "npc_sft.jsonl"
NPC_DATA_FILES = (SFT_FILE, "personas.json")
PERSONAS_DIR = "personas"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS.values()]

#: Every message is ``<|role|>\\n{content}<|eos|>``; the prompt for a reply ends ``<|assistant|>\\n``.
#: A model stops a reply by emitting eos, so HF ``generate`` and vLLM stop without extra settings.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role'] + ' (use system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class DefaultModelParams:
    """Every parameter of the default model's build; all of them are recorded in the stamp."""

    seed: int = 1234
    # tokenizer
    vocab_size: int = 4096
    # architecture (LlamaConfig); head size = hidden_size // num_heads must be >= 64 for vLLM's CPU
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 688
    max_positions: int = 2048
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # pre-training on the shipped corpus, in windows as long as the NPC prompts served
    train_steps: int = 240
    seq_len: int = 512
    batch_size: int = 8
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    #: the corpus conversations (chat.txt) appear this many times in the pre-training stream
    chat_repeat: int = 1
    # supervised fine-tuning on NPC turns (npcbus/data_files/npc_sft.jsonl) rendered exactly as
    # inference renders them; the loss is taken on the response JSON only. 0 steps: no fine-tuning
    sft_steps: int = 2200
    sft_batch_size: int = 8
    sft_learning_rate: float = 1.5e-3
    sft_warmup_steps: int = 20
    sft_max_length: int = 640
    #: each fine-tuning step also takes the language-model loss on this many pre-training windows
    #: (of ``sft_rehearsal_len`` tokens), so that fine-tuning keeps what pre-training taught
    sft_rehearsal_batch: int = 2
    sft_rehearsal_len: int = 256
    #: how NPC requests become prompts for this model (npcbus.npc.PROMPT_STYLES); recorded in its tokenizer
    prompt_style: str = "minimal"
    #: the order it writes a response's keys in (npcbus.npc.RESPONSE_ORDERS); recorded in its tokenizer.
    #: plan_first: the intent and actions, then the line (a tiny model picks the answer better so)
    response_order: str = "plan_first"
    #: the sampling it recommends for NPC turns (npcbus.npc.NPC_SAMPLING_KEY; a request's own settings win).
    #: Measured on bench.npc: cooler (0.5, top-k 10) repeats lines (distinct 78% against 84%) for little
    #: gain, so this build names the request defaults
    npc_temperature: float = 0.7
    npc_top_k: int = 50
    # one LoRA adapter per shipped persona (``personas/<id>/``), trained on that persona's turns.
    # Measured on bench.npc (builder 5): 80 steps instead of 20 took persona consistency from 25% to 32%
    # at about 15 s more per persona; 60 keeps the build near ten minutes
    persona_steps: int = 120
    persona_batch_size: int = 8
    persona_learning_rate: float = 2e-3
    persona_rank: int = 8

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.hidden_size // self.num_heads < 64:
            raise ValueError("head size (hidden_size // num_heads) must be >= 64: vLLM's CPU attention needs it")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.vocab_size < 512:
            raise ValueError("vocab_size must be >= 512")
        if self.train_steps < 0 or self.seq_len < 8 or self.batch_size < 1 or self.chat_repeat < 0:
            raise ValueError("train_steps and chat_repeat must be >= 0, seq_len >= 8 and batch_size >= 1")
        if self.sft_steps < 0 or self.sft_batch_size < 1 or self.sft_max_length < 64:
            raise ValueError("sft_steps must be >= 0, sft_batch_size >= 1 and sft_max_length >= 64")
        if self.sft_rehearsal_batch < 0 or self.sft_rehearsal_len < 8:
            raise ValueError("sft_rehearsal_batch must be >= 0 and sft_rehearsal_len >= 8")
        if self.persona_steps < 0 or self.persona_batch_size < 1 or self.persona_rank < 1:
            raise ValueError("persona_steps must be >= 0, persona_batch_size and persona_rank >= 1")
        if self.prompt_style not in ("full", "compact", "minimal"):
            raise ValueError("prompt_style must be full, compact or minimal")
        if not (0 <= self.npc_temperature <= 2 and 0 <= self.npc_top_k <= 1000):
            raise ValueError("npc_temperature must be in [0, 2] and npc_top_k in [0, 1000]")
        if self.response_order not in ("dialogue_first", "plan_first"):
            raise ValueError("response_order must be dialogue_first or plan_first")
        if self.seq_len > self.max_positions:
            raise ValueError("seq_len must be <= max_positions")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _params(**params: Any) -> DefaultModelParams:
    names = {f.name for f in dataclasses.fields(DefaultModelParams)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise TypeError(f"unknown model parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return DefaultModelParams(**{k: v for k, v in params.items() if v is not None})


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def corpus_hash(corpus_dir: Path | str = CORPUS_DIR) -> str:
    """sha256 over the names and bytes of the corpus files and of the NPC data the build fine-tunes on."""
    h = hashlib.sha256()
    paths = [Path(corpus_dir) / name for name in CORPUS_FILES] + [DATA_DIR / name for name in NPC_DATA_FILES]
    for path in paths:
        data = path.read_bytes()
        h.update(path.name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def _documents(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def corpus_texts(corpus_dir: Path | str = CORPUS_DIR) -> list[str]:
    """The corpus's prose and dialogue documents (everything but the conversations)."""
    out: list[str] = []
    for name in CORPUS_FILES:
        if name != CHAT_FILE:
            out.extend(_documents(Path(corpus_dir) / name))
    return out


def parse_chat(doc: str) -> list[dict[str, str]]:
    """Parse one conversation block (``system: ...`` / ``user: ...`` / ``assistant: ...`` lines)."""
    messages: list[dict[str, str]] = []
    for line in doc.splitlines():
        role, sep, content = line.partition(": ")
        if not sep or role not in ROLE_TOKENS:
            raise ValueError(f"bad chat line (want 'role: content'): {line[:80]!r}")
        messages.append({"role": role, "content": content})
    return messages


def corpus_chats(corpus_dir: Path | str = CORPUS_DIR) -> list[list[dict[str, str]]]:
    """The corpus's conversations as chat message lists (assistant turns are JSON NPC responses)."""
    return [parse_chat(d) for d in _documents(Path(corpus_dir) / CHAT_FILE)]


def sft_records() -> list[dict]:
    """The NPC turns the build fine-tunes on (``npcbus/data_files/npc_sft.jsonl``)."""
    lines = (DATA_DIR / SFT_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def npc_texts() -> list[str]:
    """Text of the NPC data for the tokenizer: the personas' words, the player lines, the histories
    and the response JSON, so that prompts and responses take few tokens."""
    from npcbus.npc import canonical_json

    texts = []
    for persona in json.loads((DATA_DIR / "personas.json").read_text(encoding="utf-8")).values():
        texts.append(" ".join([persona["name"], persona["description"], *persona.get("traits", []),
                               persona.get("speaking_style", ""), *persona.get("allowed_actions", []),
                               *persona.get("known_entities", [])]))
    for rec in sft_records():
        req = rec["request"]
        texts.append(req["player_input"])
        texts.extend(t["text"] for t in req.get("history", []))
        texts.append(canonical_json(rec["response"]))
    return texts


def persona_of(record: dict) -> str:
    """The persona id of an NPC record (``persona_id`` or the inline persona's id)."""
    req = record["request"]
    return req.get("persona_id") or req["persona"]["id"]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(vocab_size: int = 4096, corpus_dir: Path | str = CORPUS_DIR):
    """Train a byte-level BPE tokenizer on the corpus; return a ``PreTrainedTokenizerFast``.

    The tokenizer prepends bos to plain encodings (like Llama's); its chat template writes bos
    itself, and ``apply_chat_template`` encodes without adding special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = corpus_texts(corpus_dir)
    for conv in corpus_chats(corpus_dir):
        texts.extend(m["content"] for m in conv)
    texts.extend(npc_texts())

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _training_stream(tokenizer, chat_repeat: int = 1, corpus_dir: Path | str = CORPUS_DIR) -> list[int]:
    """All corpus documents as one token stream: ``bos doc eos`` and chat-templated conversations
    (these ``chat_repeat`` times, so that the model sees more of the JSON replies)."""
    ids: list[int] = []
    texts = corpus_texts(corpus_dir)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for doc in enc:
        ids.append(tokenizer.bos_token_id)
        ids.extend(doc)
        ids.append(tokenizer.eos_token_id)
    chats: list[int] = []
    for conv in corpus_chats(corpus_dir):
        chats.extend(_chat_ids(tokenizer, conv))
    return ids + chats * chat_repeat


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _llama_config(p: DefaultModelParams, tokenizer):
    from transformers import LlamaConfig

    # the embedding rows: the tokenizer's size rounded up to a multiple of 64
    vocab = max(len(tokenizer), 64)
    vocab = (vocab + 63) // 64 * 64
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        head_dim=p.head_dim,
        max_position_embeddings=p.max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta},
        tie_word_embeddings=p.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
        dtype="float32",
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for the block, then restore the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """No transformers progress bars inside the block (they would interleave with our log lines)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Progress:
    """Periodic progress of a training phase: a log line (and the callback) at the first and last
    step and every 10 s, with the loss, rate and ETA."""

    def __init__(self, phase: str, steps: int, callback: Callable[[dict[str, Any]], None] | None):
        self.phase, self.steps, self.callback = phase, steps, callback
        self.t0 = self.last = time.monotonic()
        self.losses: list[float] = []
        self.tokens = 0

    def step(self, loss: float, lr: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        now, done = time.monotonic(), len(self.losses)
        if done not in (1, self.steps) and now - self.last < 10.0:
            return
        self.last = now
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        info = {"phase": self.phase, "step": done, "steps": self.steps,
                "loss": round(sum(self.losses[-10:]) / len(self.losses[-10:]), 4), "lr": round(lr, 6),
                "steps_per_s": round(rate, 2), "tokens_per_s": round(self.tokens / elapsed) if elapsed > 0 else 0,
                "elapsed_s": round(elapsed, 1), "eta_s": round((self.steps - done) / rate, 1) if rate > 0 else None}
        log.info(self.phase, **{k: v for k, v in info.items() if k != "phase"})
        if self.callback is not None:
            self.callback(info)

    @property
    def final_loss(self) -> float | None:
        return round(sum(self.losses[-10:]) / len(self.losses[-10:]), 4) if self.losses else None


def _optimizer(model, lr: float, weight_decay: float):
    import torch

    decay = [t for t in model.parameters() if t.requires_grad and t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.requires_grad and t.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )


def _pretrain(model, stream: list[int], p: DefaultModelParams,
              progress: Callable[[dict[str, Any]], None] | None) -> _Progress:
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    n_windows = data.numel() - p.seq_len - 1
    if n_windows <= 0:
        raise ValueError("corpus too small for seq_len")
    gen = torch.Generator().manual_seed(p.seed + 1)
    opt = _optimizer(model, p.learning_rate, p.weight_decay)
    model.train()
    report = _Progress("pretrain", p.train_steps, progress)
    for step in range(p.train_steps):
        lr = _lr_at(step, p.train_steps, p.warmup_steps, p.learning_rate)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, n_windows, (p.batch_size,), generator=gen)
        batch = torch.stack([data[s: s + p.seq_len] for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        report.step(float(out.loss.detach()), lr, batch.numel())
    model.eval()
    return report


def _sft_batches(examples: list, batch_size: int, steps: int, seed: int) -> Iterator[list]:
    """``steps`` batches over the examples, epoch after epoch, each epoch in a seeded order; examples
    of similar length share a batch (sorted within groups of 16 batches) to pad little."""
    import random

    rng = random.Random(seed)
    made = 0
    while made < steps:
        order = list(range(len(examples)))
        rng.shuffle(order)
        group = 16 * batch_size
        batches = []
        for g in range(0, len(order), group):
            chunk = sorted(order[g: g + group], key=lambda i: len(examples[i].input_ids))
            batches += [chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        for b in batches[: steps - made]:
            yield [examples[i] for i in b]
        made += min(len(batches), steps - made)


def _finetune(model, tokenizer, records: list[dict], stream: list[int], p: DefaultModelParams,
              progress: Callable[[dict[str, Any]], None] | None) -> _Progress:
    """Full fine-tuning on NPC turns, loss on the response tokens only (the head runs on those alone),
    plus the language-model loss on a few pre-training windows per step (rehearsal): without it the
    model forgets its corpus (its perplexity on the lore rose past that of a uniform guess)."""
    import torch

    from npcbus.training import IGNORE_INDEX, _collate, encode_examples

    examples = encode_examples(records, tokenizer, p.sft_max_length)
    data = torch.tensor(stream, dtype=torch.long)
    n_windows = data.numel() - p.sft_rehearsal_len - 1
    gen = torch.Generator().manual_seed(p.seed + 4)
    opt = _optimizer(model, p.sft_learning_rate, p.weight_decay)
    model.train()
    report = _Progress("finetune", p.sft_steps, progress)
    for step, batch in enumerate(_sft_batches(examples, p.sft_batch_size, p.sft_steps, p.seed + 2)):
        lr = _lr_at(step, p.sft_steps, p.sft_warmup_steps, p.sft_learning_rate)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, mask, labels = _collate(batch, tokenizer.pad_token_id)
        # right padding under causal attention: no real token sees a pad, so no mask is needed and
        # attention takes its fast causal path
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        logits = model.lm_head(hidden[keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep])
        tokens, sft_loss = int(mask.sum()), float(loss.detach())
        if p.sft_rehearsal_batch and n_windows > 0:
            starts = torch.randint(0, n_windows, (p.sft_rehearsal_batch,), generator=gen)
            lm = torch.stack([data[s: s + p.sft_rehearsal_len] for s in starts.tolist()])
            loss = loss + model(input_ids=lm, labels=lm).loss
            tokens += lm.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        report.step(sft_loss, lr, tokens)  # the response loss alone, comparable across builds
    model.eval()
    return report


def _train_personas(model, tokenizer, records: list[dict], p: DefaultModelParams, out: Path,
                    progress: Callable[[dict[str, Any]], None] | None) -> dict[str, dict[str, Any]]:
    """One LoRA adapter per shipped persona, trained on that persona's turns, written as PEFT folders
    ``out/<persona id>/``; returns each one's training metrics."""
    from npcbus.training import TrainConfig, save_adapter, train_lora

    personas = json.loads((DATA_DIR / "personas.json").read_text(encoding="utf-8"))
    metrics: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    for i, pid in enumerate(personas):
        own = [r for r in records if persona_of(r) == pid]
        if not own:
            raise ValueError(f"no fine-tuning turns for persona {pid!r} in {SFT_FILE}")
        cfg = TrainConfig(rank=p.persona_rank, alpha=2.0 * p.persona_rank, dropout=0.0,
                          learning_rate=p.persona_learning_rate, max_steps=p.persona_steps,
                          batch_size=p.persona_batch_size, max_length=p.sft_max_length, seed=p.seed + 100 + i)
        result = train_lora(model, tokenizer, own, cfg)
        save_adapter(out / pid, result.adapter_state, result.peft_config)
        metrics[pid] = {"records": len(own), "steps": p.persona_steps,
                        "loss_last": round(float(result.metrics.get("loss_last", 0.0)), 4)}
        elapsed = time.monotonic() - t0
        info = {"phase": "personas", "step": i + 1, "steps": len(personas), "persona": pid,
                "loss": metrics[pid]["loss_last"], "elapsed_s": round(elapsed, 1),
                "eta_s": round(elapsed / (i + 1) * (len(personas) - i - 1), 1)}
        log.info("persona adapter", **{k: v for k, v in info.items() if k != "phase"})
        if progress is not None:
            progress(info)
    return metrics


def weights_hash(state_dict: dict[str, Any]) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_default_model(
    out_dir: str | os.PathLike[str],
    seed: int = 1234,
    train_steps: int | None = None,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Build the offline default model into ``out_dir``; return its stamp.

    ``out_dir`` may be new, empty or an earlier build (which is replaced); any other existing
    path raises :class:`FileExistsError`.

    ``params`` are the other fields of :class:`DefaultModelParams` (vocab_size, hidden_size,
    num_layers, num_heads, intermediate_size, seq_len, batch_size, learning_rate, ...).
    ``progress`` is called with each progress report of the pre-training (also logged). Uses no
    network. The build goes to a temporary folder beside ``out_dir`` and is renamed into place, so
    a reader never sees a half-written model.
    """
    import tokenizers
    import torch
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM

    p = _params(seed=seed, train_steps=train_steps, **params)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / STAMP_FILE).is_file())):
        # never replace something that is not an earlier build (a typo must not delete a folder)
        raise FileExistsError(f"{out} exists and holds no npcbus model ({STAMP_FILE}); "
                              "choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    chash = corpus_hash()
    log.info("model_build_start", path=str(out), seed=p.seed, steps=p.train_steps)

    from npcbus.npc import NPC_SAMPLING_KEY, PROMPT_STYLE_KEY, RESPONSE_ORDER_KEY

    tokenizer = train_tokenizer(p.vocab_size)
    tokenizer.init_kwargs[PROMPT_STYLE_KEY] = p.prompt_style
    tokenizer.init_kwargs[RESPONSE_ORDER_KEY] = p.response_order
    tokenizer.init_kwargs[NPC_SAMPLING_KEY] = {"temperature": p.npc_temperature, "top_k": p.npc_top_k}
    stream = _training_stream(tokenizer, p.chat_repeat)
    config = _llama_config(p, tokenizer)
    records = sft_records() if (p.sft_steps or p.persona_steps) else []
    with _seeded(p.seed):
        model = LlamaForCausalLM(config)
        model.to(torch.float32)
        pre = _pretrain(model, stream, p, progress)
        sft = _finetune(model, tokenizer, records, stream, p, progress) if p.sft_steps else None
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    n_params = sum(t.numel() for t in model.parameters())
    stamp = {
        "format": 1,
        "builder": BUILDER_VERSION,
        "kind": "npcbus-default",
        "seed": p.seed,
        "params": p.as_dict(),
        "corpus_sha256": chash,
        "stream_tokens": len(stream),
        "n_params": n_params,
        "tokenizer_size": len(tokenizer),
        "vocab_size": config.vocab_size,
        "prompt_style": p.prompt_style,
        "response_order": p.response_order,
        "npc_sampling": {"temperature": p.npc_temperature, "top_k": p.npc_top_k},
        "final_loss": pre.final_loss,
        "sft": {"records": len(records), "steps": p.sft_steps, "final_loss": sft.final_loss} if sft else None,
        "personas": None,
        "weights_sha256": weights_hash(model.state_dict()),
        "build_seconds": None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.mkdir(parents=True)
        with _quiet_progress_bars():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if p.persona_steps:
            model.name_or_path = str(out)
            with _seeded(p.seed + 3):
                stamp["personas"] = _train_personas(model, tokenizer, records, p, tmp / PERSONAS_DIR, progress)
        for f in tmp.rglob("*"):  # some writers create files 0600; the model is meant to be shared
            f.chmod(0o755 if f.is_dir() else 0o644)
        stamp["build_seconds"] = round(time.monotonic() - t_start, 1)
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            out.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    stamp["path"] = str(out)
    log.info("model_build_done", path=str(out), params=n_params, vocab=config.vocab_size,
             final_loss=stamp["final_loss"], sft_loss=sft.final_loss if sft else None,
             personas=len(stamp["personas"] or {}), seconds=stamp["build_seconds"])
    return stamp


# --------------------------------------------------------------------------------------------
# Stamps, idempotent builds
# --------------------------------------------------------------------------------------------

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def read_stamp(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The stamp of a default-model build at ``path``, or None if there is no complete build."""
    d = Path(path)
    try:
        stamp = json.loads((d / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or not all((d / f).is_file() for f in _REQUIRED_FILES):
        return None
    stamp["path"] = str(d.resolve())
    return stamp


def is_current(out_dir: str | os.PathLike[str], **params: Any) -> bool:
    """True if ``out_dir`` holds a complete build of exactly these parameters, builder and corpus."""
    stamp = read_stamp(out_dir)
    if stamp is None:
        return False
    p = _params(**params)
    return (stamp.get("builder") == BUILDER_VERSION and stamp.get("params") == p.as_dict()
            and stamp.get("corpus_sha256") == corpus_hash())


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """An exclusive lock beside ``out`` so that concurrent processes build once."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_default_model(out_dir: str | os.PathLike[str], *, force: bool = False,
                         progress: Callable[[dict[str, Any]], None] | None = None, **params: Any) -> Path:
    """Make sure ``out_dir`` holds the default model built with ``params``; return its path.

    Reuses an existing build whose stamp matches (parameters, builder version, corpus hash);
    otherwise (or with ``force``) builds it. Safe to call from several processes at once.
    """
    out = Path(out_dir).expanduser().resolve()
    _params(**params)  # validate before taking the lock
    if not force and is_current(out, **params):
        return out
    with _build_lock(out):
        if force or not is_current(out, **params):
            build_default_model(out, progress=progress, **params)
    return out


def default_test_model_dir() -> Path:
    """Where tests keep their shared default model: ``$NPCBUS_TEST_MODEL_DIR``, else ``.npcbus/test-model``
    in the source checkout (or the current directory when installed)."""
    env = os.environ.get("NPCBUS_TEST_MODEL_DIR")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    base = repo if (repo / "pyproject.toml").is_file() else Path.cwd()
    return base / ".npcbus" / "test-model"


def ensure_test_model() -> Path:
    """The default model (default parameters) for tests, built once and cached across runs.

    Call it from a session-scoped fixture, or before the tests (``scripts/test.sh`` does, so that
    no test's time limit includes the build); the first call builds (about ten minutes on two
    cores), later ones only read the stamp.
    """
    return ensure_default_model(default_test_model_dir())


# --------------------------------------------------------------------------------------------
# Loading any base model
# --------------------------------------------------------------------------------------------


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto") from None


def load_tokenizer(name_or_path: str | os.PathLike[str]):
    """Load a tokenizer; local folders never touch the network. Sets pad to eos when missing."""
    from transformers import AutoTokenizer

    src = str(name_or_path)
    local = Path(src).expanduser().is_dir()
    tok = AutoTokenizer.from_pretrained(str(Path(src).expanduser()) if local else src, local_files_only=local)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(name_or_path: str | os.PathLike[str], dtype: Any = "float32", device: str = "cpu"):
    """Load a causal LM and its tokenizer from a local folder or a Hugging Face name.

    A local folder is read with ``local_files_only`` (no network even without ``HF_HUB_OFFLINE``);
    a hub name goes through the hub cache (set ``HF_HUB_OFFLINE=1`` to forbid downloads).
    ``dtype``: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``, ``"auto"`` or a torch dtype.
    Returns ``(model, tokenizer)`` with the model in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM

    src = str(name_or_path)
    p = Path(src).expanduser()
    local = p.is_dir()
    if not local and src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model folder at {src}; build the default model with `npcbus model init {src}`")
    tokenizer = load_tokenizer(src)
    with _quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(
            str(p) if local else src, dtype=_torch_dtype(dtype), local_files_only=local,
        )
    model.to(device)
    model.eval()
    return model, tokenizer


def resolve_base_model(model_settings: ModelSettings | None = None, *, build: bool = True) -> str:
    """The name or path of the base model that the settings select.

    ``BASE_MODEL`` set: returned as is (a hub name or a path). Empty: the offline default model at
    ``MODEL_DIR`` (an absolute path is returned). With ``build`` it is built on demand: an existing
    build there is used if its seed is ``MODEL_SEED`` and its builder and corpus are current (even
    if it was built with other training parameters, e.g. ``npcbus model init --steps``); otherwise
    the default model is built with that seed.
    """
    from npcbus.settings import ModelSettings

    s = model_settings if model_settings is not None else ModelSettings.from_env()
    if s.base_model:
        return s.base_model
    out = Path(s.model_dir).expanduser().resolve()
    if build:
        stamp = read_stamp(out)
        usable = (stamp is not None and stamp.get("seed") == s.model_seed
                  and stamp.get("builder") == BUILDER_VERSION and stamp.get("corpus_sha256") == corpus_hash())
        if not usable:
            ensure_default_model(out, seed=s.model_seed)
    return str(out)


# --------------------------------------------------------------------------------------------
# Evaluation helper
# --------------------------------------------------------------------------------------------


def perplexity(model, tokenizer, texts: list[str], max_length: int = 256) -> float:
    """Token-level perplexity of ``model`` over ``texts`` (each truncated to ``max_length`` tokens)."""
    import torch

    total_nll = 0.0
    total_tokens = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            ids = ids.to(device)
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += ids.shape[1] - 1
    if total_tokens == 0:
        raise ValueError("no tokens to score")
    return math.exp(total_nll / total_tokens)
