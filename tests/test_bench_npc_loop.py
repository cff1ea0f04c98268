"""bench.npc_loop (the learning half of the NPC quality benchmark): the stand-in player's ratings,
the turns it plays and the figure lines, on fixed inputs. The loop itself runs through the real
services in ``python -m bench.npc_loop --quick`` (CI)."""

from __future__ import annotations

import numpy as np

from bench import npc as B
from bench import npc_loop as L
from npcbus import quality as Q
from npcbus.model import persona_of


def _embed(texts: list[str]) -> np.ndarray:
    """A stand-in embedding: one axis per topic word, so that similarity is easy to follow."""
    topics = ("gate", "ale", "sword", "goat")
    v = np.array([[1.0 if t in s.lower() else 0.0 for t in topics] + [0.1] for s in texts], dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_reply_like_its_own_reference_gets_thumbs_up():
    replies = ["The gate opens at dawn, citizen.", "Have some ale, the gate is closed.", "ok", "Goats eat the gate."]
    refs = ["The north gate is that way.", "A pint of ale for you.", "The gate shuts at dusk.", "My goat ran off."]
    groups = ["guard", "guard", "guard", "farmer"]
    valid = [True, True, True, True]
    got = L.ratings(replies, refs, groups, valid, _embed)
    # 0: about the gate like its reference; 1: mixes ale and gate, no nearer its own (ale) line than the others;
    # 2: not a readable line; 3: the only farmer turn has no other reference to beat
    assert got == [1.0, -1.0, -1.0, -1.0]
    # a reply that did not pass the output checks is never rated up
    assert L.ratings(replies[:1] * 2, [refs[1], refs[0]], ["guard", "guard"], [False, True], _embed) == [-1.0, 1.0]


def test_played_turns_are_not_held_out_and_come_per_persona():
    play = L.play_records(["innkeeper", "guard"], 5)
    assert [persona_of(r) for r in play] == ["innkeeper"] * 5 + ["guard"] * 5
    held = {(persona_of(r), r["request"]["player_input"]) for r in B.read_records()}
    assert not any((persona_of(r), r["request"]["player_input"]) in held for r in play)
    assert all(r["response"]["dialogue"] for r in play)


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
