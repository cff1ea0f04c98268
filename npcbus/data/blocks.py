"""``npcbus data blocks``: tokenized fixed-length blocks for training tasks.

Documents (the JSONL shards of ``npcbus data build``, other JSONL files with a text field, or text
files) are tokenized with the configured base model's tokenizer (``--base-model``, else
``BASE_MODEL``, else the offline default model), each as ``bos text eos``, and packed into one
stream that is cut into sequences of exactly ``--seq-len`` tokens. ``--batch-size`` x
``--steps-per-block`` consecutive sequences make one block: the data of one training task.

Output in ``OUT``:

- ``tokens.u32``: every sequence, row after row (uint32, ``[num_sequences, seq_len]``);
- ``blocks.jsonl``: the same sequences as ``{"input_ids": [...], "text": ..., "block": b}`` records,
  interleaved so that shard ``b`` of ``n`` (records ``b, b+n, ...``, the way a task reads a shard
  of a file) is exactly block ``b``; ``text`` is the decoded sequence (special tokens inside it
  written out, a leading bos and a trailing eos left to the trainer), for trainers that tokenize
  text themselves;
- ``blocks.json``: sizes, tokenizer, counts, and the command that publishes one task per block.

Memory stays bounded: documents are read and tokenized in small batches, sequences go straight to
``tokens.u32``, and ``blocks.jsonl`` is written from that file at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

TOKENS_FILE = "tokens.u32"
RECORDS_FILE = "blocks.jsonl"
META_FILE = "blocks.json"


def iter_documents(inputs: Iterable[str | os.PathLike], text_field: str = "text") -> Iterator[str]:
    """Texts of JSONL files (``text_field``), text files (read line by line, cut into documents of about
    8000 characters at paragraph boundaries), and folders of either (sorted, recursive)."""
    for inp in inputs:
        p = Path(inp).expanduser()
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        if p.is_dir():
            files = [f for f in files if f.name.endswith((".jsonl", ".txt", ".md")) and not f.name.startswith(".")]
        if not files or not all(f.exists() for f in files):
            raise FileNotFoundError(f"no input files at {inp}")
        for f in files:
            if f.name.endswith(".jsonl"):
                with open(f, encoding="utf-8") as fh:
                    for line in fh:
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            continue
                        t = rec.get(text_field) if isinstance(rec, dict) else None
                        if isinstance(t, str) and t.strip():
                            yield t
            else:
                from npcbus.data.sources import read_text_file

                for doc in read_text_file(str(f), "text", chunk_chars=8000):
                    if doc.text and doc.text.strip():
                        yield doc.text


def _batches(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def _inner(ids: list[int], bos: int | None, eos: int | None) -> list[int]:
    """The ids whose decoded text a trainer that adds bos and eos itself should see."""
    a = 1 if ids and bos is not None and ids[0] == bos else 0
    b = len(ids) - 1 if len(ids) > a and eos is not None and ids[-1] == eos else len(ids)
    return ids[a:b]


def make_blocks(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, tokenizer, *, seq_len: int = 256,
                batch_size: int = 4, steps_per_block: int = 20, max_blocks: int | None = None,
                text_field: str = "text", tokenizer_name: str = "", overwrite: bool = False) -> dict:
    """Tokenize, pack and write blocks; returns the metadata (also written to ``blocks.json``)."""
    if seq_len < 2 or batch_size < 1 or steps_per_block < 1:
        raise ValueError("seq_len must be >= 2, batch_size and steps_per_block >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any((out / f).exists() for f in (TOKENS_FILE, RECORDS_FILE, META_FILE)) and not overwrite:
        raise FileExistsError(f"{out} already holds blocks; pass --overwrite")
    if len(tokenizer) > 2**32 - 1:
        raise ValueError("vocabulary too large for uint32 tokens")
    per_block = batch_size * steps_per_block
    max_seqs = None if max_blocks is None else max_blocks * per_block
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    buf: list[int] = []
    n_seq = n_docs = n_tokens = 0
    tok_tmp = out / (TOKENS_FILE + ".tmp")
    with open(tok_tmp, "wb") as fh:
        for docs in _batches(iter_documents(inputs, text_field), 64):
            enc = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
            for ids in enc:
                n_docs += 1
                doc = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
                n_tokens += len(doc)
                buf.extend(doc)
            while len(buf) >= seq_len and (max_seqs is None or n_seq < max_seqs):
                fh.write(np.asarray(buf[:seq_len], dtype=np.uint32).tobytes())
                del buf[:seq_len]
                n_seq += 1
            if max_seqs is not None and n_seq >= max_seqs:
                break
    n_blocks = n_seq // per_block
    used = n_blocks * per_block
    if n_blocks == 0:
        tok_tmp.unlink(missing_ok=True)
        raise ValueError(f"not enough text for one block: {n_seq} sequences of {seq_len} tokens, "
                         f"a block needs {per_block} (batch_size x steps_per_block)")
    # keep whole blocks only
    with open(tok_tmp, "r+b") as fh:
        fh.truncate(used * seq_len * 4)
    os.replace(tok_tmp, out / TOKENS_FILE)
    tokens = np.memmap(out / TOKENS_FILE, dtype=np.uint32, mode="r", shape=(used, seq_len))
    rec_tmp = out / (RECORDS_FILE + ".tmp")
    with open(rec_tmp, "w", encoding="utf-8") as fh:
        for pos in range(per_block):
            rows = [b * per_block + pos for b in range(n_blocks)]
            seqs = np.asarray(tokens[rows]).tolist()
            texts = tokenizer.batch_decode([_inner(s, bos, eos) for s in seqs], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
            for b, ids, text in zip(range(n_blocks), seqs, texts, strict=True):
                fh.write(json.dumps({"input_ids": ids, "text": text, "block": b}, ensure_ascii=False) + "\n")
    os.replace(rec_tmp, out / RECORDS_FILE)
    del tokens
    records = str((out / RECORDS_FILE).resolve())
    meta = {
        "format": 1,
        "tokenizer": tokenizer_name,
        "vocab_size": len(tokenizer),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps_per_block": steps_per_block,
        "sequences_per_block": per_block,
        "num_blocks": n_blocks,
        "num_sequences": used,
        "tokens_in_blocks": used * seq_len,
        "documents": n_docs,
        "tokens_read": n_tokens,
        "sequences_dropped": n_seq - used,
        "tokens_file": TOKENS_FILE,
        "tokens_dtype": "uint32",
        "records_file": RECORDS_FILE,
        "task_data": [{"path": records, "shard": b, "num_shards": n_blocks} for b in range(min(n_blocks, 1000))],
        "publish": (f"npcbus task publish --adapter ADAPTER --data {records} --num-tasks {n_blocks} "
                    f"--steps {steps_per_block} --hp batch_size={batch_size} --hp max_length={seq_len + 2}"),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def read_block(out_dir: str | os.PathLike, block: int) -> np.ndarray:
    """The ``[sequences_per_block, seq_len]`` token ids of one block, from ``tokens.u32``."""
    meta = json.loads((Path(out_dir) / META_FILE).read_text(encoding="utf-8"))
    per, L = meta["sequences_per_block"], meta["seq_len"]
    tokens = np.memmap(Path(out_dir) / meta["tokens_file"], dtype=np.uint32, mode="r",
                       shape=(meta["num_sequences"], L))
    return np.array(tokens[block * per : (block + 1) * per])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", action="append", required=True, metavar="PATH",
                   help="JSONL shards or folder (e.g. the output of `npcbus data build`), or text files; repeatable.")
    p.add_argument("--out", "-o", required=True, help="Output folder.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence.")
    p.add_argument("--batch-size", type=int, default=4, help="Sequences per optimizer step.")
    p.add_argument("--steps-per-block", type=int, default=20, help="Optimizer steps per block (one task).")
    p.add_argument("--max-blocks", type=int, default=None, help="Stop after this many blocks.")
    p.add_argument("--base-model", default="", help="Tokenizer of this model (default: the configured base model).")
    p.add_argument("--text-field", default="text", help="Text field of JSONL records.")
    p.add_argument("--overwrite", action="store_true", help="Replace existing blocks.")


def run(args: argparse.Namespace) -> int:
    from npcbus.model import load_tokenizer, resolve_base_model

    try:
        name = args.base_model or resolve_base_model()
        tok = load_tokenizer(name)
        meta = make_blocks(args.input, args.out, tok, seq_len=args.seq_len, batch_size=args.batch_size,
                           steps_per_block=args.steps_per_block, max_blocks=args.max_blocks,
                           text_field=args.text_field, tokenizer_name=name, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{meta['num_blocks']} blocks of {meta['sequences_per_block']} x {meta['seq_len']} tokens "
          f"({meta['documents']} documents, {meta['tokens_read']} tokens read, {meta['sequences_dropped']} "
          f"sequences left over) in {args.out}")
    print(meta["publish"])
    return 0
