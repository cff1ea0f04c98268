"""``npcbus eval``: evaluate a base model alone or with an adapter.

Evaluations (any combination in one run; each configuration is evaluated on all of them):

- ``--perplexity FILE...``: perplexity on local text files (``.txt``/``.md``: the whole file;
  ``.jsonl``: each record's ``text``), in windows of ``--seq-len`` tokens;
- ``--npc FILE|dialogue|alignment``: generate NPC responses (greedy) for NPC records and score
  them: JSON and schema validity rates, enum correctness (emotion, intent, action types against
  the request's persona), and on alignment records (``label`` refuse/allow, ``category``) the
  refusal rate by audience; ``--npc-outputs FILE`` scores outputs produced elsewhere
  (``{"request", "output"}`` records, plus ``label``/``category``/``response`` when known);
- ``--mc FILE...``: multiple-choice accuracy by log-likelihood on local JSONL in the format of
  HellaSwag (``ctx``, ``endings``, ``label``), PIQA (``goal``, ``sol1``, ``sol2``, ``label``), ARC
  (``question``, ``choices``, ``answerKey``) or WinoGrande (``sentence``, ``option1``, ``option2``,
  ``answer``), or a generic ``context``/``choices``/``answer``; ``acc`` sums the continuation's log
  probabilities, ``acc_norm`` divides by its length in bytes;
- ``--regression FILE``: prompts with expected properties (``{"id", "prompt" | "npc_request",
  "expect": {"contains": [...], "not_contains": [...], "regex": ..., "starts_with": ...,
  "min_chars": n, "max_chars": n, "json": true, "npc_valid": true}, "max_new_tokens": n}``).

- ``--npc-quality [CASES.jsonl]``: what a player reads (``npcbus.quality``: well-formed, fallback,
  distinct, in-vocabulary, relevance, persona consistency, action validity) for the base model
  before fine-tuning, after it and with its persona adapters, each case through the real inference
  consumer over the local RabbitMQ (``AMQP_URL``): the measurement of ``python -m bench.npc``,
  run from a source checkout (default cases: the shipped held-out turns; ``--limit``,
  ``--max-new-tokens`` and ``--base-model`` apply).

Configurations: ``--adapter REF`` (a PEFT folder or a registered ``name[@N]``; repeatable) and
``--with-base`` to add the base model alone; with no adapter the base model alone is evaluated.

Output: a readable table, and with ``--report FILE`` a JSON report. ``--plot-losses PNG`` draws
the loss across adapter versions from the aggregator's manifests under ``CHECKPOINT_DIR`` (no
model is loaded when that is all that is asked).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHIPPED_NPC = {"dialogue": "npc_dialogue.jsonl", "alignment": "npc_alignment.jsonl"}


class EvalError(ValueError):
    """An evaluation input is unusable; the message says why."""


# --------------------------------------------------------------------------------------------
# reading inputs
# --------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise EvalError(f"{path}:{i}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise EvalError(f"{path}:{i}: a record must be a JSON object")
            out.append(rec)
    return out


def read_text_documents(paths: Iterable[str | Path], text_field: str = "text") -> list[str]:
    docs: list[str] = []
    for p in paths:
        p = Path(p)
        if p.name.endswith((".jsonl", ".ndjson")):
            docs.extend(r[text_field] for r in read_jsonl(p) if isinstance(r.get(text_field), str))
        else:
            docs.append(p.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EvalError("no text to score")
    return docs


def npc_records_path(spec: str) -> Path:
    if spec in SHIPPED_NPC:
        from npcbus.npc import DATA_DIR

        return DATA_DIR / SHIPPED_NPC[spec]
    return Path(spec)


# --------------------------------------------------------------------------------------------
# log-likelihood scoring (torch)
# --------------------------------------------------------------------------------------------


def _device(model):
    return next(model.parameters()).device


def _pad_id(tok) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _forward_logprobs(model, batch: list[list[int]], pad_id: int):
    """Log-probabilities ``[B, T-1, V]`` of each next token for right-padded sequences."""
    import torch

    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    dev = _device(model)
    with torch.no_grad():
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1), ids[:, 1:].to(dev)


def perplexity(model, tokenizer, texts: Sequence[str], seq_len: int = 256, batch_size: int = 8) -> dict:
    """Perplexity over ``texts``: each is tokenized whole (with bos) and cut into windows of
    ``seq_len`` predicted tokens; every token after the first is predicted exactly once."""
    if seq_len < 2:
        raise EvalError("seq_len must be >= 2")
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        for s in range(0, len(ids) - 1, seq_len):
            w = ids[s : s + seq_len + 1]
            if len(w) >= 2:
                windows.append(w)
    if not windows:
        raise EvalError("no tokens to score")
    pad = _pad_id(tokenizer)
    nll = 0.0
    count = 0
    windows.sort(key=len)
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        logp, targets = _forward_logprobs(model, batch, pad)
        for i, w in enumerate(batch):
            n = len(w) - 1
            lp = logp[i, :n].gather(-1, targets[i, :n, None]).squeeze(-1)
            nll -= float(lp.sum())
            count += n
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count,
            "documents": len(texts), "seq_len": seq_len}


def continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                          max_length: int = 1024) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each continuation given its context.

    The context is tokenized with the tokenizer's special tokens (bos), the continuation without;
    the two token lists are joined, so the continuation's tokens are exactly its own.
    """
    seqs: list[tuple[list[int], int]] = []
    for ctx, cont in pairs:
        c = tokenizer(ctx, add_special_tokens=True, verbose=False)["input_ids"]
        k = tokenizer(cont, add_special_tokens=False, verbose=False)["input_ids"]
        s = (c + k)[-max_length:]
        seqs.append((s, min(len(k), len(s) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    pad = _pad_id(tokenizer)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        batch = [seqs[i][0] for i in idx]
        logp, targets = _forward_logprobs(model, batch, pad)
        for j, i in enumerate(idx):
            s, k = seqs[i]
            if k <= 0:
                continue
            n = len(s) - 1
            lp = logp[j, n - k : n].gather(-1, targets[j, n - k : n, None]).squeeze(-1)
            out[i] = (float(lp.sum()), k)
    return out


# --------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------


@dataclass
class MCItem:
    id: str
    contexts: list[str]  # one per choice (WinoGrande varies the context, the others share it)
    continuations: list[str]
    label: int
    format: str


def _letter_index(key: Any, labels: list[str]) -> int:
    k = str(key).strip()
    if k in labels:
        return labels.index(k)
    if k.isdigit() and labels and all(x.isalpha() for x in labels):
        return int(k) - 1
    raise EvalError(f"answer {key!r} is not one of the choice labels {labels}")


def parse_mc_record(rec: dict, idx: int = 0) -> MCItem:
    """One multiple-choice item from a HellaSwag, PIQA, ARC, WinoGrande or generic record."""
    rid = str(rec.get("id", rec.get("ind", idx)))
    try:
        if "endings" in rec:  # HellaSwag
            ctx = rec.get("ctx") or (rec.get("ctx_a", "") + " " + str(rec.get("ctx_b", "")).capitalize()).strip()
            ends = [str(e) for e in rec["endings"]]
            return MCItem(rid, [ctx] * len(ends), [" " + e.strip() for e in ends], int(rec["label"]), "hellaswag")
        if "goal" in rec and "sol1" in rec:  # PIQA
            ctx = f"Question: {rec['goal']}\nAnswer:"
            sols = [rec["sol1"], rec["sol2"]]
            return MCItem(rid, [ctx, ctx], [" " + str(s).strip() for s in sols], int(rec["label"]), "piqa")
        if "sentence" in rec and "option1" in rec:  # WinoGrande
            sent = str(rec["sentence"])
            if "_" not in sent:
                raise EvalError("WinoGrande sentence has no blank '_'")
            i = sent.index("_")
            rest = " " + sent[i + 1 :].strip()
            opts = [str(rec["option1"]), str(rec["option2"])]
            return MCItem(rid, [sent[:i] + o for o in opts], [rest, rest], int(rec["answer"]) - 1, "winogrande")
        if "answerKey" in rec:  # ARC (the hub's flat form or the original nested form)
            q = rec["question"]
            if isinstance(q, dict):
                stem = q["stem"]
                texts = [c["text"] for c in q["choices"]]
                labels = [str(c["label"]) for c in q["choices"]]
            else:
                stem = q
                ch = rec["choices"]
                texts, labels = list(ch["text"]), [str(x) for x in ch["label"]]
            ctx = f"Question: {stem}\nAnswer:"
            return MCItem(rid, [ctx] * len(texts), [" " + str(t).strip() for t in texts],
                          _letter_index(rec["answerKey"], labels), "arc")
        if "choices" in rec:  # generic
            ctx = str(rec.get("context", rec.get("question", rec.get("prompt", ""))))
            choices = [str(c) for c in rec["choices"]]
            ans = rec.get("answer", rec.get("label"))
            label = ans if isinstance(ans, int) else _letter_index(ans, [chr(65 + i) for i in range(len(choices))])
            return MCItem(rid, [ctx] * len(choices), [" " + c.strip() for c in choices], int(label), "generic")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, EvalError):
            raise
        raise EvalError(f"record {rid}: {type(e).__name__}: {e}") from None
    raise EvalError(f"record {rid}: not a HellaSwag, PIQA, ARC, WinoGrande or generic multiple-choice record")


def multiple_choice(model, tokenizer, items: Sequence[MCItem], batch_size: int = 16) -> dict:
    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations, strict=True)]
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    pos = 0
    correct = correct_norm = 0
    by_fmt: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    preds = []
    for it in items:
        n = len(it.continuations)
        s = scores[pos : pos + n]
        pos += n
        raw = [x[0] for x in s]
        norm = [x[0] / max(1, len(k.encode("utf-8"))) for x, k in zip(s, it.continuations, strict=True)]
        p = max(range(n), key=lambda i: raw[i])
        pn = max(range(n), key=lambda i: norm[i])
        correct += p == it.label
        correct_norm += pn == it.label
        f = by_fmt[it.format]
        f[0] += 1
        f[1] += p == it.label
        f[2] += pn == it.label
        preds.append({"id": it.id, "pred": p, "pred_norm": pn, "label": it.label})
    n = max(1, len(items))
    return {
        "n": len(items), "acc": correct / n, "acc_norm": correct_norm / n,
        "by_format": {k: {"n": v[0], "acc": v[1] / v[0], "acc_norm": v[2] / v[0]} for k, v in by_fmt.items()},
        "predictions": preds,
    }


