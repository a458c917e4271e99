"""Shared by the RLHF job tests: a tiny RM built from the tiny model, base preference pairs, small-run overrides."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def rlhf_inputs(tiny_dir, tmp_path_factory) -> dict[str, str]:
    """{"sft", "rm", "pairs"}: the tiny model as SFT, a freshly initialised conditional RM, world pairs as JSONL."""
    from data.io import atomic_write_jsonl
    from data.world import DOMAINS, preference_pairs
    from modeling.reward import RewardModel, RewardModelConfig

    root = tmp_path_factory.mktemp("rlhf_inputs")
    model, tok = RewardModel.from_causal_lm(str(tiny_dir), RewardModelConfig(), seed=1)
    rm = model.save_pretrained(root / "rm", tok)
    pairs = atomic_write_jsonl(root / "pairs.jsonl", [r for d in DOMAINS for r in preference_pairs(d, 6, seed=0)])
    return {"sft": str(tiny_dir), "rm": str(rm), "pairs": str(pairs)}


def small_run(inputs: dict[str, str], root: Path, name: str, *extra: str) -> list[str]:
    """Overrides for a seconds-scale run: 8 prompts x 8 new tokens, 1 critic warm-up iteration, tiny online round."""
    return [
        f"run.root={root}", f"run.name={name}", "logging.wandb=disabled", "logging.progress=false",
        f"policy.path={inputs['sft']}", f"reward.path={inputs['rm']}", f"reward.base_pairs_path={inputs['pairs']}",
        "ppo.rollout_batch_size=8", "ppo.critic_warmup_iterations=1",
        "policy.trainer.micro_batch_size=4", "critic.trainer.micro_batch_size=4",
        "rollout.sampling.max_new_tokens=8", "eval.heldout_per_domain=2", "prompts.pool_per_domain=16",
        "online.prompts_per_source=6", "online.slow_pairs_per_round=4", "online.pairs_per_pattern_min=1",
        "online.extra_sampling_tries=0", "online.pattern_checks=2", "online.rm_update.max_steps=2",
        *extra,
    ]


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """The last logged row of every PPO iteration (a resumed run may have logged an iteration twice)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "reward/raw_mean" in row:
            rows[int(row["iteration"])] = row
    return rows
