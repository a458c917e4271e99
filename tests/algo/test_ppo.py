"""PPO policy / value / PTX losses on hand-derived values, and the COOL RLHF defaults."""
from __future__ import annotations

import math

import pytest
import torch

from algo.advantages import AdvantageConfig
from algo.kl import KLConfig
from algo.ppo import PPOLossConfig, compute_policy_loss, compute_ptx_loss, compute_value_loss
from algo.stats import RewardNormConfig

# One sequence, five tokens, eps = 0.2:
#   ratio  A    -rho*A   -clip(rho)*A   max     clipped?  d(loss_t)/d(logp_t)
#   1.5   +1    -1.5     -1.2           -1.2    yes       0
#   0.5   +1    -0.5     -0.8           -0.5    no        -rho*A = -0.5
#   1.5   -1     1.5      1.2            1.5    no        -rho*A =  1.5
#   0.5   -1     0.5      0.8            0.8    yes       0
#   1.1   +2    -2.2     -2.2           -2.2    no (in band) -rho*A = -2.2
# token mean = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5 = -1.6 / 5 = -0.32 ; clipfrac = 2/5
RATIOS = [1.5, 0.5, 1.5, 0.5, 1.1]
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
OLD = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -3.0]], dtype=torch.float64)


def _logprobs(ratios=RATIOS) -> torch.Tensor:
    return (OLD + torch.tensor([ratios], dtype=torch.float64).log()).requires_grad_(True)


def test_policy_loss_inside_and_outside_the_clip_band_by_hand():
    logprobs = _logprobs()
    loss, metrics = compute_policy_loss(logprobs, OLD, ADV, torch.ones(1, 5), PPOLossConfig())
    assert loss.item() == pytest.approx(-0.32)
    loss.backward()
    # gradient is zero exactly where the clip is active; elsewhere -rho*A / 5
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, -0.1, 0.3, 0.0, -0.44])
    assert metrics["policy/clipfrac"].item() == pytest.approx(0.4)
    assert metrics["policy/ratio_mean"].item() == pytest.approx(sum(RATIOS) / 5)
    # approx KL(pi_old || pi_theta) by k3: mean of rho - 1 - ln rho
    want_kl = sum(r - 1 - math.log(r) for r in RATIOS) / 5
    assert metrics["policy/approx_kl"].item() == pytest.approx(want_kl)
    assert "policy/dual_clipfrac" not in metrics  # dual clip is off by default


def test_on_policy_first_step_is_minus_mean_advantage():
    # rho = 1 everywhere: L = -mean(A) = -(1 + 1 - 1 - 1 + 2)/5 = -0.4, gradient -A/5, nothing clipped
    logprobs = OLD.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(logprobs, OLD, ADV, torch.ones(1, 5), PPOLossConfig())
    loss.backward()
    assert loss.item() == pytest.approx(-0.4)
    assert logprobs.grad.tolist()[0] == pytest.approx([-0.2, -0.2, 0.2, 0.2, -0.4])
    assert metrics["policy/clipfrac"].item() == 0.0
    assert metrics["policy/approx_kl"].item() == 0.0


