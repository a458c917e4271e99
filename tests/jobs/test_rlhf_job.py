"""jobs/rlhf.py end to end on the tiny model through real Ray actors: one short round, summary and metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from algo.stats import paired_gain_se
from jobs.common import execute, load_config
from jobs.rlhf import RLHFJobConfig, main
from tests.jobs.rlhf_helpers import metric_rows, rlhf_inputs, small_run  # noqa: F401  (fixture)

PER_ITERATION = [
    "round", "iteration", "reward/raw_mean", "reward/normalized_mean", "kl", "entropy", "critic/value_loss",
    "critic/explained_var", "response_length/mean", "time/generate", "time/score", "time/reference", "time/critic",
    "time/train", "tokens_per_second", "mismatch/mean_abs", "mismatch/p95_abs",
]


def test_one_round_of_two_iterations_through_ray_actors(ray_cluster, rlhf_inputs, tmp_path, capfd):  # noqa: F811
    cfg = load_config("rlhf", RLHFJobConfig, small_run(rlhf_inputs, tmp_path, "smoke", "rounds=1",
                                                      "iterations_per_round=2", "ppo.epochs=2"))
    summary = json.loads(execute("rlhf", cfg, main).read_text())

    for key in ("oracle_score_sft", "oracle_score_final", "kl_final", "hack_rate_by_round", "rounds", "iterations",
                "seconds", "model_dir", "oracle_score_by_domain_sft", "oracle_score_by_domain_final",
                "mismatch_p95_final", "oracle_score_greedy_sft", "oracle_score_greedy_final"):
        assert key in summary, key
    assert summary["completed"] and summary["rounds"] == 1 and summary["iterations"] == 2
    assert len(summary["hack_rate_by_round"]) == 1
    assert 0.0 <= summary["oracle_score_final"] <= 1.0
    assert summary["kl_final_k3"] >= 0.0  # k3 cannot go negative, whatever k1's sampling noise does
    assert set(summary["oracle_score_by_domain_final"]) == set(summary["oracle_score_by_domain_sft"])
    assert set(summary["oracle_score_greedy_by_domain_sft"]) == set(summary["oracle_score_by_domain_sft"])
    # Same weights in engine and trainer: only float noise separates the two log-probs of a sampled token.
    assert summary["mismatch_p95_final"] < 1e-3
    # Every held-out answer behind the headline is on disk, and the headline is their per-domain mean.
    for name in ("sft", "final"):
        answers = [json.loads(line) for line in Path(summary["heldout_samples"][name]).read_text().splitlines()]
        for decoding, key in (("sampled", f"oracle_score_by_domain_{name}"), ("greedy", f"oracle_score_greedy_by_domain_{name}")):
            by_domain: dict[str, list[float]] = {}
            for a in answers:
                if a["decoding"] == decoding:
                    by_domain.setdefault(a["domain"], []).append(a["oracle"])
            assert {d: sum(v) / len(v) for d, v in by_domain.items()} == pytest.approx(summary[key])
        assert all(a["prompt"] and isinstance(a["response"], str) for a in answers)
    # The gain's evaluation noise pairs each held-out prompt's sampled answers before and after (same prompt order).
    per_prompt = {}
    for name in ("sft", "final"):
        sampled: dict[str, list] = {}
        for line in Path(summary["heldout_samples"][name]).read_text().splitlines():
            a = json.loads(line)
            if a["decoding"] == "sampled":
                sampled.setdefault(a["domain"], []).append((a["prompt_id"], a["oracle"]))
        per_prompt[name] = {d: [sum(s for _, s in v[i::2]) / (len(v) // 2) for i in range(2)] for d, v in sampled.items()}
        assert all(v[0][0] == v[len(v) // 2][0] for v in sampled.values())  # samples cycle over the 2 prompts
    assert summary["oracle_score_gain_se"] == pytest.approx(paired_gain_se(per_prompt["sft"], per_prompt["final"]))
    assert summary["oracle_score_gain_se"] >= 0.0
    # 8 new tokens cannot hold the world's best answers: the job says so, names the budget that would, and reports
    # the share of sampled held-out answers the budget cut off.
    need = summary["reference_answer_tokens_max"]
    err = capfd.readouterr().err
    assert need > 8 and f"raise rollout.sampling.max_new_tokens to at least {need}" in err
    for name in ("sft", "final"):
        sampled = [json.loads(line) for line in Path(summary["heldout_samples"][name]).read_text().splitlines()]
        sampled = [a for a in sampled if a["decoding"] == "sampled"]
        assert summary[f"heldout_truncated_frac_{name}"] == pytest.approx(sum(a["truncated"] for a in sampled) / len(sampled))
    assert summary["heldout_truncated_frac_sft"] > 0.5  # an untrained tiny model rarely ends a reply in 8 tokens

    rows = metric_rows(Path(summary["run_dir"]))
    assert sorted(rows) == [1, 2]
    for it, row in rows.items():
        missing = [k for k in PER_ITERATION if k not in row]
        assert not missing, f"iteration {it} lacks {missing}"
        assert any(k.startswith("reward/") and k.split("/")[1] in ("math", "code", "helpful") for k in row)
    assert rows[1]["policy/trained"] == 0.0 and "policy/clipfrac" not in rows[1]  # critic warm-up
    assert rows[2]["policy/trained"] == 1.0 and "policy/clipfrac" in rows[2] and rows[2]["weight_version"] >= 1
    # ppo.epochs=2: the first pass is on-policy (ratio 1, no KL to the sampler); the second sees the moved weights.
    assert rows[2]["policy/approx_kl"] < 1e-6 < rows[2]["policy/approx_kl_last_epoch"]
    assert isinstance(summary["hack_tracking"], list)
    assert "round1_hacks_halved" in summary and "round1_hack_excess_halved" in summary

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(summary["model_dir"]).config.vocab_size > 0

    def last_state(run_dir: str) -> dict:
        latest = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
        return json.loads((Path(run_dir) / "checkpoints" / latest / "state.json").read_text())

    # The only round is the last: its pairs are labelled and saved and the RM it ran with is evaluated on them, but no
    # RM is trained for a PPO round that never comes.
    state = last_state(summary["run_dir"])
    (done,) = state["round_results"]
    rdir = Path(summary["run_dir"]) / "rounds" / "round_1"
    assert not done["rm_updated"] and done["new_rm_dir"] == state["rm_dir"] == rlhf_inputs["rm"]
    assert (rdir / "pairs.jsonl").exists() and (rdir / "patterns.json").exists() and not (rdir / "rm").exists()
    assert done["rm_eval"]["heldout_acc_before"] is not None and done["rm_eval"]["heldout_acc_after"] is None
    assert summary["rm_updated_by_round"] == [False]
    assert "no RM update after the last round" in err

    # Resumed with one more round, the run first trains the update it skipped, reloads the RM role with it, and
    # goes on with round 2 (now the last, so again without an update). Its RM workers are started for each round's
    # online step and stopped after it (rm_update_workers.keep_warm=false) instead of kept.
    more = load_config("rlhf", RLHFJobConfig, small_run(rlhf_inputs, tmp_path, "smoke", "rounds=2",
                                                       "iterations_per_round=2", "ppo.epochs=2",
                                                       "rm_update_workers.keep_warm=false"))
    extended = json.loads(execute("rlhf", more, main).read_text())
    state = last_state(extended["run_dir"])
    assert extended["iterations"] == 4 and extended["rm_updated_by_round"] == [True, False]
    assert state["rm_dir"] == str(rdir / "rm") and (rdir / "rm" / "reward_config.json").exists()
    assert state["round_results"][0]["rm_eval"]["heldout_acc_after"] is not None
    assert [r["new_rm_dir"] for r in state["round_results"]] == [str(rdir / "rm")] * 2


def test_warm_rm_workers_serve_every_round_when_the_roles_nearly_fill_the_cluster(ray_cluster, rlhf_inputs,  # noqa: F811
                                                                                  tmp_path):
    # As on the demo's 2 cores: the roles leave 0.75 CPU, the RM-update worker started at round 1's end takes 0.7 of
    # it and keeps it (rm_update_workers.keep_warm, the default). Round 2's online step must reuse that group as it
    # was sized; sizing it again from what is free now (0.05 CPU) would stop the run.
    free = wait_for_free_cpus(ray_cluster)  # an earlier test's actors may still be releasing theirs
    policy_cpus = round(free - 4 * 0.25 - 0.75, 2)  # the other four roles keep their default quarter CPU
    assert policy_cpus >= 0.25, f"the test cluster has {free} CPUs; this test needs at least 2"
    cfg = load_config("rlhf", RLHFJobConfig, small_run(rlhf_inputs, tmp_path, "full", "rounds=2",
                                                      "iterations_per_round=1",
                                                      f"placement.policy.cpus_per_actor={policy_cpus}"))
    summary = json.loads(execute("rlhf", cfg, main).read_text())
    assert summary["completed"] and summary["rounds"] == 2 and summary["rm_updated_by_round"] == [True, False]
    wait_for_free_cpus(ray_cluster)  # fails if the roles or the warm RM workers still hold CPUs after the run


def wait_for_free_cpus(ray, timeout_s: float = 60.0) -> float:
    """The cluster's CPU count once all of it is free again (Ray reports a removed actor's or placement group's
    CPUs free a moment later); fails naming what is still held after timeout_s."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.time() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < total - 1e-6:
        if time.time() > deadline:
            raise AssertionError(f"{total - ray.available_resources().get('CPU', 0.0):g} of {total:g} CPUs still "
                                 f"held {timeout_s:g} s after the last run ended")
        time.sleep(0.5)
    return total


