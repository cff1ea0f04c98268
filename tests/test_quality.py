"""NPC quality figures (npcbus.quality) on fixed inputs: pure tests with a stand-in embedding where
the figure's arithmetic is the point, and the real all-MiniLM-L6-v2 where the model's judgement is."""

from __future__ import annotations

import os

import numpy as np
import pytest

from npcbus import quality as Q

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def case(dialogue: str = "Welcome to the inn, dear traveler.", *, persona: str = "innkeeper",
         description: str = "Runs an inn.", player: str = "Hello there!", valid: bool = True,
         actions: list | None = None, allowed: tuple = ("rent_room", "serve_ale"),
         targets: tuple = ("", "Corin", "room_3")) -> Q.Case:
    resp = {"dialogue": dialogue, "emotion": "neutral", "intent": "greet", "actions": actions or [],
            "relationship_change": 0, "end_conversation": False}
    return Q.Case(persona, description, player, resp, valid, allowed, targets)


# --------------------------------------------------------------------------------------------
# text figures (pure)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "Welcome to the Sleepy Lantern, dear.",
    "Aye, the harbor is down the steps behind the fish market.",
    "Can't say I've heard of it, love!",
])
def test_readable_lines_are_well_formed(text):
    assert Q.is_well_formed(text)


@pytest.mark.parametrize("text", [
    "': '", "", "   ", "Hello there",                     # junk, empty, under 3 words
    'He said "hello" to me.',                            # JSON punctuation
    "The {room} is ready now.", "Take [this] with you.", 'dialogue": well then friend',
    "12 34 56 78 ok ok ok",                              # mostly digits
    "a, b, c; !!! ??? ... --- ###",                      # mostly punctuation
])
def test_junk_is_not_well_formed(text):
    assert not Q.is_well_formed(text)


def test_rates_on_fixed_cases():
    cases = [case("Welcome to the inn, dear."), case("Welcome to the inn, dear."),
             case("': '", valid=False), case("The ale is cold tonight.")]
    assert Q.well_formed_rate(cases) == 0.75
    assert Q.fallback_rate(cases) == 0.25
    assert Q.distinct_rate(cases) == 0.75
    assert Q.well_formed_rate([]) is None and Q.distinct_rate([]) is None


def test_words_are_lowercased_letter_runs():
    assert Q.words("Can't STOP, 3 times!") == ["can", "t", "stop", "times"]


def test_in_vocabulary_rate_counts_words_over_all_cases():
    vocab = frozenset({"the", "inn", "is", "open"})
    cases = [case("The inn is open."), case("The zxqv is open.")]  # 7 of 8 words known
    assert Q.in_vocabulary_rate(cases, vocab) == pytest.approx(7 / 8)


def test_vocabulary_is_built_from_the_shipped_text(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "corpus" / "lore.txt").write_text("The Old Mill stands by the river.", encoding="utf-8")
    (tmp_path / "data" / "npc.jsonl").write_text(
        '{"request": {"player_input": "Where is Brindle?", "history": [{"role": "npc", "text": "Hush now."}]},'
        ' "response": {"dialogue": "Past the well.", "emotion": "neutral"}}\n', encoding="utf-8")
    vocab = Q.build_vocabulary(tmp_path / "corpus", tmp_path / "data")
    assert vocab == {"the", "old", "mill", "stands", "by", "river", "where", "is", "brindle", "hush", "now", "past",
                     "well"}
    shipped = Q.build_vocabulary()
    assert {"innkeeper", "harbor", "ale"} <= shipped and "zxqv" not in shipped


def test_action_validity():
    ok = {"type": "rent_room", "target": "room_3"}
    assert Q.action_validity([case(), case()]) == 1.0  # no actions at all
    assert Q.action_validity([case(actions=[ok])]) == 1.0
    outside = {"type": "cast_fireball", "target": "room_3"}  # not one of the persona's actions
    assert Q.action_validity([case(actions=[outside])]) == 0.0
    bad_target = {"type": "serve_ale", "target": "the moon"}
    assert Q.action_validity([case(actions=[ok, bad_target]), case(actions=[ok, outside])]) == 0.5
    assert Q.action_validity([case(actions=[{"type": "serve_ale"}])]) == 1.0  # no target: ""


