"""Data tools: the build (sources, filters, weights, deduplication, bounded memory, hub errors),
NPC data validation and splits, and token blocks."""

from __future__ import annotations

import gc
import itertools
import json
import random
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from npcbus.data import build as B
from npcbus.data.dedup import (
    _GROUP_CHARS,
    _MAX_ROWS,
    ExactDuplicateFilter,
    MinHashSigner,
    NearDuplicateIndex,
    datasketch_minhash,
    shingle_set,
)
from npcbus.data.sources import HubUnavailableError, SourceError, check_hub_reachable, parse_source
from npcbus.data.text import FilterConfig, clean_text, detect_language, filter_reason, quality_reason

FUNCTION_WORDS = "the of and to in is was that it for with as he she on be at by this had not are but from or".split()


def _vocab(seed: int, n: int = 4000) -> list[str]:
    r = random.Random(seed)
    return ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(3, 9))) for _ in range(n)]


VOCAB = _vocab(0)


def english_like(r: random.Random, n_words: int = 120) -> str:
    """Pseudo-English: random content words mixed with frequent function words."""
    words = [r.choice(FUNCTION_WORDS) if r.random() < 0.4 else r.choice(VOCAB) for _ in range(n_words)]
    return (" ".join(words)).capitalize() + "."


def mutate(text: str, r: random.Random, n_changes: int) -> str:
    words = text.split()
    for _ in range(n_changes):
        words[r.randrange(len(words))] = r.choice(VOCAB)
    return " ".join(words)


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    sa, sb = shingle_set(a, ngram), shingle_set(b, ngram)
    return len(sa & sb) / len(sa | sb)


def read_shards(out: Path) -> list[dict]:
    recs = []
    for f in sorted(out.glob("data-*.jsonl")):
        recs.extend(json.loads(line) for line in f.read_text(encoding="utf-8").splitlines())
    return recs


def quiet(**kw) -> B.BuildConfig:
    kw.setdefault("progress", False)
    return B.BuildConfig(**kw)


# --------------------------------------------------------------------------------------------
# text: cleaning, language, quality
# --------------------------------------------------------------------------------------------


def test_clean_text_normalizes_whitespace_and_controls():
    raw = "  Hello\x00 world\t\t again \r\n\r\n\r\n\r\nNext\u200b para  \n"
    assert clean_text(raw) == "Hello world again\n\nNext para"


@pytest.mark.parametrize(
    "text, lang",
    [
        ("The old man walked to the market and he was not happy with the price of the bread that day.", "en"),
        ("Der alte Mann ging auf den Markt und er war nicht zufrieden mit dem Preis, das ist so.", "de"),
        ("Le vieil homme est allé au marché et il n'était pas content du prix du pain dans la ville.", "fr"),
        ("El viejo fue al mercado y no estaba contento con el precio del pan para la casa.", "es"),
        ("Старик пошёл на рынок и был недоволен ценой хлеба в тот день.", "ru"),
        ("老人去市场买面包，他对价格不满意。", "zh"),
    ],
)
def test_detect_language(text, lang):
    assert detect_language(text)[0] == lang


def test_quality_rules_give_reason_codes():
    cfg = FilterConfig(min_chars=0, min_words=0, languages=())
    good = english_like(random.Random(3), 200)
    assert quality_reason(good, cfg) is None
    assert quality_reason("buy now " * 100, cfg) == "quality:repetition"
    bullets = [f"- take the {w} and the {v} home" for w, v in zip(VOCAB[:20], VOCAB[20:40], strict=True)]
    assert quality_reason("\n".join(bullets + ["and then some text here"]), cfg) == "quality:bullets"
    assert quality_reason("\n".join(["the same line again and again"] * 5 + bullets[:3]), cfg) == "quality:repeated_lines"
    assert quality_reason(" ".join(["1234 5678 9012"] * 40), cfg) == "quality:non_alpha"
    assert quality_reason(good.upper(), cfg) == "quality:uppercase"
    assert quality_reason(" ".join(["#tag #tag2 word"] * 30) + " " + good, cfg) == "quality:symbols"
    assert filter_reason("too short", FilterConfig())[0] == "too_short"
    assert filter_reason("Der Mann ist nicht da und die Frau ist auch nicht da. " * 10, FilterConfig())[0] == "language"