def test_a_placement_that_cannot_fit_fails_before_any_model_loads(ray_cluster, rlhf_inputs, tmp_path):  # noqa: F811
    from cluster.placement import PlacementError

    cfg = load_config("rlhf", RLHFJobConfig, small_run(rlhf_inputs, tmp_path, "too_big",
                                                      "placement.policy.cpus_per_actor=64"))
    with pytest.raises(PlacementError) as err:
        execute("rlhf", cfg, main)
    assert "policy" in str(err.value) and "CPU" in str(err.value) and "64" in str(err.value)
    assert not (tmp_path / "too_big" / "checkpoints").exists()


def test_missing_model_paths_are_a_config_error(rlhf_inputs, tmp_path, capsys):  # noqa: F811
    cfg = load_config("rlhf", RLHFJobConfig, [f"run.root={tmp_path}", "logging.wandb=disabled",
                                             f"reward.path={rlhf_inputs['rm']}"])
    with pytest.raises(SystemExit) as exc:
        execute("rlhf", cfg, main)
    assert exc.value.code == 2
    assert "config error: policy.path is required" in capsys.readouterr().err


@pytest.mark.parametrize("swap, message", [
    (lambda i: [f"policy.path={i['rm']}"], "policy.path={rm!r} is a reward model directory"),
    (lambda i: [f"reward.path={i['sft']}"], "reward.path={sft!r} is not a reward model directory"),
])
def test_swapped_model_directories_are_a_config_error(rlhf_inputs, tmp_path, capsys, swap, message):  # noqa: F811
    # A reward model as the policy trained a random LM head to a 0.000 score without a word; an SFT model as the RM
    # killed the reward actor at start, and the job's restart then reported a placement error.
    cfg = load_config("rlhf", RLHFJobConfig, small_run(rlhf_inputs, tmp_path, "swapped", *swap(rlhf_inputs)))
    with pytest.raises(SystemExit) as exc:
        execute("rlhf", cfg, main)
    assert exc.value.code == 2
    assert message.format(**rlhf_inputs) in capsys.readouterr().err
    assert not (tmp_path / "swapped" / "checkpoints").exists()


