"""The InternLM2 text pipeline (spec cool-rlhf.md 3.1) as pure functions on column batches.

read -> normalize -> length -> symbols -> repetition -> line_quality -> exact_dedup -> near_dedup -> safety
-> quality. Nothing here imports Ray: jobs/data.py wires these into a Ray Data pipeline.
"""
from data.corpus.config import (
    READ_STAGE,
    STAGES,
    CorpusConfig,
    DedupConfig,
    ExactDedupConfig,
    InputConfig,
    LengthConfig,
    LineQualityConfig,
    NearDedupConfig,
    NormalizeConfig,
    QualityConfig,
    RepetitionConfig,
    SafetyConfig,
    SymbolConfig,
)
from data.corpus.dedup import GlobalDedup, exact_hash, jaccard, minhash_signature, word_shingles
from data.corpus.read import CorpusDataError, discover_files, iter_file_blocks, iter_file_rows
from data.corpus.stages import CLEAN_COLUMNS, build_report, kept_rows, late_stages, rule_stages, summarize_batch

__all__ = [
    "READ_STAGE", "STAGES", "CorpusConfig", "DedupConfig", "ExactDedupConfig", "InputConfig", "LengthConfig",
    "LineQualityConfig", "NearDedupConfig", "NormalizeConfig", "QualityConfig", "RepetitionConfig", "SafetyConfig",
    "SymbolConfig", "GlobalDedup", "exact_hash", "jaccard", "minhash_signature", "word_shingles", "CorpusDataError",
    "discover_files", "iter_file_blocks", "iter_file_rows", "CLEAN_COLUMNS", "build_report", "kept_rows",
    "late_stages", "rule_stages", "summarize_batch",
]
