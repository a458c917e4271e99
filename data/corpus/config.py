"""Every knob of the corpus pipeline, one dataclass per stage (InternLM2 report section 3.1; spec cool-rlhf.md 3.1).

The report names the stages but publishes no rule thresholds; the rule defaults below are Gopher's
(Rae et al. 2021, appendix A.1) where Gopher has one, and our own choice (marked) elsewhere. The
dedup defaults are the report's: 128 permutations, 5-gram shingles, Jaccard 0.7, keep the most recent doc.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Order of the stages as documents flow through them; "read" (malformed input rows) comes first.
STAGES = (
    "normalize", "length", "symbols", "repetition", "line_quality", "exact_dedup", "near_dedup", "safety", "quality",
)
READ_STAGE = "read"


def _check_fraction(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}.{name} is a fraction and must be in [0, 1] (got {value})")


@dataclass
class InputConfig:
    # Files or directories, local or fsspec URLs (s3://, gs://, file://, memory://). Directories are searched
    # recursively for .jsonl/.jsonl.gz, .json (a JSON array or JSON Lines), .parquet and .txt/.txt.gz files.
    # A relative path that does not exist under the current directory is taken relative to the repo root.
    paths: list[str] = field(default_factory=lambda: ["data/sample_corpus"])
    text_field: str = "text"
    id_field: str = "id"  # missing -> "<file name>:<line>"
    url_field: str = "url"  # used by the domain block list
    # The first of these present gives the recency key used to keep the most recent doc of a duplicate
    # cluster (a CC dump name like "CC-MAIN-2023-50" or an ISO date both sort correctly as text).
    date_fields: list[str] = field(default_factory=lambda: ["date", "dump"])
    # .txt files: "blank_line" = every block separated by blank lines is one document (so one .txt shard can
    # hold many docs); "file" = the whole file is one document (use it for multi-paragraph texts like books).
    txt_docs: str = "blank_line"
    on_error: str = "fail"  # fail | skip: a malformed row (bad JSON, missing/non-string text) stops or is counted
    read_batch_rows: int = 2000  # rows per block a reader task emits (large files stream out in blocks)

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("input.paths is empty: give at least one file or directory (local path or fsspec URL)")
        if self.txt_docs not in ("blank_line", "file"):
            raise ValueError(f"input.txt_docs must be 'blank_line' or 'file' (got {self.txt_docs!r})")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"input.on_error must be 'fail' or 'skip' (got {self.on_error!r})")
        if not self.text_field:
            raise ValueError("input.text_field must name the field holding the document text (e.g. 'text')")
        if self.read_batch_rows < 1:
            raise ValueError(f"input.read_batch_rows must be >= 1 (got {self.read_batch_rows})")


@dataclass
class NormalizeConfig:
    # Unicode NFKC, control/format characters removed, runs of spaces collapsed, >2 newlines collapsed to one
    # blank line. Documents that are empty afterwards are removed. Not switchable: later stages assume it.
    form: str = "NFKC"

    def __post_init__(self) -> None:
        if self.form not in ("NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"corpus.normalize.form must be one of NFC, NFKC, NFD, NFKD (got {self.form!r})")


@dataclass
class LengthConfig:
    enabled: bool = True
    min_words: int = 20  # Gopher uses 50; ours is lower because short API docs are legitimate here
    max_words: int = 100_000  # Gopher

    def __post_init__(self) -> None:
        if self.min_words < 0 or self.max_words < 1 or self.min_words > self.max_words:
            raise ValueError(
                f"corpus.length needs 0 <= min_words <= max_words (got {self.min_words}, {self.max_words})"
            )


@dataclass
class SymbolConfig:
    enabled: bool = True
    min_alpha_word_fraction: float = 0.7  # words with >= 1 letter; Gopher 0.8, lowered for code-bearing docs
    max_symbol_word_ratio: float = 0.1  # ('#' + '...' + '…') occurrences per word; Gopher
    max_non_alpha_char_fraction: float = 0.35  # non-space chars that are not letters (our choice)

    def __post_init__(self) -> None:
        for name in ("min_alpha_word_fraction", "max_non_alpha_char_fraction"):
            _check_fraction("corpus.symbols", name, getattr(self, name))
        if self.max_symbol_word_ratio < 0:
            raise ValueError(f"corpus.symbols.max_symbol_word_ratio must be >= 0 (got {self.max_symbol_word_ratio})")


@dataclass
class RepetitionConfig:
    enabled: bool = True
    max_duplicate_line_fraction: float = 0.30  # Gopher
    max_duplicate_line_char_fraction: float = 0.20  # Gopher
    # Share of word characters covered by the most frequent word n-gram; Gopher's 2/3/4-gram limits.
    max_top_2gram_char_fraction: float = 0.20
    max_top_3gram_char_fraction: float = 0.18
    max_top_4gram_char_fraction: float = 0.16

    def __post_init__(self) -> None:
        for name in (
            "max_duplicate_line_fraction", "max_duplicate_line_char_fraction", "max_top_2gram_char_fraction",
            "max_top_3gram_char_fraction", "max_top_4gram_char_fraction",
        ):
            _check_fraction("corpus.repetition", name, getattr(self, name))


@dataclass
class LineQualityConfig:
    enabled: bool = True
    # Lines ending in . ! ? : ; or a closing quote/bracket (C4 keeps only such lines; we score the whole doc).
    min_terminal_punct_line_fraction: float = 0.2  # our choice: wrapped prose has many mid-sentence line ends
    max_boilerplate_line_fraction: float = 0.2  # our choice
    max_ellipsis_line_fraction: float = 0.3  # Gopher
    max_bullet_line_fraction: float = 0.9  # Gopher
    # Case-insensitive phrases that mark navigation/legal/cookie boilerplate lines (matched on word boundaries).
    boilerplate_phrases: list[str] = field(
        default_factory=lambda: [
            "click here", "cookie", "cookies", "all rights reserved", "privacy policy", "terms of use",
            "terms of service", "sign up", "log in", "subscribe", "newsletter", "javascript", "read more",
            "share this", "skip to content", "powered by",
        ]
    )

    def __post_init__(self) -> None:
        for name in (
            "min_terminal_punct_line_fraction", "max_boilerplate_line_fraction", "max_ellipsis_line_fraction",
            "max_bullet_line_fraction",
        ):
            _check_fraction("corpus.line_quality", name, getattr(self, name))


@dataclass
class ExactDedupConfig:
    enabled: bool = True  # hash of the normalized text; global (one set for the whole corpus)


@dataclass
class NearDedupConfig:
    enabled: bool = True
    num_perm: int = 128  # InternLM2 report
    ngram: int = 5  # word 5-gram shingles (InternLM2: 5-grams; word level is our choice for space-delimited text)
    threshold: float = 0.7  # Jaccard; InternLM2 report
    # LSH banding (bands x rows <= num_perm). A pair with Jaccard J becomes a candidate with probability
    # P(J) = 1 - (1 - J^rows)^bands. Candidates are verified (below), so the default leans to recall:
    # 25 x 5 gives P(0.7) = 0.99, P(0.5) = 0.55, P(0.3) = 0.06. (datasketch's own choice for 0.7, 14 x 9, has
    # P(0.75) = 0.60 and misses many true pairs just above the threshold.) 0/0 = let datasketch choose.
    bands: int = 25
    rows: int = 5
    # A candidate counts only if its estimated Jaccard (share of equal signature slots) is >= threshold.
    # With verify=false every LSH candidate is a duplicate: then pick bands/rows whose S-curve threshold
    # (1/bands)^(1/rows) is near `threshold` (e.g. 16 x 8 -> 0.707).
    verify: bool = True
    seed: int = 1  # MinHash permutation seed; must be the same for every signature of one run

    def __post_init__(self) -> None:
        if self.num_perm < 16:
            raise ValueError(f"corpus.dedup.near.num_perm must be >= 16 (got {self.num_perm}); the report uses 128")
        if self.ngram < 1:
            raise ValueError(f"corpus.dedup.near.ngram must be >= 1 (got {self.ngram})")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"corpus.dedup.near.threshold must be in (0, 1) (got {self.threshold})")
        if (self.bands == 0) != (self.rows == 0):
            raise ValueError("corpus.dedup.near: set both bands and rows, or neither (0 = choose from threshold)")
        if self.bands and self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"corpus.dedup.near: bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}"
            )


@dataclass
class DedupConfig:
    exact: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near: NearDedupConfig = field(default_factory=NearDedupConfig)
    # "most_recent": sort by the recency key (descending) before the global dedup pass, so the first doc of a
    # cluster to reach the index, the one kept, is the newest (the report keeps the largest CC dump).
    # "first": keep the first doc in input order (no sort).
    keep: str = "most_recent"
    # CPUs reserved by the single global dedup actor. It does little work per doc (set/LSH look-ups); reserving a
    # whole CPU would leave none for the parallel stages on a 1-CPU node.
    actor_num_cpus: float = 0.0

    def __post_init__(self) -> None:
        if self.keep not in ("most_recent", "first"):
            raise ValueError(f"corpus.dedup.keep must be 'most_recent' or 'first' (got {self.keep!r})")
        if self.actor_num_cpus < 0:
            raise ValueError(f"corpus.dedup.actor_num_cpus must be >= 0 (got {self.actor_num_cpus})")


@dataclass
class SafetyConfig:
    enabled: bool = True
    # "" = the small default lists shipped in data/blocklists/. Files: one entry per line, '#' comments.
    domain_blocklist: str = ""  # a listed domain also blocks its subdomains
    word_blocklist: str = ""  # entries may be multi-word phrases; matched on lowercase word tokens
    # Word blocking over-removes (InternLM2 keeps its list conservative), so one stray hit is not enough.
    min_blocked_word_hits: int = 2

    def __post_init__(self) -> None:
        if self.min_blocked_word_hits < 1:
            raise ValueError(f"corpus.safety.min_blocked_word_hits must be >= 1 (got {self.min_blocked_word_hits})")


@dataclass
class QualityConfig:
    enabled: bool = True
    # "heuristic" = data.corpus.quality.heuristic_quality_scores; or "package.module:name" naming a function
    # `f(texts: list[str]) -> list[float]` or a class whose instances are such functions (built once per worker,
    # e.g. a model-based classifier). Scores must be in [0, 1]; docs scoring below `threshold` are removed.
    scorer: str = "heuristic"
    threshold: float = 0.6
    # Weights of the heuristic's four signals (see quality.py); a weighted mean, so only ratios matter.
    stopword_weight: float = 1.0
    word_length_weight: float = 1.0
    alpha_weight: float = 1.0
    sentence_weight: float = 1.0
    stopword_target: float = 0.3  # stop-word share at which that signal saturates at 1 (English prose: 0.4-0.5)

    def __post_init__(self) -> None:
        _check_fraction("corpus.quality", "threshold", self.threshold)
        if self.scorer != "heuristic" and ":" not in self.scorer:
            raise ValueError(
                f"corpus.quality.scorer must be 'heuristic' or 'package.module:name' (got {self.scorer!r})"
            )
        weights = [self.stopword_weight, self.word_length_weight, self.alpha_weight, self.sentence_weight]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("corpus.quality weights must be >= 0 and not all zero")
        if not 0.0 < self.stopword_target <= 1.0:
            raise ValueError(f"corpus.quality.stopword_target must be in (0, 1] (got {self.stopword_target})")


@dataclass
class CorpusConfig:
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    symbols: SymbolConfig = field(default_factory=SymbolConfig)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    line_quality: LineQualityConfig = field(default_factory=LineQualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    batch_size: int = 256  # docs per map_batches call of the parallel stages
    max_examples: int = 3  # removed examples kept per stage in report.json
    example_chars: int = 300  # removed docs keep this much text for the report
    rows_per_file: int = 100_000  # cleaned Parquet: at least this many rows per file (so few files, not 200)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"corpus.batch_size must be >= 1 (got {self.batch_size})")
        if self.max_examples < 0 or self.example_chars < 0:
            raise ValueError("corpus.max_examples and corpus.example_chars must be >= 0")
        if self.rows_per_file < 1:
            raise ValueError(f"corpus.rows_per_file must be >= 1 (got {self.rows_per_file})")