def test_a_malformed_human_label_file_is_a_config_error_before_any_ppo(rlhf_inputs, tmp_path, capsys):  # noqa: F811
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"id": "a", "label": 0}\n{"id": "b", "label": 1\n')
    cfg = load_config("rlhf", RLHFJobConfig, small_run(rlhf_inputs, tmp_path, "labels", "online.labeler=file",
                                                      f"online.labels_path={labels}"))
    with pytest.raises(SystemExit) as exc:
        execute("rlhf", cfg, main)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "config error: online.labels_path" in err and f"{labels}:2" in err


@pytest.mark.parametrize("override, message", [
    ("prompts.domains=[cooking]", "prompts.domains has unknown ['cooking']"),
    ("rm_update_workers.backend=fsdp", "rm_update_workers.backend must be one of ddp, deepspeed"),
    # Layout mistakes that need no cluster to see: raw ValueErrors from cluster/placement.py after Ray had started.
    ("placement.reference.num_actors=3", "placement: role 'reference' has 3 actors but is colocated with 'policy'"),
    ("placement.rollout.colocate_with=nonrole", "placement: role 'rollout' has colocate_with='nonrole', which is not"),
])
def test_bad_prompt_domains_and_rm_update_backend_fail_at_load(rlhf_inputs, tmp_path, capsys, override,  # noqa: F811
                                                               message):
    # Both failed only after Ray and the roles had started (the backend after a whole round of PPO), as tracebacks.
    with pytest.raises(SystemExit) as exc:
        load_config("rlhf", RLHFJobConfig, small_run(rlhf_inputs, tmp_path, "bad", override))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_rm_update_workers_that_cannot_fit_beside_the_roles_fail_before_any_ppo(ray_cluster, rlhf_inputs,  # noqa: F811
                                                                                tmp_path, capsys):
    # The roles take every free CPU: the RM update's worker, started at round 1's end, could not start, and the run
    # failed there, a round of PPO later (its message suggested rm_update_workers.cpus_per_worker, which cannot help).
    free = wait_for_free_cpus(ray_cluster)
    cfg = load_config("rlhf", RLHFJobConfig, small_run(rlhf_inputs, tmp_path, "full", "rounds=2",
                                                      f"placement.policy.cpus_per_actor={free - 1.0}"))
    with pytest.raises(SystemExit) as exc:
        execute("rlhf", cfg, main)
    assert exc.value.code == 2
    assert "between-round RM update" in capsys.readouterr().err
    assert not (tmp_path / "full" / "checkpoints").exists()


def test_rm_update_workers_share_what_the_roles_leave_free(monkeypatch):
    # rm_update_workers.num_workers=2 with cpus_per_worker=0 sized each worker to all the free CPUs: 2 x 0.7 of 0.75.
    import ray

    from jobs.rlhf import RMUpdateWorkers
    from jobs.rlhf_preflight import rm_update_overrides

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.75})
    assert rm_update_overrides(RMUpdateWorkers())["cpus_per_worker"] == pytest.approx(0.7)
    two = rm_update_overrides(RMUpdateWorkers(num_workers=2))
    assert two["num_workers"] == 2 and 2 * two["cpus_per_worker"] <= 0.75 - 0.05 + 1e-9 and two["cpus_per_worker"] > 0.3
