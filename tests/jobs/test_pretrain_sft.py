"""jobs/pretrain.py -> jobs/sft.py on the tiny model through Ray Train, plus their config contract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.runtime_env import REPO_ROOT
from jobs.common import execute, load_config
from jobs.pretrain import PretrainJobConfig
from jobs.pretrain import main as pretrain_main
from jobs.sft import SFTJobConfig, resolve_input
from jobs.sft import main as sft_main
from tests.trainer.lm_data import make_packed_corpus
from trainer.config import LoraConfig, TrainerConfig


def test_yaml_defaults_follow_run_root_and_seed():
    cfg = load_config("pretrain", PretrainJobConfig, ["run.root=/abs/runs", "run.seed=7", "trainer=deepspeed_zero3"])
    assert cfg.data.packed_dir == "/abs/runs/data/packed" and cfg.model.tokenizer_path == "/abs/runs/data/tokenizer"
    assert (cfg.trainer.backend, cfg.trainer.zero_stage, cfg.trainer.seed) == ("deepspeed", 3, 7)
    sft = load_config("sft", SFTJobConfig, ["trainer=lora", "trainer.lr=1e-5"])
    assert sft.trainer.lora.enabled and sft.trainer.backend == "ddp" and sft.trainer.lr == 1e-5
    assert sft.data.paths == ["data/sample_sft"] and sft.model.path == ""
    assert load_config("sft", SFTJobConfig, ["model=hf", "run.root=/r"]).model.path == "/r/pretrain/model"


def test_mistyped_override_fails_before_work_naming_valid_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config("sft", SFTJobConfig, ["trainer.lrr=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'trainer.lrr'. Did you mean 'trainer.lr'?" in err
    assert "Valid keys under 'trainer': backend, betas, bf16," in err


def test_qlora_without_a_gpu_is_refused_with_the_reason(ray_cluster):
    from cluster.train import check_resources
    from trainer.engine import apply_lora

    cfg = TrainerConfig(gpus_per_worker=1, lora=LoraConfig(enabled=True, qlora=True))
    with pytest.raises(ValueError, match=r"has no GPU \(QLoRA needs a CUDA GPU and bitsandbytes\)"):
        check_resources(cfg)  # before Ray Train would wait forever for a GPU
    with pytest.raises(ValueError, match="QLoRA needs a CUDA GPU and the bitsandbytes package"):
        apply_lora(torch.nn.Linear(2, 2), cfg)  # and on a worker that has none


def test_relative_sft_paths_fall_back_to_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as under `ray job submit`
    assert resolve_input("data/sample_sft") == sorted((REPO_ROOT / "data" / "sample_sft").glob("*.jsonl"))
    with pytest.raises(FileNotFoundError, match="data.paths entry 'nope.jsonl' not found"):
        resolve_input("nope.jsonl")


def test_pretrain_then_sft_end_to_end(ray_cluster, tiny_dir, tmp_path):
    packed = make_packed_corpus(tiny_dir, tmp_path / "data" / "packed", seq_len=32, rows=64)
    common = [f"run.root={tmp_path}", "trainer.max_steps=4", "trainer.checkpoint_every=2", "logging.progress=false"]
    pre_cfg = load_config("pretrain", PretrainJobConfig, common + [
        f"data.packed_dir={packed}", f"model.tokenizer_path={tiny_dir}", "trainer.micro_batch_size=4",
    ])
    pre = json.loads(execute("pretrain", pre_cfg, pretrain_main).read_text())
    assert pre["steps"] == 4 and pre["tokens"] == 4 * 2 * 4 * 32  # steps x ranks x rows x tokens
    assert pre["final_loss"] > 0 and pre["tokens_per_second"] > 0
    assert Path(pre["checkpoint_dir"]).name == "step_00000004"
    assert sorted(p.name for p in (tmp_path / "pretrain" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    rows = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"train/lr", "train/grad_norm", "train/tokens_per_second"} <= set(r) for r in steps)
    assert steps[-1]["train/loss"] == pytest.approx(pre["final_loss"])

    sft_cfg = load_config("sft", SFTJobConfig, common + [
        f"model.path={pre['model_dir']}", "data.max_length=128", "sample_max_new_tokens=8",
        f"data.paths=[{REPO_ROOT}/data/sample_sft/openai.jsonl,data/sample_sft/alpaca.jsonl]",
    ])
    sft = json.loads(execute("sft", sft_cfg, sft_main).read_text())
    assert sft["steps"] == 4 and sft["skipped_rows"] == 0 and sft["dropped_rows"] == 1  # alpaca's <nooutput>
    assert sft["conversations"] == 8 + 9 and sft["sample_prompt"] == "What is the capital of France?"
    assert isinstance(sft["sample_response"], str)
    model = AutoModelForCausalLM.from_pretrained(sft["model_dir"])
    start = AutoModelForCausalLM.from_pretrained(pre["model_dir"])
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)  # SFT started from pretrain and moved
    assert (Path(sft["model_dir"]) / "tokenizer.json").exists() and (Path(sft["model_dir"]) / "config.json").exists()
