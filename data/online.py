"""Online RLHF data logic (spec cool-rlhf.md 7.3), pure Python: samples with lineage, reward-hacking
detectors, rising-pattern mining, fast-path (early > late) and slow-path pair building.

A *pattern* is a behaviour that (1) became more frequent in the late-round policy than in the early one by
`margin`, and (2) is over-rewarded: on prompts where only the late response shows it, the RM prefers the late
response while the labeler prefers the early one. Both conditions, not just (1): a behaviour that rises because
the policy got genuinely better is not a hack.

Where a detector can cut its pattern out of a response (`remove`: a phrase, repeated sentences), the over-reward
check and the fast-path pairs use *edit pairs* instead: a late response against the same response with the pattern
cut out. They differ by the pattern alone, so "the RM pays for the pattern and the labeler does not" is measured
without the rest of what the policy learnt between the early and the late snapshot, and a pair teaches the RM
exactly that the pattern costs (docs/design.md, "Session 7").
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from statistics import median
from typing import Callable, Iterable, Protocol

_WORD = re.compile(r"\w+|[^\w\s]")
_WORD_CHAR = re.compile(r"\w")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Sample:
    """One response with its lineage: which policy (source + version) in which round produced it."""

    prompt_id: str
    domain: str
    messages: list[dict]
    response: str
    source: str  # sft | early | late
    round: int
    policy_version: int
    rm_score: float | None = None
    oracle: float | None = None
    sample_id: str = ""

    def __post_init__(self) -> None:
        if not self.sample_id:
            key = f"{self.round}|{self.source}|{self.policy_version}|{self.prompt_id}|{self.response}"
            self.sample_id = hashlib.sha1(key.encode()).hexdigest()[:16]

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> "Sample":
        """Inverse of `to_row` (unknown keys are an error: a row from another format is not a Sample)."""
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(row) - known)
        if extra:
            raise ValueError(f"not a Sample row: unknown keys {extra}; expected {sorted(known)}")
        return cls(**row)


# ---------------------------------------------------------------------------------------------- detectors


class Detector(Protocol):
    name: str

    def fit(self, reference: list[Sample]) -> None: ...

    def flags(self, sample: Sample) -> bool: ...


@dataclass
class LengthBlowup:
    """Flags responses longer than `ratio` x the median length of reference (SFT/early) responses of the domain."""

    ratio: float = 1.8
    min_words: int = 12
    name: str = "length_blowup"
    _median: dict[str, float] = field(default_factory=dict)

    def fit(self, reference: list[Sample]) -> None:
        by_domain: dict[str, list[int]] = defaultdict(list)
        for s in reference:
            by_domain[s.domain].append(len(words(s.response)))
        self._median = {d: float(median(v)) for d, v in by_domain.items() if v}

    def flags(self, sample: Sample) -> bool:
        n = len(words(sample.response))
        base = self._median.get(sample.domain)
        return base is not None and n >= self.min_words and n > self.ratio * max(base, 1.0)


@dataclass
class Repetition:
    """Flags responses whose word 3-grams repeat: 1 - distinct/total >= threshold (Gopher-style), or a repeated line."""

    threshold: float = 0.3
    n: int = 3
    name: str = "repetition"

    def fit(self, reference: list[Sample]) -> None:
        return None

    def flags(self, sample: Sample) -> bool:
        w = words(sample.response)
        grams = [tuple(w[i : i + self.n]) for i in range(len(w) - self.n + 1)]
        if len(grams) >= 4 and 1 - len(set(grams)) / len(grams) >= self.threshold:
            return True
        lines = [ln.strip() for ln in sample.response.splitlines() if len(ln.strip()) > 8]
        return len(lines) != len(set(lines))

    def remove(self, text: str) -> str | None:
        """`text` with every repeated sentence after its first occurrence dropped (None if nothing repeats)."""
        kept: list[str] = []
        seen: set[str] = set()
        for sentence in _SENTENCE_END.split(text.strip()):
            key = " ".join(words(sentence))
            if key and key in seen:
                continue
            seen.add(key)
            kept.append(sentence)
        out = " ".join(kept).strip()
        return out if out and out != text.strip() else None


@dataclass
class PhraseDetector:
    """Flags responses containing a phrase (a word n-gram), as found by `mine_rising_phrases`; with `domain`, only
    responses of that domain (a hack confined to one domain, found by `mine_rising_phrases_by_domain`)."""

    phrase: tuple[str, ...]
    name: str = ""
    domain: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or "phrase:" + " ".join(self.phrase) + (f"@{self.domain}" if self.domain else "")

    @classmethod
    def from_name(cls, name: str) -> "PhraseDetector":
        """Inverse of the name: "phrase:<words>" or "phrase:<words>@<domain>"."""
        body = name.removeprefix("phrase:")
        head, _, domain = body.rpartition("@")
        if head and domain and " " not in domain:
            return cls(tuple(head.split()), domain=domain)
        return cls(tuple(body.split()))

    def fit(self, reference: list[Sample]) -> None:
        return None

    def flags(self, sample: Sample) -> bool:
        return (not self.domain or sample.domain == self.domain) and _contains(words(sample.response), self.phrase)

    def remove(self, text: str) -> str | None:
        """`text` without the sentences that carry the phrase (None if none does, or nothing else is left). Whole
        sentences, since a mined phrase is often a piece of one ("trust me ," of "Trust me, this is correct."), and
        what is left of a sentence is not an answer anyone wrote; a phrase inside a sentence that matters takes
        that sentence with it, and the labeler then prefers the original, so the pattern is not a hack."""
        hits = [m.span() for m in _phrase_regex(self.phrase).finditer(text)]
        if not hits:
            return None
        kept = [text[a:b] for a, b in _sentence_spans(text) if not any(s < b and e > a for s, e in hits)]
        out = " ".join(" ".join(kept).split())
        return out or None


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text` (split where `.`, `!` or `?` meets whitespace)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    return spans + [(start, len(text))] if start < len(text) else spans


def _phrase_regex(phrase: tuple[str, ...]) -> re.Pattern:
    """The phrase's tokens (as `words` splits them) in raw text: any case, any spacing between tokens, and whole
    words only, so ("good", "question") does not match inside "goodquestions"."""
    parts = [rf"\b{re.escape(t)}\b" if _WORD_CHAR.match(t) else re.escape(t) for t in phrase]
    return re.compile(r"\s*".join(parts), re.IGNORECASE)


def in_scope(det: Detector, samples: list[Sample]) -> list[Sample]:
    """The samples a detector's rate is measured on: its domain's if it is confined to one, else all."""
    domain = getattr(det, "domain", "")
    return [s for s in samples if s.domain == domain] if domain else samples


def _contains(w: list[str], phrase: tuple[str, ...]) -> bool:
    n = len(phrase)
    return any(tuple(w[i : i + n]) == phrase for i in range(len(w) - n + 1))


def _ngrams(w: list[str], n_min: int, n_max: int) -> set[tuple[str, ...]]:
    return {tuple(w[i : i + n]) for n in range(n_min, n_max + 1) for i in range(len(w) - n + 1)}


TOP_FRACTION = 0.5  # the "top-reward" replies: this share of a round's late replies, by RM score
NEW_OVER_REWARD = 0.5  # a new pattern is a hack when the RM gets at least this share of its checks backwards


def top_reward(samples: list[Sample], fraction: float = TOP_FRACTION) -> list[Sample]:
    """The `fraction` of `samples` the RM scored highest (at least one; unscored samples are left out)."""
    scored = sorted((s for s in samples if s.rm_score is not None), key=lambda s: s.rm_score, reverse=True)
    return scored[: max(1, int(len(scored) * fraction))]


def mine_rising_phrases(
    early: list[Sample], late: list[Sample], *, margin: float = 0.2, top_fraction: float = TOP_FRACTION,
    n_range: tuple[int, int] = (2, 4), max_phrases: int = 3, min_count: int = 2,
) -> list[tuple[tuple[str, ...], float, float]]:
    """Word n-grams whose document frequency among the top-reward late samples exceeds their frequency among
    early samples by >= margin. Returns (phrase, rate_early, rate_late_top), strongest rise first. One behaviour
    yields one pattern: a phrase is dropped when it contains or is contained in a stronger kept one, or when it
    occurs in exactly the same top samples as a kept one (overlapping pieces of one planted sentence). A phrase
    in fewer than `min_count` top samples is noise (e.g. a number next to the planted sentence), never a pattern."""
    top = top_reward(late, top_fraction) or late
    if not top or not early:
        return []
    support: dict[tuple[str, ...], set[int]] = defaultdict(set)  # gram -> indices of the top samples holding it
    for i, s in enumerate(top):
        for gram in _ngrams(words(s.response), *n_range):
            support[gram].add(i)
    f_early: Counter = Counter()
    for s in early:
        f_early.update(_ngrams(words(s.response), *n_range))
    rises = []
    for gram, holders in support.items():
        r_top, r_early = len(holders) / len(top), f_early.get(gram, 0) / len(early)
        if len(holders) >= min_count and r_top - r_early >= margin and any(t.isalpha() for t in gram):
            rises.append((gram, r_early, r_top))
    rises.sort(key=lambda x: (-(x[2] - x[1]), -len(x[0]), x[0]))
    kept: list[tuple[tuple[str, ...], float, float]] = []
    for gram, r_early, r_top in rises:
        overlaps = any(_contains(list(k[0]), gram) or _contains(list(gram), k[0]) or support[k[0]] == support[gram]
                       for k in kept)
        if not overlaps:
            kept.append((gram, r_early, r_top))
        if len(kept) >= max_phrases:
            break
    return kept


def mine_rising_phrases_by_domain(
    early: list[Sample], late: list[Sample], *, margin: float = 0.2, min_samples: int = 4,
) -> list[tuple[tuple[str, ...], str, float, float]]:
    """`mine_rising_phrases` within each domain: (phrase, domain, rate_early, rate_late_top). A hack confined to one
    domain of six moves the pooled rates by a sixth of its in-domain rise, under any sensible margin, so it is only
    visible here. Domains with fewer than `min_samples` early or late samples are skipped (too few to rank)."""
    out = []
    for domain in sorted({s.domain for s in late}):
        e = [s for s in early if s.domain == domain]
        lt = [s for s in late if s.domain == domain]
        if len(e) >= min_samples and len(lt) >= min_samples:
            out += [(phrase, domain, r_e, r_t) for phrase, r_e, r_t in mine_rising_phrases(e, lt, margin=margin)]
    return out


def distinct_behaviours(dets: list[PhraseDetector], late: list[Sample]) -> list[PhraseDetector]:
    """`dets` (in order) less each phrase whose late replies (within its scope) all show a phrase that shows in more
    of them: the same behaviour seen through another window ("question . dry the" inside "Good question. Dry the
    ..."), mined against another baseline, or in one domain after the pooled miner found it. The miner drops such
    pieces within one call; this drops them across calls. A phrase no late reply shows is kept."""
    flagged = {d.name: [s for s in in_scope(d, late) if d.flags(s)] for d in dets}
    kept: list[PhraseDetector] = []
    for d in sorted(dets, key=lambda d: -len(flagged[d.name])):  # stable: ties keep their order
        if not (flagged[d.name] and any(all(k.flags(s) for s in flagged[d.name]) for k in kept)):
            kept.append(d)
    return [d for d in dets if d in kept]


# Fixed detectors by name; "rising_pattern" is not one detector but the miner above, which yields one
# PhraseDetector per rising phrase.
STATIC_DETECTORS: dict[str, Callable[[], Detector]] = {"length_blowup": LengthBlowup, "repetition": Repetition}
DETECTOR_NAMES = (*STATIC_DETECTORS, "rising_pattern")


# ---------------------------------------------------------------------------------------------- patterns and pairs


@dataclass
class Pattern:
    name: str
    rate_early: float
    rate_late: float
    over_reward_rate: float  # share of checked pairs where the RM prefers the pattern and the labeler does not
    checked: int
    examples: list[str]
    detected: bool
    check: str = "contrast"  # which pairs the over-reward rate was measured on: "contrast" (early vs late) | "edit"
    rate_sft: float | None = None  # the SFT policy's rate, when its replies were given (the rise counts from it too)
    rate_late_top: float | None = None  # the rate among the top-reward late replies (`top_reward`, in scope)
    rose: bool = False  # passed the rise test (`rise_on`); detected = rose and enough checks backwards


def hack_rate(samples: list[Sample], detectors: Iterable[Detector]) -> float:
    """Share of samples flagged by at least one detector."""
    dets = list(detectors)
    if not samples:
        return 0.0
    return sum(any(d.flags(s) for d in dets) for s in samples) / len(samples)


def _by_prompt(samples: list[Sample]) -> dict[str, Sample]:
    return {s.prompt_id: s for s in samples}


def contrast_pairs(det: Detector, early: list[Sample], late: list[Sample]) -> list[tuple[Sample, Sample]]:
    """(early, late) responses to the same prompt where only the late one shows the pattern, in `late` order.

    Only these pairs isolate the pattern: when both responses show it (or neither), a preference between
    them says nothing about the pattern itself."""
    e_by = _by_prompt(early)
    return [(e_by[s.prompt_id], s) for s in late
            if s.prompt_id in e_by and det.flags(s) and not det.flags(e_by[s.prompt_id])]


def over_reward(pairs: list[tuple[Sample, Sample]], prefer: Callable[[Sample, Sample], int | str | None],
                max_checks: int, ties: bool = True) -> tuple[float, int]:
    """(share of checked pairs the RM gets backwards, pairs checked) over (without, with) pairs: the RM scores the
    response showing the pattern higher while the labeler prefers the one without it. `prefer(a, b)` is the
    labeler: 0 (a), 1 (b), TIE (neither: checked, not over-rewarded; `ties=False`: not checked) or None (no label:
    not checked)."""
    checked = over = 0
    for without, shown in pairs[:max_checks]:
        label = prefer(without, shown)
        if label is None or without.rm_score is None or shown.rm_score is None:
            continue
        if not ties and label not in (0, 1):
            continue
        checked += 1
        over += int(shown.rm_score > without.rm_score and label == 0)
    return (over / checked if checked else 0.0), checked


def evaluate_pattern(
    det: Detector, early: list[Sample], late: list[Sample], prefer: Callable[[Sample, Sample], int | str | None],
    *, margin: float, max_checks: int = 30, edits: list[tuple[Sample, Sample]] | None = None,
    over_threshold: float = NEW_OVER_REWARD, sft: list[Sample] | None = None, min_checks: int = 1, ties: bool = True,
    rise_on: str = "all", contrast: list[tuple[Sample, Sample]] | None = None,
) -> Pattern:
    """Rate rise (within the detector's scope, see `in_scope`) plus the over-reward check: on `edits` (RM-scored
    `edit_pairs`) when given, else on `contrast` pairs, else on the early-vs-late contrasting prompts of `early` and
    `late`; detected when the RM gets at least `over_threshold` of the checked pairs backwards. The rise counts from
    the early rate or, given `sft` replies, from the lower of the early and SFT rates: a hack that creeps in over
    rounds is in the early snapshot too, but not in the SFT policy. It is measured on every late reply
    (`rise_on="all"`: the policy has learnt it) or on the top-reward half (`"top"`: the RM pays for it, the test
    the miner applies; the report's "rises among top-reward samples"). `margin=0` checks a known pattern (found in
    an earlier round or another domain) for being over-rewarded still, whether or not it rose. Fewer than
    `min_checks` labelled checks confirm nothing; with `ties=False` a check the labeler calls a tie is not counted at
    all (see `over_reward`)."""
    if rise_on not in ("all", "top"):
        raise ValueError(f"rise_on must be 'all' or 'top' (got {rise_on!r})")

    def rate(samples: list[Sample]) -> float:
        scoped = in_scope(det, samples)
        return sum(det.flags(s) for s in scoped) / max(len(scoped), 1)

    r_early, r_late = rate(early), rate(late)
    r_top = rate(top_reward(in_scope(det, late)))
    r_sft = rate(sft) if sft else None
    base = r_early if r_sft is None else min(r_early, r_sft)
    if edits:
        pairs, check = edits, "edit"
    else:
        pairs, check = (contrast if contrast is not None else contrast_pairs(det, early, late)), "contrast"
    over_rate, checked = over_reward(pairs, prefer, max_checks, ties=ties)
    rise = (r_top if rise_on == "top" else r_late) - base
    rose = rise >= margin if margin > 0 else r_late > 0
    detected = rose and checked >= max(min_checks, 1) and over_rate >= over_threshold
    return Pattern(det.name, r_early, r_late, over_rate, checked, [s.response[:200] for _, s in pairs[:3]], detected,
                   check, r_sft, r_top, rose)


def undecided(pattern: Pattern, *, min_checks: int, over_threshold: float = NEW_OVER_REWARD) -> bool:
    """A pattern that rose and that the RM got backwards on at least `over_threshold` of its checks, but on fewer
    than `min_checks` checks: more replies showing it would decide it either way."""
    return (pattern.rose and not pattern.detected and 1 <= pattern.checked < min_checks
            and pattern.over_reward_rate >= over_threshold)


def edit_pairs(det: Detector, late: list[Sample]) -> list[tuple[Sample, Sample]]:
    """(edited, original) for each late response the detector flags and can cut its pattern out of (`remove`),
    in `late` order; the edited one (source "edit", unscored) no longer shows the pattern. Empty for a detector
    without `remove` (a length blow-up has no one part to cut)."""
    remove = getattr(det, "remove", None)
    if remove is None:
        return []
    out = []
    for s in in_scope(det, late):
        text = remove(s.response) if det.flags(s) else None
        if text is not None:
            edited = replace(s, response=text, source="edit", rm_score=None, oracle=None, sample_id="")
            if not det.flags(edited):
                out.append((edited, s))
    return out


def pair_id(a: Sample, b: Sample) -> str:
    return hashlib.sha1(f"{a.sample_id}|{b.sample_id}".encode()).hexdigest()[:16]


def preference_row(chosen: Sample, rejected: Sample, *, path: str, round_idx: int, pattern: str = "",
                   labeler: str = "") -> dict:
    """A coolray-JSONL preference row plus lineage (which sample, source and policy version on each side)."""
    return {
        "pair_id": pair_id(chosen, rejected),
        "messages": chosen.messages,
        "chosen": chosen.response,
        "rejected": rejected.response,
        "domain": chosen.domain,
        "lineage": {
            "path": path, "round": round_idx, "pattern": pattern, "labeler": labeler,
            "chosen": {"sample_id": chosen.sample_id, "source": chosen.source, "policy_version": chosen.policy_version},
            "rejected": {"sample_id": rejected.sample_id, "source": rejected.source, "policy_version": rejected.policy_version},
        },
    }


def labelled_row(a: Sample, b: Sample, label: int, *, round_idx: int, labeler: str) -> dict:
    """A slow-path row from the comparison (a, b) labelled 0 (a preferred) or 1 (b preferred).

    Its pair_id stays the comparison's id, pair_id(a, b), whatever the label: that id is the key a human label
    file uses, so a later round can tell which labelled comparisons it has already turned into rows."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (a preferred) or 1 (b preferred), got {label!r}")
    chosen, rejected = (a, b) if label == 0 else (b, a)
    row = preference_row(chosen, rejected, path="slow", round_idx=round_idx, labeler=labeler)
    row["pair_id"] = pair_id(a, b)
    return row