# --------------------------------------------------------------------------------------------
# MinHash signatures
# --------------------------------------------------------------------------------------------


def test_batch_signatures_equal_datasketch_minhash():
    r = random.Random(5)
    long_doc = english_like(r, _MAX_ROWS + 500)  # more shingles than one block
    assert len(long_doc) > _GROUP_CHARS // 8
    texts = [english_like(r, n) for n in (3, 7, 60, 200)] + ["Ünïcödé wörds, ナイフ and 刀 mixed in text here.", "",
                                                               "..", long_doc, english_like(r, 40)]
    signer = MinHashSigner(num_perm=64, ngram=5, seed=3)
    sigs, has = signer.signatures(texts)
    assert has.tolist() == [True, True, True, True, True, False, False, True, True]
    for i, t in enumerate(texts):
        if has[i]:
            ref = datasketch_minhash(t, num_perm=64, ngram=5, seed=3)
            assert np.array_equal(ref.hashvalues, sigs[i]), i
    # one text alone or in a batch gives the same signature
    alone, _ = signer.signatures([texts[2]])
    assert np.array_equal(alone[0], sigs[2])


def test_signature_estimates_jaccard():
    r = random.Random(9)
    a = english_like(r, 300)
    b = mutate(a, r, 12)
    signer = MinHashSigner(num_perm=256)
    sigs, _ = signer.signatures([a, b])
    est = float((sigs[0] == sigs[1]).mean())
    assert abs(est - jaccard(a, b)) < 0.1


def test_exact_filter_is_bounded():
    f = ExactDuplicateFilter(capacity=10)
    assert not f.seen("Hello  World")
    assert f.seen("hello world")
    for i in range(50):
        f.seen(f"doc {i}")
    assert len(f) == 10 and f.evicted == 41
    assert not f.seen("hello world")  # forgotten: it left the window


# --------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------


