"""Running statistics (Chan et al. merge) and the reward clip + normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from algo.stats import RewardNormalizer, RewardNormConfig, RunningMeanStd


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
