"""Per-token reward shaping for RLHF PPO: a KL penalty on every response token plus the RM score on the last one.

r_t = -beta * KL_t + 1[t = last response token] * r~,   with r~ the clipped, normalised RM score (`algo.stats`).
This is the InstructGPT / Ziegler et al. shaping (https://arxiv.org/abs/1909.08593, §2.2) as used by COOL RLHF
[R §4.2.3] with beta = 0.01 and the k1 estimator (spec §7.4).
"""
from __future__ import annotations

import torch

from algo.kl import compute_kl
from algo.masked import compute_masked_mean, compute_masked_sum
from algo.types import check_scores, check_token_tensors


def compute_last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row. `response_mask`: `[B, T]` -> `[B]` (int64).

    Raises ValueError when a row has no response token, since its score would have nowhere to go.
    """
    present = response_mask.bool()
    empty = ~present.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no response token; generate with min_new_tokens >= 1 or drop them")
    # last = T - 1 - argmax(flip(mask)): the first 1 seen from the right
    return present.shape[1] - 1 - present.long().flip(dims=[1]).argmax(dim=1)


def compute_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shaped per-token rewards for GAE.

    Args:
        scores: `[B]` already clipped/normalised RM scores (see `algo.stats.RewardNormalizer`).
        logprobs: `[B, T]` rollout policy log-probs of the response tokens.
        ref_logprobs: `[B, T]` reference log-probs of the same tokens.
        response_mask: `[B, T]`; padding gets reward 0.
        kl_coef: beta, from the KL controller (`algo.kl`).
        kl_estimator: "k1" | "k2" | "k3".

    Returns `rewards` `[B, T]` and metrics: `kl/token_mean` (mean KL per response token), `kl/seq_sum_mean` (KL
    summed over each response, averaged over responses; what the adaptive controller targets), both with the
    penalty's estimator, and `kl/k3_seq_sum_mean`, the same sum with k3, which is never negative: k1 averages
    log-ratios and dips below 0 by sampling noise when the policy is close to the reference.
    """
    check_scores(scores, response_mask)
    check_token_tensors(response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    mask = response_mask.to(logprobs.dtype)
    kl = compute_kl(logprobs.detach(), ref_logprobs.detach(), kl_estimator) * mask
    last = compute_last_token_index(response_mask)
    score_at_last = torch.zeros_like(kl).scatter(1, last.unsqueeze(1), scores.detach().to(kl.dtype).unsqueeze(1))
    # r_t = -beta * KL_t + 1[t = last] * r~
    rewards = -kl_coef * kl + score_at_last
    metrics = {
        "kl/token_mean": compute_masked_mean(kl, mask),
        "kl/seq_sum_mean": compute_masked_sum(kl, mask, dim=1).mean(),
    }
    k3 = kl if kl_estimator == "k3" else compute_kl(logprobs.detach(), ref_logprobs.detach(), "k3")
    metrics["kl/k3_seq_sum_mean"] = compute_masked_sum(k3, mask, dim=1).mean()
    return rewards, metrics
