"""Text cleaning, language identification and quality heuristics for ``npcbus data build``.

Everything here is a pure function over one document, cheap enough to run on every record of a
stream. A filter answers with ``None`` (keep) or a short reason code (drop); the build counts drops
by reason code, so the codes are stable: ``too_short``, ``too_long``, ``language``, and
``quality:<rule>`` for the heuristics below.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# cleaning
# --------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_TRAILING = re.compile(r" +\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalize a document: NFC, no control characters, tidy whitespace, at most one blank line."""
    if not text:
        return ""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def normalize_for_hash(text: str) -> str:
    """The form two documents must share to count as exact duplicates (case and spacing ignored)."""
    return " ".join(text.lower().split())


# --------------------------------------------------------------------------------------------
# language identification
# --------------------------------------------------------------------------------------------

# Frequent function words per language. A document's Latin-script language is the one whose list
# covers the largest share of its words; the lists are short on purpose (speed) and disjoint enough
# for the languages listed.
_FUNCTION_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the of and to in is was that it for with as he she on be at by this had not are but from or "
        "have an they which you were her his their we there been has would will what when who if "
        "them so can said all my one do no out up into could about than then its our your these".split()
    ),
    "de": frozenset(
        "der die das und ist nicht ein eine zu den von mit sich des auf für im dem es sie er ich "
        "auch wir noch wie aber nach bei aus wenn nur oder war hat sind werden wird einen einem "
        "dass so zum zur über kann doch schon".split()
    ),
    "fr": frozenset(
        "le la les de des et est un une du en que qui dans pour pas sur au aux il elle ne se ce "
        "avec plus par nous vous sont mais ou son sa ses leur été comme tout cette je on était "
        "avait fait bien très".split()
    ),
    "es": frozenset(
        "el la los las de del y que en un una es por con para no se su al lo como más pero sus "
        "le ya o este fue ha muy sin sobre también me hasta hay donde quien desde todo nos "
        "cuando está era".split()
    ),
    "it": frozenset(
        "il lo la gli le di del della dei che è e un una per non con sono si da nel nella al alla "
        "ma come più anche questo questa ha era io lui lei loro mi ci se perché quando già "
        "molto tutto".split()
    ),
    "pt": frozenset(
        "o a os as de do da dos das e que em um uma é para com não no na por se mais ao como "
        "mas foi ele ela seu sua ou quando muito já também só pelo pela até isso entre era "
        "depois sem mesmo são".split()
    ),
    "nl": frozenset(
        "de het een en van is dat in te op niet zijn voor met die hij er maar om aan ook als "
        "bij dan nog wat naar door over ze zich uit worden was heeft deze tot wel kan wordt "
        "geen meer zo".split()
    ),
}

# (first code point, last code point, language) for scripts that name a language on their own
_SCRIPTS: list[tuple[int, int, str]] = [
    (0x0370, 0x03FF, "el"),
    (0x0400, 0x04FF, "ru"),
    (0x0590, 0x05FF, "he"),
    (0x0600, 0x06FF, "ar"),
    (0x0900, 0x097F, "hi"),
    (0x0E00, 0x0E7F, "th"),
    (0x3040, 0x30FF, "ja"),
    (0x4E00, 0x9FFF, "zh"),
    (0xAC00, 0xD7AF, "ko"),
]

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_LATIN_LETTER = re.compile(r"[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]")
_SCRIPT_RES = [(re.compile(f"[{chr(lo)}-{chr(hi)}]"), lang) for lo, hi, lang in _SCRIPTS]
LANG_SAMPLE_CHARS = 4000


def _count(pattern: re.Pattern, text: str) -> int:
    return pattern.subn("", text)[1]


def detect_language(text: str) -> tuple[str, float]:
    """Best-guess ISO 639-1 code of ``text`` and a confidence in [0, 1]; ``("unknown", 0.0)`` if unsure.

    Non-Latin scripts decide on their own (Cyrillic is reported as ``ru``, Han as ``zh``; kana wins
    over Han as ``ja``). Latin-script text is scored by the share of its words that are frequent
    function words of each language listed in ``_FUNCTION_WORDS``.
    """
    sample = text[:LANG_SAMPLE_CHARS]
    scripts: Counter[str] = Counter()
    scripts["latin"] = _count(_LATIN_LETTER, sample)
    if not sample.isascii():
        for pat, lang in _SCRIPT_RES:
            n = _count(pat, sample)
            if n:
                scripts[lang] += n
    letters = sum(scripts.values())
    if not letters:
        return "unknown", 0.0
    script, count = scripts.most_common(1)[0]
    if script == "zh" and scripts.get("ja", 0) > 0.05 * letters:
        script, count = "ja", count + scripts["ja"]
    if script != "latin":
        return script, count / letters
    words = Counter(w.lower() for w in _WORD.findall(sample))
    total = sum(words.values())
    if not total:
        return "unknown", 0.0
    best, best_score = "unknown", 0.0
    for lang, vocab in _FUNCTION_WORDS.items():
        score = sum(words[w] for w in vocab if w in words) / total
        if score > best_score:
            best, best_score = lang, score
    if best_score < 0.08:
        return "unknown", best_score
    return best, min(1.0, best_score * 2.5)


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------


