"""The RM task and job: conditioning learnt in-process, the full job on Ray Train, data sources and config checks."""
from __future__ import annotations

import json

import pytest

from data.io import RowErrors, atomic_write_jsonl


def _conflict_pairs(n: int, split: str):
    from data.preferences import pair_from_row
    from data.world import conflict_pairs

    return [pair_from_row(r) for r in conflict_pairs(n, seed=0, split=split)]


def test_the_same_pair_under_two_domains_gets_two_preferences(tiny_dir, tmp_path):
    """A short in-process training on conflict pairs only: the condition alone must decide the order."""
    from actors.reward import RewardWorker
    from modeling.reward import RewardEncoder, RewardModelConfig
    from trainer.config import TrainerConfig
    from trainer.lm_tasks import load_any_tokenizer
    from trainer.loop import train
    from trainer.rm_task import RewardTask, encode_pairs, write_encoded

    rm = RewardModelConfig()
    encoded, stats = encode_pairs(_conflict_pairs(150, "train"), RewardEncoder(load_any_tokenizer(str(tiny_dir)), rm))
    assert stats.pairs == 300 and stats.too_long == 0
    task = RewardTask(data_path=str(write_encoded(encoded, tmp_path / "data")), tokenizer_path=str(tiny_dir), rm=rm,
                      max_tokens_per_batch=2048)
    cfg = TrainerConfig(num_workers=1, lr=3e-3, epochs=3, weight_decay=0.01, betas=[0.9, 0.999], checkpoint_every=0)
    result = train(task, cfg, tmp_path / "run")
    worker = RewardWorker(result.model_dir)
    flips, held = 0, _conflict_pairs(40, "heldout")[::2]  # concise rows; the detailed row has the same texts
    for p in held:
        short, long_ = p.chosen, p.rejected
        items = [{"domain": d, "messages": p.messages, "response": r} for d in ("concise", "detailed") for r in (short, long_)]
        s_short_c, s_long_c, s_short_d, s_long_d = worker.score(items)
        flips += (s_short_c > s_long_c) and (s_long_d > s_short_d)
    assert flips / len(held) >= 0.8, f"only {flips}/{len(held)} held-out conflicts flip with the condition"


def _job_cfg(tmp_path, tiny_dir, *extra):
    from jobs.common import load_config
    from jobs.reward import RewardJobConfig

    return load_config("reward", RewardJobConfig, [
        f"run.root={tmp_path}", "run.name=rm", "logging.wandb=offline", "logging.progress=false",
        f"model.path={tiny_dir}", "data.world.train_pairs_per_domain=24", "data.world.train_pairs_override.math=24",
        "data.world.train_pairs_override.code=24",
        "data.world.heldout_pairs_per_domain=8", "data.world.conflict_pairs=6", "eval.style_prompts_per_domain=2",
        "trainer.epochs=1", *extra,
    ])


def test_reward_job_trains_both_variants_on_ray_and_reports(ray_cluster, tiny_dir, tmp_path):
    from jobs.common import execute
    from jobs.reward import main
    from modeling.reward import RewardModel

    path = execute("reward", _job_cfg(tmp_path, tiny_dir, "compare_unconditioned=true"), main)
    s = json.loads(path.read_text())
    for key in ("accuracy_by_domain", "conflict_accuracy", "conflict_accuracy_unconditioned", "score_min",
                "score_max", "model_dir", "baseline"):
        assert key in s, key
    assert set(s["accuracy_by_domain"]) == {"helpful", "harmless", "code", "math", "concise", "detailed"}
    assert -5 < s["score_min"] <= s["score_max"] < 5
    # without a condition a conflict's two rows share two scores with opposite labels: exactly one is right
    assert s["conflict_accuracy_unconditioned"] == 0.5 and s["baseline"]["conflict_accuracy"] == 0.5
    assert s["steps"] == s["total_steps"] > 0 and s["train_pairs"] == 6 * 24
    rm = RewardModel.from_pretrained(s["model_dir"])
    base = RewardModel.from_pretrained(s["baseline"]["model_dir"])
    assert rm.cfg.conditional and not base.cfg.conditional
    ev = json.loads((path.parent / "eval.json").read_text())
    assert ev["eval"]["conditional"]["score_histogram"]["counts"] and "style_scores" in ev["eval"]["conditional"]
    assert (path.parent / "eval.png").stat().st_size > 10_000
    logged = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("eval/conditional/conflict_accuracy") == s["conflict_accuracy"] for row in logged)
    assert any("train/loss" in row for row in logged)  # per-step training rows from Ray Train


def test_reward_job_reads_user_files_in_any_format_and_counts_skips(tiny_dir, tmp_path):
    from jobs.reward import load_split

    hh = "\n\nHuman: How do I fix a chair?\n\nAssistant: "
    atomic_write_jsonl(tmp_path / "hh.jsonl", [{"chosen": hh + "Tighten the loose parts.", "rejected": hh + "No."}])
    atomic_write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5.", "domain": "math"},
        {"prompt": "What is 2 + 2?", "chosen": "4."},  # malformed: no rejected
    ])
    cfg = _job_cfg(tmp_path, tiny_dir, f"data.train_paths=[{tmp_path}]", "data.default_domain=helpful",
                   "data.on_error=skip")
    errors = RowErrors(cfg.data.on_error)
    train, source = load_split(cfg, "train", errors)
    assert source == "files" and sorted(p.domain for p in train) == ["helpful", "math"]
    assert errors.skipped == 1 and "mixed.jsonl:2: field 'rejected'" in errors.examples[0]
    assert load_split(cfg, "heldout", errors) == ([], "none")  # own training data: no world eval mixed in


def test_reward_job_config_errors_say_how_to_fix_them(tiny_dir, tmp_path):
    cfg = _job_cfg(tmp_path, tiny_dir, "trainer=lora")  # conf/reward.yaml trains the head next to the adapters
    assert cfg.trainer.lora.enabled and cfg.trainer.lora.modules_to_save == ["head"]
    with pytest.raises(SystemExit):
        _job_cfg(tmp_path, tiny_dir, "trainer=lora", "trainer.lora.modules_to_save=[]")  # a frozen head learns nothing
    with pytest.raises(SystemExit):
        _job_cfg(tmp_path, tiny_dir, "data.max_tokens_per_batch=100")  # cannot hold one rm.max_length pair
