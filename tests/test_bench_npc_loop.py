"""bench.npc_loop (the learning half of the NPC quality benchmark): the stand-in player's ratings,
the turns it plays and the figure lines, on fixed inputs. The loop itself runs through the real
services in ``python -m bench.npc_loop --quick`` (CI)."""

from __future__ import annotations

import numpy as np
import pytest

from bench import npc as B
from bench import npc_loop as L
from npcbus import quality as Q
from npcbus.model import persona_of


def _embed(texts: list[str]) -> np.ndarray:
    """A stand-in embedding: one axis per topic word, so that similarity is easy to follow."""
    topics = ("gate", "ale", "sword", "goat")
    v = np.array([[1.0 if t in s.lower() else 0.0 for t in topics] + [0.1] for s in texts], dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


PERSONAS = {"guard": "Keeps the gate of the town.", "innkeeper": "Pours ale at the inn.",
            "farmer": "Keeps a goat."}


def _reply(line: str, intent: str, *actions: str) -> dict:
    return {"dialogue": line, "intent": intent, "actions": [{"type": t, "target": "x"} for t in actions]}


def test_a_reply_that_does_what_was_asked_in_character_gets_thumbs_up():
    directions = [{"intent": "inform", "actions": ["give_directions"]}]
    greet = [{"intent": "greet", "actions": []}]
    cases = [
        (_reply("The gate is north of here, citizen.", "inform", "give_directions"), True, directions, "guard", 1.0),
        # the right kind of answer, in another persona's voice (ale: the innkeeper's)
        (_reply("Have a pint of ale, the road is long.", "inform", "give_directions"), True, directions, "guard", -1.0),
        # in character, but no directions given where the player asked for them
        (_reply("The gate stays shut tonight, citizen.", "inform"), True, directions, "guard", -1.0),
        # another intent than the kinds written for the request
        (_reply("Welcome to the gate, traveller.", "greet"), True, directions, "guard", -1.0),
        # not a readable line / did not pass the output checks / no response at all
        (_reply("gate", "greet"), True, greet, "guard", -1.0),
        (_reply("Hello from the gate, friend.", "greet"), False, greet, "guard", -1.0),
        (None, False, greet, "guard", -1.0),
        # several written answers: any of them counts
        (_reply("My goat says hello to you.", "greet"), True, [{"intent": "inform", "actions": []}, *greet],
         "farmer", 1.0),
        # the same line again from the same persona (case and punctuation aside) is no longer rated up
        (_reply("my goat says hello to you", "greet"), True, greet, "farmer", -1.0),
        # a line as close to another persona as to its own is not in character
        (_reply("The gate is north, and my goat too.", "inform", "give_directions"), True, directions, "guard", -1.0),
    ]
    args = [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases], [c[3] for c in cases]
    got = L.ratings(*args, PERSONAS, _embed)
    assert got == [c[4] for c in cases]
    # the weaker test of a persona's voice lets the line as close to the farmer as to the guard through
    assert L.ratings(*args, PERSONAS, _embed, in_character="above-mean") == [c[4] for c in cases[:-1]] + [1.0]
    # lines rated up in an earlier round count as heard in the next
    heard: set = set()
    first = L.ratings(*args, PERSONAS, _embed, heard=heard)
    assert first == got and ("farmer", "my goat says hello to you") in heard
    assert L.ratings(*args, PERSONAS, _embed, heard=heard)[0::7] == [-1.0, -1.0]
    # a reader who spots spliced lines: only lines made of known sentences are rated up
    whole = frozenset({"The gate is north of here, citizen.", "My goat says hello to you."})
    assert L.ratings(*args, PERSONAS, _embed, whole=whole) == got
    assert L.ratings(*args, PERSONAS, _embed, whole=frozenset({"My goat says hello to you."}))[0] == -1.0
    with pytest.raises(ValueError, match="in_character"):
        L.ratings(*args, PERSONAS, _embed, in_character="loud")


def test_answers_request_needs_the_intent_and_where_the_answer_acts_the_action_kind():
    rent = [{"intent": "trade", "actions": ["rent_room"]}]
    assert L.answers_request(_reply("Room three.", "trade", "rent_room", "serve_food"), rent)
    assert not L.answers_request(_reply("Stew?", "trade", "serve_food"), rent)
    assert not L.answers_request(_reply("Room three.", "inform", "rent_room"), rent)
    assert L.answers_request(_reply("Ha!", "joke"), [{"intent": "joke", "actions": []}])
    assert not L.answers_request(_reply("Ha!", "joke"), [])


def test_the_play_set_is_new_to_training_and_held_out_and_comes_per_persona_in_turn_by_kind():
    from npcbus.data_files.make_npc_data import _normalized
    from npcbus.evaluate import read_jsonl
    from npcbus.npc import DATA_DIR

    play = L.play_records(["innkeeper", "guard"], 5)
    assert [persona_of(r) for r in play] == ["innkeeper"] * 5 + ["guard"] * 5
    assert len({r["situation"] for r in play[:5]}) == 5  # five kinds of request, not five greetings
    everything = L.play_records(["innkeeper"], None)
    assert len(everything) > 50 and {r["situation"] for r in everything} >= {"trade", "directions", "rude", "greet"}
    seen = {_normalized(r["request"]["player_input"])
            for name in ("npc_sft.jsonl", "npc_dialogue.jsonl", "npc_heldout.jsonl")
            for r in read_jsonl(DATA_DIR / name)}
    assert not any(_normalized(r["request"]["player_input"]) in seen for r in everything)
    assert all(r["response"]["dialogue"] and r["answers"] for r in everything)
    # every written line for the record does what was asked by its own answers
    assert all(L.answers_request(r["response"], r["answers"]) for r in everything)


def test_seeded_plays_each_record_once_per_seed_offset():
    recs = [{"a": 1}, {"a": 2}]
    assert L.seeded(recs, 2) == [(recs[0], 0), (recs[1], 0), (recs[0], 1), (recs[1], 1)]
    assert L.seeded(recs, 1, start=2) == [(recs[0], 2), (recs[1], 2)]  # a later round's own seeds


def test_reports_of_several_seeds_are_averaged_figure_by_figure():
    a, b = _report(1.2, 0.0), _report(1.4, 0.02)
    avg = L.average_reports([a, b])
    assert abs(avg["relevance"]["ratio"] - 1.3) < 1e-9 and avg["relevance"]["per_seed"] == [1.2, 1.4]
    assert abs(avg["fallback"]["value"] - 0.01) < 1e-9 and avg["cases"] == 16
    b["persona_consistency"]["value"] = None
    assert L.average_reports([a, b])["persona_consistency"]["value"] is None


def _report(relevance: float, fallback: float, well_formed: float = 1.0) -> dict:
    out = {name: {"value": 0.5} for name in Q.FIGURES}
    out["relevance"] = {"value": 0.2, "baseline": 0.2 / relevance, "ratio": relevance}
    out["fallback"] = {"value": fallback}
    out["well_formed"] = {"value": well_formed}
    out["cases"] = 16
    return out


def test_figure_lines_compare_the_newest_version_with_version_zero():
    lines = {x["bench"]: x for x in L.figure_lines(_report(1.1, 0.0), _report(1.3, 0.005, 0.995), quick=True)}
    assert set(lines) == {f"npc_loop.{n}" for n in Q.FIGURES}
    rel = lines["npc_loop.relevance"]
    assert (rel["value"], rel["baseline"], rel["met"], rel["on"]) == (1.3, 1.1, True, "ratio")
    assert lines["npc_loop.fallback"]["met"] is True  # within the tolerance
    assert lines["npc_loop.well_formed"]["met"] is True
    assert lines["npc_loop.in_vocabulary"]["met"] is None and lines["npc_loop.relevance"]["quick"] is True
    worse = {x["bench"]: x for x in L.figure_lines(_report(1.3, 0.0), _report(1.1, 0.05, 0.9))}
    assert not worse["npc_loop.relevance"]["met"] and not worse["npc_loop.fallback"]["met"]
    assert not worse["npc_loop.well_formed"]["met"]


def test_in_turn_takes_each_persona_in_turn():
    recs = [{"request": {"persona_id": p, "player_input": f"{p}{i}"}} for p in ("guard", "bard") for i in range(3)]
    assert [r["request"]["player_input"] for r in B.in_turn(recs, 4)] == ["guard0", "bard0", "guard1", "bard1"]
    assert B.in_turn(recs, None) == recs
