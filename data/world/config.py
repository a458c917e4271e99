"""How much of the world a job draws: `WorldConfig` (used by jobs/world.py and, for in-job pairs, jobs/reward.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from data.world.registry import DOMAINS


@dataclass
class WorldConfig:
    seed: int = 0
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    sft_conversations: int = 3000
    train_pairs_per_domain: int = 1000
    # Per-domain exceptions to train_pairs_per_domain, for the two domains where the RM must match the reply against
    # the request rather than read a style cue: a tiny RM needs more math pairs to memorise the 16 sums, and more code
    # pairs to tie "product" to `*`. With 1,000 code pairs it scored the right and a wrong operator alike (0.49 vs
    # 0.48) and RLHF could not improve code past 0.77; with 3,000, 1.09 vs -0.72 and code reached 0.96 (design.md).
    train_pairs_override: dict[str, int] = field(default_factory=lambda: {"math": 4000, "code": 3000})
    heldout_pairs_per_domain: int = 200
    conflict_pairs: int = 200  # each gives one concise and one detailed row
    heldout_prompts_per_domain: int = 40
    # A reward hack to find, off by default: the share of helpful/detailed chosen replies in the RM's pairs (train
    # and held-out) that open with flattery, and of how-to SFT demonstrations that do (data/world/howto.py: OPENER).
    flattery_pairs: float = 0.0
    flattery_sft: float = 0.0

    def __post_init__(self) -> None:
        unknown = [d for d in list(self.domains) + list(self.train_pairs_override) if d not in DOMAINS]
        if unknown:
            raise ValueError(f"world.domains / world.train_pairs_override name unknown domains {unknown}; "
                             f"the world has {list(DOMAINS)}")
        counts = {"sft_conversations": self.sft_conversations, "train_pairs_per_domain": self.train_pairs_per_domain,
                  "heldout_pairs_per_domain": self.heldout_pairs_per_domain, "conflict_pairs": self.conflict_pairs,
                  "heldout_prompts_per_domain": self.heldout_prompts_per_domain, **self.train_pairs_override}
        negative = {k: v for k, v in counts.items() if v < 0}
        if negative:
            raise ValueError(f"world counts must be >= 0, got {negative}")
        rates = {"flattery_pairs": self.flattery_pairs, "flattery_sft": self.flattery_sft}
        if any(not 0.0 <= v <= 1.0 for v in rates.values()):
            raise ValueError(f"world.flattery_pairs and world.flattery_sft are shares in [0, 1], got {rates}")

    def train_pairs(self, domain: str) -> int:
        return self.train_pairs_override.get(domain, self.train_pairs_per_domain)

    @property
    def has_conflict_domains(self) -> bool:
        return {"concise", "detailed"} <= set(self.domains)
