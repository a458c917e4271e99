"""The conditional reward model's loss [InternLM2 report §4.2.1, Eq. 1-3; spec cool-rlhf.md §7.1].

For a pair where response i is preferred over j, with scalar rewards r_i (chosen) and r_j (rejected):

    P = sigmoid(r_i - r_j)
    L_ranking = -(1 - 2 * max(0, P - 1/2))^gamma * log P                     (focal ranking, gamma = 2)
    L_penalty(x) = -(log(x + 5) + log(5 - x)),  dL/dx = 2x / (25 - x^2)      (log barrier, on every score)
    L = L_ranking + lambda * (L_penalty(r_i) + L_penalty(r_j)),  lambda = 0.02

As in XTuner, the focal weight is not detached (its gradient flows) and the barrier is evaluated on scores
clamped to [-5 + eps, 5 - eps] in fp32. Deviation: XTuner's clamp makes the barrier flat outside that
interval, so a score that escapes gets *no* gradient back. By default (`penalty_outside="linear"`) we continue
the barrier past the clamp point with its tangent line, which keeps the value and gradient identical inside
the interval and pushes escaped scores back with the boundary slope (~1000). `penalty_outside="clamp"` is
XTuner's behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCORE_BOUND = 5.0


@dataclass
class RMLossConfig:
    gamma: float = 2.0  # focal exponent [R]
    penalty_weight: float = 0.02  # lambda [R]; XTuner's default is 0.01
    penalty_eps: float = 1e-3  # the barrier is evaluated at most this close to +-5
    penalty_outside: str = "linear"  # linear (tangent continuation) | clamp (XTuner: flat, zero gradient)

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"rm.loss.gamma must be >= 0 (got {self.gamma}); 0 gives the plain Bradley-Terry loss")
        if self.penalty_weight < 0:
            raise ValueError(f"rm.loss.penalty_weight must be >= 0 (got {self.penalty_weight}); 0 turns the barrier off")
        if not 0 < self.penalty_eps < SCORE_BOUND:
            raise ValueError(f"rm.loss.penalty_eps must be in (0, {SCORE_BOUND}) (got {self.penalty_eps})")
        if self.penalty_outside not in ("linear", "clamp"):
            raise ValueError(f"rm.loss.penalty_outside must be 'linear' or 'clamp' (got {self.penalty_outside!r})")


def compute_focal_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-pair focal ranking loss. `chosen`, `rejected`: `[N]` scores -> `[N]` losses."""
    margin = chosen.float() - rejected.float()
    p = torch.sigmoid(margin)
    # weight = (1 - 2 max(0, P - 1/2))^gamma: 1 for mis-ranked pairs, (2(1 - P))^gamma once ranked correctly
    weight = (1.0 - 2.0 * F.relu(p - 0.5)) ** gamma
    # -log P computed as -logsigmoid(margin), stable for large |margin|
    return -weight * F.logsigmoid(margin)


def compute_log_barrier_penalty(scores: torch.Tensor, eps: float = 1e-3, outside: str = "linear") -> torch.Tensor:
    """Per-score barrier -(log(x + 5) + log(5 - x)), evaluated at x clamped to +-(5 - eps). `[N]` -> `[N]`."""
    x = scores.float()
    limit = SCORE_BOUND - eps
    xc = x.clamp(-limit, limit)
    barrier = -(torch.log(SCORE_BOUND + xc) + torch.log(SCORE_BOUND - xc))
    if outside == "clamp":
        return barrier
    # tangent continuation: barrier(xc) + barrier'(xc) * (x - xc); the extra term is 0 (with 0 gradient) inside
    slope = 2.0 * xc / (SCORE_BOUND**2 - xc * xc)
    return barrier + slope.detach() * (x - xc)


def compute_rm_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    cfg: RMLossConfig,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss for a micro-batch of pairs, and its metrics.

    `chosen`, `rejected`: `[N]`. Per pair: L_ranking + lambda * (L_penalty(r_i) + L_penalty(r_j)). The sum is
    divided by `denominator` (the global pair count when micro-batches or ranks share one mean), else by N.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must both be [N]; got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    ranking = compute_focal_ranking_loss(chosen, rejected, cfg.gamma)
    penalty = compute_log_barrier_penalty(chosen, cfg.penalty_eps, cfg.penalty_outside) + compute_log_barrier_penalty(
        rejected, cfg.penalty_eps, cfg.penalty_outside
    )
    per_pair = ranking + cfg.penalty_weight * penalty
    n = float(denominator) if denominator is not None else float(max(1, chosen.numel()))
    loss = per_pair.sum() / n
    with torch.no_grad():
        metrics = {
            "rm/ranking_loss": float(ranking.mean()),
            "rm/penalty": float(penalty.mean()),
            "rm/accuracy": float((chosen > rejected).float().mean()),
            "rm/margin": float((chosen - rejected).float().mean()),
            "rm/score_abs_max": float(torch.cat([chosen, rejected]).abs().max()),
            "pairs": float(chosen.numel()),
        }
    return loss, metrics