def test_near_duplicates_removed_at_threshold(tmp_path):
    r = random.Random(11)
    threshold = 0.8
    originals = [english_like(r, r.randint(100, 180)) for _ in range(300)]
    docs: list[str] = []
    planted_close: list[str] = []
    planted_far: list[str] = []
    for i, d in enumerate(originals):
        docs.append(d)
        if i % 3 == 0:
            near = mutate(d, r, 1)  # Jaccard about 0.93
            planted_close.append((near, d))
            docs.append(near)
        elif i % 3 == 1:
            far = mutate(d, r, max(12, len(d.split()) // 6))  # Jaccard well below the threshold
            planted_far.append((far, d))
            docs.append(far)
    assert max(jaccard(originals[0], o) for o in originals[1:20]) < 0.2  # originals are unrelated
    stats = B.build_from_streams(
        [B.Stream("gen", 1.0, docs)], tmp_path / "out",
        quiet(dedup=B.DedupConfig(use_minhash=True, threshold=threshold), batch_size=64),
    )
    kept = {rec["text"] for rec in read_shards(tmp_path / "out")}
    assert all(o in kept for o in originals)  # an original always comes first
    assert min(jaccard(d, o) for d, o in planted_close) >= threshold + 0.05
    removed_close = sum(1 for d, _ in planted_close if d not in kept)
    assert removed_close == len(planted_close), f"{len(planted_close) - removed_close} near duplicates kept"
    assert max(jaccard(d, o) for d, o in planted_far) < threshold - 0.2
    assert all(d in kept for d, _ in planted_far), "documents below the threshold must be kept"
    assert stats["dropped"].get("duplicate_near", 0) == removed_close
    assert stats["read"] == stats["kept"] + stats["dropped_total"]


def test_threshold_moves_the_cut(tmp_path):
    r = random.Random(12)
    a = english_like(r, 200)
    b = mutate(a, r, 8)  # Jaccard around 0.8
    j = jaccard(a, b)
    assert 0.6 < j < 0.9
    low = NearDuplicateIndex(threshold=max(0.05, j - 0.2), num_perm=256)
    high = NearDuplicateIndex(threshold=min(1.0, j + 0.1), num_perm=256)
    assert low.add_batch([a, b]) == [True, False]
    assert high.add_batch([a, b]) == [True, True]


def _source(name: str, seed: int, short_frac: float = 0.0, dup_frac: float = 0.0, n: int | None = None):
    r = random.Random(seed)
    recent: list[str] = []
    counter = itertools.count() if n is None else range(n)
    for _ in counter:
        x = r.random()
        if x < short_frac:
            yield "tiny text"
        elif x < short_frac + dup_frac and recent:
            yield r.choice(recent)
        else:
            d = english_like(r, r.randint(40, 120))
            recent = (recent + [d])[-20:]
            yield d


def test_weights_hold_and_stats_add_up(tmp_path):
    streams = [
        B.Stream("a", 0.5, _source("a", 1, short_frac=0.3)),
        B.Stream("b", 0.3, _source("b", 2, dup_frac=0.25)),
        B.Stream("c", 0.2, _source("c", 3)),
    ]
    stats = B.build_from_streams(streams, tmp_path / "out",
                                 quiet(max_total=1500, shard_size=400, dedup=B.DedupConfig(use_minhash=True)))
    assert stats["kept"] == 1500 and stats["stopped"] == "max_total"
    for name, target in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(stats["sources"][name]["share"] - target) < 0.01, stats["weights"]
    assert stats["weights"]["max_abs_error"] < 0.01
    # stats add up, overall and per source
    assert stats["read"] == stats["kept"] + stats["dropped_total"]
    assert stats["dropped_total"] == sum(stats["dropped"].values())
    assert sum(s["read"] for s in stats["sources"].values()) == stats["read"]
    assert sum(s["kept"] for s in stats["sources"].values()) == stats["kept"]
    for s in stats["sources"].values():
        assert s["read"] == s["kept"] + sum(s["dropped"].values())
    assert stats["sources"]["a"]["dropped"]["too_short"] > 100
    assert stats["sources"]["b"]["dropped"]["duplicate_exact"] > 50
    # shards
    recs = read_shards(tmp_path / "out")
    assert len(recs) == 1500 == sum(s["records"] for s in stats["shards"])
    assert [s["records"] for s in stats["shards"]] == [400, 400, 400, 300]
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert {r["source"] for r in recs} == {"a", "b", "c"}


def test_weight_by_chars(tmp_path):
    short = (english_like(random.Random(i), 40) for i in itertools.count())
    long = (english_like(random.Random(10**6 + i), 160) for i in itertools.count())
    stats = B.build_from_streams([B.Stream("short", 0.5, short), B.Stream("long", 0.5, long)], tmp_path / "o",
                                 quiet(max_total=600, weight_by="chars"))
    s = stats["sources"]
    assert abs(s["short"]["kept_chars"] / (s["short"]["kept_chars"] + s["long"]["kept_chars"]) - 0.5) < 0.02
    assert s["short"]["kept"] > 2 * s["long"]["kept"]


def test_exhausted_source_is_reported(tmp_path):
    stats = B.build_from_streams(
        [B.Stream("small", 0.5, _source("s", 4, n=30)), B.Stream("big", 0.5, _source("b", 5, n=500))],
        tmp_path / "o", quiet())
    assert stats["stopped"] == "exhausted"
    assert stats["sources"]["small"]["exhausted"] and stats["sources"]["small"]["kept"] == 30
    assert stats["kept"] == 530


def test_mixed_local_sources(tmp_path):
    import datasets

    r = random.Random(21)
    books = tmp_path / "books"
    books.mkdir()
    body = "\n\n".join("\n".join(english_like(r, 30)[i:i + 70] for i in range(0, 200, 70)) for _ in range(60))
    (books / "book1.txt").write_text(
        "Licence words nobody wants.\n*** START OF THE EBOOK SOMETHING ***\n\n" + body
        + "\n\n*** END OF THE EBOOK SOMETHING ***\nMore licence words here.\n", encoding="utf-8")
    (books / "notes.md").write_text("\n\n".join(english_like(r, 80) for _ in range(3)), encoding="utf-8")
    jl = tmp_path / "web.jsonl"
    lines = [json.dumps({"text": english_like(r, 90), "id": f"w{i}"}) for i in range(40)]
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"body": "no text field"}))
    jl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = datasets.Dataset.from_dict({"text": [english_like(r, 70) for _ in range(30)]})
    ds.save_to_disk(str(tmp_path / "saved"))

    specs = [parse_source(f"books={books}"), parse_source(str(jl)), parse_source(f"wiki={tmp_path / 'saved'}")]
    assert [s.kind for s in specs] == ["text", "jsonl", "disk"]
    assert [s.name for s in specs] == ["books", "web", "wiki"]
    stats = B.build(specs, tmp_path / "out", quiet(chunk_chars=1500))
    recs = read_shards(tmp_path / "out")
    assert stats["sources"]["web"]["dropped"] == {"bad_record": 2}
    assert stats["sources"]["web"]["kept"] == 40 and stats["sources"]["wiki"]["kept"] == 30
    book_texts = [x["text"] for x in recs if x["source"] == "books"]
    assert book_texts and all(len(t) <= 1500 for t in book_texts)
    assert not any("licence" in t.lower() for t in book_texts)
    assert stats["read"] == stats["kept"] + stats["dropped_total"]
    assert {x["id"] for x in recs if x["source"] == "web"} == {f"w{i}" for i in range(40)}
    # an existing output is not overwritten without asking
    with pytest.raises(FileExistsError):
        B.build(specs, tmp_path / "out", quiet())


