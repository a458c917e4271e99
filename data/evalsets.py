"""Evaluation sets and their scoring, free of torch and Ray: held-out text for perplexity, per-domain oracle
scores, win rates with ties counted half, and the needle-in-a-haystack passkey test scored the CDME way.

The suites that depend on the preference world or the reward model take those as callables (`scorer`,
`prefer`, reward lists), so this module never imports them and the maths is testable with plain functions.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------------------------- suite configs


@dataclass
class PerplexityConfig:
    enabled: bool = True
    # A file or directory in any corpus format (.jsonl/.json/.parquet/.txt), local or fsspec URL.
    # "" = a held-out slice of data/sample_corpus/ when it exists, else the standard-library docstrings
    # shipped with Python (data.samples.stdlib_docstrings).
    path: str = ""
    text_field: str = "text"  # the JSONL field holding a document
    heldout_fraction: float = 0.1  # the last fraction of documents (in sorted-file order) is the held-out slice
    max_docs: int = 64
    window: int = 512  # tokens per scored window (capped at the model's max_position_embeddings)

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction <= 1.0:
            raise ValueError(f"perplexity.heldout_fraction must be in (0, 1] (got {self.heldout_fraction})")
        if self.max_docs < 1:
            raise ValueError(f"perplexity.max_docs must be >= 1 (got {self.max_docs})")
        if self.window < 2:
            raise ValueError(f"perplexity.window must be >= 2 tokens (got {self.window})")


@dataclass
class DomainScoresConfig:
    enabled: bool = True
    domains: list[str] = field(default_factory=list)  # [] = every domain of the preference world
    n_per_domain: int = 16  # held-out prompts per domain
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.n_per_domain < 1:
            raise ValueError(f"domain_scores.n_per_domain must be >= 1 (got {self.n_per_domain})")


@dataclass
class WinRateConfig:
    # Each checkpoint against the job's `baseline` on the domain_scores prompts, judged by the conditional RM
    # (when `rm_path` is set) and by the world's annotators (order-swapped).
    enabled: bool = True
    annotators: bool = True


@dataclass
class NeedleConfig:
    enabled: bool = True
    depths: int = 5  # needle positions, evenly spaced over 0..100 % of the haystack
    # Prompt lengths in tokens. [] = `n_lengths` evenly spaced lengths up to the model's limit
    # (max_position_embeddings minus the answer budget `max_new_tokens`).
    lengths: list[int] = field(default_factory=list)
    n_lengths: int = 4
    max_new_tokens: int = 32  # the answer budget
    repeats: int = 1  # passkeys per (length, depth) cell
    filler_path: str = ""  # haystack text (a file or dir in any corpus format); "" = stdlib docstrings
    seed: int = 0

    def __post_init__(self) -> None:
        if self.depths < 1:
            raise ValueError(f"needle.depths must be >= 1 (got {self.depths})")
        if self.n_lengths < 1 and not self.lengths:
            raise ValueError(f"needle.n_lengths must be >= 1 when needle.lengths is empty (got {self.n_lengths})")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"needle.lengths must be positive token counts (got {self.lengths})")
        if self.max_new_tokens < 1 or self.repeats < 1:
            raise ValueError("needle.max_new_tokens and needle.repeats must be >= 1")


# ---------------------------------------------------------------------------------------------- text scoring


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


_WS = re.compile(r"\s+")


def cdme_score(prediction: str, reference: str) -> float:
    """OpenCompass CDMEEvaluator: strip all whitespace, then
    score = 100 * (1 - Lev(pred, ref) / max(|pred|, |ref|)); two empty strings score 100."""
    pred, ref = _WS.sub("", prediction), _WS.sub("", reference)
    longest = max(len(pred), len(ref))
    if longest == 0:
        return 100.0
    return 100.0 * (1.0 - levenshtein(pred, ref) / longest)


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding punctuation: "  42. " and "42" compare equal."""
    return _WS.sub(" ", text).strip().strip(".,;:!?\"'").strip().casefold()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


# ---------------------------------------------------------------------------------------------- perplexity


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Token-weighted: exp(sum of token NLLs / number of tokens), so long documents weigh more than short ones."""
    tokens = sum(token_counts)
    if tokens <= 0:
        raise ValueError("perplexity over zero tokens: the held-out texts tokenized to nothing")
    return math.exp(sum(nll_sums) / tokens)


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a file or of every file under a directory, local or fsspec URL, in the corpus pipeline's
    formats (.jsonl/.json/.parquet/.txt, gzip too; .txt blocks separated by blank lines are documents).
    A malformed row raises a DataError naming file, line and field."""
    from data.corpus.config import InputConfig
    from data.corpus.read import discover_files, iter_file_rows

    cfg = InputConfig(paths=[str(path)], text_field=text_field)
    return [row["text"] for url, fmt in discover_files(cfg.paths) for row in iter_file_rows(url, fmt, cfg)]


