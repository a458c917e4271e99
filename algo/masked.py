"""Masked reductions, loss aggregation, and per-token quantities computed from logits.

Aggregation is the one place where micro-batching and data parallelism can silently change the objective. Every loss
in `algo/` therefore takes a `denominator`: the *global* count (response tokens, or sequences) of the whole mini-batch,
summed over micro-batches and ranks with `compute_aggregation_denominator`. Each micro-batch then contributes
`sum(its terms) / denominator`, and the accumulated gradient equals the gradient of the full-batch mean exactly,
however the mini-batch was split. See `tests/algo/test_aggregation_invariance.py`.
"""
from __future__ import annotations

import torch

from algo.types import check_token_tensors


def compute_masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1. `values`, `mask`: `[B, T]`; returns a scalar, or `[B]`/`[T]` with `dim`."""
    masked = values * mask.to(values.dtype)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def compute_masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (`[B, T]` in, scalar or reduced along `dim` out).

    A slice with no masked-in element gives 0, not NaN: the count is clamped to 1 to avoid a device sync for a check.
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    # mean = sum(m * x) / max(sum(m), 1)
    return compute_masked_sum(values, mask, dim) / count.clamp_min(1)


def compute_masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked-in elements of `values` (`[B, T]`) as a scalar; Bessel-corrected when `unbiased`."""
    mean = compute_masked_mean(values, mask)
    count = mask.to(values.dtype).sum()
    # var = sum(m * (x - mean)^2) / (n - 1)   (or / n when not unbiased)
    denom = (count - 1 if unbiased else count).clamp_min(1)
    return compute_masked_sum((values - mean) ** 2, mask) / denom


def compute_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                          eps: float = 1e-8) -> torch.Tensor:
    """Standardise `values` (`[B, T]`) with the mean/std of its masked-in elements; masked-out positions become 0.

    With `shift_mean=False` only the scale changes (the mean is added back), as some PPO variants prefer.
    Whiten over the whole batch in the driver, never per micro-batch: per-micro-batch statistics differ.
    """
    mean = compute_masked_mean(values, mask)
    var = compute_masked_var(values, mask)
    # x_hat = (x - mean) / sqrt(var + eps)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# --- loss aggregation ---------------------------------------------------------------------------------------------


