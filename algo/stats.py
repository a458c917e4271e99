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
    # Keep the running statistics per domain (the RM's condition) instead of over all scores: a conditional RM's
    # system prompts put scores on different scales (one demo round: domain means -0.5 to +3.3, stds 0.7 to 2.3).
    per_domain: bool = False
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


def paired_gain_se(before: dict[str, list[float]], after: dict[str, list[float]]) -> float | None:
    """Standard error of a gain averaged over domains with equal weight, mean_d(mean(after_d) - mean(before_d)),
    where after_d[i] and before_d[i] score the same unit (a held-out prompt, same sampling seeds). None when a
    domain has fewer than two units. It measures the evaluation's noise (which prompts, which samples), not the
    training run's: another seed of the whole run varies more.

        se = sqrt(sum_d s_d^2 / n_d) / D,   s_d^2 the sample variance (n - 1) of domain d's n_d differences
    """
    if set(before) != set(after) or any(len(before[d]) != len(after[d]) for d in before):
        raise ValueError("paired_gain_se needs the same domains and the same number of units before and after")
    total = 0.0
    for d in before:
        diffs = [a - b for a, b in zip(after[d], before[d])]
        n = len(diffs)
        if n < 2:
            return None
        mean = sum(diffs) / n
        total += sum((x - mean) ** 2 for x in diffs) / (n - 1) / n
    return total ** 0.5 / len(before) if before else None


def excess_reduction(first: tuple[int, int], last: tuple[int, int], base: tuple[int, int]) -> tuple[float | None, float | None]:
    """How much of a behaviour's rise above a baseline is gone, with its standard error. Each argument is
    (hits, n): the behaviour in `hits` of `n` replies of the policy when it was found (`first`), at the end
    (`last`) and of the baseline policy (`base`, the SFT policy: a habit it had is not something PPO added).

        r = 1 - (L - S) / (F - S),   F, L, S = hits / n

    1 = back to the baseline's rate, 0 = no change, > 1 = below the baseline. The error treats the three rates as
    independent binomial estimates, var(p) = p (1 - p) / n, and propagates them to first order:

        dr/dF = (L - S) / (F - S)^2,   dr/dL = -1 / (F - S),   dr/dS = (F - L) / (F - S)^2

    (None, None) when F <= S (no rise over the baseline to undo) or a count is empty."""
    if min(first[1], last[1], base[1]) <= 0:
        return None, None
    f, l_, s = (h / n for h, n in (first, last, base))
    rise = f - s
    if rise <= 0:
        return None, None
    var = [p * (1 - p) / n for p, (_, n) in zip((f, l_, s), (first, last, base))]
    grad = ((l_ - s) / rise ** 2, -1 / rise, (f - l_) / rise ** 2)
    return 1 - (l_ - s) / rise, sum(g * g * v for g, v in zip(grad, var)) ** 0.5


class RewardNormalizer:
    """Clip, update the running statistics with the batch, normalise; checkpoint it with `state_dict`.

    The batch is added before normalising (as XTuner does), so the very first batch is standardised by its own
    statistics, and a single first sample maps to 0 (sigma = 0, the eps keeps it finite).
    Call it once per rollout batch with the scores of all ranks, so every rank sees the same statistics.

    With `per_domain`, each score is standardised by the running statistics of its own domain only (`domains[i]`
    names score i's); `stats` still sees every score. Without it, between-domain offsets inflate sigma and shrink
    the within-domain differences PPO learns from, and a domain the RM scores on a wide scale dominates the update.
    """

    def __init__(self, cfg: RewardNormConfig):
        self.cfg = cfg
        self.stats = RunningMeanStd()
        self.domain_stats: dict[str, RunningMeanStd] = {}

    def __call__(self, scores: torch.Tensor, domains: list[str] | None = None) -> torch.Tensor:
        """`scores`: raw RM scores `[B]` -> rewards `[B]`; `domains`: B domain names (needed with `per_domain`)."""
        clipped = compute_clipped_scores(scores, self.cfg.clip_min, self.cfg.clip_max)
        if not self.cfg.normalize:
            return clipped
        self.stats.update(clipped)
        if not self.cfg.per_domain:
            return compute_normalized_scores(clipped, self.stats.mean, self.stats.std, self.cfg.eps)
        if domains is None or len(domains) != len(clipped):
            got = "none" if domains is None else len(domains)
            raise ValueError(f"reward_norm.per_domain needs one domain per score: {len(clipped)} scores, {got} domains")
        out = torch.empty_like(clipped)
        for domain in dict.fromkeys(domains):
            idx = torch.tensor([i for i, d in enumerate(domains) if d == domain])
            stats = self.domain_stats.setdefault(domain, RunningMeanStd())
            stats.update(clipped[idx])
            out[idx] = compute_normalized_scores(clipped[idx], stats.mean, stats.std, self.cfg.eps)
        return out

    def state_dict(self) -> dict:
        return {**self.stats.state_dict(), "domains": {d: s.state_dict() for d, s in self.domain_stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state)
        self.domain_stats = {}
        for domain, sub in state.get("domains", {}).items():
            self.domain_stats[domain] = RunningMeanStd()
            self.domain_stats[domain].load_state_dict(sub)