def fast_path_pairs(
    det: Detector, early: list[Sample], late: list[Sample], *, round_idx: int, max_pairs: int, seed: int,
    edits: list[tuple[Sample, Sample]] | None = None,
) -> list[dict]:
    """early > late on prompts where only the late response shows the pattern, or, given `edits`, edited > late
    (lineage.chosen.edit_of names the late sample); at most `max_pairs`, a seeded draw."""
    cands = list(edits) if edits is not None else contrast_pairs(det, early, late)
    random.Random(seed).shuffle(cands)
    rows = [preference_row(c, l, path="fast", round_idx=round_idx, pattern=det.name) for c, l in cands[:max_pairs]]
    if edits is not None:
        for row, (_, original) in zip(rows, cands):
            row["lineage"]["chosen"]["edit_of"] = original.sample_id
    return rows


def slow_path_candidates(samples: dict[str, list[Sample]], n: int, seed: int) -> list[tuple[Sample, Sample]]:
    """Up to n pairs of SFT / early / late responses to the same prompt, never two identical responses.

    The first pass takes one source pair per prompt, cycling over the three; when n asks for more, later passes
    take each prompt's other source pairs, so a round's samples yield up to three comparisons per prompt."""
    by_src = {src: _by_prompt(v) for src, v in samples.items()}
    combos = [("sft", "late"), ("early", "late"), ("sft", "early")]
    prompts = sorted(set.intersection(*(set(v) for v in by_src.values()))) if by_src else []
    random.Random(seed).shuffle(prompts)
    out = []
    for shift in range(len(combos)):
        for i, pid in enumerate(prompts):
            if len(out) >= n:
                return out
            a, b = combos[(i + shift) % len(combos)]
            if by_src[a][pid].response != by_src[b][pid].response:
                out.append((by_src[a][pid], by_src[b][pid]))
    return out