@dataclass
class FilterConfig:
    """Thresholds of the length, language and quality filters (``None``/empty disables one)."""

    min_chars: int = 200
    max_chars: int = 200_000
    min_words: int = 20
    languages: tuple[str, ...] = ("en",)
    quality: bool = True
    min_mean_word_len: float = 2.5
    max_mean_word_len: float = 12.0
    min_alpha_word_frac: float = 0.7
    max_symbol_ratio: float = 0.1
    max_bullet_line_frac: float = 0.9
    max_ellipsis_line_frac: float = 0.3
    max_dup_line_frac: float = 0.3
    min_type_token_ratio: float = 0.2
    max_upper_frac: float = 0.5
    max_digit_frac: float = 0.3


def length_reason(text: str, cfg: FilterConfig) -> str | None:
    n = len(text)
    if cfg.min_chars and n < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and n > cfg.max_chars:
        return "too_long"
    if cfg.min_words and len(text.split()) < cfg.min_words:
        return "too_short"
    return None


def language_reason(text: str, cfg: FilterConfig) -> tuple[str | None, str]:
    """(drop reason or None, detected language)."""
    if not cfg.languages:
        return None, ""
    lang, _conf = detect_language(text)
    if lang not in cfg.languages:
        return "language", lang
    return None, lang


_BULLETS = ("-", "*", "•", "·", "–", "‣", "◦")
_ALPHA_TOKEN = re.compile(r"\S*[^\W\d_]\S*")
_LETTER = re.compile(r"[^\W\d_]")
_UPPER_LATIN = re.compile(r"[A-Z\u00c0-\u00d6\u00d8-\u00de]")
_DIGIT = re.compile(r"\d")
_SPACE = re.compile(r"\s")
QUALITY_SAMPLE_CHARS = 20000


def quality_reason(text: str, cfg: FilterConfig) -> str | None:
    """The first quality rule ``text`` breaks, as ``quality:<rule>``, or None.

    Rules look at the first ``QUALITY_SAMPLE_CHARS`` characters (the symbol ratio at the whole text).
    """
    if not cfg.quality:
        return None
    sample = text[:QUALITY_SAMPLE_CHARS]
    words = sample.split()
    if not words:
        return "quality:empty"
    mean_len = sum(map(len, words)) / len(words)
    if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
        return "quality:word_length"
    if len(_ALPHA_TOKEN.findall(sample)) / len(words) < cfg.min_alpha_word_frac:
        return "quality:non_alpha"
    n_words = len(words) if len(sample) == len(text) else max(len(words), len(text.split()))
    symbols = text.count("#") + text.count("...") + text.count("…") + text.count("{") + text.count("}")
    if symbols / n_words > cfg.max_symbol_ratio:
        return "quality:symbols"
    lines = [ln.strip() for ln in sample.split("\n") if ln.strip()]
    if len(lines) >= 3:
        if sum(1 for ln in lines if ln.startswith(_BULLETS)) / len(lines) > cfg.max_bullet_line_frac:
            return "quality:bullets"
        if sum(1 for ln in lines if ln.endswith(("...", "…"))) / len(lines) > cfg.max_ellipsis_line_frac:
            return "quality:ellipsis"
        if 1 - len(set(lines)) / len(lines) > cfg.max_dup_line_frac:
            return "quality:repeated_lines"
    if len(words) >= 50:
        window = [w.lower() for w in words[:500]]
        if len(set(window)) / len(window) < cfg.min_type_token_ratio:
            return "quality:repetition"
    letters = _count(_LETTER, sample)
    if letters >= 20 and _count(_UPPER_LATIN, sample) / letters > cfg.max_upper_frac:
        return "quality:uppercase"
    non_space = len(sample) - _count(_SPACE, sample)
    if non_space and _count(_DIGIT, sample) / non_space > cfg.max_digit_frac:
        return "quality:digits"
    if "lorem ipsum" in sample.lower():
        return "quality:boilerplate"
    return None


def filter_reason(text: str, cfg: FilterConfig) -> tuple[str | None, str]:
    """Run the length, language and quality filters: (first drop reason or None, language)."""
    r = length_reason(text, cfg)
    if r:
        return r, ""
    r, lang = language_reason(text, cfg)
    if r:
        return r, lang
    return quality_reason(text, cfg), lang
