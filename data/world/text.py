"""Small text helpers the world's oracles share: sentences, refusals, repetition.

The oracles must judge *any* text (RLHF samples from a half-trained policy), not only the world's own styles,
so everything here is a plain, forgiving function of the string.
"""
from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
REFUSAL_MARKERS = ("i can't help", "i cannot help", "i won't help", "i will not help")


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def sentences(text: str) -> list[str]:
    """Sentences, lower-cased and whitespace-normalized, in order (duplicates kept)."""
    return [normalize(s) for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def word_count(text: str) -> int:
    return len(text.split())


def is_refusal(text: str) -> bool:
    t = normalize(text).replace("’", "'")
    return any(m in t for m in REFUSAL_MARKERS)


def repeated_sentences(text: str) -> int:
    """How many sentences are exact repeats of an earlier one (the cheapest way to look 'long')."""
    sents = sentences(text)
    return len(sents) - len(set(sents))


def integers(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"-?\d+", text)]


def clamp01(x: float) -> float:
    return max(0.0, min(1.0, x))