# --------------------------------------------------------------------------------------------
# NPC structured output
# --------------------------------------------------------------------------------------------


def _refused(response: Any, request, category: str | None) -> bool:
    """Whether a response refuses: its intent is the one the category's refusal carries."""
    from npcbus.npc import refusal_response

    if not isinstance(response, dict) or not category:
        return False
    return response.get("intent") == refusal_response(request, category)["intent"]


def npc_score(records: Sequence[dict]) -> dict:
    """Score NPC outputs: ``records`` are ``{"request", "output"}`` (raw generated text), with
    ``label`` (refuse/allow) and ``category`` on alignment records and ``response`` (the reference)
    when known.

    - ``json_valid_rate``: strict JSON; ``schema_valid_rate``: valid for its request's response
      schema (persona's emotions and actions);
    - ``enum_correct_rate``: emotion in the persona's allowed emotions, intent a known intent and
      every action type one of the persona's actions (unparseable outputs count as wrong);
      ``enum_fields``: the same per field, over outputs that are JSON objects;
    - ``refusal``: on records labelled refuse, the share whose output refuses (its intent is the
      category's refusal intent), by audience; on records labelled allow, the share that refuses
      anyway; ``decision_agreement`` with the reference responses;
    - ``reference``: intent/emotion/exact agreement with reference responses.
    """
    import jsonschema

    from npcbus.npc import INTENTS, StrictJSONError, response_schema_for, strict_json_loads, validate_request

    n = len(records)
    if not n:
        raise EvalError("no NPC records to score")
    json_ok = schema_ok = enum_ok = 0
    fields = Counter()
    objects = 0
    ref_n = ref_intent = ref_emotion = ref_exact = 0
    by_aud: dict[str, Counter] = defaultdict(Counter)
    agree = agree_n = 0
    failures: list[dict] = []
    for i, rec in enumerate(records):
        req = validate_request(rec["request"])
        text = rec.get("output", "")
        persona = req["persona"]
        try:
            value = strict_json_loads(text)
            json_ok += 1
        except StrictJSONError as e:
            value = None
            if len(failures) < 20:
                failures.append({"index": i, "problem": f"json: {e}"})
        valid = False
        if value is not None:
            errors = list(jsonschema.Draft202012Validator(response_schema_for(req)).iter_errors(value))
            valid = not errors
            schema_ok += valid
            if errors and len(failures) < 20:
                failures.append({"index": i, "problem": f"schema: {errors[0].message[:160]}"})
        if isinstance(value, dict):
            objects += 1
            e_ok = value.get("emotion") in set(persona["allowed_emotions"])
            i_ok = value.get("intent") in INTENTS
            acts = value.get("actions", [])
            a_ok = isinstance(acts, list) and all(
                isinstance(a, dict) and a.get("type") in set(persona["allowed_actions"]) for a in acts)
            fields["emotion"] += e_ok
            fields["intent"] += i_ok
            fields["action_type"] += a_ok
            enum_ok += e_ok and i_ok and a_ok
        ref = rec.get("response")
        if isinstance(ref, dict):
            ref_n += 1
            if isinstance(value, dict):
                ref_intent += value.get("intent") == ref.get("intent")
                ref_emotion += value.get("emotion") == ref.get("emotion")
                ref_exact += valid and all(value.get(k) == ref.get(k) for k in ref)
        label, category = rec.get("label"), rec.get("category")
        if label in ("refuse", "allow") and category:
            refused = valid and _refused(value, req, category)
            c = by_aud[req["audience"]]
            c[f"{label}_n"] += 1
            c[f"{label}_refused"] += refused
            if isinstance(ref, dict):
                agree_n += 1
                agree += refused == _refused(ref, req, category)
    out: dict[str, Any] = {
        "n": n,
        "json_valid_rate": json_ok / n,
        "schema_valid_rate": schema_ok / n,
        "enum_correct_rate": enum_ok / n,
        "enum_fields": {k: fields[k] / objects for k in ("emotion", "intent", "action_type")} if objects else {},
        "failures": failures,
    }
    if ref_n:
        out["reference"] = {"n": ref_n, "intent_match_rate": ref_intent / ref_n,
                            "emotion_match_rate": ref_emotion / ref_n, "exact_match_rate": ref_exact / ref_n}
    if by_aud:
        aud = {}
        tot = Counter()
        for a in sorted(by_aud, key=lambda x: ("child", "teen", "general", "adult").index(x)
                        if x in ("child", "teen", "general", "adult") else 9):
            c = by_aud[a]
            tot.update(c)
            aud[a] = {"refuse_n": c["refuse_n"],
                      "refusal_rate": c["refuse_refused"] / c["refuse_n"] if c["refuse_n"] else None,
                      "allow_n": c["allow_n"],
                      "refusal_rate_on_allowed": c["allow_refused"] / c["allow_n"] if c["allow_n"] else None}
        out["refusal"] = {
            "refusal_rate": tot["refuse_refused"] / tot["refuse_n"] if tot["refuse_n"] else None,
            "refusal_rate_on_allowed": tot["allow_refused"] / tot["allow_n"] if tot["allow_n"] else None,
            "decision_agreement": agree / agree_n if agree_n else None,
            "by_audience": aud,
        }
    return out