def heldout_slice(texts: Sequence[str], fraction: float, max_docs: int) -> list[str]:
    """The last `fraction` of the documents, at most `max_docs` of them (at least one)."""
    n = max(1, math.ceil(len(texts) * fraction))
    return list(texts[len(texts) - n:][:max_docs])


# ------------------------------------------------------------------------------------------ domain scores, win rates


def mean_by_domain(domains: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for d, v in zip(domains, values, strict=True):
        sums.setdefault(d, []).append(float(v))
    return {d: sum(v) / len(v) for d, v in sums.items()}


def domain_scores(prompts: Sequence[Any], responses: Sequence[str],
                  scorer: Callable[[Any, str], float]) -> dict[str, float]:
    """Mean oracle score per domain; `scorer(prompt, response)` is the world's ground truth in [0, 1]."""
    values = []
    for p, r in zip(prompts, responses, strict=True):
        s = float(scorer(p, r))
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"the scorer returned {s} for prompt {p.id!r}; oracle scores must lie in [0, 1]")
        values.append(s)
    return mean_by_domain([p.domain for p in prompts], values)


def reward_wins(candidate: Sequence[float], baseline: Sequence[float], tie_tol: float = 1e-5) -> list[float]:
    """Per pair: 1 when the candidate's reward is higher, 0.5 on a tie, 0 when lower. Rewards within `tie_tol`
    are a tie: the same text scored in two batches differs by float noise from padding and batch mates."""
    return [0.5 if abs(c - b) <= tie_tol else 1.0 if c > b else 0.0 for c, b in zip(candidate, baseline, strict=True)]


def judged_wins(prompts: Sequence[Any], candidate: Sequence[str], baseline: Sequence[str],
                prefer: Callable[[Any, str, str], int]) -> list[float]:
    """Per pair, judged in both orders to cancel position bias: `prefer(prompt, a, b)` returns 0 when a is
    preferred. Win in both orders = 1, a split verdict = 0.5 (a tie), identical responses = 0.5 without asking."""
    out = []
    for p, c, b in zip(prompts, candidate, baseline, strict=True):
        if c == b:
            out.append(0.5)
            continue
        first, second = int(prefer(p, c, b)), int(prefer(p, b, c))
        if first not in (0, 1) or second not in (0, 1):
            raise ValueError(f"prefer() must return 0 or 1, got {first}/{second} for prompt {getattr(p, 'id', p)!r}")
        out.append(((first == 0) + (second == 1)) / 2.0)
    return out


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- needle in a haystack

NEEDLE_QUESTION = (
    "There is a pass key hidden in the document above. What is the pass key? "
    "Answer with one sentence in the format 'The pass key is _____.' and nothing else."
)
NEEDLE_INTRO = "Read the following document. It contains one important fact.\n\n"


@dataclass(frozen=True)
class NeedleCase:
    id: str
    length: int  # target prompt length in tokens (chat template included)
    depth: float  # needle position in the haystack, percent
    messages: list[dict]
    reference: str  # the needle sentence; a correct answer reproduces it
    n_tokens: int  # the prompt's real length after building


def needle_depths(n: int) -> list[float]:
    """n points evenly spaced over 0..100 % (a single point sits at 50 %)."""
    if n == 1:
        return [50.0]
    return [round(100.0 * i / (n - 1), 2) for i in range(n)]


