"""Masked reductions, aggregation modes, logits helpers and diagnostics, on hand-derived values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algo.masked import (
    compute_aggregate,
    compute_aggregation_denominator,
    compute_entropy_from_logits,
    compute_explained_variance,
    compute_logprob_mismatch,
    compute_logprobs_from_logits,
    compute_masked_mean,
    compute_masked_sum,
    compute_masked_var,
    compute_masked_whiten,
)

# Shared example: masked-in values are 1, 2 (row 0) and 4 (row 1); 3, 5, 6 are padding.
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_mean_var_ignore_padding():
    # sum = 1 + 2 + 4 = 7, mean = 7/3
    assert compute_masked_sum(X, M).item() == pytest.approx(7.0)
    assert compute_masked_mean(X, M).item() == pytest.approx(7 / 3)
    # per row: (1 + 2)/2 = 1.5 and 4/1 = 4
    assert compute_masked_mean(X, M, dim=1).tolist() == pytest.approx([1.5, 4.0])
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares sum 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # unbiased: (14/3) / 2 = 7/3 ; population: (14/3) / 3 = 14/9
    assert compute_masked_var(X, M).item() == pytest.approx(7 / 3)
    assert compute_masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9)


def test_masked_mean_of_an_empty_row_is_zero_not_nan():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert compute_masked_mean(X, mask, dim=1).tolist() == [1.5, 0.0]


def test_whiten_gives_zero_mean_unit_variance_on_masked_tokens_and_zero_padding():
    torch.manual_seed(0)
    values = torch.randn(4, 7, dtype=torch.float64) * 3 + 5
    mask = (torch.arange(7) < torch.tensor([[7], [2], [5], [1]])).long()
    white = compute_masked_whiten(values, mask)
    assert compute_masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert compute_masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(white[mask == 0] == 0)
    # shift_mean=False keeps the original mean, only rescales
    kept = compute_masked_whiten(values, mask, shift_mean=False)
    assert compute_masked_mean(kept, mask).item() == pytest.approx(compute_masked_mean(values, mask).item())


def test_token_mean_and_seq_mean_token_mean_by_hand():
    # token-mean: (1 + 2 + 4) / 3 tokens = 7/3
    assert compute_aggregate(X, M, "token-mean").item() == pytest.approx(7 / 3)
    # seq-mean-token-mean: mean of row means (1.5 + 4) / 2 = 2.75
    assert compute_aggregate(X, M, "seq-mean-token-mean").item() == pytest.approx(2.75)
    # a given (global) denominator replaces the local count: 7 / 10 and 5.5 / 4
    assert compute_aggregate(X, M, "token-mean", denominator=10.0).item() == pytest.approx(0.7)
    assert compute_aggregate(X, M, "seq-mean-token-mean", torch.tensor(4.0)).item() == pytest.approx(1.375)


def test_aggregation_denominator_counts_tokens_or_nonempty_sequences():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert compute_aggregation_denominator(mask, "token-mean").item() == 3
    assert compute_aggregation_denominator(mask, "seq-mean-token-mean").item() == 2
    with pytest.raises(ValueError, match="token-mean"):
        compute_aggregation_denominator(mask, "token_mean")
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        compute_aggregate(X, M, "mean")


def test_logprobs_from_logits_by_hand_and_with_temperature():
    # logits (0, ln 3): p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    got = compute_logprobs_from_logits(logits, tokens)
    assert got.tolist()[0] == pytest.approx([math.log(0.75), math.log(0.25)], abs=1e-6)
    # temperature 2 halves the logits: (0, ln 3 / 2) -> p1 = sqrt(3) / (1 + sqrt(3))
    hot = compute_logprobs_from_logits(logits, tokens, temperature=2.0)
    assert hot[0, 0].item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        compute_logprobs_from_logits(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        compute_logprobs_from_logits(logits[0], tokens)


def test_logprobs_from_logits_equals_negative_cross_entropy_and_carries_gradient():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    got = compute_logprobs_from_logits(logits, tokens)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1), reduction="none")
    torch.testing.assert_close(got, -ce.reshape(3, 5))
    got.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_entropy_from_logits_by_hand():
    # uniform over 4 -> ln 4 ; p = (1/4, 3/4) -> -(1/4 ln 1/4 + 3/4 ln 3/4)
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[0.0, math.log(3.0), -math.inf, -math.inf]]])
    want = [math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    # the -inf entries (filtered out of the vocabulary) have p = 0 and must contribute 0, not NaN
    got = compute_entropy_from_logits(logits)
    assert got.flatten().tolist() == pytest.approx(want, abs=1e-6)


def test_explained_variance_by_hand_ignores_padding():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert compute_explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    # a constant critic explains nothing
    assert compute_explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)
    # V = (1, 2, 3, 5): R - V = (0, 0, 0, -1), Var = 3/16 ; Var[R] = 5/4 -> EV = 1 - (3/16)/(5/4) = 0.85
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, -7.0]])
    assert compute_explained_variance(values, returns, mask).item() == pytest.approx(0.85)
    flat = torch.tensor([[2.0, 2.0, 2.0, 2.0, 0.0]])
    assert math.isnan(compute_explained_variance(values, flat, mask).item())


def test_logprob_mismatch_by_hand():
    # masked-in deltas (trainer - rollout): 0, 0.1, -0.2, 0.3, -0.4 ; the sixth slot is padding with a huge delta
    rollout = torch.zeros(2, 3)
    trainer = torch.tensor([[0.0, 0.1, -0.2], [0.3, -0.4, 50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = compute_logprob_mismatch(trainer, rollout, mask)
    # sorted |delta| = 0, .1, .2, .3, .4 ; p95 at position 0.95 * 4 = 3.8 -> 0.3 + 0.8 * 0.1 = 0.38
    assert got["mismatch/abs_diff_p95"].item() == pytest.approx(0.38, abs=1e-6)
    assert got["mismatch/abs_diff_mean"].item() == pytest.approx(0.2, abs=1e-6)
    assert got["mismatch/abs_diff_max"].item() == pytest.approx(0.4, abs=1e-6)
    # ratios e^0.3 = 1.35 > 1.2 and e^-0.4 = 0.67 < 0.8 are outside; e^-0.2 = 0.819 is still inside -> 2 / 5
    assert got["mismatch/ratio_outside_clip_frac"].item() == pytest.approx(0.4)


def test_logprob_mismatch_quantile_matches_numpy():
    torch.manual_seed(2)
    a, b = torch.randn(6, 40), torch.randn(6, 40)
    mask = (torch.rand(6, 40) > 0.3).long()
    want = np.percentile((a - b).abs()[mask.bool()].numpy(), 95)
    got = compute_logprob_mismatch(a, b, mask)["mismatch/abs_diff_p95"].item()
    assert got == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="no token"):
        compute_logprob_mismatch(a, b, torch.zeros_like(mask))


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match="returns has shape"):
        compute_explained_variance(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
