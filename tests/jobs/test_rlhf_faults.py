"""Failures: a role actor that dies mid-run is restarted from the last checkpoint, or the job fails naming the role
and the phase - never a hang."""
from __future__ import annotations

import json

import pytest

from cluster.timeouts import PhaseTimeout, RoleDied
from jobs import rlhf
from jobs.common import execute, load_config
from jobs.rlhf import RLHFJobConfig, RoleFailure, main
from tests.jobs.rlhf_helpers import metric_rows, rlhf_inputs, small_run  # noqa: F401  (fixture)


@pytest.mark.timeout(600)
def test_critic_that_dies_mid_run_is_restarted_from_the_last_checkpoint(ray_cluster, rlhf_inputs, tmp_path,  # noqa: F811
                                                                        capfd):
    marker = tmp_path / "critic_died"
    overrides = small_run(rlhf_inputs, tmp_path, "fault", "rounds=1", "iterations_per_round=6",
                          "stop_after_iterations=3", "max_actor_restarts=1", "fault.role=critic",
                          "fault.method=compute_values", "fault.at_call=2", f"fault.marker={marker}")
    summary = json.loads(execute("rlhf", load_config("rlhf", RLHFJobConfig, overrides), main).read_text())

    assert marker.exists(), "the critic actor never died: the fault was not injected"
    assert summary["restarts"] == 1
    err = capfd.readouterr().err
    assert "critic: rank 0 died during phase 'critic values'" in err
    assert "resumed from" in err and "iter_000001" in err  # restarted from the checkpoint of iteration 1
    assert sorted(metric_rows(tmp_path / "fault")) == [1, 2, 3]


@pytest.mark.timeout(600)
def test_a_restart_waits_for_the_failed_attempts_resources_when_the_roles_fill_most_of_the_cluster(  # noqa: F811
        ray_cluster, rlhf_inputs, tmp_path, capfd):
    # As on the demo's 2 cores, where the roles hold 1.25 of 2 CPUs: Ray frees the failed attempt's placement group a
    # moment after its removal, so a restart that checked the placement at once stopped with "the roles do not fit".
    from tests.jobs.test_rlhf_job import wait_for_free_cpus

    free = wait_for_free_cpus(ray_cluster)
    policy_cpus = round(free / 2 - 4 * 0.25 + 0.5, 2)  # the roles take free/2 + 0.5 CPUs: two attempts cannot overlap
    marker = tmp_path / "critic_died"
    overrides = small_run(rlhf_inputs, tmp_path, "tight", "rounds=1", "iterations_per_round=6",
                          "stop_after_iterations=2", "max_actor_restarts=1", "fault.role=critic",
                          "fault.method=compute_values", "fault.at_call=2", f"fault.marker={marker}",
                          f"placement.policy.cpus_per_actor={policy_cpus}")
    summary = json.loads(execute("rlhf", load_config("rlhf", RLHFJobConfig, overrides), main).read_text())

    assert marker.exists(), "the critic actor never died: the fault was not injected"
    assert summary["restarts"] == 1 and summary["iterations"] == 2
    assert "resumed from" in capfd.readouterr().err
    wait_for_free_cpus(ray_cluster)


@pytest.mark.parametrize("failure", [
    RoleDied("critic", "critic values", 0, RuntimeError("actor died")),
    PhaseTimeout("rollout", "generate", 5.0, missing=[0], answered=[]),
])
def test_the_job_fails_naming_role_and_phase_once_restarts_are_used_up(monkeypatch, rlhf_inputs, tmp_path,  # noqa: F811
                                                                       failure):
    calls = []

    def failing_attempt(cfg, run, ckpt, base_pairs):
        calls.append(1)
        raise failure

    monkeypatch.setattr(rlhf, "attempt", failing_attempt)
    monkeypatch.setattr(rlhf, "init_ray", lambda cfg: False)
    cfg = load_config("rlhf", RLHFJobConfig, small_run(rlhf_inputs, tmp_path, "budget", "max_actor_restarts=2"))
    with pytest.raises(RoleFailure) as err:
        execute("rlhf", cfg, main)
    assert len(calls) == 3  # the first attempt plus 2 restarts
    assert f"role '{failure.role}' failed during phase '{failure.phase}'" in str(err.value)
