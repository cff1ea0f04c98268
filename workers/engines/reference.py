"""Plain transformers + PEFT reference generation, and random LoRA adapters, for tests and benchmarks.

:func:`reference_generate` is the yardstick the engines are compared with: one prompt at a time,
no batching, no padding, ``model.generate`` with greedy decoding.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapter(model_dir: str, out_dir: str | Path, *, seed: int, rank: int = 8, alpha: int = 16,
                        scale: float = 1.0, targets: tuple[str, ...] = DEFAULT_TARGETS) -> Path:
    """Write a LoRA adapter with random (seeded) A and B matrices for the model at ``model_dir``.

    ``scale`` sets the size of the change: B entries have standard deviation ``scale / rank``, A
    entries ``1 / sqrt(in_features)``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (scale / rank))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    return out


def cached_random_adapter(model_dir: str, root: str | Path, *, seed: int, scale: float = 1.0, rank: int = 8) -> Path:
    """:func:`make_random_adapter` built once under ``root`` (reused while the base model is the same)."""
    import json
    import os
    import shutil
    import tempfile

    stamp = {"seed": seed, "scale": scale, "rank": rank}
    model_stamp = Path(model_dir) / "npcbus_model.json"
    if model_stamp.is_file():
        stamp["model"] = json.loads(model_stamp.read_text()).get("weights_sha256")
    out = Path(root) / f"random-s{seed}-x{scale:g}-r{rank}"
    marker = out / "npcbus_random_adapter.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    try:
        make_random_adapter(model_dir, tmp, seed=seed, rank=rank, scale=scale)
        (tmp / "npcbus_random_adapter.json").write_text(json.dumps(stamp))
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():  # not built by someone else meanwhile
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_reference(model_dir: str, adapter_dir: str | None = None):
    """(model, tokenizer): the base model, with the adapter applied when given."""
    from npcbus.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
        model.eval()
    return model, tok


def reference_generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, *,
                       ignore_eos: bool = False) -> list[int]:
    """Greedy continuation token ids of one prompt. Stops after the end-of-sequence token (which is
    included) unless ``ignore_eos``, which keeps going past it like the engines' ``ignore_eos``."""
    import torch

    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.inference_mode():
        if not ignore_eos:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            return out[0, ids.shape[1]:].tolist()
        from transformers import DynamicCache

        cache = DynamicCache(config=getattr(model, "config", None))
        generated: list[int] = []
        step = ids
        for _ in range(max_new_tokens):
            out = model(input_ids=step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tok = int(torch.argmax(out.logits[0, -1]))
            generated.append(tok)
            step = torch.tensor([[tok]], dtype=torch.long)
        return generated
