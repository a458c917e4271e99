"""Normalization and the rule-based stages (InternLM2 "Clean data"; Gopher/C4/RefinedWeb-style heuristics).

Each rule stage is `<stage>_reason(text, cfg) -> str | None`: None keeps the document, a string says why it
goes. The measurements behind them are separate functions so tests can check them against hand counts.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from functools import lru_cache

from data.corpus.config import LengthConfig, LineQualityConfig, NormalizeConfig, RepetitionConfig, SymbolConfig

# Control (Cc) characters other than newline and tab, plus invisible format (Cf) characters that web text
# carries around: zero-width spaces/joiners, bidi marks, word joiner, BOM, soft hyphen.
_INVISIBLE = [c for c in range(0x20) if c not in (0x09, 0x0A)] + list(range(0x7F, 0xA0)) + [
    0xAD, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2060, 0x2065), 0xFEFF,
]
_DELETE = dict.fromkeys(_INVISIBLE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_LETTER = re.compile(r"[^\W\d_]")  # a Unicode letter: a word character that is not a digit or underscore


def normalize_text(text: str, cfg: NormalizeConfig = NormalizeConfig()) -> str:
    """NFKC (full-width letters, ligatures, odd spaces -> plain forms), invisible characters removed, each line's
    whitespace runs collapsed to one space and stripped, at most one blank line in a row, no outer whitespace."""
    text = unicodedata.normalize(cfg.form, text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_DELETE)
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------------------------------------- length


def length_reason(text: str, cfg: LengthConfig) -> str | None:
    n = len(text.split())
    if n < cfg.min_words:
        return f"too short: {n} words < min_words {cfg.min_words}"
    if n > cfg.max_words:
        return f"too long: {n} words > max_words {cfg.max_words}"
    return None


# ---------------------------------------------------------------------------------------------- symbols


def symbol_stats(text: str) -> dict[str, float]:
    """alpha_word_fraction: words with at least one letter / words.
    symbol_word_ratio: ('#' count + '...' count + '…' count) / words  (Gopher's hash and ellipsis ratio).
    non_alpha_char_fraction: non-whitespace characters that are not letters / non-whitespace characters."""
    words = text.split()
    n_words = max(len(words), 1)
    non_space = sum(map(len, words))
    alpha_words = sum(1 for w in words if _LETTER.search(w))
    symbols = text.count("#") + text.count("...") + text.count("…")
    letters = len(_LETTER.findall(text))
    return {
        "alpha_word_fraction": alpha_words / n_words,
        "symbol_word_ratio": symbols / n_words,
        "non_alpha_char_fraction": 1.0 - letters / max(non_space, 1),
    }


def symbols_reason(text: str, cfg: SymbolConfig) -> str | None:
    s = symbol_stats(text)
    if s["alpha_word_fraction"] < cfg.min_alpha_word_fraction:
        return f"alpha word fraction {s['alpha_word_fraction']:.2f} < {cfg.min_alpha_word_fraction}"
    if s["symbol_word_ratio"] > cfg.max_symbol_word_ratio:
        return f"symbol/word ratio {s['symbol_word_ratio']:.2f} > {cfg.max_symbol_word_ratio}"
    if s["non_alpha_char_fraction"] > cfg.max_non_alpha_char_fraction:
        return f"non-alpha char fraction {s['non_alpha_char_fraction']:.2f} > {cfg.max_non_alpha_char_fraction}"
    return None


# ---------------------------------------------------------------------------------------------- repetition


def duplicate_line_stats(text: str) -> tuple[float, float]:
    """(fraction of non-empty lines that repeat an earlier line, their share of the characters of all lines)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for line in lines:
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        seen.add(line)
    return dup_lines / len(lines), dup_chars / max(sum(len(line) for line in lines), 1)


def top_ngram_char_fraction(words: list[str], n: int, word_chars: int | None = None) -> float:
    """Gopher: characters of the most frequent word n-gram times its count, over the characters of all words
    (`word_chars`, computed when not given). 0 when no n-gram occurs twice (one occurrence is not repetition)."""
    if len(words) < n:
        return 0.0
    gram, count = Counter(zip(*(words[i:] for i in range(n)))).most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(map(len, words)) if word_chars is None else word_chars
    return count * sum(map(len, gram)) / max(total, 1)


def repetition_reason(text: str, cfg: RepetitionConfig) -> str | None:
    dup_lines, dup_chars = duplicate_line_stats(text)
    if dup_lines > cfg.max_duplicate_line_fraction:
        return f"duplicate line fraction {dup_lines:.2f} > {cfg.max_duplicate_line_fraction}"
    if dup_chars > cfg.max_duplicate_line_char_fraction:
        return f"duplicate line char fraction {dup_chars:.2f} > {cfg.max_duplicate_line_char_fraction}"
    words = text.lower().split()
    limits = {
        2: cfg.max_top_2gram_char_fraction, 3: cfg.max_top_3gram_char_fraction, 4: cfg.max_top_4gram_char_fraction,
    }
    word_chars = sum(map(len, words))
    for n, limit in limits.items():
        frac = top_ngram_char_fraction(words, n, word_chars)
        if frac > limit:
            return f"top {n}-gram covers {frac:.2f} of characters > {limit}"
    return None


# ---------------------------------------------------------------------------------------------- line quality

_TERMINAL = (".", "!", "?", ":", ";", '"', "'", ")", "]", "”", "’", "»")
_BULLETS = ("-", "*", "•", "·", "‣", "◦", "▪", "–")


@lru_cache(maxsize=8)
def _boilerplate_regex(phrases: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(p.lower()) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def line_quality_stats(text: str, phrases: tuple[str, ...]) -> dict[str, float]:
    """Fractions of non-empty lines that end in terminal punctuation, contain a boilerplate phrase, end in an
    ellipsis, start with a bullet."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    n = max(len(lines), 1)
    regex = _boilerplate_regex(phrases) if phrases else None
    return {
        "terminal_punct": sum(line.endswith(_TERMINAL) for line in lines) / n,
        "boilerplate": sum(bool(regex and regex.search(line)) for line in lines) / n,
        "ellipsis": sum(line.endswith(("...", "…")) for line in lines) / n,
        "bullet": sum(line.startswith(_BULLETS) for line in lines) / n,
    }


def line_quality_reason(text: str, cfg: LineQualityConfig) -> str | None:
    s = line_quality_stats(text, tuple(cfg.boilerplate_phrases))
    if s["boilerplate"] > cfg.max_boilerplate_line_fraction:
        return f"boilerplate line fraction {s['boilerplate']:.2f} > {cfg.max_boilerplate_line_fraction}"
    if s["terminal_punct"] < cfg.min_terminal_punct_line_fraction:
        return f"lines ending in punctuation {s['terminal_punct']:.2f} < {cfg.min_terminal_punct_line_fraction}"
    if s["ellipsis"] > cfg.max_ellipsis_line_fraction:
        return f"ellipsis line fraction {s['ellipsis']:.2f} > {cfg.max_ellipsis_line_fraction}"
    if s["bullet"] > cfg.max_bullet_line_fraction:
        return f"bullet line fraction {s['bullet']:.2f} > {cfg.max_bullet_line_fraction}"
    return None