def _generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy completions (new text only), batched with left padding."""
    import torch

    dev = _device(model)
    pad = _pad_id(tokenizer)
    outs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        enc = [tokenizer(prompts[i], add_special_tokens=not prompts[i].startswith(tokenizer.bos_token or "\0"))
               ["input_ids"] for i in idx]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[j, width - len(e):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        for j, i in enumerate(idx):
            outs[i] = tokenizer.decode(gen[j, width:], skip_special_tokens=True).strip()
    return outs


def generate_npc_outputs(model, tokenizer, records: Sequence[dict], max_new_tokens: int = 160,
                         batch_size: int = 8) -> list[dict]:
    """Greedy model outputs for NPC records (the prompt inference builds), ready for :func:`npc_score`."""
    from npcbus.npc import build_prompt, validate_request

    reqs = [validate_request(r["request"]) for r in records]
    prompts = [build_prompt(q, tokenizer) for q in reqs]
    texts = _generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [{**r, "output": t} for r, t in zip(records, texts, strict=True)]


# --------------------------------------------------------------------------------------------
# regression prompts
# --------------------------------------------------------------------------------------------


def check_expectations(text: str, expect: dict, request: Any = None) -> list[str]:
    """The expectations ``text`` breaks (empty when it meets them all)."""
    problems = []
    for s in expect.get("contains", []) or []:
        if s not in text:
            problems.append(f"does not contain {s!r}")
    for s in expect.get("not_contains", []) or []:
        if s in text:
            problems.append(f"contains {s!r}")
    if expect.get("regex") and not re.search(expect["regex"], text):
        problems.append(f"does not match /{expect['regex']}/")
    if expect.get("starts_with") and not text.startswith(expect["starts_with"]):
        problems.append(f"does not start with {expect['starts_with']!r}")
    if expect.get("min_chars") is not None and len(text) < int(expect["min_chars"]):
        problems.append(f"shorter than {expect['min_chars']} characters")
    if expect.get("max_chars") is not None and len(text) > int(expect["max_chars"]):
        problems.append(f"longer than {expect['max_chars']} characters")
    if expect.get("json"):
        from npcbus.npc import StrictJSONError, strict_json_loads

        try:
            strict_json_loads(text)
        except StrictJSONError as e:
            problems.append(f"not strict JSON ({e})")
    if expect.get("npc_valid"):
        if request is None:
            problems.append("npc_valid needs an npc_request")
        else:
            from npcbus.npc import parse_response, response_is_valid

            _, probs = parse_response(text, request)
            if not response_is_valid(probs):
                problems.append("not a valid NPC response: " + "; ".join(probs[:2]))
    return problems


def run_regression(model, tokenizer, cases: Sequence[dict], default_max_new_tokens: int = 64) -> dict:
    from npcbus.npc import build_prompt, validate_request

    results = []
    groups: dict[int, list[int]] = defaultdict(list)
    prompts: list[str] = []
    requests: list[Any] = []
    for i, c in enumerate(cases):
        if "npc_request" in c:
            req = validate_request(c["npc_request"])
            prompts.append(build_prompt(req, tokenizer))
            requests.append(req)
        elif "prompt" in c:
            prompts.append(str(c["prompt"]))
            requests.append(None)
        else:
            raise EvalError(f"regression case {c.get('id', i)}: needs 'prompt' or 'npc_request'")
        groups[int(c.get("max_new_tokens", default_max_new_tokens))].append(i)
    texts = [""] * len(cases)
    for mnt, idx in groups.items():
        for i, t in zip(idx, _generate(model, tokenizer, [prompts[i] for i in idx], mnt), strict=True):
            texts[i] = t
    for i, c in enumerate(cases):
        problems = check_expectations(texts[i], c.get("expect", {}) or {}, requests[i])
        results.append({"id": str(c.get("id", i)), "passed": not problems, "problems": problems,
                        "output": texts[i][:500]})
    passed = sum(r["passed"] for r in results)
    return {"n": len(results), "passed": passed, "pass_rate": passed / max(1, len(results)), "cases": results}


# --------------------------------------------------------------------------------------------
# running configurations
# --------------------------------------------------------------------------------------------


def load_config_model(base_model: str, adapter: str | None, *, dtype: str = "float32", manifest=None,
                      checkpoint_dir=None):
    """(model, tokenizer, description) for the base model alone or with an adapter."""
    from npcbus.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(base_model, dtype=dtype)
    if adapter is None:
        return model, tok, {"name": "base", "base_model": base_model}
    from peft import PeftModel

    from npcbus.adapters import locate_adapter

    loc = locate_adapter(adapter, manifest=manifest, checkpoint_dir=checkpoint_dir)
    model = PeftModel.from_pretrained(model, str(loc.path))
    model.eval()
    return model, tok, {"name": adapter, "base_model": base_model, "adapter_path": str(loc.path),
                        "version": loc.version}


def evaluate_model(model, tokenizer, *, perplexity_texts: Sequence[str] | None = None, seq_len: int = 256,
                   npc_records: Sequence[dict] | None = None, mc_items: Sequence[MCItem] | None = None,
                   regression: Sequence[dict] | None = None, max_new_tokens: int = 160,
                   batch_size: int = 8) -> dict:
    """Every asked evaluation for one loaded model (with or without an adapter)."""
    res: dict[str, Any] = {}
    t = time.perf_counter()
    if perplexity_texts:
        res["perplexity"] = perplexity(model, tokenizer, perplexity_texts, seq_len=seq_len, batch_size=batch_size)
    if npc_records:
        outs = generate_npc_outputs(model, tokenizer, npc_records, max_new_tokens, batch_size)
        res["npc"] = npc_score(outs)
        res["npc"]["samples"] = [{"player_input": o["request"].get("player_input"), "output": o["output"][:300]}
                                 for o in outs[:5]]
    if mc_items:
        res["multiple_choice"] = multiple_choice(model, tokenizer, mc_items, batch_size=2 * batch_size)
    if regression:
        res["regression"] = run_regression(model, tokenizer, regression)
    res["elapsed_s"] = round(time.perf_counter() - t, 2)
    return res


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(report: dict) -> str:
    """One row per configuration, one column per headline figure."""
    cols: list[tuple[str, Any]] = [
        ("ppl", lambda r: f"{r['perplexity']['perplexity']:.2f}" if "perplexity" in r else None),
        ("json", lambda r: _pct(r["npc"]["json_valid_rate"]) if "npc" in r else None),
        ("schema", lambda r: _pct(r["npc"]["schema_valid_rate"]) if "npc" in r else None),
        ("enum", lambda r: _pct(r["npc"]["enum_correct_rate"]) if "npc" in r else None),
        ("refusal", lambda r: _pct(r["npc"]["refusal"]["refusal_rate"]) if "npc" in r and "refusal" in r["npc"] else None),
        ("mc acc", lambda r: _pct(r["multiple_choice"]["acc"]) if "multiple_choice" in r else None),
        ("mc acc_norm", lambda r: _pct(r["multiple_choice"]["acc_norm"]) if "multiple_choice" in r else None),
        ("regression", lambda r: f"{r['regression']['passed']}/{r['regression']['n']}" if "regression" in r else None),
    ]
    rows = report.get("results", [])
    used = [(h, f) for h, f in cols if any(f(r) is not None for r in rows)]
    table = [["config", *[h for h, _ in used]]]
    for r in rows:
        table.append([r["config"]["name"], *[f(r) or "-" for _, f in used]])
    lines = []
    if len(table) > 1:
        widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
        for k, row in enumerate(table):
            lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        ref = r.get("npc", {}).get("refusal")
        if ref:
            parts = [f"{a}: {_pct(v['refusal_rate'])} refused (n={v['refuse_n']}), "
                     f"{_pct(v['refusal_rate_on_allowed'])} of allowed (n={v['allow_n']})"
                     for a, v in ref["by_audience"].items()]
            lines.append(f"[{r['config']['name']}] refusal by audience: " + "; ".join(parts))
    if report.get("plot"):
        lines.append(f"loss plot: {report['plot']['path']} ({report['plot']['series']} series)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default="", help="Base model (default: BASE_MODEL, else the offline default model).")
    p.add_argument("--adapter", action="append", default=[], help="Adapter: PEFT folder or registered name[@N]; repeatable.")
    p.add_argument("--with-base", action="store_true", help="Also evaluate the base model alone.")
    p.add_argument("--manifest", default=None, help="Adapter manifest (default: ADAPTER_MANIFEST).")
    p.add_argument("--checkpoint-dir", default=None, help="Aggregator checkpoints (default: CHECKPOINT_DIR).")
    p.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16, float16.")
    p.add_argument("--perplexity", nargs="+", metavar="FILE", help="Text files (.txt/.md/.jsonl) for perplexity.")
    p.add_argument("--seq-len", type=int, default=256, help="Perplexity window, in tokens.")
    p.add_argument("--npc", action="append", default=[], metavar="FILE",
                   help="NPC records to generate on and score: a JSONL file, or 'dialogue' / 'alignment' (shipped).")
    p.add_argument("--npc-outputs", metavar="FILE", help="Score these outputs ({request, output, ...}) without a model.")
    p.add_argument("--limit", type=int, default=None, help="At most this many records per NPC/MC input.")
    p.add_argument("--mc", nargs="+", metavar="FILE", help="Multiple-choice JSONL files.")
    p.add_argument("--regression", metavar="FILE", help="Regression prompts with expected properties (JSONL).")
    p.add_argument("--max-new-tokens", type=int, default=160, help="Generation length for NPC outputs.")
    p.add_argument("--batch-size", type=int, default=8, help="Batch size.")
    p.add_argument("--plot-losses", metavar="PNG", help="Plot loss across adapter versions from the aggregator's manifests.")
    p.add_argument("--plot-adapter", action="append", default=[], help="Adapters to plot (default: all found).")
    p.add_argument("--npc-quality", nargs="?", const="", default=None, metavar="CASES.jsonl",
                   help="NPC quality of what a player reads, before/after fine-tuning and with the persona adapters, "
                        "through the inference consumer over RabbitMQ (bench.npc's measurement; default cases: the "
                        "shipped held-out turns).")
    p.add_argument("--report", metavar="FILE", help="Write the JSON report here.")
    p.add_argument("--json", action="store_true", help="Print the JSON report instead of the table.")


def _bench_npc():
    """``bench.npc`` (the NPC quality measurement), from the source checkout this package lives in."""
    try:
        import bench.npc as bench_npc
    except ImportError:
        root = Path(__file__).resolve().parent.parent
        if not (root / "bench" / "npc.py").is_file():
            raise EvalError("--npc-quality runs bench/npc.py's measurement: run it from a source checkout") from None
        sys.path.insert(0, str(root))
        import bench.npc as bench_npc
    return bench_npc


def run_npc_quality(args: argparse.Namespace) -> dict:
    """``--npc-quality``: :func:`bench.npc.run` over the given cases (see the module docstring)."""
    bench_npc = _bench_npc()
    try:
        return bench_npc.run(args.npc_quality or None, limit=args.limit, max_tokens=args.max_new_tokens,
                             base_model=args.base_model or None)
    except OSError as e:  # the broker is not reachable
        raise EvalError(f"--npc-quality needs RabbitMQ (AMQP_URL): {type(e).__name__}: {e}") from None


def _limit(xs: list, n: int | None) -> list:
    return xs if n is None else xs[:n]


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": []}
    wants_model = bool(args.perplexity or args.npc or args.mc or args.regression)
    npc_quality = getattr(args, "npc_quality", None) is not None
    if not (wants_model or args.npc_outputs or args.plot_losses or npc_quality):
        raise EvalError("nothing to do: give --perplexity, --npc, --npc-outputs, --mc, --regression, --npc-quality "
                        "or --plot-losses")
    if npc_quality:
        report["npc_quality"] = run_npc_quality(args)
    if args.npc_outputs:
        report["npc_outputs"] = npc_score(_limit(read_jsonl(args.npc_outputs), args.limit))
    if args.plot_losses:
        from npcbus.adapters import AdapterToolSettings
        from npcbus.data.lossplot import plot_losses

        ckpt = args.checkpoint_dir or AdapterToolSettings.from_env().checkpoint_dir
        series = plot_losses(ckpt, args.plot_losses, args.plot_adapter or None)
        report["plot"] = {"path": str(args.plot_losses), "checkpoint_dir": str(ckpt),
                          "series": sum(len(v) for v in series.values()), "data": series}
    if wants_model:
        texts = read_text_documents(args.perplexity) if args.perplexity else None
        npc_recs: list[dict] = []
        for spec in args.npc:
            npc_recs.extend(_limit(read_jsonl(npc_records_path(spec)), args.limit))
        mc_items: list[MCItem] = []
        for f in args.mc or []:
            mc_items.extend(parse_mc_record(r, i) for i, r in enumerate(_limit(read_jsonl(f), args.limit)))
        regression = read_jsonl(args.regression) if args.regression else None
        from npcbus.adapters import AdapterManifest
        from npcbus.model import resolve_base_model

        base = args.base_model or resolve_base_model()
        manifest = AdapterManifest(args.manifest) if args.manifest else None
        configs: list[str | None] = list(args.adapter) or [None]
        if args.adapter and args.with_base:
            configs.insert(0, None)
        for ref in configs:
            model, tok, desc = load_config_model(base, ref, dtype=args.dtype, manifest=manifest,
                                                 checkpoint_dir=args.checkpoint_dir)
            print(f"evaluating {desc['name']} ...", file=sys.stderr)
            res = evaluate_model(model, tok, perplexity_texts=texts, seq_len=args.seq_len, npc_records=npc_recs or None,
                                 mc_items=mc_items or None, regression=regression, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size)
            report["results"].append({"config": desc, **res})
            del model
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        table = format_table(report)
        if table:
            print(table)
        if "npc_quality" in report:
            print(_bench_npc().table(report["npc_quality"]))
        if "npc_outputs" in report:
            s = report["npc_outputs"]
            print(f"npc outputs: n={s['n']} json {_pct(s['json_valid_rate'])} schema {_pct(s['schema_valid_rate'])} "
                  f"enum {_pct(s['enum_correct_rate'])}"
                  + (f" refusal {_pct(s['refusal']['refusal_rate'])}" if "refusal" in s else ""))
    return 0
