"""Per-token reward shaping: -beta * KL on every response token plus the score on the last valid one."""
from __future__ import annotations

import pytest
import torch

from algo.kl import compute_kl
from algo.rewards import compute_last_token_index, compute_token_rewards
from algo.stats import RewardNormalizer, RewardNormConfig

# Ragged batch (right padded): lengths 3, 1, 2.
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -7.0, -7.0], [-1.2, -0.1, -9.0]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -1.0, -1.0], [-1.0, -0.6, -1.0]], dtype=torch.float64)


def test_last_token_index_for_ragged_and_interior_masks():
    assert compute_last_token_index(MASK).tolist() == [2, 0, 1]
    assert compute_last_token_index(torch.tensor([[1, 0, 1, 0]])).tolist() == [2]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        compute_last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_rewards_by_hand_with_score_on_last_valid_token():
    # k1 = logp - ref on real tokens: row0 (0.5, -1, 0), row1 (-0.1), row2 (-0.2, 0.5) ; beta = 0.1
    # row0: (-0.05, 0.1, 0 + 2.0) ; row1: (0.01 + (-1.0)) ; row2: (0.02, -0.05 + 0.5)
    scores = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    rewards, metrics = compute_token_rewards(scores, LOGP, REF, MASK, kl_coef=0.1)
    want = [[-0.05, 0.1, 2.0], [-0.99, 0.0, 0.0], [0.02, 0.45, 0.0]]
    for got_row, want_row in zip(rewards.tolist(), want):
        assert got_row == pytest.approx(want_row)
    # KL per token: (0.5 - 1 + 0 - 0.1 - 0.2 + 0.5) / 6 = -0.3 / 6 = -0.05
    # per sequence sums (-0.5, -0.1, 0.3) -> mean -0.3 / 3 = -0.1
    assert metrics["kl/token_mean"].item() == pytest.approx(-0.05)
    assert metrics["kl/seq_sum_mean"].item() == pytest.approx(-0.1)
    # k3 = e^-d - 1 + d with d = logp - ref: row0 0.106531 + 0.718282 + 0 = 0.824812, row1 0.005171,
    # row2 0.021403 + 0.106531 = 0.127933 -> mean 0.957917 / 3 = 0.319306 (never negative, unlike k1's -0.1)
    assert metrics["kl/k3_seq_sum_mean"].item() == pytest.approx(0.319306, abs=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sum_of_token_rewards_is_minus_beta_kl_plus_normalised_score(estimator):
    torch.manual_seed(0)
    B, T, beta = 5, 7, 0.01
    lengths = torch.tensor([7, 1, 4, 2, 6])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    logp, ref = -torch.rand(B, T, dtype=torch.float64) * 3, -torch.rand(B, T, dtype=torch.float64) * 3
    normalizer = RewardNormalizer(RewardNormConfig())
    normalizer(torch.tensor([0.3, 1.0, -2.0]))  # some earlier batch, so the stats are not the batch's own
    scores = normalizer(torch.tensor([9.0, -0.5, 1.5, -7.0, 0.0], dtype=torch.float64))
    rewards, _ = compute_token_rewards(scores, logp, ref, mask, kl_coef=beta, kl_estimator=estimator)
    kl = compute_kl(logp, ref, estimator) * mask
    # sum_t r_t = -beta * sum_t KL_t + r~
    torch.testing.assert_close(rewards.sum(dim=1), -beta * kl.sum(dim=1) + scores)
    # the score sits on the last valid token, nothing lands on padding
    last = lengths - 1
    torch.testing.assert_close(rewards[torch.arange(B), last] + beta * kl[torch.arange(B), last], scores)
    assert torch.all(rewards[mask == 0] == 0)


def test_shape_checks():
    with pytest.raises(ValueError, match="scores must be"):
        compute_token_rewards(torch.zeros(2), LOGP, REF, MASK, kl_coef=0.01)
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        compute_token_rewards(torch.zeros(3), LOGP, REF[:, :2], MASK, kl_coef=0.01)
