"""The RM loss against hand-derived values (spec cool-rlhf.md §7.1 table), gradients included."""
from __future__ import annotations

import math

import pytest
import torch

from algo.rm_loss import RMLossConfig, compute_focal_ranking_loss, compute_log_barrier_penalty, compute_rm_loss

# d = r_i - r_j, P = sigmoid(d), weight = (1 - 2 max(0, P - 1/2))^2, loss = -weight * log P
#   d=-1: P=0.268941, weight 1 (mis-ranked), loss = -log 0.268941 = 1.313262
#   d=0 : P=0.5, weight 1, loss = log 2 = 0.693147
#   d=0.1: P=0.524979, weight = (1 - 0.049958)^2 = 0.902579, -log P = 0.644397, loss = 0.581619
#   d=1 : P=0.731059, weight = (2 * 0.268941)^2 = 0.289318, -log P = 0.313262, loss = 0.090632
#   d=3 : P=0.952574, weight = (2 * 0.047426)^2 = 0.008997, -log P = 0.048587, loss = 0.000437
RANKING = [(-1.0, 1.313262), (0.0, 0.693147), (0.1, 0.581619), (1.0, 0.090632), (3.0, 0.000437)]
# -(log(x + 5) + log(5 - x)): x=0 -> -2 log 5; x=1 -> -(log 6 + log 4); x=4 -> -(log 9 + log 1); x=4.9 -> -(log 9.9 + log 0.1)
PENALTY = [(0.0, -3.218876), (1.0, -3.178054), (4.0, -2.197225), (4.9, 0.010050)]


@pytest.mark.parametrize("margin,expected", RANKING)
def test_focal_ranking_loss_matches_the_spec_table(margin, expected):
    loss = compute_focal_ranking_loss(torch.tensor([margin]), torch.tensor([0.0]), gamma=2.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_gamma_zero_is_the_plain_bradley_terry_loss():
    d = torch.tensor([-1.0, 0.0, 0.1, 1.0, 3.0])
    bt = [1.313262, 0.693147, 0.644397, 0.313262, 0.048587]  # -log sigmoid(d), the table's last column
    torch.testing.assert_close(compute_focal_ranking_loss(d, torch.zeros(5), gamma=0.0), torch.tensor(bt), atol=1e-6, rtol=0)


def test_focal_gradient_by_hand_including_the_weight():
    # L(d) = -w(d) log P, w = (2(1 - P))^2 for d > 0, dP/dd = P(1 - P).
    # dw/dd = 2 * 2(1 - P) * (-2 P (1 - P)) = -8 P (1 - P)^2
    # dL/dd = -(dw/dd) log P - w (1 - P)
    # At d = 1: P = 0.731059, 1 - P = 0.268941, dw/dd = -8 * 0.731059 * 0.072329 = -0.423014,
    #   -(dw/dd) log P = -(-0.423014)(-0.313262) = -0.132514, w (1 - P) = 0.289318 * 0.268941 = 0.077810,
    #   dL/dd = -0.210324. (Detaching the weight would give only -0.077810.)
    # At d = -1 the weight is 1 and constant: dL/dd = -(1 - P) = -0.731059.
    chosen = torch.tensor([1.0, -1.0], requires_grad=True)
    rejected = torch.zeros(2, requires_grad=True)
    compute_focal_ranking_loss(chosen, rejected).sum().backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.210324, -0.731059]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected.grad, -chosen.grad)  # d(r_i - r_j)/dr_j = -1


@pytest.mark.parametrize("x,expected", PENALTY)
def test_log_barrier_penalty_values(x, expected):
    assert compute_log_barrier_penalty(torch.tensor([x])).item() == pytest.approx(expected, abs=1e-5)


def test_log_barrier_gradient_is_2x_over_25_minus_x_squared():
    x = torch.tensor([4.0, -4.0, 0.0, 1.0], requires_grad=True)
    compute_log_barrier_penalty(x).sum().backward()
    # 2x / (25 - x^2): 8/9 = 0.888889 at 4, -0.888889 at -4, 0 at 0, 2/24 = 0.083333 at 1
    torch.testing.assert_close(x.grad, torch.tensor([0.888889, -0.888889, 0.0, 0.083333]), atol=1e-5, rtol=0)


def test_outside_the_clamp_xtuner_mode_loses_the_gradient_and_linear_mode_keeps_pushing_back():
    limit = 5.0 - 1e-3
    slope = 2 * limit / (25 - limit**2)  # ~ 999.9: the barrier's slope at the clamp point
    x = torch.tensor([6.0, -7.0], requires_grad=True)
    compute_log_barrier_penalty(x, outside="clamp").sum().backward()
    assert x.grad.abs().max().item() == 0.0  # XTuner's caveat: an escaped score gets no push back
    x.grad = None
    value = compute_log_barrier_penalty(x, outside="linear")
    value.sum().backward()
    # fp32: 25 - 4.999^2 = 0.009999 loses ~4 digits to cancellation, hence rtol 1e-3
    torch.testing.assert_close(x.grad, torch.tensor([slope, -slope]), rtol=1e-3, atol=0)
    at_limit = -(math.log(5 + limit) + math.log(5 - limit))
    # tangent line: barrier(limit) + slope * (x - limit), continuous at the clamp point
    torch.testing.assert_close(value.detach(), torch.tensor([at_limit + slope * (6 - limit), at_limit + slope * (7 - limit)]),
                               rtol=1e-3, atol=0)


def test_total_loss_value_gradients_and_denominator():
    # one pair, r_i = 1, r_j = 0 (lambda = 0.02):
    #   L = 0.090632 + 0.02 * (penalty(1) + penalty(0)) = 0.090632 + 0.02 * (-3.178054 - 3.218876) = -0.037307
    #   dL/dr_i = -0.210324 + 0.02 * 2 / 24 = -0.208657 ; dL/dr_j = 0.210324 + 0.02 * 0 = 0.210324
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    loss, metrics = compute_rm_loss(chosen, rejected, RMLossConfig())
    loss.backward()
    assert loss.item() == pytest.approx(-0.037307, abs=1e-5)
    assert chosen.grad.item() == pytest.approx(-0.208657, abs=1e-5)
    assert rejected.grad.item() == pytest.approx(0.210324, abs=1e-5)
    assert metrics["rm/accuracy"] == 1.0 and metrics["pairs"] == 1.0
    # two identical pairs averaged over a global denominator of 4 pairs: half the one-pair loss
    half, _ = compute_rm_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), RMLossConfig(), denominator=4)
    assert half.item() == pytest.approx(-0.037307 / 2, abs=1e-5)


def test_config_rejects_bad_values_with_the_fix():
    with pytest.raises(ValueError, match="penalty_outside"):
        RMLossConfig(penalty_outside="smooth")
    with pytest.raises(ValueError, match="gamma"):
        RMLossConfig(gamma=-1)
    with pytest.raises(ValueError, match=r"\[N\]"):
        compute_rm_loss(torch.zeros(2, 1), torch.zeros(2, 1), RMLossConfig())
