"""``npcbus adapter list|register|show|merge|publish``.

Examples::

    npcbus adapter register innkeeper --persona-id innkeeper --source bus --description "Marta"
    npcbus adapter register blacksmith --path runs/blacksmith-lora
    npcbus adapter list
    npcbus adapter show innkeeper --json
    npcbus adapter merge innkeeper@3 --out merged/innkeeper-v3           # full model, checked
    npcbus adapter publish innkeeper --repo-id my-org/innkeeper-lora --dry-run --out publish/innkeeper
    HF_TOKEN=... npcbus adapter publish innkeeper --repo-id my-org/innkeeper-lora

An adapter argument is a PEFT folder or a registered name (``name@N`` for version N; the files
come from the entry's path or from ``CHECKPOINT_DIR/<name>/v<N>``).

``merge`` folds the LoRA weights into the base model and saves a full model (safetensors +
tokenizer) that needs no PEFT; it checks that the merged model, reloaded from disk, gives the same
greedy tokens as base+adapter on a few prompts (``--no-check`` skips that).

``publish`` stages exactly the folder that is uploaded: the adapter's files, a model card
(``README.md``) and ``npcbus_adapter.json``. ``--dry-run`` stops there; otherwise it needs
``huggingface_hub``, a token in ``HF_TOKEN`` and a reachable hub.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHECK_PROMPTS = ("The innkeeper said", "Traveler: Where can I find the blacksmith?\nNPC:", "Once upon a time")
CARD_FILE = "README.md"
INFO_FILE = "npcbus_adapter.json"
MERGE_INFO_FILE = "npcbus_merge.json"


class AdapterToolError(RuntimeError):
    """An adapter command cannot go on; the message says why."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _manifest(args):
    from npcbus.adapters import AdapterManifest

    return AdapterManifest(getattr(args, "manifest", None) or None)


def _fmt_entry(e) -> str:
    lines = [f"name:            {e.name}"]
    for label, v in (("base model", e.base_model or "(configured default)"),
                     ("current version", "none yet" if e.current_version is None else e.current_version),
                     ("content hash", e.content_hash or "-"), ("path", e.path or "-"), ("source", e.source or "-"),
                     ("persona", e.persona_id or "-"), ("description", e.description or "-"),
                     ("created", e.created), ("updated", e.updated)):
        lines.append(f"{label + ':':<16} {v}")
    if e.history:
        lines.append("history:         " + ", ".join(f"v{h.get('version')}" for h in e.history[-10:]))
    return "\n".join(lines)


def _adapter_info(folder: Path) -> dict:
    try:
        return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _content_hash(folder: Path) -> str:
    from npcbus.adapter_store import content_hash, read_adapter_files

    return content_hash(read_adapter_files(folder))


def _base_for(base_arg: str | None, entry) -> str:
    """--base-model, else the manifest entry's, else the configured base model (built if needed)."""
    if base_arg:
        return base_arg
    if entry is not None and entry.base_model:
        return entry.base_model
    from npcbus.model import resolve_base_model

    return resolve_base_model()


def _is_hub_id(name: str) -> bool:
    return bool(name) and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~")) \
        and name.count("/") <= 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------


def _greedy(model, tokenizer, prompts, max_new_tokens: int) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            enc = tokenizer(p, return_tensors="pt")
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            out.append(gen[0, enc["input_ids"].shape[1]:].tolist())
    return out


