"""The embedded preference world: domains, prompts, oracles, annotators and labelers (docs/design.md).

Everything is deterministic from seeds and needs no download. Domains:
  helpful   how-to questions; the right instruction, ideally with a supporting sentence
  harmless  refuse requests to harm someone, answer the rest (meta["unsafe"])
  code      tiny Python functions, checked by running them
  math      one-digit sums with exact answers (the verifiable domain)
  concise   the how-to prompts again; prefers the short correct answer
  detailed  the how-to prompts again; prefers the explained answer (conflicts with concise)
"""
from data.world.core import Prompt
from data.world.labelers import (
    Comparison,
    FileLabeler,
    HttpJudgeLabeler,
    JudgeError,
    Labeler,
    ProgrammaticLabeler,
    TIE,
    to_preference_rows,
    write_labels,
)
from data.world.pairs import CONFLICT_DOMAINS, conflict_pairs, pair_id, preference_pairs, sft_conversations
from data.world.registry import DOMAINS, Annotator, annotator, get_domain, make_prompts, respond, score, styles

__all__ = [
    "DOMAINS", "CONFLICT_DOMAINS", "Prompt", "Annotator", "annotator", "make_prompts", "score", "respond", "styles",
    "get_domain", "sft_conversations", "preference_pairs", "conflict_pairs", "pair_id", "Labeler", "Comparison",
    "ProgrammaticLabeler", "TIE", "FileLabeler", "HttpJudgeLabeler", "JudgeError", "to_preference_rows", "write_labels",
]
