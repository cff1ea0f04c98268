"""bench.npc (the NPC quality benchmark): how it picks cases and variants and turns a measurement
into figure lines, on fixed inputs. The measurement itself runs through the real consumer in
``python -m bench.npc --quick`` (CI) and ``npcbus eval --npc-quality``."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import npc as B
from npcbus import quality as Q


def _rec(pid: str, line: str) -> dict:
    return {"request": {"persona_id": pid, "player_input": line},
            "response": {"dialogue": f"The {pid} says hello to you.", "actions": []}}


def test_limited_cases_take_every_persona_in_turn(tmp_path):
    path = tmp_path / "cases.jsonl"
    recs = ([_rec("innkeeper", f"a{i}") for i in range(5)] + [_rec("guard", f"b{i}") for i in range(2)]
            + [_rec("bard", "c0")])
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + json.dumps({"no": "request"}) + "\n")
    assert len(B.read_records(path)) == 8  # the line without a request is not a case
    got = [r["request"]["player_input"] for r in B.read_records(path, limit=6)]
    assert got == ["a0", "b0", "c0", "a1", "b1", "a2"]


def test_the_default_cases_are_the_held_out_turns():
    path = B.default_cases_path()
    assert path.name == B.HELDOUT
    recs = B.read_records(path)
    assert len(recs) >= 100
    from npcbus.model import persona_of

    assert len({persona_of(r) for r in recs}) >= 6
    # no held-out player line is in any training file
    from npcbus.npc import DATA_DIR

    held = {r["request"]["player_input"] for r in recs}
    checked = 0
    for name in ("npc_sft.jsonl", "npc_dialogue.jsonl"):
        for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            said = (rec.get("request") or {}).get("player_input")
            assert said not in held, (name, said)
            checked += said is not None
    assert checked > 2000


def test_persona_adapters_are_the_build_folders_with_a_config(tmp_path):
    for pid, ok in (("smith", True), ("guard", True), ("empty", False)):
        d = tmp_path / "personas" / pid
        d.mkdir(parents=True)
        if ok:
            (d / "adapter_config.json").write_text("{}")
    assert B.persona_adapters(str(tmp_path)) == {"guard": str(tmp_path / "personas" / "guard"),
                                                 "smith": str(tmp_path / "personas" / "smith")}
    assert B.persona_adapters(str(tmp_path / "nothing")) == {}


def _report(well_formed: float, relevance_ratio: float) -> dict:
    return {"well_formed": {"value": well_formed}, "fallback": {"value": 0.0}, "distinct": {"value": 1.0},
            "in_vocabulary": {"value": 0.9},
            "relevance": {"value": 0.3, "baseline": 0.3 / relevance_ratio, "ratio": relevance_ratio},
            "persona_consistency": {"value": 0.5}, "action_validity": {"value": 1.0},
            "request_match": {"value": 0.6, "baseline": 0.2, "ratio": 3.0},
            "player_name": {"value": 0.5, "naming": 0.2}, "written_sentences": {"value": well_formed},
            "cases": 10, "errors": 0}


def test_figure_lines_carry_goal_baseline_and_the_variant_improved_on():
    result = {"variants": {"pretrained": _report(0.5, 0.9), "finetuned": _report(1.0, 1.5)},
              "reference": _report(0.9, 1.3), "personas": 4,
              "compared_with": {"pretrained": None, "finetuned": "pretrained"}}
    lines = B.figure_lines(result, engine="hf")
    assert len(lines) == 2 * len(Q.FIGURES)
    by = {(x["variant"], x["bench"]): x for x in lines}
    wf = by[("finetuned", "npc.well_formed")]
    assert wf["value"] == 1.0 and wf["baseline"] == 0.9 and wf["ratio"] == pytest.approx(1.0 / 0.9, abs=1e-4)
    assert wf["met"] is True and wf["goal"] == ">=0.95" and wf["engine"] == "hf"
    assert wf["compared_with"] == {"variant": "pretrained", "value": 0.5}
    assert by[("pretrained", "npc.well_formed")]["met"] is False
    assert "compared_with" not in by[("pretrained", "npc.well_formed")]
    rel = by[("finetuned", "npc.relevance")]
    assert rel["ratio"] == 1.5 and rel["met"] is True and rel["goal_on"] == "ratio"
    assert rel["compared_with"] == {"variant": "pretrained", "ratio": 0.9}
    pc = by[("finetuned", "npc.persona_consistency")]
    assert pc["baseline"] == 0.25 and pc["ratio"] == 2.0 and pc["met"] is False
    rm = by[("finetuned", "npc.request_match")]
    assert rm["baseline"] == 0.2 and rm["ratio"] == 3.0 and rm["met"] is None and "other cases" in rm["baseline_is"]
    pn = by[("finetuned", "npc.player_name")]
    assert pn["value"] == 0.5 and pn["naming"] == 0.2 and pn["met"] is None
    ws = by[("finetuned", "npc.written_sentences")]
    assert ws["value"] == 1.0 and ws["baseline"] == 0.9 and ws["met"] is None and ws["goal"] == "report"
    for x in lines:  # every line is one JSON object with the documented keys
        assert {"bench", "value", "baseline", "ratio", "goal", "met"} <= set(json.loads(json.dumps(x)))


def test_a_generation_error_counts_as_a_failed_empty_turn():
    from npcbus.messages import FinalResponse, GenerationError

    rec = _rec("innkeeper", "hello there")
    ok = FinalResponse("r1", 3, "", response={"dialogue": "Welcome in, traveler, sit by the fire.", "actions": []},
                       valid=True)
    bad = GenerationError("r2", 0, code="timeout", message="too slow")
    cases, errors = B.to_cases([(rec, ok), (rec, bad)])
    assert errors == 1
    assert cases[0].dialogue.startswith("Welcome") and cases[0].valid
    assert cases[1].dialogue == "" and not cases[1].valid
    assert Q.well_formed_rate(cases) == 0.5


def test_eval_npc_quality_needs_the_broker(monkeypatch):
    """``npcbus eval --npc-quality`` runs bench.npc's measurement; without a broker it says so clearly."""
    from npcbus import evaluate as E

    def no_broker(*a, **k):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(B, "run", no_broker)
    p = argparse.ArgumentParser()
    E.add_arguments(p)
    args = p.parse_args(["--npc-quality"])
    with pytest.raises(E.EvalError, match="needs RabbitMQ"):
        E._run(args)


