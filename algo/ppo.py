"""PPO losses for RLHF: clipped policy loss, critic loss, and the pretraining (PTX) LM loss mixed into the actor.

- Clipped surrogate: Schulman et al., "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347 eq. 7.
- Dual clip (off by default): Ye et al., "Mastering Complex Control in MOBA Games with Deep RL",
  https://arxiv.org/abs/1912.09729 eq. 5.
- PTX: Ouyang et al., "Training language models to follow instructions with human feedback",
  https://arxiv.org/abs/2203.02155 eq. 2.

COOL RLHF [R §4.2.3]: clip 0.2, critic loss 1/2 (V - R)^2 without value clipping, PTX coefficient 0.5.

Every loss takes `denominator`, the global token (or sequence) count of the mini-batch; see `algo.masked` for why.
Under DDP, which *averages* gradients over ranks, multiply the loss by the world size so the average of the ranks'
gradients equals the sum that the global denominator assumes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from algo.kl import compute_kl_k3
from algo.masked import AGGREGATIONS, compute_aggregate, compute_masked_mean, compute_token_mean
from algo.types import check_token_tensors


@dataclass
class PPOLossConfig:
    clip_eps: float = 0.2  # policy ratio clip epsilon
    dual_clip: float | None = None  # c > 1 bounds the loss of negative-advantage tokens at c * |A|; None = off
    value_clip: float | None = None  # clip V around old values by this much; None = off, as in [R]
    ptx_coef: float = 0.5  # weight of the pretraining LM loss in the actor loss [R]
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean

    def __post_init__(self) -> None:
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"ppo.clip_eps must be in (0, 1) (got {self.clip_eps}); the usual value is 0.2")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"ppo.dual_clip must be > 1 (got {self.dual_clip}); e.g. 3.0, or null to disable it")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError(f"ppo.value_clip must be > 0 (got {self.value_clip}); e.g. 0.2, or null to disable it")
        if self.ptx_coef < 0:
            raise ValueError(f"ppo.ptx_coef must be >= 0 (got {self.ptx_coef}); 0 disables the pretraining loss")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"ppo.aggregation must be one of {sorted(AGGREGATIONS)} (got {self.aggregation!r})")


def compute_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: PPOLossConfig,
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate loss (to minimise).

    Args:
        logprobs: `[B, T]` current policy log-probs (carry the gradient).
        old_logprobs: `[B, T]` log-probs of the policy that sampled the rollout.
        advantages: `[B, T]`.
        response_mask: `[B, T]`.
        cfg: clip settings and aggregation.
        denominator: the mini-batch's global token/sequence count (`compute_aggregation_denominator` summed over
            micro-batches and ranks); None = this batch alone.

    Returns the scalar loss and metrics (local means over this batch's response tokens, detached):
    `policy/clipfrac` (share of tokens whose gradient the clip removes), `policy/approx_kl` (k3 estimate of
    KL(pi_old || pi_theta)), `policy/ratio_mean`, and `policy/dual_clipfrac` when dual clip is on.
    """
    check_token_tensors(response_mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()
    # rho_t = pi_theta(a_t) / pi_old(a_t)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    # L_t = max(-rho_t A_t, -clip(rho_t, 1 - eps, 1 + eps) A_t)
    losses = torch.maximum(unclipped, clipped)
    metrics = {}
    if cfg.dual_clip is not None:
        # A_t < 0:  L_t = min(L_t, -c A_t)
        bound = -advantages * cfg.dual_clip
        dual_active = (advantages < 0) & (losses > bound)
        losses = torch.where(dual_active, bound, losses)
        metrics["policy/dual_clipfrac"] = compute_masked_mean(dual_active.float(), response_mask).detach()
    loss = compute_aggregate(losses, response_mask, cfg.aggregation, denominator)

    with torch.no_grad():
        metrics["policy/clipfrac"] = compute_masked_mean((clipped > unclipped).float(), response_mask)
        metrics["policy/approx_kl"] = compute_masked_mean(compute_kl_k3(old_logprobs, logprobs), response_mask)
        metrics["policy/ratio_mean"] = compute_masked_mean(ratio, response_mask)
    return loss, metrics


def compute_value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: PPOLossConfig,
    old_values: torch.Tensor | None = None,
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss 1/2 (V - R)^2, aggregated like the policy loss.

    Args:
        values: `[B, T]` current critic values (carry the gradient).
        returns: `[B, T]` GAE returns.
        response_mask: `[B, T]`.
        cfg: `value_clip` (None = plain loss, as [R]) and aggregation.
        old_values: `[B, T]` values at rollout time; required when `cfg.value_clip` is set.
        denominator: as in `compute_policy_loss`.

    Returns the scalar loss and metrics `critic/vf_clipfrac` (when clipping), `critic/values_mean`,
    `critic/abs_error_mean` (local, detached).
    """
    check_token_tensors(response_mask, values=values, returns=returns, old_values=old_values)
    returns = returns.detach()
    # L_t = 1/2 (V_t - R_t)^2
    losses = 0.5 * (values - returns) ** 2
    metrics = {}
    if cfg.value_clip is not None:
        if old_values is None:
            raise ValueError("ppo.value_clip is set, so compute_value_loss needs old_values (critic values at rollout)")
        old_values = old_values.detach()
        # V_clip = V_old + clip(V - V_old, -c, c);  L_t = 1/2 max((V - R)^2, (V_clip - R)^2)
        clipped_values = old_values + (values - old_values).clamp(-cfg.value_clip, cfg.value_clip)
        clipped_losses = 0.5 * (clipped_values - returns) ** 2
        metrics["critic/vf_clipfrac"] = compute_masked_mean((clipped_losses > losses).float(), response_mask).detach()
        losses = torch.maximum(losses, clipped_losses)
    loss = compute_aggregate(losses, response_mask, cfg.aggregation, denominator)
    with torch.no_grad():
        metrics["critic/values_mean"] = compute_masked_mean(values, response_mask)
        metrics["critic/abs_error_mean"] = compute_masked_mean((values - returns).abs(), response_mask)
    return loss, metrics


def compute_ptx_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: PPOLossConfig,
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted LM loss on pretraining sequences, to add to the policy loss: ptx_coef * mean token NLL.

    Args:
        logprobs: `[B, T]` log-probs of each pretraining token given its prefix (`compute_logprobs_from_logits`
            with shifted labels).
        loss_mask: `[B, T]`, 1 on tokens that count (0 on padding).
        cfg: `ptx_coef` (0.5 in [R]).
        denominator: the pretraining mini-batch's global token count; None = this batch alone. Always a token mean,
            like ordinary LM training.

    Returns the weighted loss and `ptx/lm_loss`, the unweighted mean NLL of this batch (detached).
    """
    check_token_tensors(loss_mask, logprobs=logprobs)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(device=logprobs.device, dtype=logprobs.dtype)
    # L_ptx = coef * sum_t m_t (-log p(x_t | x_<t)) / N
    loss = cfg.ptx_coef * compute_token_mean(-logprobs, loss_mask, denominator)
    return loss, {"ptx/lm_loss": compute_masked_mean(-logprobs, loss_mask).detach()}
