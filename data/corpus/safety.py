"""Block-list safety filter (InternLM2 "Safe data", the list-based half).

The report uses ~13M blocked domains and 36,289 blocked words plus two BERT classifiers (toxicity, porn).
The lists here are small shipped defaults (data/blocklists/) to show the mechanism; point
corpus.safety.domain_blocklist / word_blocklist at real lists. The classifier half fits the pluggable
quality scorer (corpus.quality.scorer), which takes any `texts -> scores` model.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from data.corpus.config import SafetyConfig

BLOCKLIST_DIR = Path(__file__).resolve().parents[1] / "blocklists"
DEFAULT_DOMAINS = BLOCKLIST_DIR / "domains.txt"
DEFAULT_WORDS = BLOCKLIST_DIR / "words.txt"
_WORD = re.compile(r"\w+")


@lru_cache(maxsize=16)
def load_list(path: str) -> frozenset[str]:
    """Lower-cased entries of a block list file (local or fsspec URL): one per line, '#' starts a comment."""
    import fsspec

    with fsspec.open(path, "rt", encoding="utf-8") as f:
        entries = (line.split("#", 1)[0].strip().lower() for line in f)
        return frozenset(e for e in entries if e)


def host_of(url: str) -> str:
    try:
        return (urlsplit(url if "//" in url else f"//{url}").hostname or "").lower().rstrip(".")
    except ValueError:  # malformed URL (e.g. a bad port): no host to match
        return ""


def blocked_domain(url: str, domains: frozenset[str]) -> str | None:
    """The listed domain that covers the URL's host: the host itself or any parent (a.b.example -> b.example)."""
    parts = host_of(url).split(".")
    for i in range(len(parts) - 1):  # stop before the bare TLD
        candidate = ".".join(parts[i:])
        if candidate in domains:
            return candidate
    return None


@lru_cache(maxsize=16)
def _phrases_by_length(words: frozenset[str]) -> dict[int, frozenset[tuple[str, ...]]]:
    by_len: dict[int, set[tuple[str, ...]]] = {}
    for entry in words:
        tokens = tuple(_WORD.findall(entry))
        if tokens:
            by_len.setdefault(len(tokens), set()).add(tokens)
    return {n: frozenset(s) for n, s in by_len.items()}


def blocked_word_hits(text: str, words: frozenset[str]) -> list[str]:
    """Every occurrence of a listed word or phrase, matched on whole lower-cased word tokens."""
    tokens = _WORD.findall(text.lower())
    hits: list[str] = []
    for n, phrases in _phrases_by_length(words).items():
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i : i + n])
            if gram in phrases:
                hits.append(" ".join(gram))
    return hits


def safety_reason(text: str, url: str, cfg: SafetyConfig) -> str | None:
    domains = load_list(cfg.domain_blocklist or str(DEFAULT_DOMAINS))
    if url:
        domain = blocked_domain(url, domains)
        if domain:
            return f"blocked domain {domain}"
    hits = blocked_word_hits(text, load_list(cfg.word_blocklist or str(DEFAULT_WORDS)))
    if len(hits) >= cfg.min_blocked_word_hits:
        return f"{len(hits)} blocked word hits >= {cfg.min_blocked_word_hits} ({', '.join(sorted(set(hits))[:3])})"
    return None
