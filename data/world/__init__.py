"""The embedded preference world: domains, prompts, oracles, annotators and labelers (docs/design.md).

Everything is deterministic from seeds and needs no download. Domains:
  helpful   how-to questions; the right instruction, ideally with a supporting sentence
  harmless  refuse requests to harm someone, answer the rest (meta["unsafe"])
  code      tiny Python functions, checked by running them
  math      one-digit sums with exact answers (the verifiable domain)
  concise   how-to prompts asking for brevity ("Briefly, ..."); prefers the short correct answer
  detailed  how-to prompts asking for reasons ("... Explain why."); prefers the explained answer
            (the RM's pairs of both also use the plain wording, where they conflict: only the RM's system prompt
            can decide; see howto.py)
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