def needle_lengths(limit: int, n: int) -> list[int]:
    """n prompt lengths evenly spaced up to `limit` tokens: limit/n, 2 limit/n, ..., limit."""
    if limit < n:
        raise ValueError(f"a context limit of {limit} tokens cannot hold {n} needle lengths")
    return [limit * (i + 1) // n for i in range(n)]


def passkey_needle(seed: int, length: int, depth: float, repeat: int) -> str:
    key = random.Random(f"{seed}/{length}/{depth}/{repeat}").randint(10000, 99999)
    return f"The pass key is {key}."


def _needle_messages(haystack: str) -> list[dict]:
    return [{"role": "user", "content": f"{NEEDLE_INTRO}{haystack}\n\n{NEEDLE_QUESTION}"}]


def _split_at_sentence(prefix: str, suffix: str, lookback: int = 300) -> tuple[str, str]:
    """Move the insertion point back to the end of the previous sentence (within `lookback` characters), as
    CDME does, so the needle does not cut a sentence in half."""
    cut = max(prefix.rfind(". "), prefix.rfind("\n"))
    if cut >= 0 and len(prefix) - cut <= lookback:
        return prefix[: cut + 1], prefix[cut + 1:] + suffix
    return prefix, suffix


def build_needle_case(filler_ids: Sequence[int], length: int, depth: float, needle: str,
                      encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str],
                      count_prompt: Callable[[list[dict]], int], case_id: str) -> NeedleCase:
    """A prompt of about `length` tokens (never more) with `needle` at `depth` % of the filler haystack.

    `count_prompt(messages)` is the checkpoint's real prompt length (chat template + generation prompt), so the
    length is what the model sees. Re-tokenizing around the insertion point can add a token or two; the suffix
    is trimmed until the prompt fits."""
    overhead = count_prompt(_needle_messages(needle))
    budget = length - overhead
    if budget < 1:
        raise ValueError(
            f"needle length {length} tokens leaves no room for filler: the template, question and needle take "
            f"{overhead} tokens. Use needle.lengths above {overhead}."
        )
    if len(filler_ids) < budget:
        raise ValueError(f"the filler has {len(filler_ids)} tokens, {budget} are needed (length {length})")
    ids = list(filler_ids[:budget])
    pos = round(budget * depth / 100.0)
    prefix, suffix = _split_at_sentence(decode(ids[:pos]), decode(ids[pos:]))
    for _ in range(8):
        haystack = " ".join(part for part in (prefix.strip(), needle, suffix.strip()) if part)
        messages = _needle_messages(haystack)
        n_tokens = count_prompt(messages)
        if n_tokens <= length:
            return NeedleCase(case_id, length, depth, messages, needle, n_tokens)
        excess = n_tokens - length
        suffix_ids = encode(suffix)
        if suffix_ids:  # trim after the needle first: it keeps the needle's depth
            suffix = decode(suffix_ids[: max(0, len(suffix_ids) - excess)])
        else:
            prefix_ids = encode(prefix)
            prefix = decode(prefix_ids[: max(0, len(prefix_ids) - excess)])
    raise ValueError(f"could not fit needle case {case_id} into {length} tokens (last try: {n_tokens})")


def filler_token_ids(texts: Sequence[str], encode: Callable[[str], list[int]], n_tokens: int) -> list[int]:
    """At least `n_tokens` token ids of filler, cycling through `texts` (paragraphs joined by blank lines)."""
    if not any(t.strip() for t in texts):
        raise ValueError("the needle filler has no text")
    ids: list[int] = []
    i = 0
    while len(ids) < n_tokens:
        ids.extend(encode(texts[i % len(texts)].strip() + "\n\n"))
        i += 1
    return ids


def build_needle_cases(filler: Sequence[str], lengths: Sequence[int], depths: Sequence[float], repeats: int, seed: int,
                       encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str],
                       count_prompt: Callable[[list[dict]], int]) -> list[NeedleCase]:
    ids = filler_token_ids(filler, encode, max(lengths))
    cases = []
    for length in lengths:
        for depth in depths:
            for r in range(repeats):
                needle = passkey_needle(seed, length, depth, r)
                case_id = f"needle-L{length}-D{depth:g}-r{r}"
                cases.append(build_needle_case(ids, length, depth, needle, encode, decode, count_prompt, case_id))
    return cases


def aggregate_needle(cases: Sequence[NeedleCase], scores: Sequence[float]) -> dict:
    """CDME scores (0..100) averaged per (depth, length) cell, per length, per depth and overall."""
    lengths = sorted({c.length for c in cases})
    depths = sorted({c.depth for c in cases})
    cells: dict[tuple[float, int], list[float]] = {}
    for c, s in zip(cases, scores, strict=True):
        cells.setdefault((c.depth, c.length), []).append(float(s))
    grid = [[mean(cells[(d, n)]) for n in lengths] for d in depths]
    by_length = {str(n): mean([s for (d, m), v in cells.items() if m == n for s in v]) for n in lengths}
    by_depth = {f"{d:g}": mean([s for (e, m), v in cells.items() if e == d for s in v]) for d in depths}
    return {
        "lengths": lengths,
        "depths": depths,
        "grid": grid,  # grid[i][j]: depth i, length j
        "by_length": by_length,
        "by_depth": by_depth,
        "mean": mean([float(s) for s in scores]),
    }


def messages_json(messages: list[dict]) -> str:
    """Messages travel through Ray Data as one JSON string column (nested lists of dicts vary in schema)."""
    return json.dumps(messages, ensure_ascii=False)