def test_case_from_request_reads_the_persona():
    c = Q.case_from_request({"persona_id": "innkeeper", "player_input": "Hi!", "player": {"name": "Corin"}},
                            {"dialogue": "Hello, love.", "actions": []}, valid=True)
    assert c.persona_id == "innkeeper" and c.player_line == "Hi!" and c.valid
    assert "Sleepy Lantern" in c.persona_description and "rent_room" in c.allowed_actions
    assert {"", "Corin", "harbor"} <= set(c.allowed_targets)


def test_request_match_counts_replies_that_do_what_was_asked():
    room = {"intent": "trade", "actions": [{"type": "rent_room", "target": "room_3"}]}
    hello = {"intent": "greet", "actions": []}

    def turn(intent, actions, reference, valid=True):
        c = case(actions=actions, valid=valid)
        return Q.Case(c.persona_id, c.persona_description, c.player_line, {**c.response, "intent": intent}, valid,
                      c.allowed_actions, c.allowed_targets, reference)

    cases = [
        turn("trade", [{"type": "rent_room", "target": "room_3"}], room),   # does it
        turn("trade", [], room),                                             # right intent, no room rented
        turn("greet", [], hello),                                            # does it (no action asked)
        turn("greet", [], hello, valid=False),                               # the player got the fallback
        turn("inform", [{"type": "give_directions", "target": "mill"}], hello),  # answers something else
    ]
    got = Q.request_match(cases, seed=0)
    assert got["value"] == pytest.approx(2 / 5)
    perm = Q.derangement(5, 0)
    expected = sum(Q._does_what_was_asked(c.response, c.valid, cases[j].reference)
                   for c, j in zip(cases, perm, strict=True)) / 5
    assert got["baseline"] == pytest.approx(expected)
    assert got["baseline"] < got["value"]
    # cases without a reference do not count
    assert Q.request_match([case(), case()]) == {"value": None, "baseline": None, "ratio": None}


def test_derangement_is_fixed_by_its_seed_and_moves_everything():
    for n in (2, 3, 10, 57):
        p = Q.derangement(n, seed=7)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
        assert p == Q.derangement(n, seed=7)
    assert Q.derangement(20, seed=1) != Q.derangement(20, seed=2)
    with pytest.raises(ValueError):
        Q.derangement(1)


