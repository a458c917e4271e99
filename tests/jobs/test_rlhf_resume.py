"""Resume fidelity: 4 iterations straight == 2 iterations, stop, rerun the same command to 4 (tiny model, Ray)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.common import execute, load_config
from jobs.rlhf import RLHFJobConfig, main
from tests.jobs.rlhf_helpers import metric_rows, rlhf_inputs, small_run  # noqa: F401  (fixture)


def _latest(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(ray_cluster, rlhf_inputs, tmp_path):  # noqa: F811
    def run(name: str, stop: int) -> dict:
        # rounds=1 of 6 iterations: both runs stop inside the round, so only the PPO state is compared. Per-domain
        # reward statistics: the richer normaliser state must come back too.
        overrides = small_run(rlhf_inputs, tmp_path, name, "rounds=1", "iterations_per_round=6",
                              f"stop_after_iterations={stop}", "ppo.reward_norm.per_domain=true")
        return json.loads(execute("rlhf", load_config("rlhf", RLHFJobConfig, overrides), main).read_text())

    straight = run("straight", 4)
    first = run("resumed", 2)
    second = run("resumed", 4)  # the same command again: picks up the iteration-2 checkpoint
    assert not straight["completed"] and not first["completed"] and not second["completed"]

    a, b = _latest(tmp_path / "straight"), _latest(tmp_path / "resumed")
    assert a.name == b.name == "iter_000004_r00"
    for role in ("policy", "critic"):
        for part in ("model.pt", "optimizer.pt"):
            sa, sb = torch.load(a / role / part, weights_only=True), torch.load(b / role / part, weights_only=True)
            flat_a, flat_b = _tensors(sa), _tensors(sb)
            assert flat_a.keys() == flat_b.keys()
            for key in flat_a:
                torch.testing.assert_close(flat_a[key], flat_b[key], atol=1e-6, rtol=1e-5, msg=f"{role}/{part}/{key}")
    state_a, state_b = (json.loads((p / "state.json").read_text()) for p in (a, b))
    for key in ("iteration", "prompt_cursor", "policy_version", "reward_stats", "kl_ctl"):
        assert _flat(state_a[key]) == pytest.approx(_flat(state_b[key])), key
    assert len(state_b["reward_stats"]["domains"]) >= 2  # statistics per domain were kept and resumed
    # The restarted engines got the checkpointed policy by one more (versioned) sync.
    assert state_b["weight_version"] == state_a["weight_version"] + 1

    rows_a, rows_b = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "resumed")
    assert sorted(rows_a) == sorted(rows_b) == [1, 2, 3, 4]
    for it in (3, 4):  # iterations the resumed run computed after its restart
        for key in ("reward/raw_mean", "reward/normalized_mean", "kl", "entropy", "critic/value_loss", "policy/loss"):
            assert rows_a[it][key] == pytest.approx(rows_b[it][key], abs=1e-5), (it, key)


def _flat(obj, prefix: str = ""):
    """A JSON value with nested dicts flattened to {"a/b": leaf} (pytest.approx compares flat mappings only)."""
    if not isinstance(obj, dict):
        return obj if not prefix else {prefix: obj}
    out = {}
    for k, v in obj.items():
        sub = _flat(v, f"{prefix}/{k}")
        out.update(sub if isinstance(sub, dict) else {f"{prefix}/{k}": sub})
    return out


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) state dict, keyed by its path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def test_a_checkpoint_is_published_only_when_complete(tmp_path):
    from jobs.rlhf_state import Checkpointer, DriverState

    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    assert ckpt.latest() is None

    def crash(directory):
        (directory / "policy").mkdir()
        raise RuntimeError("killed while the engines were saving")

    with pytest.raises(RuntimeError):
        ckpt.save(DriverState(iteration=1), crash)
    assert ckpt.latest() is None  # the half-written .tmp directory is never pointed at

    for it in (1, 2, 3):
        ckpt.save(DriverState(iteration=it, prompt_cursor=8 * it), lambda d: (d / "policy").mkdir())
    latest = ckpt.latest()
    assert latest.name == "iter_000003_r00" and ckpt.load_state(latest).prompt_cursor == 24
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*")) == ["iter_000002_r00", "iter_000003_r00"]


def test_the_prompt_stream_is_a_function_of_the_cursor_and_balances_domains():
    from jobs.rlhf_state import PromptStream

    domains = ["math", "code", "harmless"]
    stream = PromptStream(domains, per_domain=5, seed=7)
    first = [p.id for p in stream.batch(0, 12)]
    again = [p.id for p in PromptStream(domains, per_domain=5, seed=7).batch(4, 8)]
    assert first[4:] == again  # a resumed run at cursor 4 draws what the straight run drew
    epoch = [p.id for p in stream.batch(0, 15)]
    assert sorted(epoch) == sorted(p.id for p in stream.pool)  # one epoch visits every prompt once
    for start in (0, 3, 6, 9, 12):  # every window of 3 draws holds each domain once
        assert sorted(p.domain for p in stream.batch(start, 3)) == sorted(domains)
    assert [p.id for p in stream.batch(15, 15)] != epoch  # the next epoch is reshuffled
