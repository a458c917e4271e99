"""KL estimators k1/k2/k3 and the fixed/adaptive KL controllers."""
from __future__ import annotations

import math

import pytest
import torch

from algo.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLConfig,
    build_kl_controller,
    compute_kl,
    compute_kl_k3,
)

LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.5, -1.0, -0.5]])


def test_k1_k2_k3_by_hand():
    # logp - ref = (0.5, -1.0, 0)
    assert compute_kl(LOGP, REF, "k1").tolist()[0] == pytest.approx([0.5, -1.0, 0.0])
    # k2 = 1/2 (0.5^2, 1^2, 0) = (0.125, 0.5, 0)
    assert compute_kl(LOGP, REF, "k2").tolist()[0] == pytest.approx([0.125, 0.5, 0.0])
    # log_r = ref - logp = (-0.5, 1, 0): k3 = e^-0.5 + 0.5 - 1, e^1 - 1 - 1, e^0 - 0 - 1
    want = [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]
    assert compute_kl(LOGP, REF, "k3").tolist()[0] == pytest.approx(want, abs=1e-7)


def test_default_estimator_is_k1():
    assert torch.equal(compute_kl(LOGP, REF), LOGP - REF)


def test_k3_is_nonnegative_and_finite_even_for_extreme_log_ratios():
    torch.manual_seed(0)
    logp = torch.randn(64, 32) * 5
    ref = torch.randn(64, 32) * 5
    k3 = compute_kl_k3(logp, ref)
    assert torch.all(k3 >= 0)
    extreme = compute_kl_k3(torch.tensor([[-100.0, 0.0]]), torch.tensor([[0.0, -100.0]]))
    assert torch.all(torch.isfinite(extreme)) and torch.all(extreme >= 0)


def test_k1_and_k3_average_to_the_exact_kl_on_samples_from_the_policy():
    # Both are unbiased estimators of KL(pi || pi_ref) when tokens are drawn from pi.
    gen = torch.Generator().manual_seed(3)
    pi = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    exact = float((pi * (pi / ref).log()).sum())
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=gen)
    logp, logp_ref = pi.log()[tokens].unsqueeze(0), ref.log()[tokens].unsqueeze(0)
    assert compute_kl(logp, logp_ref, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert compute_kl(logp, logp_ref, "k3").mean().item() == pytest.approx(exact, abs=0.005)


def test_unknown_estimator_and_shape_errors():
    with pytest.raises(ValueError, match="k1"):
        compute_kl(LOGP, REF, "kl")
    with pytest.raises(ValueError, match="differ"):
        compute_kl(LOGP, REF[:, :2])


def test_kl_config_defaults_and_validation():
    cfg = KLConfig()
    assert (cfg.coef, cfg.estimator, cfg.controller) == (0.01, "k1", "fixed")
    with pytest.raises(ValueError, match="kl.target"):
        KLConfig(controller="adaptive")
    with pytest.raises(ValueError, match="kl.estimator"):
        KLConfig(estimator="k4")
    with pytest.raises(ValueError, match="kl.controller"):
        KLConfig(controller="pid")
    with pytest.raises(ValueError, match="kl.coef"):
        KLConfig(coef=-0.1)
    with pytest.raises(ValueError, match="kl.coef > 0"):
        KLConfig(coef=0.0, controller="adaptive", target=6.0)


def test_fixed_controller_never_moves():
    ctl = build_kl_controller(KLConfig(coef=0.01))
    assert isinstance(ctl, FixedKLController)
    ctl.update(current_kl=100.0, n_steps=10_000)
    assert ctl.coef == 0.01


def test_adaptive_controller_by_hand():
    ctl = build_kl_controller(KLConfig(coef=0.1, controller="adaptive", target=6.0, horizon=10_000))
    assert isinstance(ctl, AdaptiveKLController)
    # KL 9 vs target 6: error 9/6 - 1 = 0.5 is clipped to 0.2 ; beta = 0.1 * (1 + 0.2 * 100 / 10000) = 0.1002
    ctl.update(current_kl=9.0, n_steps=100)
    assert ctl.coef == pytest.approx(0.1002)
    # KL 5.4: error 5.4/6 - 1 = -0.1 ; beta = 0.1002 * (1 - 0.1 * 1000 / 10000) = 0.1002 * 0.99 = 0.099198
    ctl.update(current_kl=5.4, n_steps=1000)
    assert ctl.coef == pytest.approx(0.099198)
    # far below target the error clips at -0.2: beta * (1 - 0.2 * 10000 / 10000) = 0.8 beta
    ctl.update(current_kl=0.0, n_steps=10_000)
    assert ctl.coef == pytest.approx(0.099198 * 0.8)


def test_controller_state_round_trip_resumes_identically():
    cfg = KLConfig(coef=0.05, controller="adaptive", target=2.0, horizon=500)
    ctl = build_kl_controller(cfg)
    for kl in (3.0, 2.5, 1.0):
        ctl.update(kl, n_steps=64)
    resumed = build_kl_controller(cfg)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.coef == ctl.coef != cfg.coef
    ctl.update(4.0, 64)
    resumed.update(4.0, 64)
    assert resumed.coef == ctl.coef

    fixed = build_kl_controller(KLConfig(coef=0.02))
    fixed_resumed = build_kl_controller(KLConfig())
    fixed_resumed.load_state_dict(fixed.state_dict())
    assert fixed_resumed.coef == 0.02