def test_padding_does_not_change_the_policy_loss():
    padded_lp = torch.cat([_logprobs().detach(), torch.tensor([[5.0]], dtype=torch.float64)], dim=1)
    padded_old = torch.cat([OLD, torch.tensor([[-9.0]], dtype=torch.float64)], dim=1)
    padded_adv = torch.cat([ADV, torch.tensor([[100.0]], dtype=torch.float64)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, metrics = compute_policy_loss(padded_lp, padded_old, padded_adv, mask, PPOLossConfig())
    assert loss.item() == pytest.approx(-0.32)
    assert metrics["policy/clipfrac"].item() == pytest.approx(0.4)


def test_dual_clip_bounds_negative_advantage_tokens():
    # A = -1, rho = 5: standard L = max(5, 1.2) = 5 ; dual clip c = 3 -> min(5, 3) = 3 (gradient 0)
    # A = +1, rho = 5: dual clip never touches positive advantages: max(-5, -1.2) = -1.2
    old = torch.zeros(1, 2, dtype=torch.float64)
    logprobs = torch.full((1, 2), math.log(5.0), dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    off, _ = compute_policy_loss(logprobs, old, adv, torch.ones(1, 2), PPOLossConfig())
    assert off.item() == pytest.approx((5.0 - 1.2) / 2)
    on, metrics = compute_policy_loss(logprobs, old, adv, torch.ones(1, 2), PPOLossConfig(dual_clip=3.0))
    assert on.item() == pytest.approx((3.0 - 1.2) / 2)
    assert metrics["policy/dual_clipfrac"].item() == pytest.approx(0.5)
    on.backward()
    assert logprobs.grad.tolist()[0] == [0.0, 0.0]


def test_value_loss_is_half_squared_error_without_clipping_by_default():
    # V = (1, 2, 3), R = (0, 2, 5): 1/2 (1, 0, 4) -> mean 5/6 ; padding slot ignored
    values = torch.tensor([[1.0, 2.0, 3.0, 8.0]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[0.0, 2.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = compute_value_loss(values, returns, mask, PPOLossConfig())
    assert loss.item() == pytest.approx(5 / 6)
    loss.backward()
    # d/dV 1/2 (V - R)^2 / 3 = (V - R) / 3
    assert values.grad.tolist()[0] == pytest.approx([1 / 3, 0.0, -2 / 3, 0.0])
    assert "critic/vf_clipfrac" not in metrics
    assert metrics["critic/values_mean"].item() == pytest.approx(2.0)
    assert metrics["critic/abs_error_mean"].item() == pytest.approx(1.0)


def test_value_loss_with_clipping_by_hand():
    # clip 0.5, V_old = (1.2, 2, 2): V_clip = V_old + clip(V - V_old, +-0.5) = (1.0, 2.0, 2.5)
    # clipped losses 1/2 (1 - 0)^2 = 0.5, 0, 1/2 (2.5 - 5)^2 = 3.125 ; max with (0.5, 0, 2) = (0.5, 0, 3.125)
    # mean = 3.625 / 3 ; only the third token is clipped
    values = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    returns = torch.tensor([[0.0, 2.0, 5.0]], dtype=torch.float64)
    old = torch.tensor([[1.2, 2.0, 2.0]], dtype=torch.float64)
    cfg = PPOLossConfig(value_clip=0.5)
    loss, metrics = compute_value_loss(values, returns, torch.ones(1, 3), cfg, old_values=old)
    assert loss.item() == pytest.approx(3.625 / 3)
    assert metrics["critic/vf_clipfrac"].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="old_values"):
        compute_value_loss(values, returns, torch.ones(1, 3), cfg)


def test_ptx_loss_is_weighted_token_mean_nll():
    # NLL of the two real tokens: 1 and 2 -> mean 1.5 ; weighted by 0.5 -> 0.75
    logprobs = torch.tensor([[-1.0, -2.0, -30.0]], requires_grad=True)
    loss, metrics = compute_ptx_loss(logprobs, torch.tensor([[1, 1, 0]]), PPOLossConfig())
    assert loss.item() == pytest.approx(0.75)
    assert metrics["ptx/lm_loss"].item() == pytest.approx(1.5)
    loss.backward()
    assert logprobs.grad.tolist()[0] == pytest.approx([-0.25, -0.25, 0.0])
    off, _ = compute_ptx_loss(logprobs, torch.tensor([[1, 1, 0]]), PPOLossConfig(ptx_coef=0.0))
    assert off.item() == 0.0


def test_seq_mean_token_mean_is_selectable():
    # per-token losses at rho = 1 are -A: row 0 (-1, -3) mean -2 ; row 1 (-4) ; token-mean -8/3, seq-mean -3
    old = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 3.0], [4.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    tok, _ = compute_policy_loss(old, old, adv, mask, PPOLossConfig())
    seq, _ = compute_policy_loss(old, old, adv, mask, PPOLossConfig(aggregation="seq-mean-token-mean"))
    assert tok.item() == pytest.approx(-8 / 3)
    assert seq.item() == pytest.approx(-3.0)


def test_defaults_follow_the_internlm2_report():
    ppo = PPOLossConfig()
    assert (ppo.clip_eps, ppo.value_clip, ppo.dual_clip, ppo.ptx_coef, ppo.aggregation) == (
        0.2, None, None, 0.5, "token-mean")
    adv = AdvantageConfig()
    assert (adv.gamma, adv.lam, adv.whiten) == (1.0, 0.99, False)
    kl = KLConfig()
    assert (kl.coef, kl.estimator) == (0.01, "k1")
    reward = RewardNormConfig()
    assert (reward.clip_min, reward.clip_max, reward.normalize, reward.eps) == (-5.0, 5.0, True, 1e-8)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"clip_eps": 1.5}, "ppo.clip_eps"), ({"clip_eps": 0.0}, "ppo.clip_eps"), ({"dual_clip": 0.9}, "ppo.dual_clip"),
     ({"value_clip": 0.0}, "ppo.value_clip"), ({"ptx_coef": -1.0}, "ppo.ptx_coef"),
     ({"aggregation": "sum"}, "ppo.aggregation")],
)
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        PPOLossConfig(**kwargs)


def test_shape_errors_name_the_tensor():
    with pytest.raises(ValueError, match="advantages has shape"):
        compute_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), PPOLossConfig())