def merge_adapter(adapter_dir: str | os.PathLike, base_model: str, out_dir: str | os.PathLike, *,
                  dtype: str = "float32", check: bool = True, check_prompts=CHECK_PROMPTS,
                  max_new_tokens: int = 12, overwrite: bool = False) -> dict:
    """Merge a LoRA adapter into ``base_model`` and save the full model at ``out_dir``.

    With ``check``, the merged model is reloaded from disk and must give the same greedy tokens as
    base+adapter on ``check_prompts``; otherwise :class:`AdapterToolError` and nothing is left at
    ``out_dir``. Returns a report (also saved as ``npcbus_merge.json`` in the folder).
    """
    from peft import PeftModel

    from npcbus.model import load_model_and_tokenizer

    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise AdapterToolError(f"{out} exists and is not empty (pass --overwrite)")
    adapter_dir = Path(adapter_dir)
    base, tok = load_model_and_tokenizer(base_model, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    want = _greedy(model, tok, check_prompts, max_new_tokens) if check else None
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        report: dict[str, Any] = {
            "base_model": base_model,
            "adapter": str(adapter_dir),
            "adapter_content_hash": _content_hash(adapter_dir),
            "dtype": dtype,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checked": False,
        }
        if check:
            reloaded, rtok = load_model_and_tokenizer(tmp, dtype=dtype)
            got = _greedy(reloaded, rtok, check_prompts, max_new_tokens)
            if got != want:
                bad = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b]
                raise AdapterToolError(f"merged model differs from base+adapter on prompt(s) {bad}: "
                                       f"{want[bad[0]]} != {got[bad[0]]}")
            report.update(checked=True, check_prompts=list(check_prompts), check_tokens=max_new_tokens)
        (tmp / MERGE_INFO_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    report["path"] = str(out)
    return report


# --------------------------------------------------------------------------------------------
# publish
# --------------------------------------------------------------------------------------------


def _describe_base(base_model: str) -> str:
    if _is_hub_id(base_model):
        return f"`{base_model}`"
    from npcbus.model import read_stamp

    stamp = read_stamp(base_model) if base_model else None
    if stamp and stamp.get("kind") == "npcbus-default":
        return (f"the npcbus offline default model (a small Llama built locally by `npcbus model init`, seed "
                f"{stamp.get('seed')}, weights sha256 `{str(stamp.get('weights_sha256', ''))[:16]}...`; not on the hub)")
    return f"a local model (`{Path(base_model).name or base_model}`; not on the hub)" if base_model else \
        "the npcbus offline default model (not on the hub)"


def model_card(*, name: str, repo_id: str, base_model: str, version: int | None, content_hash: str,
               description: str = "", persona_id: str = "", metrics: dict | None = None,
               license: str = "other", adapter_config: dict | None = None) -> str:
    """The model card (README.md with metadata) of a published adapter."""
    meta = ["---", "library_name: peft", f"license: {license}"]
    if _is_hub_id(base_model):
        meta.append(f"base_model: {base_model}")
    meta += ["pipeline_tag: text-generation", "tags:", "- npcbus", "- lora", "- peft", "- game-npc", "---", ""]
    cfg = adapter_config or {}
    base_line = _describe_base(base_model)
    lines = [
        f"# {name}: an npcbus NPC persona adapter",
        "",
        description or f"A LoRA adapter that gives the NPC persona `{persona_id or name}` its voice.",
        "",
        "## Details",
        "",
        f"- Adapter name: `{name}`" + (f", persona `{persona_id}`" if persona_id else ""),
        f"- Version: {version if version is not None else 'unversioned'}",
        f"- Content hash (sha256 over the adapter files' names and bytes): `{content_hash}`",
        f"- Base model: {base_line}",
        f"- LoRA: rank {cfg.get('r', '?')}, alpha {cfg.get('lora_alpha', '?')}, "
        f"target modules {', '.join(sorted(cfg.get('target_modules') or [])) or '?'}",
    ]
    if metrics:
        lines += ["", "## Training metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float, str))]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base_name = {base_model if _is_hub_id(base_model) else 'BASE_MODEL_PATH'!r}",
        "base = AutoModelForCausalLM.from_pretrained(base_name)",
        "tokenizer = AutoTokenizer.from_pretrained(base_name)",
        f"model = PeftModel.from_pretrained(base, {repo_id!r})",
        "```",
        "",
        "With npcbus: `npcbus adapter register NAME --path FOLDER` (or `--source " + repo_id + "`), then "
        "send NPC requests with `\"adapter\": NAME`.",
        "",
        "## Intended use and limits",
        "",
        "Dialogue for non-player characters in games. The adapter writes JSON NPC responses in the npcbus "
        "response schema when prompted the npcbus way. It is small and trained on game dialogue: it is not a "
        "source of facts. The audience safety rails (refusals, masking, action limits) are applied by npcbus at "
        "inference time, not by these weights; serve it through npcbus or apply equivalent checks.",
        "",
    ]
    return "\n".join(meta + lines)


def _checkpoint_metrics(folder: Path) -> dict:
    try:
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    metrics = m.get("metrics") if isinstance(m, dict) else None
    return metrics if isinstance(metrics, dict) else {}


def stage_publish(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, repo_id: str, name: str,
                  base_model: str, version: int | None = None, description: str = "", persona_id: str = "",
                  license: str = "other", overwrite: bool = False) -> dict:
    """Write exactly what ``publish`` uploads into ``out_dir``; returns the list of files and more."""
    from npcbus.adapter_store import read_adapter_files

    src = Path(adapter_dir)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise AdapterToolError(f"{out} exists and is not empty (pass --overwrite)")
        shutil.rmtree(out)
    files = read_adapter_files(src)
    if not any(n.startswith("adapter_model") for n in files):
        raise AdapterToolError(f"{src} has no adapter weights (adapter_model.safetensors)")
    cfg = json.loads(files["adapter_config.json"])
    from npcbus.adapter_store import content_hash

    chash = content_hash(files)  # the files go up byte for byte: the hash names exactly them
    out.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        (out / fname).write_bytes(data)
    card = model_card(name=name, repo_id=repo_id, base_model=base_model, version=version, content_hash=chash,
                      description=description, persona_id=persona_id, metrics=_checkpoint_metrics(src),
                      license=license, adapter_config=cfg)
    (out / CARD_FILE).write_text(card, encoding="utf-8")
    info = {"name": name, "repo_id": repo_id, "version": version, "content_hash": chash, "base_model": base_model,
            "persona_id": persona_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    listing = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(out.iterdir())}
    return {"folder": str(out), "repo_id": repo_id, "files": listing, **{k: info[k] for k in ("version", "content_hash")}}


def upload_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                  commit_message: str = "Upload adapter with npcbus") -> str:
    """Create the repository if needed and upload ``folder``; returns the commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise AdapterToolError("publishing needs the huggingface_hub package (pip install huggingface_hub)") from None
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise AdapterToolError("publishing needs a Hugging Face token in HF_TOKEN")
    from npcbus.data.sources import check_hub_reachable, hub_offline_reason

    why = hub_offline_reason() or check_hub_reachable(timeout=5.0)
    if why:
        raise AdapterToolError(f"the Hugging Face hub is not reachable ({why}); use --dry-run to stage the folder")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_subcommand_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", default=None, help="Manifest file (default: ADAPTER_MANIFEST).")
    if name == "list":
        p.add_argument("--json", action="store_true", help="Print JSON.")
    elif name == "show":
        p.add_argument("name", help="Adapter name (name@N accepted).")
        p.add_argument("--json", action="store_true", help="Print JSON.")
    elif name == "register":
        p.add_argument("name", help="Adapter name: lower-case letters, digits, '_', '-', '.'.")
        p.add_argument("--base-model", default="", help="Base model name or path (empty: the configured default).")
        p.add_argument("--path", default="", help="Local PEFT adapter folder.")
        p.add_argument("--source", default="", help="Where versions come from otherwise: 'bus' or a hub repo id.")
        p.add_argument("--description", default="", help="What the adapter is for.")
        p.add_argument("--persona-id", default="", help="The NPC persona it serves.")
        p.add_argument("--version", type=int, default=None, help="Current version (default: none yet).")
        p.add_argument("--content-hash", default="", help="Content hash of that version (computed from --path if omitted).")
        p.add_argument("--replace", action="store_true", help="Update an existing entry.")
    elif name == "merge":
        p.add_argument("adapter", help="PEFT folder or registered name[@N].")
        p.add_argument("--out", required=True, help="Folder for the merged full model.")
        p.add_argument("--base-model", default="", help="Base model (default: the entry's, else the configured one).")
        p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16.")
        p.add_argument("--no-check", action="store_true", help="Skip the greedy-token check against base+adapter.")
        p.add_argument("--checkpoint-dir", default=None, help="Override CHECKPOINT_DIR.")
        p.add_argument("--overwrite", action="store_true", help="Replace --out.")
    elif name == "publish":
        p.add_argument("adapter", help="PEFT folder or registered name[@N].")
        p.add_argument("--repo-id", required=True, help="Hub repository, e.g. my-org/innkeeper-lora.")
        p.add_argument("--dry-run", action="store_true", help="Only write the folder that would be uploaded.")
        p.add_argument("--out", default=None, help="Staging folder (default: a temporary one; required with --dry-run).")
        p.add_argument("--base-model", default="", help="Base model (default: the entry's, else the configured one).")
        p.add_argument("--license", default="other", help="License id for the model card.")
        p.add_argument("--private", action="store_true", help="Create a private repository.")
        p.add_argument("--checkpoint-dir", default=None, help="Override CHECKPOINT_DIR.")
        p.add_argument("--overwrite", action="store_true", help="Replace the staging folder.")
    else:  # pragma: no cover - the command table names only these
        raise ValueError(f"unknown adapter subcommand {name!r}")


def _run_list(args) -> int:
    entries = _manifest(args).list()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no adapters registered in {_manifest(args).path}")
        return 0
    rows = [("NAME", "VERSION", "BASE MODEL", "PERSONA", "WHERE", "UPDATED")]
    for e in entries:
        rows.append((e.name, "-" if e.current_version is None else str(e.current_version),
                     e.base_model or "(default)", e.persona_id or "-", e.location or "-", e.updated))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _run_show(args) -> int:
    e, version = _manifest(args).resolve_ref(args.name)
    if args.json:
        print(json.dumps({**e.to_dict(), "resolved_version": version}, indent=2))
    else:
        print(_fmt_entry(e))
    return 0


def _run_register(args) -> int:
    from npcbus.adapters import is_adapter_folder

    chash = args.content_hash
    base = args.base_model
    if args.path:
        if not is_adapter_folder(args.path):
            raise AdapterToolError(f"--path {args.path} is not a PEFT adapter folder (no adapter_config.json)")
        if args.version is not None and not chash:
            chash = _content_hash(Path(args.path))
    e = _manifest(args).register(
        args.name, base_model=base, path=str(Path(args.path).expanduser().resolve()) if args.path else "",
        source=args.source, description=args.description, persona_id=args.persona_id, version=args.version,
        content_hash=chash, replace=args.replace)
    print(_fmt_entry(e))
    return 0


def _locate(args):
    from npcbus.adapters import locate_adapter

    return locate_adapter(args.adapter, manifest=_manifest(args), checkpoint_dir=args.checkpoint_dir)


def _run_merge(args) -> int:
    loc = _locate(args)
    base = _base_for(args.base_model, loc.entry)
    print(f"merging {loc.path} into {base} ...", file=sys.stderr)
    report = merge_adapter(loc.path, base, args.out, dtype=args.dtype, check=not args.no_check,
                           overwrite=args.overwrite)
    print(json.dumps(report, indent=2))
    return 0


def _run_publish(args) -> int:
    loc = _locate(args)
    entry = loc.entry
    name = entry.name if entry else Path(loc.path).name.lower()
    base = args.base_model or (entry.base_model if entry and entry.base_model else "")
    if not base:
        base = _adapter_info(loc.path).get("base_model_name_or_path") or ""
    if args.dry_run and not args.out:
        raise AdapterToolError("--dry-run needs --out (the folder to write)")
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="npcbus-publish-")
        out = os.path.join(tmp, "adapter")
    try:
        staged = stage_publish(loc.path, out, repo_id=args.repo_id, name=name, base_model=base, version=loc.version,
                               description=entry.description if entry else "",
                               persona_id=entry.persona_id if entry else "", license=args.license,
                               overwrite=args.overwrite)
        if args.dry_run:
            staged["dry_run"] = True
            print(json.dumps(staged, indent=2))
            print(f"dry run: would upload {len(staged['files'])} files from {out} to {args.repo_id}", file=sys.stderr)
            return 0
        staged["commit"] = upload_folder(out, args.repo_id, private=args.private,
                                         commit_message=f"npcbus adapter {name} v{loc.version}")
        print(json.dumps(staged, indent=2))
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from npcbus.adapters import ManifestError

    sub = args.command_path[-1]
    handlers = {"list": _run_list, "show": _run_show, "register": _run_register, "merge": _run_merge,
                "publish": _run_publish}
    try:
        return handlers[sub](args)
    except (ManifestError, AdapterToolError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