def test_eval_without_any_evaluation_names_npc_quality():
    from npcbus import evaluate as E

    p = argparse.ArgumentParser()
    E.add_arguments(p)
    with pytest.raises(E.EvalError, match="--npc-quality"):
        E._run(p.parse_args([]))



def test_replies_are_written_to_read(tmp_path):
    from npcbus.messages import FinalResponse, GenerationError

    rec = _rec("guard", "Open the gate!")
    ok = FinalResponse("r1", 2, "", response={"dialogue": "Not until dawn, citizen.", "actions": []}, valid=True)
    path = tmp_path / "replies.jsonl"
    B.write_replies(path, {"finetuned": [(rec, ok), (rec, GenerationError("r2", 0, code="timeout", message="x"))]})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"variant": "finetuned", "persona": "guard", "player": "Open the gate!",
                       "reply": {"dialogue": "Not until dawn, citizen.", "actions": []}, "valid": True, "error": None,
                       "raw": None, "reference": "The guard says hello to you."}
    assert rows[1]["reply"] is None and rows[1]["error"] == "timeout" and rows[1]["valid"] is False


def test_cases_get_the_players_sampling_with_a_seed_of_their_own():
    a, b = _rec("guard", "Open the gate!"), _rec("guard", "Close the gate!")
    pa = B.case_params(a, 100)
    assert pa == {"max_tokens": 100, "seed": pa["seed"]} and isinstance(pa["seed"], int)  # the request's defaults
    assert B.case_params(a, 100) == pa and B.case_params(b, 100)["seed"] != pa["seed"]
    assert B.case_params(a, 100, greedy=True) == {"max_tokens": 100, "temperature": 0.0}
    from workers.infer_worker import sampling_from

    spec = sampling_from(pa, {"temperature": 0.7, "top_p": 0.95, "top_k": 50, "seed": None}, 256)
    assert (spec.temperature, spec.top_p, spec.top_k, spec.seed, spec.max_tokens) == (0.7, 0.95, 50, pa["seed"], 100)
