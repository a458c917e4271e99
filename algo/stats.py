"""Running mean/variance, and the reward-score clip + normalisation that uses it.

Merging follows Chan, Golub & LeVeque, "Updating Formulae and a Pairwise Algorithm for Computing Sample Variances"
(1979, http://i.stanford.edu/pub/cstr/reports/cs/tr/79/773/CS-TR-79-773.pdf), the parallel form of Welford's update:
merging the statistics of two chunks gives the statistics of their concatenation, so ranks or batches can be merged
in any order. Statistics are kept as Python floats (float64) so a long run does not drift in fp32.

Reward handling is XTuner's Ray RLHF recipe (spec §7.4): clip the RM score to [-5, 5] (the range the RM's log-barrier
keeps it in), add the batch to the running statistics, then r~ = (r - mu) / (sigma + 1e-8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class RunningMeanStd:
    """Count, mean and M2 (sum of squared deviations) of every value seen; population variance M2 / n."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return self.var ** 0.5

    def update(self, values: torch.Tensor) -> None:
        """Add every element of `values` (any shape) to the statistics."""
        flat = values.detach().to(torch.float64).flatten()
        if flat.numel() == 0:
            return
        mean = flat.mean()
        self._merge_moments(flat.numel(), float(mean), float(((flat - mean) ** 2).sum()))

    def merge(self, other: RunningMeanStd) -> None:
        """Fold `other`'s statistics into these, as if its values had been passed to `update`."""
        self._merge_moments(other.count, other.mean, other.m2)

    def _merge_moments(self, count_b: int, mean_b: float, m2_b: float) -> None:
        if count_b == 0:
            return
        count = self.count + count_b
        delta = mean_b - self.mean
        # mu = mu_a + delta * n_b / n
        self.mean += delta * count_b / count
        # M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
        self.m2 += m2_b + delta * delta * self.count * count_b / count
        self.count = count

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(
                f"running-stats state lacks {sorted(missing)}; pass what RunningMeanStd.state_dict() wrote"
            )
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class RewardNormConfig:
    """How raw reward-model scores become the scalar reward of a response."""

    clip_min: float | None = -5.0  # None: no lower clip
    clip_max: float | None = 5.0  # None: no upper clip
    normalize: bool = True  # subtract the running mean, divide by the running std
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.clip_min is not None and self.clip_max is not None and self.clip_min >= self.clip_max:
            raise ValueError(
                f"reward clip_min ({self.clip_min}) must be < clip_max ({self.clip_max}); the RM range is (-5, 5)"
            )
        if self.eps < 0:
            raise ValueError(f"reward eps must be >= 0 (got {self.eps}); 1e-8 is the usual value")


def compute_clipped_scores(scores: torch.Tensor, clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """Clamp RM scores (`[B]`) to [clip_min, clip_max]; a None bound is open."""
    if clip_min is None and clip_max is None:
        return scores
    # r_clip = min(max(r, clip_min), clip_max)
    return scores.clamp(min=clip_min, max=clip_max)


def compute_normalized_scores(scores: torch.Tensor, mean: float, std: float, eps: float = 1e-8) -> torch.Tensor:
    """Standardise scores (`[B]`) with given statistics."""
    # r~ = (r - mu) / (sigma + eps)
    return (scores - mean) / (std + eps)


class RewardNormalizer:
    """Clip, update the running statistics with the batch, normalise; checkpoint it with `state_dict`.

    The batch is added before normalising (as XTuner does), so the very first batch is standardised by its own
    statistics, and a single first sample maps to 0 (sigma = 0, the eps keeps it finite).
    Call it once per rollout batch with the scores of all ranks, so every rank sees the same statistics.
    """

    def __init__(self, cfg: RewardNormConfig):
        self.cfg = cfg
        self.stats = RunningMeanStd()

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores`: raw RM scores `[B]` -> rewards `[B]`."""
        clipped = compute_clipped_scores(scores, self.cfg.clip_min, self.cfg.clip_max)
        if not self.cfg.normalize:
            return clipped
        self.stats.update(clipped)
        return compute_normalized_scores(clipped, self.stats.mean, self.stats.std, self.cfg.eps)

    def state_dict(self) -> dict[str, float]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.stats.load_state_dict(state)