def compute_token_mean(values: torch.Tensor, mask: torch.Tensor,
                       denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """Every response token weighs the same: `sum_{b,t} m_bt x_bt / N_tokens`.

    `values`, `mask`: `[B, T]`. `denominator`: response tokens in the whole mini-batch (all micro-batches, all ranks);
    None uses this batch's own count.
    """
    if denominator is None:
        denominator = mask.to(values.dtype).sum().clamp_min(1)
    # L = sum_{b,t} m_bt * x_bt / N
    return compute_masked_sum(values, mask) / denominator


def compute_seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor,
                                denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """Every sequence weighs the same: `sum_b (sum_t m_bt x_bt / n_b) / N_seqs`.

    `values`, `mask`: `[B, T]`. `denominator`: non-empty sequences in the whole mini-batch; None uses this batch's
    own count. Rows without response tokens contribute nothing and are not counted.
    """
    if denominator is None:
        denominator = (mask.sum(dim=1) > 0).to(values.dtype).sum().clamp_min(1)
    # L = sum_b [ sum_t m_bt x_bt / n_b ] / N_seqs
    return compute_masked_mean(values, mask, dim=1).sum() / denominator


AGGREGATIONS = {
    "token-mean": compute_token_mean,
    "seq-mean-token-mean": compute_seq_mean_token_mean,
}


def compute_aggregation_denominator(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """What this batch adds to the global denominator of `aggregation`: its response tokens or non-empty sequences.

    Sum the result over the micro-batches of a mini-batch (and all-reduce it over data-parallel ranks) and pass the
    total as `denominator` to the loss functions. Returns a float64 scalar so large token counts stay exact.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {sorted(AGGREGATIONS)}")
    if aggregation == "token-mean":
        return mask.to(torch.float64).sum()
    return (mask.sum(dim=1) > 0).to(torch.float64).sum()


def compute_aggregate(values: torch.Tensor, mask: torch.Tensor, aggregation: str,
                      denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-token `values` (`[B, T]`) to a scalar loss with the named aggregation (see `AGGREGATIONS`)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {sorted(AGGREGATIONS)}")
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(device=values.device, dtype=values.dtype)
    return AGGREGATIONS[aggregation](values, mask, denominator)


# --- quantities from logits ---------------------------------------------------------------------------------------


def compute_logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] per position: `logits` `[B, T, V]`, `tokens` `[B, T]` -> `[B, T]`.

    `logits[:, t]` must already be the prediction for `tokens[:, t]` (shift before calling). The softmax runs in >= fp32
    one row at a time, so bf16 logits of a large vocabulary never get a full fp32 copy. Pass the sampling temperature
    so trainer log-probs match what the rollout engine sampled from.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"need logits [B, T, V] and tokens [B, T], got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use 1.0 for greedy/unscaled log-probs")
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row_logits = _at_least_fp32(row_logits) / temperature
        # log p(a) = z_a - logsumexp(z)
        picked = row_logits.gather(-1, row_tokens.long().unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def compute_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position. `logits`: `[B, T, V]` -> `[B, T]` (nats).

    Entries at -inf (tokens filtered out by top-k/top-p) have probability 0 and contribute 0.
    """
    logits = _at_least_fp32(logits)
    log_z = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(logits))
    # H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v
    return log_z - weighted.sum(dim=-1)


# --- diagnostics --------------------------------------------------------------------------------------------------


def compute_explained_variance(values: torch.Tensor, returns: torch.Tensor,
                               response_mask: torch.Tensor) -> torch.Tensor:
    """How much of the return variance the critic explains: 1 is perfect, 0 is "predicts the mean", < 0 is worse.

    `values`, `returns`, `response_mask`: `[B, T]`; returns a scalar, NaN when the returns have zero variance.
    """
    check_token_tensors(response_mask, values=values, returns=returns)
    var_returns = compute_masked_var(returns, response_mask, unbiased=False)
    # EV = 1 - Var[R - V] / Var[R]
    explained = 1 - compute_masked_var(returns - values, response_mask, unbiased=False) / var_returns
    return torch.where(var_returns > 0, explained, torch.full_like(explained, float("nan")))


def compute_logprob_mismatch(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor,
                             clip_eps: float = 0.2, quantile: float = 0.95) -> dict[str, torch.Tensor]:
    """Train/inference log-prob drift on the response tokens (a silently off-policy run shows up here first).

    `logprobs`: the trainer's log-probs of the sampled tokens, `rollout_logprobs`: the rollout engine's, both
    `[B, T]`. Returns `mismatch/abs_diff_p95` (the `quantile` of |delta logprob|, numpy's linear interpolation),
    `mismatch/abs_diff_mean`, `mismatch/abs_diff_max`, and `mismatch/ratio_outside_clip_frac` (share of tokens whose
    ratio exp(delta) is already outside [1 - clip_eps, 1 + clip_eps] before any update).
    """
    check_token_tensors(response_mask, logprobs=logprobs, rollout_logprobs=rollout_logprobs)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1] (got {quantile}); use 0.95 for the p95")
    diff = (logprobs.detach() - rollout_logprobs.detach()).float()[response_mask.bool()]
    if diff.numel() == 0:
        raise ValueError("response_mask selects no token; the mismatch needs at least one response token")
    abs_diff = diff.abs()
    ratio = diff.exp()
    outside = (ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)
    return {
        "mismatch/abs_diff_p95": _quantile(abs_diff, quantile),
        "mismatch/abs_diff_mean": abs_diff.mean(),
        "mismatch/abs_diff_max": abs_diff.max(),
        "mismatch/ratio_outside_clip_frac": outside.float().mean(),
    }


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for softmax-type math; fp32/fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """numpy's default (linear) quantile of a 1-d tensor; torch.quantile refuses inputs above 2**24 elements."""
    ordered = x.sort().values
    pos = q * (ordered.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, ordered.numel() - 1)
    # q-th value = x_(lo) + (pos - lo) * (x_(hi) - x_(lo))
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])