def test_cli_build(tmp_path, capsys):
    from npcbus.cli import main

    r = random.Random(8)
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps({"text": english_like(r)}) for _ in range(50)) + "\n")
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(json.dumps({"content": english_like(r)}) for _ in range(50)) + "\n")
    rc = main(["data", "build", "-s", f"one={a}", "-s", f"two={b}", "--out", str(tmp_path / "o"), "--weights",
               "one=3,two=1", "--max-total", "40", "--use-minhash", "--minhash-threshold", "0.7", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "kept 40" in out and "bad_record" in out  # b has no "text" field
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["dedup"]["minhash"]["threshold"] == 0.7
    assert stats["sources"]["one"]["kept"] == 40
    rc = main(["data", "build", "-s", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    rc = main(["data", "build", "-s", str(a), "-s", str(b), "--weights", "1,2,3", "--out", str(tmp_path / "o3")])
    assert rc == 2


# --------------------------------------------------------------------------------------------
# bounded memory
# --------------------------------------------------------------------------------------------


def test_endless_source_stops_at_max_total(tmp_path):
    endless = _source("endless", 31, short_frac=0.2, dup_frac=0.1)  # never ends
    t = time.monotonic()
    stats = B.build_from_streams([B.Stream("endless", 1.0, endless)], tmp_path / "o", quiet(max_total=300))
    assert stats["kept"] == 300 and stats["stopped"] == "max_total"
    assert stats["read"] < 600
    assert time.monotonic() - t < 30


def _peak_build(tmp_path: Path, n_docs: int, capacity: int, tag: str) -> tuple[float, dict]:
    gc.collect()
    tracemalloc.start()
    try:
        docs = (english_like(random.Random(i), 60) for i in range(n_docs))
        stats = B.build_from_streams(
            [B.Stream("gen", 1.0, docs)], tmp_path / tag,
            quiet(shard_size=1000, dedup=B.DedupConfig(use_minhash=True, capacity=capacity)))
        return tracemalloc.get_traced_memory()[1], stats
    finally:
        tracemalloc.stop()


def test_memory_bounded_on_input_many_times_the_cap(tmp_path):
    cap = 250
    peak_small, s_small = _peak_build(tmp_path, 2 * cap, cap, "small")
    peak_big, s_big = _peak_build(tmp_path, 16 * cap, cap, "big")
    assert s_big["kept"] == 16 * cap  # all unique
    assert s_big["dedup"]["index_size"] == cap and s_big["dedup"]["index_evicted"] == 15 * cap
    # 8x the input, same index capacity: the peak stays put (an unbounded index would grow ~8x)
    assert peak_big < 1.3 * peak_small + 1.5 * 2**20, (peak_small, peak_big)


# --------------------------------------------------------------------------------------------
# the hub without network
# --------------------------------------------------------------------------------------------


def test_hub_name_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = parse_source("openwebtext")
    assert spec.kind == "hub" and spec.location == "Skylion007/openwebtext"
    assert parse_source("hf:wikipedia").config == "20231101.en"
    t = time.monotonic()
    with pytest.raises(HubUnavailableError, match="not reachable.*HF_HUB_OFFLINE"):
        B.build([spec], tmp_path / "o", quiet())
    assert time.monotonic() - t < 2


def test_hub_unreachable_fails_fast(tmp_path, monkeypatch, capsys):
    from npcbus.cli import main

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t = time.monotonic()
    rc = main(["data", "build", "-s", "wikipedia", "--out", str(tmp_path / "o"), "--hub-timeout", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not reachable" in err and "local copy" in err
    assert time.monotonic() - t < 4


def test_hub_probe_times_out_on_a_silent_peer():
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)  # accepts connections, never answers
    try:
        t = time.monotonic()
        why = check_hub_reachable(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout=0.5, repo="x/y")
        assert why is not None and ("no answer" in why or "timed out" in why)
        assert time.monotonic() - t < 2
    finally:
        srv.close()


def test_hub_probe_wants_a_hub_answer():
    import http.server
    import threading

    class NotAHub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), NotAHub)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        why = check_hub_reachable(f"http://127.0.0.1:{srv.server_port}", timeout=1, repo="x/y")
        assert why is not None and "404" in why
    finally:
        srv.shutdown()


def test_source_spec_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        parse_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no text"):
        parse_source(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------
# NPC data: validation, deduplication, split
# --------------------------------------------------------------------------------------------

NPC_DATA = Path(__file__).resolve().parent.parent / "npcbus" / "data_files"


def _npc_records(name: str) -> list[dict]:
    return [json.loads(x) for x in (NPC_DATA / name).read_text(encoding="utf-8").splitlines() if x.strip()]


def test_npc_shipped_samples_validate_and_split(tmp_path):
    from npcbus.data.npc import group_key, prepare, shipped_paths
    from npcbus.npc import validate_request

    paths = shipped_paths(alignment=True)
    stats = prepare(paths, tmp_path / "a", val_frac=0.15, seed=1)
    total = len(_npc_records("npc_dialogue.jsonl")) + len(_npc_records("npc_alignment.jsonl"))
    assert stats["read"] == stats["valid"] == total and stats["dropped_total"] == 0
    train = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "a" / "validation.jsonl").read_text().splitlines()]
    assert len(train) + len(val) == total and 0.08 < len(val) / total < 0.25
    g_train = {group_key(validate_request(r["request"])) for r in train}
    g_val = {group_key(validate_request(r["request"])) for r in val}
    assert not g_train & g_val  # the same question to the same NPC never lands on both sides
    assert stats["by_split"]["validation"]["alignment"] and stats["by_split"]["train"]["alignment"]
    # deterministic; another seed, another split
    prepare(paths, tmp_path / "b", val_frac=0.15, seed=1)
    assert (tmp_path / "a" / "validation.jsonl").read_bytes() == (tmp_path / "b" / "validation.jsonl").read_bytes()
    prepare(paths, tmp_path / "c", val_frac=0.15, seed=2)
    assert (tmp_path / "a" / "validation.jsonl").read_bytes() != (tmp_path / "c" / "validation.jsonl").read_bytes()
    with pytest.raises(FileExistsError):
        prepare(paths, tmp_path / "a")


def test_npc_bad_records_and_duplicates_are_dropped(tmp_path, capsys):
    import copy

    from npcbus.cli import main

    dialogue = _npc_records("npc_dialogue.jsonl")[:30]
    refuse = next(r for r in _npc_records("npc_alignment.jsonl") if r["label"] == "refuse")
    bad_persona = copy.deepcopy(dialogue[0])
    bad_persona["request"].pop("persona", None)
    bad_persona["request"]["persona_id"] = "nobody"
    bad_emotion = copy.deepcopy(dialogue[1])
    bad_emotion["response"]["emotion"] = "ecstatic"
    dup = copy.deepcopy(dialogue[2])
    dup["request"]["player_input"] = "  " + dup["request"]["player_input"].upper() + " "
    dup["request"].setdefault("player", {})["id"] = "someone-else"
    dup["request"]["generation"] = {"seed": 99}
    near = copy.deepcopy(dialogue[3])
    near["response"]["dialogue"] = near["response"]["dialogue"].rstrip(".!?") + " indeed."
    not_refusing = copy.deepcopy(refuse)
    not_refusing["response"]["intent"] = "inform"
    bad_label = {**copy.deepcopy(refuse), "label": "maybe"}
    lines = [json.dumps(r) for r in dialogue] + ["{broken", json.dumps([1, 2])] + [
        json.dumps(r) for r in (bad_persona, bad_emotion, dup, near, not_refusing, bad_label, refuse)]
    f = tmp_path / "npc.jsonl"
    f.write_text("\n".join(lines) + "\n")
    rc = main(["data", "npc", "-i", str(f), "--out", str(tmp_path / "o"), "--near-dedup", "0.7", "--json"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["dropped"] == {"bad_json": 2, "duplicate": 1, "duplicate_near": 1, "invalid_alignment": 2,
                                "invalid_request": 1, "invalid_response": 1}
    assert "persona_id" in stats["dropped_examples"]["invalid_request"][0]
    assert "emotion" in stats["dropped_examples"]["invalid_response"][0]
    assert stats["valid"] == 31 == stats["train"] + stats["validation"]
    assert stats["read"] == stats["valid"] + stats["dropped_total"]


# --------------------------------------------------------------------------------------------
# token blocks
# --------------------------------------------------------------------------------------------


def test_blocks_are_fixed_length_and_shard_to_tasks(model_dir, tmp_path, capsys):
    from npcbus.cli import main
    from npcbus.data.blocks import make_blocks, read_block
    from npcbus.model import load_tokenizer
    from npcbus.tasks import task_examples

    tok = load_tokenizer(model_dir)
    r = random.Random(2)
    docs = [english_like(r, r.randint(20, 80)) for _ in range(60)]
    src = tmp_path / "shards"
    src.mkdir()
    (src / "data-00000.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:30]) + "\n")
    (src / "data-00001.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[30:]) + "\n")
    meta = make_blocks([src], tmp_path / "blocks", tok, seq_len=32, batch_size=2, steps_per_block=3,
                       tokenizer_name=model_dir)
    per = 6
    assert meta["sequences_per_block"] == per and meta["num_blocks"] >= 3
    # the packed stream is bos doc eos, in order
    stream = []
    for d in docs:
        stream += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert meta["tokens_read"] == len(stream)
    n = meta["num_blocks"]
    assert meta["num_sequences"] == n * per and meta["sequences_dropped"] == len(stream) // 32 - n * per
    for b in range(n):
        blk = read_block(tmp_path / "blocks", b)
        assert blk.shape == (per, 32)
        assert blk.reshape(-1).tolist() == stream[b * per * 32 : (b + 1) * per * 32]
        # a task's shard b of n is exactly block b
        shard = task_examples(meta["task_data"][b])
        assert [x["block"] for x in shard] == [b] * per
        assert [x["input_ids"] for x in shard] == blk.tolist()
        assert all(len(x["input_ids"]) == 32 for x in shard)
    # the text form re-tokenizes to the same ids (bos/eos at the ends left to the trainer)
    x = task_examples(meta["task_data"][0])[0]
    ids = x["input_ids"]
    inner = ids[1:] if ids[0] == tok.bos_token_id else ids
    inner = inner[:-1] if inner and inner[-1] == tok.eos_token_id else inner
    assert tok(x["text"], add_special_tokens=False)["input_ids"] == inner
    # CLI, and too little text for one block
    rc = main(["data", "blocks", "-i", str(src), "-o", str(tmp_path / "b2"), "--seq-len", "16", "--batch-size", "2",
               "--steps-per-block", "2", "--max-blocks", "2", "--base-model", model_dir])
    assert rc == 0 and "npcbus task publish" in capsys.readouterr().out
    assert json.loads((tmp_path / "b2" / "blocks.json").read_text())["num_blocks"] == 2
    rc = main(["data", "blocks", "-i", str(src), "-o", str(tmp_path / "b3"), "--seq-len", "512", "--batch-size", "8",
               "--steps-per-block", "50", "--base-model", model_dir])
    assert rc == 2 and "not enough text" in capsys.readouterr().err
