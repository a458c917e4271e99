"""GAE: a hand-computed example, the lambda = 1 property, masking and ragged right-padded batches."""
from __future__ import annotations

import pytest
import torch

from algo.advantages import ADVANTAGE_FNS, AdvantageConfig, compute_advantages, compute_gae_advantages
from algo.masked import compute_masked_mean, compute_masked_var


def test_gae_t3_by_hand():
    # gamma = 0.9, lambda = 0.8, r = (0, 0, 1), V = (0.5, 0.4, 0.2), V after the end = 0.
    # delta_2 = 1 + 0.9 * 0   - 0.2 =  0.8
    # delta_1 = 0 + 0.9 * 0.2 - 0.4 = -0.22
    # delta_0 = 0 + 0.9 * 0.4 - 0.5 = -0.14
    # gamma * lambda = 0.72
    # A_2 = 0.8
    # A_1 = -0.22 + 0.72 * 0.8   = 0.356
    # A_0 = -0.14 + 0.72 * 0.356 = 0.11632
    # R = A + V = (0.61632, 0.756, 1.0)
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.2]], dtype=torch.float64)
    adv, ret = compute_gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert adv.tolist()[0] == pytest.approx([0.11632, 0.356, 0.8])
    assert ret.tolist()[0] == pytest.approx([0.61632, 0.756, 1.0])


def test_gae_t3_by_hand_with_cool_rlhf_defaults():
    # gamma = 1, lambda = 0.99, r = (-0.01, 0.02, 2), V = (1, 0.5, 1.5)
    # delta_2 = 2 - 1.5 = 0.5 ; delta_1 = 0.02 + 1.5 - 0.5 = 1.02 ; delta_0 = -0.01 + 0.5 - 1 = -0.51
    # A_2 = 0.5 ; A_1 = 1.02 + 0.99 * 0.5 = 1.515 ; A_0 = -0.51 + 0.99 * 1.515 = 0.98985
    rewards = torch.tensor([[-0.01, 0.02, 2.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 0.5, 1.5]], dtype=torch.float64)
    adv, ret = compute_advantages(rewards, values, torch.ones(1, 3), AdvantageConfig())
    assert adv.tolist()[0] == pytest.approx([0.98985, 1.515, 0.5])
    assert ret.tolist()[0] == pytest.approx([1.98985, 2.015, 2.0])


def _discounted_suffix_sums(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k, written as the double sum (independent of the recursion under test)."""
    T = rewards.shape[1]
    out = torch.zeros_like(rewards)
    for t in range(T):
        for k in range(t, T):
            out[:, t] += gamma ** (k - t) * rewards[:, k]
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_lambda_one_gives_discounted_returns_and_advantages_returns_minus_values(gamma):
    torch.manual_seed(0)
    rewards = torch.randn(4, 6, dtype=torch.float64)
    values = torch.randn(4, 6, dtype=torch.float64)
    adv, ret = compute_gae_advantages(rewards, values, torch.ones(4, 6), gamma=gamma, lam=1.0)
    want_returns = _discounted_suffix_sums(rewards, gamma)
    torch.testing.assert_close(ret, want_returns)
    torch.testing.assert_close(adv, want_returns - values)
    if gamma == 1.0:  # plain suffix sums
        torch.testing.assert_close(ret, rewards.flip(1).cumsum(1).flip(1))


def test_padding_after_the_response_does_not_leak():
    rewards = torch.tensor([[0.1, -0.2, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.3, 0.6, 0.9]], dtype=torch.float64)
    clean_adv, clean_ret = compute_gae_advantages(rewards, values, torch.ones(1, 3))
    # same response plus two padding positions holding garbage rewards/values
    padded_r = torch.cat([rewards, torch.tensor([[100.0, -50.0]], dtype=torch.float64)], dim=1)
    padded_v = torch.cat([values, torch.tensor([[7.0, float("nan")]], dtype=torch.float64)], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    adv, ret = compute_gae_advantages(padded_r, padded_v, mask)
    torch.testing.assert_close(adv[:, :3], clean_adv)
    torch.testing.assert_close(ret[:, :3], clean_ret)
    assert adv[:, 3:].tolist() == [[0.0, 0.0]] and ret[:, 3:].tolist() == [[0.0, 0.0]]


def test_ragged_right_padded_batch_equals_each_row_alone():
    torch.manual_seed(1)
    lengths = [5, 1, 3, 4]
    T = max(lengths)
    rewards = torch.randn(len(lengths), T, dtype=torch.float64)
    values = torch.randn(len(lengths), T, dtype=torch.float64)
    mask = (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).long()
    adv, ret = compute_gae_advantages(rewards, values, mask, gamma=0.95, lam=0.9)
    for b, n in enumerate(lengths):
        row_adv, row_ret = compute_gae_advantages(rewards[b:b + 1, :n], values[b:b + 1, :n], torch.ones(1, n),
                                                  gamma=0.95, lam=0.9)
        torch.testing.assert_close(adv[b:b + 1, :n], row_adv)
        torch.testing.assert_close(ret[b:b + 1, :n], row_ret)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


def test_interior_masked_positions_are_skipped():
    # mask (1, 0, 1, 1): the second slot (e.g. tool output) is bridged: same as GAE on positions 0, 2, 3 alone
    rewards = torch.tensor([[0.5, 9.0, -0.3, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.2, 9.0, 0.4, 0.1]], dtype=torch.float64)
    adv, ret = compute_gae_advantages(rewards, values, torch.tensor([[1, 0, 1, 1]]), gamma=0.9, lam=0.7)
    keep = [0, 2, 3]
    want_adv, want_ret = compute_gae_advantages(rewards[:, keep], values[:, keep], torch.ones(1, 3), 0.9, 0.7)
    torch.testing.assert_close(adv[:, keep], want_adv)
    torch.testing.assert_close(ret[:, keep], want_ret)
    assert adv[0, 1].item() == 0.0


def test_whitening_is_off_by_default_and_leaves_returns_alone():
    torch.manual_seed(2)
    rewards, values = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    raw_adv, raw_ret = compute_advantages(rewards, values, mask, AdvantageConfig())
    torch.testing.assert_close(raw_adv, compute_gae_advantages(rewards, values, mask)[0])
    white_adv, white_ret = compute_advantages(rewards, values, mask, AdvantageConfig(whiten=True))
    torch.testing.assert_close(white_ret, raw_ret)
    assert compute_masked_mean(white_adv, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert compute_masked_var(white_adv, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_gae_takes_no_gradient_from_values():
    values = torch.tensor([[0.5, 0.4]], requires_grad=True)
    adv, ret = compute_gae_advantages(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad


def test_config_validation_and_registry():
    cfg = AdvantageConfig()
    assert (cfg.estimator, cfg.gamma, cfg.lam, cfg.whiten) == ("gae", 1.0, 0.99, False)
    assert ADVANTAGE_FNS["gae"] is compute_gae_advantages
    with pytest.raises(ValueError, match="advantage.lam"):
        AdvantageConfig(lam=1.5)
    with pytest.raises(ValueError, match="advantage.gamma"):
        AdvantageConfig(gamma=-0.1)
    with pytest.raises(ValueError, match="gae"):
        AdvantageConfig(estimator="grpo")
    with pytest.raises(ValueError, match="values has shape"):
        compute_gae_advantages(torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 3))
