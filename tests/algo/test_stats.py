"""Running statistics (Chan et al. merge) and the reward clip + normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from algo.stats import RewardNormalizer, RewardNormConfig, RunningMeanStd, excess_reduction, paired_gain_se


def _stats_of(values) -> RunningMeanStd:
    stats = RunningMeanStd()
    stats.update(torch.as_tensor(values, dtype=torch.float64))
    return stats


def test_chan_merge_by_hand():
    # a = (1, 2, 3): n 3, mean 2, M2 2 ; b = (10,): n 1, mean 10, M2 0
    # delta = 8 ; mean = 2 + 8 * 1/4 = 4 ; M2 = 2 + 0 + 64 * 3 * 1 / 4 = 50 ; var = 50 / 4 = 12.5
    a, b = _stats_of([1.0, 2.0, 3.0]), _stats_of([10.0])
    a.merge(b)
    assert (a.count, a.mean, a.m2, a.var) == (4, pytest.approx(4.0), pytest.approx(50.0), pytest.approx(12.5))


def test_merge_of_chunks_equals_stats_of_the_concatenation():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=200)
    merged = _stats_of(x[:37])
    merged.merge(_stats_of(x[37:90]))
    merged.merge(RunningMeanStd())  # an empty chunk changes nothing
    merged.merge(_stats_of(x[90:]))
    streamed = RunningMeanStd()
    for chunk in np.split(x, [1, 2, 50, 50, 199]):  # includes an empty chunk and single samples
        streamed.update(torch.as_tensor(chunk))
    for stats in (merged, streamed):
        assert stats.count == 200
        assert stats.mean == pytest.approx(float(np.mean(x)), rel=1e-12)
        assert stats.var == pytest.approx(float(np.var(x)), rel=1e-12)
        assert stats.std == pytest.approx(float(np.std(x)), rel=1e-12)


def test_state_round_trip():
    stats = _stats_of([0.5, -1.0, 2.0, 7.0])
    resumed = RunningMeanStd()
    resumed.load_state_dict(stats.state_dict())
    assert resumed.state_dict() == stats.state_dict()
    for s in (stats, resumed):
        s.update(torch.tensor([3.0, 4.0]))
    assert resumed.state_dict() == stats.state_dict()
    with pytest.raises(ValueError, match="m2"):
        RunningMeanStd().load_state_dict({"count": 1, "mean": 0.0})


def test_normalizer_clips_then_matches_numpy_on_a_fixed_sequence():
    batches = [[7.0, -1.0, 0.5], [2.0, -6.0], [4.0, 4.0, -0.25, 1.0]]
    normalizer = RewardNormalizer(RewardNormConfig())
    seen: list[float] = []
    for batch in batches:
        clipped = np.clip(batch, -5.0, 5.0)
        seen.extend(clipped)
        # the batch joins the statistics before it is normalised (XTuner's order)
        want = (clipped - np.mean(seen)) / (np.std(seen) + 1e-8)
        got = normalizer(torch.tensor(batch, dtype=torch.float64))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    assert normalizer.stats.count == 9


def test_single_first_sample_normalises_to_zero_not_nan():
    got = RewardNormalizer(RewardNormConfig())(torch.tensor([3.0]))
    # mean 3, std 0: (3 - 3) / (0 + 1e-8) = 0
    assert got.tolist() == [0.0]


def test_switches_clip_and_normalize():
    raw = torch.tensor([7.0, -9.0, 1.0])
    assert RewardNormalizer(RewardNormConfig(normalize=False))(raw).tolist() == [5.0, -5.0, 1.0]
    open_range = RewardNormConfig(clip_min=None, clip_max=None, normalize=False)
    assert RewardNormalizer(open_range)(raw).tolist() == [7.0, -9.0, 1.0]


def test_normalizer_state_round_trip():
    cfg = RewardNormConfig()
    first = RewardNormalizer(cfg)
    first(torch.tensor([1.0, 2.0, 4.0]))
    resumed = RewardNormalizer(cfg)
    resumed.load_state_dict(first.state_dict())
    nxt = torch.tensor([0.0, 3.0])
    torch.testing.assert_close(resumed(nxt), first(nxt))


def test_reward_norm_config_validation():
    with pytest.raises(ValueError, match="clip_min"):
        RewardNormConfig(clip_min=5.0, clip_max=-5.0)
    with pytest.raises(ValueError, match="eps"):
        RewardNormConfig(eps=-1.0)


def test_per_domain_normalizer_standardises_each_domain_by_its_own_history():
    normalizer = RewardNormalizer(RewardNormConfig(per_domain=True))
    # a: 1, 3 -> mean 2, std 1 -> -1, 1;  b: -2, 4 -> mean 1, std 3 -> -1, 1
    got = normalizer(torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64), ["a", "b", "a", "b"])
    assert got.tolist() == pytest.approx([-1.0, -1.0, 1.0, 1.0], abs=1e-7)
    # a now holds 1, 3, 5: mean 3, population var 8/3 -> (5 - 3) / sqrt(8/3) = sqrt(3/2); a 9 clips to 5 first
    got = normalizer(torch.tensor([9.0], dtype=torch.float64), ["a"])
    assert got.item() == pytest.approx(1.5 ** 0.5, abs=1e-7)
    assert normalizer.domain_stats["b"].count == 2 and normalizer.stats.count == 5  # stats still sees every score
    # the same scores pooled would be standardised by the pooled mean 1.5 and std sqrt(21/4): not what we got
    pooled = RewardNormalizer(RewardNormConfig())(torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64))
    assert pooled[0].item() == pytest.approx(-0.5 / 5.25 ** 0.5)
    with pytest.raises(ValueError, match="one domain per score"):
        normalizer(torch.tensor([1.0, 2.0]), ["a"])


def test_per_domain_state_round_trip_and_old_checkpoints_load():
    cfg = RewardNormConfig(per_domain=True)
    first = RewardNormalizer(cfg)
    first(torch.tensor([1.0, 2.0, 4.0, -1.0]), ["x", "y", "x", "y"])
    resumed = RewardNormalizer(cfg)
    resumed.load_state_dict(first.state_dict())
    nxt, doms = torch.tensor([0.0, 3.0, 2.5]), ["y", "x", "z"]
    torch.testing.assert_close(resumed(nxt, doms), first(nxt, doms))
    legacy = RewardNormalizer(RewardNormConfig())  # a checkpoint written before per-domain statistics existed
    legacy.load_state_dict({"count": 3, "mean": 1.0, "m2": 2.0})
    assert legacy.stats.count == 3 and legacy.domain_stats == {}


def test_paired_gain_se_on_hand_derived_values():
    before = {"a": [0.0, 1.0], "b": [1.0, 1.0, 0.0]}
    after = {"a": [1.0, 1.0], "b": [1.0, 0.0, 0.0]}
    # a: diffs 1, 0 -> s^2 = 0.5, /2 = 0.25;  b: diffs 0, -1, 0 -> mean -1/3, s^2 = (1/9 + 4/9 + 1/9) / 2 = 1/3, /3
    assert paired_gain_se(before, after) == pytest.approx((0.25 + 1 / 9) ** 0.5 / 2)
    assert paired_gain_se({"a": [0.2, 0.4]}, {"a": [0.7, 0.9]}) == pytest.approx(0.0)  # the same gain on every prompt
    assert paired_gain_se({"a": [0.0]}, {"a": [1.0]}) is None  # one prompt: no variance to estimate
    with pytest.raises(ValueError, match="same domains"):
        paired_gain_se(before, {"a": [1.0, 1.0]})


def test_excess_reduction_on_hand_derived_values():
    # F = 12/48 = 1/4, L = 6/48 = 1/8, S = 4/48 = 1/12: the rise over SFT 1/6 shrank to 1/24, so 3/4 of it is gone.
    # var F = (1/4)(3/4)/48 = 3/768, var L = (1/8)(7/8)/48 = 7/3072, var S = (1/12)(11/12)/48 = 11/6912;
    # dr/dF = (1/24)/(1/36) = 3/2, dr/dL = -6, dr/dS = (1/8)/(1/36) = 9/2 (they sum to 0: a common shift changes nothing)
    value, se = excess_reduction((12, 48), (6, 48), (4, 48))
    assert value == pytest.approx(0.75)
    assert se == pytest.approx((2.25 * 3 / 768 + 36 * 7 / 3072 + 20.25 * 11 / 6912) ** 0.5)
    # Back to the baseline's rate is all of it; below the baseline is more than all; the raw share would read 0.5.
    assert excess_reduction((12, 48), (4, 48), (4, 48))[0] == pytest.approx(1.0)
    assert excess_reduction((12, 48), (2, 48), (4, 48))[0] == pytest.approx(1.25)
    # No rise over the baseline (or nothing counted): nothing to undo, so no figure rather than a division by ~0.
    assert excess_reduction((4, 48), (1, 48), (4, 48)) == (None, None)
    assert excess_reduction((3, 48), (1, 48), (4, 48)) == (None, None)
    assert excess_reduction((3, 48), (1, 0), (4, 48)) == (None, None)
