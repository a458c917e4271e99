"""jobs/demo.py's wiring: every stage of the default chain gets overrides that its own config schema accepts,
built from the summaries of the stages before it (no training here; the chain itself runs in `make demo`)."""
from __future__ import annotations

import importlib

import pytest

from jobs import demo
from jobs.common import load_config


def fake_summaries(root) -> dict[str, dict]:
    d = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    return {
        "data": {"run_dir": d("data"), "packed_dir": d("data", "packed"), "tokenizer_dir": d("data", "tokenizer")},
        "pretrain": {"run_dir": d("pretrain"), "model_dir": d("pretrain", "model")},
        "world": {"run_dir": d("world"), "sft_path": d("world", "sft.jsonl")},
        "sft": {"run_dir": d("sft"), "model_dir": d("sft", "model")},
        "reward": {"run_dir": d("reward"), "model_dir": d("reward", "model")},
        "rlhf": {"run_dir": d("rlhf"), "model_dir": d("rlhf", "model")},
        "quantize": {"run_dir": d("quantize"), "model_dir": d("quantize", "model")},
        "eval": {"run_dir": d("eval"), "report": d("eval", "report.md")},
    }


def test_default_demo_is_the_whole_chain():
    assert demo.DEFAULT_STAGES == demo.CHAIN and set(demo.WIRING) == set(demo.CHAIN)


@pytest.mark.parametrize("stage", demo.CHAIN)
def test_each_stage_gets_overrides_its_schema_accepts(stage, tmp_path):
    before = {k: v for k, v in fake_summaries(tmp_path).items() if demo.CHAIN.index(k) < demo.CHAIN.index(stage)}
    overrides = demo.WIRING[stage](before)
    module = importlib.import_module(f"jobs.{stage}")
    schema = next(v for k, v in vars(module).items() if k.endswith("JobConfig"))
    cfg = load_config(stage, schema, [f"run.root={tmp_path}", f"run.name={stage}", *overrides])
    if stage == "rlhf":  # the chain's pieces meet where they should
        assert cfg.policy.path == before["sft"]["model_dir"] and cfg.reward.path == before["reward"]["model_dir"]
        assert cfg.ptx.packed_dir == before["data"]["packed_dir"]
    if stage == "eval":
        assert set(cfg.checkpoints) == {"pretrain", "sft", "rlhf"} and cfg.baseline == "sft"
        assert cfg.rm_path == before["reward"]["model_dir"] and cfg.rlhf_run_dir == before["rlhf"]["run_dir"]
    if stage == "serve":
        assert cfg.model.path == before["quantize"]["model_dir"] and cfg.smoke


def test_recap_prints_rlhf_gain_report_and_served_answer(capsys):
    demo.recap({
        "rlhf": {"oracle_score_sft": 0.4, "oracle_score_final": 0.55, "rounds": 3, "kl_final": -0.01, "kl_final_k3": 0.5,
                 "oracle_score_greedy_sft": 0.7, "oracle_score_greedy_final": 0.75, "oracle_score_gain_se": 0.0171,
                 "hack_rate_by_round": [0.2, 0.1, 0.05], "rm_label_agreement_by_round": [0.6, None, 0.75]},
        "eval": {"report": "/runs/demo/eval/report.md"},
        "serve": {"model_dir": "/m", "url": "http://127.0.0.1:8000/v1", "smoke_prompt": "Hi", "smoke_reply": "Hello."},
    })
    out = capsys.readouterr().out
    assert "0.400 (SFT) -> 0.550 (after 3 rounds) (gain +0.150 +- 0.017) [greedy 0.700 -> 0.750]" in out and "KL 0.500 (k3)" in out and "[0.6, None, 0.75]" in out and "/runs/demo/eval/report.md" in out and "'Hello.'" in out


def test_extra_overrides_for_one_stage_take_the_documented_form():
    """README: `'overrides.rlhf=["rounds=1"]'`: every stage has an entry (no '+' needed); unquoted, the '=' inside
    a list element is a Hydra grammar error."""
    from jobs.common import ConfigError

    cfg = load_config("demo", demo.DemoJobConfig, ['overrides.rlhf=["rounds=1"]',
                                                   'overrides.world=["world.flattery_pairs=0.5","world.flattery_sft=0.1"]'])
    assert cfg.overrides["rlhf"] == ["rounds=1"] and cfg.overrides["world"][0] == "world.flattery_pairs=0.5"
    assert cfg.overrides["sft"] == [] and set(cfg.overrides) == set(demo.CHAIN)
    with pytest.raises(ConfigError):
        load_config("demo", demo.DemoJobConfig, ["overrides.rlhf=[rounds=1]"])
