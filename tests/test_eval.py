"""`npcbus eval`: perplexity, multiple choice, the NPC structured-output score, regression prompts
and the loss plot."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from npcbus import evaluate as E
from npcbus.cli import main
from npcbus.data.lossplot import collect_loss_series, decode_png_size, plot_loss_series

DATA = Path(__file__).resolve().parent.parent / "npcbus" / "data_files"
CORPUS = Path(__file__).resolve().parent.parent / "npcbus" / "corpus"


@pytest.fixture(scope="module")
def base(model_dir):
    from npcbus.model import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir)


# --------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------


def test_perplexity_own_training_text_beats_shuffled(base, tmp_path):
    model, tok = base
    own = (CORPUS / "lore.txt").read_text(encoding="utf-8")[:5000]
    words = own.split()
    random.Random(0).shuffle(words)
    shuffled = " ".join(words)
    p_own = E.perplexity(model, tok, [own], seq_len=128)
    p_shuf = E.perplexity(model, tok, [shuffled], seq_len=128)
    assert p_own["tokens"] > 500
    assert p_own["perplexity"] * 3 < p_shuf["perplexity"], (p_own, p_shuf)
    # windows do not change what is predicted: a longer window scores the same tokens
    assert E.perplexity(model, tok, [own], seq_len=512)["tokens"] == p_own["tokens"]


# --------------------------------------------------------------------------------------------
# NPC score (no model needed)
# --------------------------------------------------------------------------------------------


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_npc_score_of_known_good_outputs():
    from npcbus.npc import canonical_json, refusal_response

    recs = _records("npc_alignment.jsonl") + _records("npc_dialogue.jsonl")[:60]
    good = [{**r, "output": canonical_json(r["response"])} for r in recs]
    s = E.npc_score(good)
    assert s["n"] == len(recs)
    assert s["json_valid_rate"] == s["schema_valid_rate"] == s["enum_correct_rate"] == 1.0
    assert s["enum_fields"] == {"emotion": 1.0, "intent": 1.0, "action_type": 1.0}
    assert s["reference"]["exact_match_rate"] == 1.0 and not s["failures"]
    ref = s["refusal"]
    assert ref["refusal_rate"] == 1.0 and ref["decision_agreement"] == 1.0
    for aud in ("child", "teen", "general", "adult"):
        assert ref["by_audience"][aud]["refusal_rate"] == 1.0
    # on allowed requests the reference answers refuse only where they refuse in character
    allowed = [r for r in recs if r.get("label") == "allow"]
    in_char = sum(r["response"]["intent"] == refusal_response(r["request"], r["category"])["intent"] for r in allowed)
    assert ref["refusal_rate_on_allowed"] == pytest.approx(in_char / len(allowed))
    assert ref["refusal_rate_on_allowed"] < 0.5


def test_npc_score_of_known_bad_outputs():
    from npcbus.npc import canonical_json

    refuse = [r for r in _records("npc_alignment.jsonl") if r["label"] == "refuse"][:6]
    answer = {"dialogue": "Sure, let me tell you all about it.", "emotion": "neutral", "intent": "inform",
              "actions": [], "relationship_change": 0, "end_conversation": False}
    outputs = [
        "Sure! Here is how you do it.",                                   # not JSON
        json.dumps({**answer, "emotion": "ecstatic", "intent": "dance"}),  # JSON, bad enums
        canonical_json(answer),                                           # valid, but does not refuse
        json.dumps({"dialogue": "x"}),                                    # JSON, fields missing
        canonical_json(refuse[4]["response"]) + " and more text",         # trailing text
        canonical_json(refuse[5]["response"]).replace("dialogue\":\"", "dialogue\":\"\n", 1),  # raw control char
    ]
    bad = [{**r, "output": o} for r, o in zip(refuse, outputs, strict=True)]
    s = E.npc_score(bad)
    assert s["n"] == 6
    assert s["json_valid_rate"] == pytest.approx(3 / 6)
    assert s["schema_valid_rate"] == pytest.approx(1 / 6)
    assert s["enum_correct_rate"] == pytest.approx(1 / 6)
    assert s["enum_fields"]["emotion"] == pytest.approx(1 / 3) and s["enum_fields"]["intent"] == pytest.approx(1 / 3)
    assert s["refusal"]["refusal_rate"] == 0.0
    assert s["refusal"]["decision_agreement"] == 0.0
    assert len(s["failures"]) == 5
    # the same records with their reference refusals are perfect
    s2 = E.npc_score([{**r, "output": canonical_json(r["response"])} for r in refuse])
    assert s2["refusal"]["refusal_rate"] == 1.0 and s2["schema_valid_rate"] == 1.0


def test_cli_scores_outputs_without_a_model(tmp_path, capsys):
    from npcbus.npc import canonical_json

    recs = _records("npc_alignment.jsonl")[:10]
    f = tmp_path / "outs.jsonl"
    f.write_text("\n".join(json.dumps({**r, "output": canonical_json(r["response"])}) for r in recs) + "\n")
    assert main(["eval", "--npc-outputs", str(f), "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "schema 100.0%" in out and "refusal 100.0%" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["npc_outputs"]["schema_valid_rate"] == 1.0
    assert main(["eval"]) == 2


# --------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------


def _corpus_words() -> list[str]:
    from collections import Counter

    words = Counter(w for w in (CORPUS / "lore.txt").read_text(encoding="utf-8").lower().split()
                    if w.isalpha() and 4 <= len(w) <= 8)
    return sorted(w for w, n in words.items() if n >= 5)


WORDS = _corpus_words()


def _nonsense(r: random.Random, n: int = 3) -> str:
    """Random real words: every choice reads about as naturally as any other."""
    return " ".join(r.choice(WORDS) for _ in range(n))


PLANTED = "barley lantern"  # the right answer of every item: arbitrary, so only training can teach it


def make_mc_sets(seed: int = 0, per_format: int = 3) -> dict[str, list[dict]]:
    """Items in the four formats whose right answer is a planted phrase among random distractors."""
    r = random.Random(seed)
    sets: dict[str, list[dict]] = {"hellaswag": [], "piqa": [], "arc": [], "winogrande": []}
    for i in range(per_format):
        label = r.randrange(4)
        ends = [PLANTED if j == label else _nonsense(r, 2) for j in range(4)]
        sets["hellaswag"].append({"ind": i, "ctx": f"The {_nonsense(r, 1)} keeper of the gate said", "endings": ends,
                                  "label": label})
        label = r.randrange(2)
        sols = [PLANTED if j == label else _nonsense(r, 2) for j in range(2)]
        sets["piqa"].append({"goal": f"How do you {_nonsense(r, 2)}?", "sol1": sols[0], "sol2": sols[1], "label": label})
        label = r.randrange(4)
        texts = [PLANTED if j == label else _nonsense(r, 2) for j in range(4)]
        q = f"Which {_nonsense(r, 1)} does the miller keep?"
        if i % 2 == 0:  # the hub's flat form
            sets["arc"].append({"id": f"arc{i}", "question": q, "choices": {"text": texts, "label": list("ABCD")},
                                "answerKey": "ABCD"[label]})
        else:  # the original nested form, numeric labels
            sets["arc"].append({"id": f"arc{i}", "question": {"stem": q, "choices": [
                {"text": t, "label": str(j + 1)} for j, t in enumerate(texts)]}, "answerKey": str(label + 1)})
        label = r.randrange(2)
        opts = [PLANTED.split()[0].capitalize() if j == label else _nonsense(r, 1).capitalize() for j in range(2)]
        sets["winogrande"].append({"sentence": f"The {_nonsense(r, 1)} gave the lamp to _ because it was {_nonsense(r, 1)}.",
                                   "option1": opts[0], "option2": opts[1], "answer": str(1 + label)})
    return sets


def _right_texts(items: list[E.MCItem]) -> list[dict]:
    return [{"text": it.contexts[it.label] + it.continuations[it.label]} for it in items]


def test_parse_mc_formats():
    sets = make_mc_sets(per_format=2)
    items = {k: [E.parse_mc_record(x, i) for i, x in enumerate(v)] for k, v in sets.items()}
    assert [len(it.continuations) for it in items["hellaswag"]] == [4, 4]
    assert items["piqa"][0].contexts[0].startswith("Question: How do you")
    arc0, arc1 = items["arc"]
    assert arc0.label == "ABCD".index(sets["arc"][0]["answerKey"])
    assert arc1.label == int(sets["arc"][1]["answerKey"]) - 1 and len(arc1.continuations) == 4
    for it in (items["hellaswag"][0], items["piqa"][0], arc0, arc1):
        assert it.continuations[it.label] == " " + PLANTED
    w = items["winogrande"][0]
    assert w.contexts[0].endswith(sets["winogrande"][0]["option1"]) and w.continuations[0] == w.continuations[1]
    assert w.continuations[0].startswith(" because")
    assert E.parse_mc_record({"question": "q", "choices": ["a", "b"], "answer": "B"}).label == 1
    with pytest.raises(E.EvalError):
        E.parse_mc_record({"foo": 1})


def test_mc_picks_planted_answers_after_training(base, model_dir, tmp_path, capsys):
    from npcbus.training import TrainConfig, save_adapter, train_lora

    model, tok = base
    sets = make_mc_sets(seed=3, per_format=3)
    items = [E.parse_mc_record(x, i) for v in sets.values() for i, x in enumerate(v)]
    before = E.multiple_choice(model, tok, items)
    # arbitrary planted answers: the base model cannot know them all (12 items of 2 to 4 choices:
    # chance is 0.375 on average, and a base model may guess 9 of 12)
    assert before["acc"] < 1.0

    cfg = TrainConfig(rank=16, alpha=32, dropout=0.0, learning_rate=5e-3, max_steps=24, batch_size=12,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      lr_schedule="constant")
    result = train_lora(model, tok, _right_texts(items), cfg)
    adapter = save_adapter(tmp_path / "mc-adapter", result.adapter_state, result.peft_config)

    files = []
    for name, recs in sets.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text("\n".join(json.dumps(x) for x in recs) + "\n")
        files.append(str(f))
    rc = main(["eval", "--base-model", model_dir, "--adapter", str(adapter), "--with-base", "--mc", *files,
               "--report", str(tmp_path / "report.json")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "mc acc" in table and "base" in table
    rep = json.loads((tmp_path / "report.json").read_text())
    base_res, tuned = rep["results"]
    assert base_res["config"]["name"] == "base" and tuned["config"]["adapter_path"] == str(adapter)
    assert base_res["multiple_choice"]["acc"] == pytest.approx(before["acc"])
    assert tuned["multiple_choice"]["acc"] == 1.0, tuned["multiple_choice"]["by_format"]
    assert set(tuned["multiple_choice"]["by_format"]) == {"hellaswag", "piqa", "arc", "winogrande"}


# --------------------------------------------------------------------------------------------
# regression prompts
# --------------------------------------------------------------------------------------------


def test_expectations():
    assert E.check_expectations("hello world", {"contains": ["hello"], "max_chars": 20}) == []
    probs = E.check_expectations("hello world", {"contains": ["bye"], "not_contains": ["world"], "regex": r"^\d+$",
                                                  "starts_with": "x", "min_chars": 50, "json": True})
    assert len(probs) == 6
    req = _records("npc_dialogue.jsonl")[0]
    from npcbus.npc import canonical_json

    assert E.check_expectations(canonical_json(req["response"]), {"npc_valid": True, "json": True}, req["request"]) == []
    assert E.check_expectations("{}", {"npc_valid": True}, req["request"])


def test_regression_run(base):
    model, tok = base
    req = _records("npc_dialogue.jsonl")[0]["request"]
    cases = [
        {"id": "short", "prompt": "The innkeeper", "expect": {"max_chars": 10000}, "max_new_tokens": 8},
        {"id": "impossible", "prompt": "The innkeeper", "expect": {"contains": ["zzqqxx"]}, "max_new_tokens": 8},
        {"id": "npc", "npc_request": req, "expect": {"min_chars": 1}, "max_new_tokens": 16},
    ]
    res = E.run_regression(model, tok, cases)
    assert [c["passed"] for c in res["cases"]] == [True, False, True]
    assert res["passed"] == 2 and "zzqqxx" in res["cases"][1]["problems"][0]


# --------------------------------------------------------------------------------------------
# loss plot
# --------------------------------------------------------------------------------------------


def _write_manifest(root: Path, adapter: str, version: int, metrics, raw: str | None = None) -> None:
    d = root / adapter / f"v{version}"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "manifest.json").write_text(raw if raw is not None else json.dumps(
        {"version": version, "parent": version - 1 if version else None, "delta_ids": [], "hashes": {},
         "metrics": metrics}))


def test_loss_plot_from_manifests(tmp_path, capsys):
    ck = tmp_path / "ck"
    for v, (loss, held) in enumerate([(3.0, None), (2.6, 2.9), (2.3, 2.7), (2.1, 2.65)]):
        _write_manifest(ck, "innkeeper", v, {"loss_mean": loss, **({"heldout_loss": held} if held else {})})
    _write_manifest(ck, "smith", 0, {"loss_mean": 3.2})
    _write_manifest(ck, "smith", 1, {"loss_mean": "NaN"})          # not a number: skipped
    _write_manifest(ck, "smith", 2, {}, raw="{not json")            # unreadable: skipped
    _write_manifest(ck, "smith", 3, None, raw=json.dumps([1, 2]))   # odd shape: skipped
    _write_manifest(ck, "smith", 4, {"loss_mean": float("inf")})    # not finite: skipped
    _write_manifest(ck, "smith", 5, {"loss_mean": 2.8})
    (ck / "leases.json").write_text("{}")
    series = collect_loss_series(ck)
    assert series["innkeeper"]["loss_mean"] == [(0, 3.0), (1, 2.6), (2, 2.3), (3, 2.1)]
    assert series["innkeeper"]["heldout_loss"] == [(1, 2.9), (2, 2.7), (3, 2.65)]
    assert series["smith"] == {"loss_mean": [(0, 3.2), (5, 2.8)]}
    png = plot_loss_series(series)
    assert decode_png_size(png) == (900, 520)

    out = tmp_path / "plots" / "loss.png"
    assert main(["eval", "--plot-losses", str(out), "--checkpoint-dir", str(ck), "--plot-adapter", "innkeeper"]) == 0
    assert decode_png_size(out.read_bytes()) == (900, 520)
    assert "loss plot" in capsys.readouterr().out
    # decodable: the pixels are there (zlib stream of width*3+1 bytes per row)
    import zlib

    data = out.read_bytes()
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == 520 * (900 * 3 + 1)
    # nothing to plot: a clear error
    assert main(["eval", "--plot-losses", str(out), "--checkpoint-dir", str(tmp_path / "empty")]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_cli_generates_and_scores_npc_outputs(model_dir, tmp_path, capsys):
    text = tmp_path / "lore.txt"
    text.write_text((CORPUS / "lore.txt").read_text(encoding="utf-8")[:1500], encoding="utf-8")
    reg = tmp_path / "reg.jsonl"
    reg.write_text(json.dumps({"id": "any", "prompt": "The reeve", "expect": {"max_chars": 100000},
                               "max_new_tokens": 4}) + "\n")
    rc = main(["eval", "--base-model", model_dir, "--perplexity", str(text), "--npc", "alignment", "--limit", "4",
               "--max-new-tokens", "24", "--regression", str(reg), "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    (res,) = rep["results"]
    assert res["config"] == {"name": "base", "base_model": model_dir}
    assert res["perplexity"]["perplexity"] > 1 and res["perplexity"]["documents"] == 1
    npc = res["npc"]
    assert npc["n"] == 4 and 0 <= npc["schema_valid_rate"] <= npc["json_valid_rate"] <= 1
    assert set(npc["refusal"]["by_audience"]) <= {"child", "teen", "general", "adult"}
    assert len(npc["samples"]) == 4
    assert res["regression"]["passed"] == 1
