"""End of an online COOL RLHF round: fast path (hack detectors -> early-vs-late pairs), slow path (labeler),
RM update on base + all new pairs, evaluation, and lineage on disk (spec cool-rlhf.md 7.3).

Called by `jobs/rlhf.py` once per round:  result = end_of_round(RoundContext(...)).
Idempotent: a rerun after a crash returns the saved `round.json`, or reuses pairs already collected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class RMUpdateConfig:
    mode: str = "finetune"  # finetune RM_{k-1} on base + all new pairs | retrain from the SFT backbone
    max_steps: int = 60
    lr: float = 5e-4
    max_tokens_per_batch: int = 4096

    def __post_init__(self) -> None:
        if self.mode not in ("finetune", "retrain"):
            raise ValueError(f"online.rm_update.mode must be 'finetune' or 'retrain' (got {self.mode!r})")


@dataclass
class OnlineConfig:
    detectors: list[str] = field(default_factory=lambda: ["length_blowup", "repetition", "rising_pattern"])
    pairs_per_pattern_min: int = 20
    pairs_per_pattern_max: int = 100
    slow_path: bool = True
    labeler: str = "programmatic"  # programmatic | file | http
    labels_path: str = ""  # labeler=file: JSONL of human labels keyed by pair id
    judge_url: str = ""  # labeler=http
    slow_pairs_per_round: int = 60
    prompts_per_source: int = 48  # prompts on which SFT / early / late responses are sampled
    rise_margin: float = 0.2  # a pattern counts when its late rate exceeds the early rate by this much
    rm_update: RMUpdateConfig = field(default_factory=RMUpdateConfig)

    def __post_init__(self) -> None:
        from data.online import DETECTOR_NAMES

        unknown = [d for d in self.detectors if d not in DETECTOR_NAMES]
        if unknown:
            raise ValueError(f"online.detectors has unknown {unknown}; known: {list(DETECTOR_NAMES)}")
        if not 1 <= self.pairs_per_pattern_min <= self.pairs_per_pattern_max:
            raise ValueError("online.pairs_per_pattern_min must be >= 1 and <= online.pairs_per_pattern_max")
        if self.labeler not in ("programmatic", "file", "http"):
            raise ValueError(f"online.labeler must be programmatic, file or http (got {self.labeler!r})")
        if self.labeler == "file" and not self.labels_path:
            raise ValueError("online.labeler=file needs online.labels_path=<labels.jsonl>")
        if self.labeler == "http" and not self.judge_url:
            raise ValueError("online.labeler=http needs online.judge_url=<http://host:port/...>")


@dataclass
class RoundContext:
    round: int
    run_dir: Path
    rm_dir: str
    base_pairs_path: str
    prior_pair_files: list[str]
    cfg: OnlineConfig
    generate: Callable[[str, list], list[str]]  # (source in {"sft","early","late"}, prompts) -> responses
    rm_score: Callable[[list[dict]], list[float]]  # [{"domain","messages","response"}] -> scores
    logger: Any  # jobs.common.MetricsLogger
    policy_versions: dict[str, int]
    seed: int = 0
    trainer_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundResult:
    new_rm_dir: str
    patterns: list[dict]
    pair_counts: dict[str, int]
    hack_rate_early: float
    hack_rate_late: float
    rm_eval: dict
    pairs_path: str
