"""jobs/quantize.py end to end on the tiny model: int8 checkpoint, perplexity check, summary, defaults."""
from __future__ import annotations

import json
import os
import time

import pytest

from jobs import quantize as qjob
from jobs.common import ConfigError, execute, load_config

SMALL = ["logging.wandb=disabled", "perplexity.window=64", "perplexity.max_docs=8", "quant.max_blocks=4",
         "quant.speed_tokens=4"]


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("qjob")
    cfg = load_config("quantize", qjob.QuantizeJobConfig, [f"model.path={tiny_dir}", f"run.root={root}", *SMALL])
    path = execute("quantize", cfg, qjob.main)
    return json.loads(path.read_text()), root


def test_summary_reports_both_perplexities_and_their_ratio(quantized, tiny_dir):
    summary, _ = quantized
    assert summary["method"] == "int8_dynamic"
    assert summary["source_model"] == str(tiny_dir)
    assert summary["ppl_ratio"] == pytest.approx(summary["ppl_quantized"] / summary["ppl_original"])
    assert summary["ppl_ratio"] <= 1.05  # the job's default check passed
    # 4 blocks of 64 tokens were scored: the counts in the summary are the real ones.
    assert summary["eval_tokens"] == 4 * 64
    assert summary["tokens_per_s_original"] > 0 and summary["tokens_per_s_quantized"] > 0
    # int8 moves the distributions a little, not at all would mean the float model was measured twice.
    assert 0 < summary["kl_mean"] <= 0.05 and 0.5 < summary["top1_agreement"] <= 1


class _FixedLogits:
    """A stand-in causal LM whose logits at every position are `row` (vocabulary of len(row))."""

    def __init__(self, row: list[float]):
        import torch

        self.row, self.param = torch.tensor(row), torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.param])

    def __call__(self, input_ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1).clone())


def test_fidelity_is_the_mean_kl_and_top1_agreement_derived_by_hand():
    import math

    import torch

    from modeling.quantize import fidelity

    blocks = torch.zeros((3, 5), dtype=torch.long)  # 3 blocks x 4 scored positions
    # p = softmax([1, 0]) = (e, 1) / (1 + e), q its mirror: KL(p || q) = (p0 - p1) * ln(p0 / p1) = tanh(1/2) * 1;
    # the argmaxes differ everywhere.
    got = fidelity(_FixedLogits([1.0, 0.0]), _FixedLogits([0.0, 1.0]), blocks, batch_size=2)
    assert got["kl_mean"] == pytest.approx(math.tanh(0.5), rel=1e-6) and got["top1_agreement"] == 0.0
    # p uniform over 2, q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); both argmaxes are token 0.
    got = fidelity(_FixedLogits([0.0, 0.0]), _FixedLogits([math.log(3.0), 0.0]), blocks)
    assert got["kl_mean"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6) and got["top1_agreement"] == 1.0
    same = fidelity(_FixedLogits([0.3, -1.0, 2.0]), _FixedLogits([0.3, -1.0, 2.0]), blocks)
    assert same == {"kl_mean": pytest.approx(0.0, abs=1e-7), "top1_agreement": 1.0}


def test_the_fidelity_gate_fails_a_quantization_that_moves_the_distribution_too_far(tiny_dir, tmp_path):
    cfg = load_config("quantize", qjob.QuantizeJobConfig,
                      [f"model.path={tiny_dir}", f"run.root={tmp_path}", "quant.max_kl=1e-9", *SMALL])
    failed = r"fidelity check failed: int8_dynamic .* \(> quant.max_kl=1e-09; top-1 agreement"
    with pytest.raises(RuntimeError, match=failed):
        execute("quantize", cfg, qjob.main)


def test_written_checkpoint_is_an_int8_recipe_that_scores_the_reported_perplexity(quantized):
    import torch

    from data import evalsets as ev
    from modeling.loading import load_tokenizer
    from modeling.quantize import load_quantized, perplexity, read_recipe, token_blocks

    summary, _ = quantized
    model_dir = summary["model_dir"]
    assert read_recipe(model_dir)["method"] == "int8_dynamic"
    model = load_quantized(model_dir)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
    # Recompute the quantized perplexity from the checkpoint on the same held-out blocks.
    texts, _, _ = qjob.eval_texts(ev.PerplexityConfig(window=64, max_docs=8))
    blocks = token_blocks(load_tokenizer(model_dir), texts, 64, 4)
    with torch.no_grad():
        assert perplexity(model, blocks) == pytest.approx(summary["ppl_quantized"], rel=1e-6)


def test_heldout_and_calibration_texts_do_not_overlap():
    from data import evalsets as ev

    heldout, calib, source = qjob.eval_texts(ev.PerplexityConfig(max_docs=1000))
    assert heldout and calib and source
    assert not set(heldout) & set(calib[-50:])  # calibration is cut before the held-out tail


def test_empty_model_path_takes_the_newest_checkpoint_of_earlier_runs(tmp_path):
    from jobs.serve import newest_model_dir

    root = tmp_path / "outputs"
    with pytest.raises(FileNotFoundError, match="make demo"):
        newest_model_dir(root)

    def model(name: str):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        return d

    def summary(name: str, job: str, model_dir, age_s: float):
        path = root / name / "summary.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"job": job, "model_dir": str(model_dir)}))
        os.utime(path, (time.time() - age_s, time.time() - age_s))

    sft, int8 = model("sft-model"), model("int8-model")
    summary("sft", "sft", sft, age_s=300)
    summary("gone", "rlhf", tmp_path / "deleted-model", age_s=10)  # newer, but its model no longer exists
    summary("quantize", "quantize", int8, age_s=5)
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text("{half written")
    assert newest_model_dir(root) == int8
    assert newest_model_dir(root, exclude_jobs=("quantize",)) == sft


def test_config_errors_and_gpu_methods_on_cpu(tiny_dir, tmp_path):
    with pytest.raises(ConfigError):
        load_config("quantize", qjob.QuantizeJobConfig, ["quant.method=int3"])
    with pytest.raises(ConfigError):
        load_config("quantize", qjob.QuantizeJobConfig, ["quant.max_ppl_ratio=0.5"])
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp8 would really run")
    cfg = load_config("quantize", qjob.QuantizeJobConfig,
                      [f"model.path={tiny_dir}", f"run.root={tmp_path}", "quant.method=fp8_dynamic", *SMALL])
    with pytest.raises(RuntimeError, match="CUDA GPU.*int8_dynamic"):
        execute("quantize", cfg, qjob.main)


def test_a_method_whose_package_is_missing_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    # torchao is an optional extra: without it int8_weight_only must say so at once (with the install line), not
    # after loading and scoring the model. The model path does not even exist: the check comes first.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    cfg = load_config("quantize", qjob.QuantizeJobConfig,
                      [f"model.path={tmp_path}/no-such-model", f"run.root={tmp_path}", "quant.method=int8_weight_only",
                       *SMALL])
    with pytest.raises(RuntimeError, match=r"needs torchao, which is not installed: pip install .*\[quant\]"):
        execute("quantize", cfg, qjob.main)
