"""Advantage estimation for PPO with a critic.

GAE: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
(https://arxiv.org/abs/1506.02438), eq. 16. COOL RLHF uses lambda = 0.99 ("larger lambda gave higher reward"),
gamma = 1, and no advantage normalisation [R §4.2.3]; whitening stays available behind `whiten`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from algo.masked import compute_masked_whiten
from algo.types import check_token_tensors


def compute_gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.99,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and critic returns. `rewards`, `values`, `response_mask`: `[B, T]` -> two `[B, T]` tensors.

    The episode ends after the last response token (V = 0 beyond it). Positions with mask 0 are skipped: they get
    advantage and return 0, and the recursion passes over them as if they were absent, so right padding never leaks
    into real tokens and interior gaps (e.g. tool output) are bridged. Inputs are treated as constants (no grad).
    """
    check_token_tensors(response_mask, rewards=rewards, values=values)
    rewards, values = rewards.detach(), values.detach()
    present = response_mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        # delta_t = r_t + gamma * V_{t+1} - V_t
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # A_t = delta_t + gamma * lambda * A_{t+1}
        advantage = delta + gamma * lam * next_advantage
        here = present[:, t]
        next_advantage = torch.where(here, advantage, next_advantage)
        next_value = torch.where(here, values[:, t], next_value)
        advantages_reversed.append(torch.where(here, advantage, torch.zeros_like(advantage)))
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    # R_t = A_t + V_t  (the critic's regression target)
    returns = torch.where(present, advantages + values, torch.zeros_like(values))
    return advantages, returns


ADVANTAGE_FNS = {
    "gae": compute_gae_advantages,
}


@dataclass
class AdvantageConfig:
    estimator: str = "gae"
    gamma: float = 1.0  # discount; XTuner Ray RLHF default (not in [R])
    lam: float = 0.99  # GAE lambda [R §4.2.3]
    whiten: bool = False  # [R]: advantage normalisation not used

    def __post_init__(self) -> None:
        if self.estimator not in ADVANTAGE_FNS:
            raise ValueError(f"advantage.estimator must be one of {sorted(ADVANTAGE_FNS)} (got {self.estimator!r})")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"advantage.gamma must be in [0, 1] (got {self.gamma}); COOL RLHF uses 1.0")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"advantage.lam must be in [0, 1] (got {self.lam}); COOL RLHF uses 0.99")


def compute_advantages(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, cfg: AdvantageConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (`[B, T]` each) with the configured estimator, whitened over the batch if asked.

    Returns are computed before whitening, so the critic target is unaffected by `whiten`. Call this on the whole
    rollout batch, not per micro-batch, or whitening statistics would differ between micro-batches.
    """
    advantages, returns = ADVANTAGE_FNS[cfg.estimator](rewards, values, response_mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten:
        advantages = compute_masked_whiten(advantages, response_mask)
    return advantages, returns