def fake_embed(table: dict[str, list[float]]):
    def embed(texts):
        v = np.array([table[t] for t in texts], dtype=np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    return embed


def test_relevance_arithmetic_with_a_stand_in_embedding():
    # each player line points along one axis, its reply along the same axis: cosine 1 with its own
    # reply, 0 with any other
    table = {"p0": [1, 0, 0], "p1": [0, 1, 0], "p2": [0, 0, 1], "r0": [1, 0, 0], "r1": [0, 1, 0], "r2": [0, 0, 1]}
    cases = [case(f"r{i}", player=f"p{i}") for i in range(3)]
    rel = Q.relevance(cases, fake_embed(table))
    assert rel["value"] == pytest.approx(1.0) and rel["baseline"] == pytest.approx(0.0) and rel["ratio"] is None
    assert Q.relevance(cases[:1], fake_embed(table)) == {"value": None, "baseline": None, "ratio": None}


def test_persona_consistency_arithmetic_with_a_stand_in_embedding():
    table = {"inn": [1, 0], "forge": [0, 1], "ale": [0.9, 0.1], "steel": [0.2, 0.8], "ale?": [0.1, 0.9]}
    cases = [case("ale", persona="innkeeper", description="inn"),
             case("steel", persona="blacksmith", description="forge"),
             case("ale?", persona="innkeeper", description="inn")]
    assert Q.persona_consistency(cases, fake_embed(table)) == pytest.approx(2 / 3)
    assert Q.persona_consistency(cases[:1], fake_embed(table)) is None  # one persona: undefined


def test_goals():
    assert Q.goal_met("well_formed", 0.95, None) and not Q.goal_met("well_formed", 0.9, None)
    assert Q.goal_met("fallback", 0.02, None) and not Q.goal_met("fallback", 0.03, None)
    assert Q.goal_met("relevance", 0.1, 1.3) and not Q.goal_met("relevance", 0.5, 1.1)
    assert Q.goal_met("action_validity", 1.0, None) and not Q.goal_met("action_validity", 0.99, None)
    assert Q.goal_met("in_vocabulary", 0.5, None) is None
    assert Q.goal_met("persona_consistency", None, None) is False  # not measurable: not met


def test_format_table_marks_missed_goals():
    rep = {"cases": 2, "well_formed": {"value": 1.0}, "fallback": {"value": 0.5}, "distinct": {"value": 1.0},
           "in_vocabulary": {"value": 0.9}, "relevance": {"value": 0.3, "baseline": 0.1, "ratio": 3.0},
           "persona_consistency": {"value": None}, "action_validity": {"value": 1.0}}
    table = Q.format_table({"finetuned": rep})
    row = table.splitlines()[3]
    assert row.split()[:5] == ["finetuned", "2", "100.0%", "50.0%", "x"]
    assert "3.00" in row and "-" in row.split()


# --------------------------------------------------------------------------------------------
# with the real sentence embedding (all-MiniLM-L6-v2, from its package's own files)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    return Q.Embedder(threads=2)


def test_embedder_gives_unit_vectors(embedder):
    v = embedder(["The harbor is down the steps.", "I forge swords."])
    assert v.shape == (2, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert embedder([]).shape == (0, 384)


PAIRS = [
    ("Where can I find the harbor?", "The harbor? Go down the steps behind the fish market, you will smell it."),
    ("Can you fix my broken sword?", "Aye, leave the sword on the anvil and I will mend the blade by noon."),
    ("Do you have a room for the night?", "I have a room upstairs for the night, two silver with breakfast."),
    ("What herbs help with a fever?", "Willow bark tea and feverfew will bring a fever down, drink it warm."),
    ("Sing me a song about the sea!", "Gather round, I'll sing of the waves and the sailors lost at sea."),
]


def test_a_relevant_reply_scores_above_a_shuffled_one(embedder):
    cases = [case(reply, player=player) for player, reply in PAIRS]
    rel = Q.relevance(cases, embedder, seed=3)
    assert rel["value"] > rel["baseline"]
    assert rel["ratio"] > 1.2
    # pair by pair too: each player line is closer to its own reply than to the one it is shuffled with
    v = embedder([p for p, _ in PAIRS] + [r for _, r in PAIRS])
    n = len(PAIRS)
    perm = Q.derangement(n, 3)
    assert all(v[i] @ v[n + i] > v[i] @ v[n + perm[i]] for i in range(n))


def test_a_reply_matching_its_personas_description_is_consistent(embedder):
    smith = "A blacksmith who forges swords, axes and horseshoes at the anvil in her smithy."
    healer = "A healer who tends the sick with herbs, poultices and prayers at the temple."
    cases = [
        case("I'll hammer out a new axe head on the anvil for you.", persona="blacksmith", description=smith),
        case("Rest now, this poultice of herbs will ease the fever.", persona="healer", description=healer),
        case("Every sword I forge is quenched twice in the smithy.", persona="blacksmith", description=smith),
        case("Rest now, this poultice of herbs will ease the fever.", persona="blacksmith", description=smith),
    ]
    # the first three match their own persona; the last is the healer's line under the smith's name
    assert Q.persona_consistency(cases, embedder) == pytest.approx(0.75)


def test_measure_gives_every_figure(embedder):
    cases = [case(reply, player=player, persona=f"p{i % 2}", description=d)
             for i, ((player, reply), d) in enumerate(zip(PAIRS, ["an inn", "a forge"] * 3, strict=False))]
    rep = Q.measure(cases, embedder, Q.build_vocabulary())
    assert set(rep) == {*Q.FIGURES, "cases"} and rep["cases"] == 5
    assert rep["well_formed"]["value"] == 1.0 and rep["fallback"]["value"] == 0.0
    assert rep["distinct"]["value"] == 1.0 and rep["action_validity"]["value"] == 1.0
    assert 0.8 < rep["in_vocabulary"]["value"] <= 1.0
    assert rep["relevance"]["ratio"] > 1.2


def test_player_name_accuracy_counts_replies_that_name_the_right_player():
    def case(line: str, name: str = "Ayla") -> Q.Case:
        return Q.Case("guard", "d", "hi", {"dialogue": line}, True, player_name=name)

    cases = [case("Welcome, Ayla."), case("Ayla's horse is here."), case("Welcome, Bren."),
             case("Ayla and Bren, both of you."), case("Welcome, traveller."), case("Hello, Zanric.", "Zanric")]
    got = Q.player_name_accuracy(cases, {"Ayla", "Bren"})
    # five replies name someone; three only the right player (the last by the case's own name)
    assert got == {"value": 3 / 5, "naming": 5 / 6}
    assert Q.player_name_accuracy([case("Welcome, traveller.")], {"Bren"}) == {"value": None, "naming": 0.0}


def test_known_player_names_are_the_names_in_the_shipped_requests():
    names = Q.known_player_names()
    assert {"Ayla", "Bren", "Lira"} <= names and "Marta" not in names  # players, not personas


def test_each_personas_asides_are_closest_to_its_own_description(embedder):
    """The asides that the shipped data closes lines with (general and stern) carry their persona: each one, under the
    benchmark's embedding, is closer to its own persona's text than to any other's, by a margin."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_npc_data", Q.DATA_DIR / "make_npc_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from npcbus.npc import load_personas

    personas = load_personas()
    ids = list(personas)
    assert set(mod.ASIDES) == set(mod.STERN_ASIDES) == set(ids)
    texts = embedder([Q.persona_text(personas[i]) for i in ids])
    for pid in ids:
        general, stern = mod.ASIDES[pid], mod.STERN_ASIDES[pid]
        assert len(set(general)) == len(general) >= 8 and len(set(stern)) == len(stern) >= 3
        asides = sorted(set(general) | set(stern))  # a general aside may also serve a rude player
        sims = embedder(asides) @ texts.T
        k = ids.index(pid)
        margins = sims[:, k] - np.delete(sims, k, axis=1).max(axis=1)
        assert (margins > 0.05).all(), (pid, [a for a, m in zip(asides, margins, strict=True) if m <= 0.05])


def test_written_sentence_rate_counts_replies_made_only_of_written_sentences():
    written = frozenset({"Forge is hot.", "Speak up.", "Mind the sparks on your way out."})
    cases = [case("Forge is hot. Speak up."),                      # two written sentences
             case("Mind the sparks on your way out."),              # one
             case("Forge is hot. The sparks are your way out."),    # a splice in the second sentence
             case("")]                                              # nothing said
    assert Q.sentences("Hm. Kind of you! Stay safe? Any time, Jory.") == ["Hm.", "Kind of you!", "Stay safe?",
                                                                         "Any time, Jory."]
    assert Q.written_sentence_rate(cases, written) == pytest.approx(0.5)
    # the shipped lines: every sentence of every fine-tuning line is a written one, asides included
    shipped = Q.written_sentences()
    assert "Those goats of mine escaped again this morning, youngling." in shipped
    assert "Forge is hot." in shipped and "Forge is hot. Speak up." not in shipped
    assert "Welcome to the Sleepy Lantern, love!" in shipped and "Sit anywhere that isn't sticky." in shipped
    assert "My goat ate. Then friend of my other never else." not in shipped
    assert Q.sentences("") == []
