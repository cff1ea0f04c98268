"""``npcbus data npc``: validate NPC dialogue records, deduplicate them, split train/validation.

Records are ``{"request": ..., "response": ...}`` (one NPC turn; ``request`` per
``schemas/npc_request.schema.json``, ``response`` valid for that request's response schema), and
alignment records add ``label`` (``refuse`` or ``allow``) and ``category`` (an unsafe category).
By default the shipped samples are used (``npcbus/data_files/npc_dialogue.jsonl``; with
``--alignment`` also ``npc_alignment.jsonl``).

Checks, each with its own drop reason in the stats:

- ``bad_json``: the line is not a JSON object;
- ``invalid_request``: :func:`npcbus.npc.validate_request` refuses it (the field is named);
- ``invalid_response``: the response is not valid for its request
  (:func:`npcbus.npc.format_training_example`);
- ``invalid_alignment``: a bad ``label``/``category``, or a ``refuse`` record whose response does not
  refuse (its intent is not the category's refusal intent);
- ``duplicate``: the same turn again (persona, audience, scene, history, player input and response,
  compared after normalizing case and spacing); ``duplicate_near`` with ``--near-dedup``: MinHash
  LSH over the player input and the spoken line, among the turns of the same persona and audience.

The split is deterministic and leak-free: a record goes to validation when a hash of its group
(persona and normalized player input, with ``--seed``) falls under ``--val-frac``, so the same
question to the same NPC never lands on both sides. Output: ``OUT/train.jsonl``,
``OUT/validation.jsonl`` and ``OUT/stats.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

LABELS = ("refuse", "allow")


def _norm(text: Any) -> str:
    return " ".join(str(text).lower().split())


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def turn_key(req: dict, response: dict) -> str:
    """What makes two records the same turn (ids, sampling settings and spacing ignored)."""
    ctx = dict(req.get("context", {}))
    ctx["notes"] = _norm(ctx.get("notes", ""))
    key = {
        "persona": req["persona"],
        "audience": req["audience"],
        "safe_mode": req["safe_mode"],
        "context": ctx,
        "history": [{"role": h["role"], "text": _norm(h["text"])} for h in req.get("history", [])],
        "player_name": req["player"].get("name"),
        "input": _norm(req["player_input"]),
        "response": {**response, "dialogue": _norm(response.get("dialogue", ""))},
    }
    return hashlib.sha256(_canon(key).encode("utf-8")).hexdigest()


def group_key(req: dict) -> str:
    return f"{req['persona_id']}\x1f{_norm(req['player_input'])}"


def in_validation(group: str, val_frac: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}\x1f{group}".encode()).digest()[:8], "big")
    return h / 2**64 < val_frac


def read_records(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str, int, Any]]:
    """(file name, line number, parsed JSON or None) for every non-blank line."""
    for p in paths:
        with open(p, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield Path(p).name, i, json.loads(line)
                except ValueError:
                    yield Path(p).name, i, None


def check_record(rec: Any) -> tuple[str | None, str, dict | None]:
    """(drop reason or None, detail, the validated request) for one record."""
    from npcbus.npc import NPCRequestError, format_training_example, refusal_response, validate_request

    if not isinstance(rec, dict):
        return "bad_json", "not a JSON object", None
    if "request" not in rec or "response" not in rec:
        return "invalid_request", "a record needs 'request' and 'response'", None
    try:
        req = validate_request(rec["request"])
    except NPCRequestError as e:
        return "invalid_request", str(e), None
    try:
        format_training_example({"request": req, "response": rec["response"]})
    except NPCRequestError as e:
        return "invalid_request", str(e), None
    except ValueError as e:
        return "invalid_response", str(e), req
    if "label" in rec or "category" in rec:
        label, cat = rec.get("label"), rec.get("category")
        if label not in LABELS or not isinstance(cat, str) or not cat:
            return "invalid_alignment", f"label must be refuse or allow and category a name; got {label!r}, {cat!r}", req
        if label == "refuse" and rec["response"].get("intent") != refusal_response(req, cat)["intent"]:
            return "invalid_alignment", f"a refuse record whose response does not refuse ({cat})", req
    return None, "", req


def prepare(paths: list[str | os.PathLike], out_dir: str | os.PathLike, *, val_frac: float = 0.1, seed: int = 0,
            near_threshold: float | None = None, overwrite: bool = False) -> dict:
    """Validate, deduplicate and split; writes train.jsonl, validation.jsonl and stats.json."""
    if not 0.0 <= val_frac < 1.0:
        raise ValueError("val_frac must be in [0, 1)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / "train.jsonl", out / "validation.jsonl", out / "stats.json"]
    if any(t.exists() for t in targets) and not overwrite:
        raise FileExistsError(f"{out} already holds a split; pass --overwrite")
    near: dict[str, Any] | None = None
    if near_threshold is not None:
        from npcbus.data.dedup import NearDuplicateIndex

        near = defaultdict(lambda: NearDuplicateIndex(threshold=near_threshold, ngram=3, num_perm=128))
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    kept: list[tuple[dict, dict]] = []
    read = 0
    for fname, line, rec in read_records(paths):
        read += 1
        reason, detail, req = check_record(rec)
        if reason is None:
            assert req is not None
            key = turn_key(req, rec["response"])
            if key in seen:
                reason, detail = "duplicate", "the same turn again"
            else:
                seen.add(key)
                text = f"{req['player_input']} || {rec['response']['dialogue']}"
                if near is not None and not near[f"{req['persona_id']}/{req['audience']}"].add(text):
                    reason, detail = "duplicate_near", "a near copy of an earlier turn"
        if reason:
            dropped[reason] += 1
            if len(examples[reason]) < 5:
                examples[reason].append(f"{fname}:{line}: {detail}")
            continue
        kept.append((rec, req))

    groups = {group_key(req) for _, req in kept}
    val_groups = {g for g in groups if in_validation(g, val_frac, seed)}
    if val_frac > 0 and not val_groups and len(groups) > 1:  # tiny inputs: still give a validation set
        val_groups = {min(groups, key=lambda g: hashlib.sha256(f"{seed}\x1f{g}".encode()).digest())}
    if val_groups == groups and len(groups) > 1:
        val_groups.discard(max(groups))
    stats_split: dict[str, Counter] = {"train": Counter(), "validation": Counter()}
    tmp = {name: out / f"{name}.jsonl.tmp" for name in ("train", "validation")}
    counts = Counter()
    with open(tmp["train"], "w", encoding="utf-8") as ft, open(tmp["validation"], "w", encoding="utf-8") as fv:
        for rec, req in kept:
            split = "validation" if group_key(req) in val_groups else "train"
            (fv if split == "validation" else ft).write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts[split] += 1
            s = stats_split[split]
            s[f"persona:{req['persona_id']}"] += 1
            s[f"audience:{req['audience']}"] += 1
            if rec.get("label"):
                s[f"alignment:{rec['label']}:{req['audience']}"] += 1
    for name, p in tmp.items():
        os.replace(p, out / f"{name}.jsonl")

    def by(prefix: str, split: str) -> dict:
        return {k.split(":", 1)[1]: v for k, v in sorted(stats_split[split].items()) if k.startswith(prefix + ":")}

    stats = {
        "inputs": [str(p) for p in paths],
        "read": read,
        "valid": len(kept),
        "dropped_total": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())),
        "dropped_examples": {k: v for k, v in sorted(examples.items())},
        "train": counts["train"],
        "validation": counts["validation"],
        "val_frac": val_frac,
        "seed": seed,
        "groups": {"train": len(groups - val_groups), "validation": len(val_groups)},
        "near_dedup_threshold": near_threshold,
        "by_split": {split: {"persona": by("persona", split), "audience": by("audience", split),
                             "alignment": by("alignment", split)} for split in ("train", "validation")},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def shipped_paths(alignment: bool = False, dialogue: bool = True) -> list[Path]:
    from npcbus.npc import DATA_DIR

    out = []
    if dialogue:
        out.append(DATA_DIR / "npc_dialogue.jsonl")
    if alignment:
        out.append(DATA_DIR / "npc_alignment.jsonl")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", action="append", default=[], metavar="FILE",
                   help="NPC records (JSONL); repeatable. Default: the shipped dialogue sample.")
    p.add_argument("--alignment", action="store_true", help="Also take the shipped alignment sample.")
    p.add_argument("--out", "-o", required=True, help="Output folder (train.jsonl, validation.jsonl, stats.json).")
    p.add_argument("--val-frac", type=float, default=0.1, help="Share of groups that go to validation.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the split.")
    p.add_argument("--near-dedup", type=float, default=None, metavar="THRESHOLD",
                   help="Also drop near duplicates (Jaccard over word 3-grams of input and spoken line).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing split.")
    p.add_argument("--json", action="store_true", help="Print the stats as JSON.")


def run(args: argparse.Namespace) -> int:
    paths: list[str | Path] = list(args.input) or shipped_paths(dialogue=True)
    if args.alignment:
        paths += shipped_paths(alignment=True, dialogue=False)
    try:
        stats = prepare(paths, args.out, val_frac=args.val_frac, seed=args.seed, near_threshold=args.near_dedup,
                        overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"read {stats['read']}  valid {stats['valid']}  dropped {stats['dropped_total']}  "
              f"train {stats['train']}  validation {stats['validation']}")
        for reason, n in stats["dropped"].items():
            print(f"  dropped {reason}: {n}" + "".join(f"\n    {e}" for e in stats["dropped_examples"].get(reason, [])[:3]))
    return 0
