"""jobs/eval.py end to end on the tiny model, through the real job code and Ray Data with 2 workers.

One run evaluates three columns at once (Ray Data pools dominate the cost): `oracle` answers with the world's
reference answers and the needle (engine `reference`), `floor` answers "" (engine `constant`), and `sft` is the
tiny random model itself (engine `hf`). Known answers: oracle scores 1.0 per domain and 100 on the needle,
floor 0.0 and 0, oracle beats floor in every order-swapped annotator comparison, and the hf perplexity equals
an independent one-window-at-a-time computation with transformers' own loss.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest

from jobs import eval as eval_job
from jobs.common import ConfigError, load_config, run_job

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 6,  # longer than one 32-token window
    "Return a list of the files in a directory.",
    "Parse the string and return the number it holds; raise ValueError when it holds none. " * 2,
]
WINDOW = 32
RLHF_ROWS = [
    {"step": 0, "round": 0, "reward/raw_mean": 0.1, "kl": 0.0, "response_length/mean": 10},
    {"step": 1, "round": 0, "reward/raw_mean": 0.3, "kl": 0.02, "response_length/mean": 14},
    {"step": 2, "round": 1, "reward/raw_mean": 0.4, "kl": 0.03, "response_length/mean": 16},
]


@pytest.fixture(scope="module")
def eval_run(ray_cluster, tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    (tmp / "heldout.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    rlhf_dir = tmp / "rlhf"
    rlhf_dir.mkdir()
    (rlhf_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RLHF_ROWS))
    argv = [
        f"run.root={tmp}", "logging.wandb=offline", "logging.progress=false",
        f"+checkpoints.oracle={tiny_dir}", "+engines.oracle=reference",
        f"+checkpoints.floor={tiny_dir}", "+engines.floor=constant",
        f"checkpoints.sft={tiny_dir}",
        "baseline=floor", f"rlhf_run_dir={rlhf_dir}",
        "inference.workers=2", "inference.batch_size=4",
        "domain_scores.domains=[math,helpful]", "domain_scores.n_per_domain=3", "generation.max_new_tokens=6",
        "needle.lengths=[160,320]", "needle.depths=3", "needle.max_new_tokens=6",
        f"perplexity.path={tmp / 'heldout.jsonl'}", "perplexity.heldout_fraction=1.0", f"perplexity.window={WINDOW}",
    ]
    return tmp, argv


@pytest.fixture(scope="module")
def eval_result(eval_run):
    tmp, argv = eval_run
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        path = run_job("eval", eval_job.EvalJobConfig, eval_job.main, argv=argv)
    return Path(path), json.loads(Path(path).read_text()), out.getvalue()


def test_prints_report_then_summary_last(eval_result):
    path, summary, stdout = eval_result
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"summary: {path}"
    assert lines[-2] == f"report: {summary['report']}"


def test_oracle_scores_one_and_floor_zero(eval_result):
    _, summary, _ = eval_result
    ckpts = summary["checkpoints"]
    assert list(ckpts) == ["sft", "oracle", "floor"]  # the chain's slots first, then added names
    assert ckpts["oracle"]["domain_scores"] == {"math": 1.0, "helpful": 1.0}
    assert ckpts["floor"]["domain_scores"] == {"math": 0.0, "helpful": 0.0}
    # The oracle wins every order-swapped comparison against the empty floor.
    assert ckpts["oracle"]["win_rate"]["annotator"] == 1.0
    assert ckpts["oracle"]["win_rate"]["baseline"] == "floor"
    assert ckpts["floor"]["win_rate"] is None  # the baseline itself
    assert 0.0 <= ckpts["sft"]["win_rate"]["annotator"] <= 1.0


def test_needle_reproduced_scores_100_and_empty_scores_0(eval_result):
    _, summary, _ = eval_result
    oracle, floor = summary["checkpoints"]["oracle"]["needle"], summary["checkpoints"]["floor"]["needle"]
    assert oracle["lengths"] == [160, 320] and oracle["depths"] == [0.0, 50.0, 100.0]
    assert oracle["grid"] == [[100.0, 100.0]] * 3 and oracle["mean"] == 100.0
    assert floor["grid"] == [[0.0, 0.0]] * 3 and floor["mean"] == 0.0
    assert oracle["exact_match"] == 1.0 and floor["exact_match"] == 0.0
    sft = summary["checkpoints"]["sft"]["needle"]
    assert len(sft["grid"]) == 3 and all(0.0 <= v <= 100.0 for row in sft["grid"] for v in row)


def test_needle_prompts_fit_their_lengths(eval_result):
    path, _, _ = eval_result
    rows = [json.loads(ln) for ln in (path.parent / "responses" / "oracle.jsonl").read_text().splitlines()]
    needles = [r for r in rows if r["suite"] == "needle"]
    assert len(needles) == 6
    assert all(r["length"] - 4 <= r["prompt_tokens"] <= r["length"] for r in needles)


def test_hf_perplexity_matches_an_independent_computation(eval_result, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, summary, _ = eval_result
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    nll, tokens = 0.0, 0
    # Same windows as the worker (BOS + up to WINDOW-1 text tokens, each text token predicted once), but one
    # window per forward pass, unpadded, with transformers' own mean loss: exp(sum NLL / tokens).
    for text in DOCS:
        ids = tok(text, add_special_tokens=False).input_ids
        for s in range(0, len(ids), WINDOW - 1):
            w = torch.tensor([[tok.bos_token_id] + ids[s:s + WINDOW - 1]])
            with torch.no_grad():
                loss = model(input_ids=w, labels=w).loss.item()
            nll += loss * (w.shape[1] - 1)
            tokens += w.shape[1] - 1
    assert summary["checkpoints"]["sft"]["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert summary["checkpoints"]["oracle"]["perplexity"] is None  # a baseline engine has no likelihoods


def test_two_ray_data_workers_shared_the_rows(eval_result):
    path, _, _ = eval_result
    results = json.loads((path.parent / "results.json").read_text())
    for name in ("sft", "oracle", "floor"):
        assert len(results["checkpoints"][name]["workers"]) == 2, name


def test_report_table_plots_and_wandb(eval_result):
    path, summary, _ = eval_result
    md = Path(summary["report"]).read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["metric", "sft", "oracle", "floor"]
    assert set(summary["plots"]) == {"needle/sft", "needle/oracle", "needle/floor", "domain_scores", "rlhf_curves"}
    for png in summary["plots"].values():
        data = Path(png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000
    assert "## RLHF run: per-round means" in md
    assert "| 0 | 2 | 0.200 |" in md  # round 0: 2 iterations, reward (0.1 + 0.3) / 2
    assert any((path.parent / "wandb").glob("offline-run-*"))
    logged = [json.loads(ln) for ln in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("eval/oracle/needle_mean") == 100.0 for r in logged)


def test_config_errors_name_the_fix(tiny_dir, capsys):
    with pytest.raises(ConfigError):
        load_config("eval", eval_job.EvalJobConfig, ["+engines.nope=reference"])
    assert "+checkpoints.nope=PATH" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_config("eval", eval_job.EvalJobConfig, [f"checkpoints.sft={tiny_dir}", "+engines.sft=vllm"])
    with pytest.raises(ConfigError):
        load_config("eval", eval_job.EvalJobConfig, [f"checkpoints.sft={tiny_dir}", "baseline=rlhf"])
    cfg = load_config("eval", eval_job.EvalJobConfig, [])
    with pytest.raises(ValueError, match="checkpoints.sft=/abs/path"):
        eval_job.main(cfg, run=None)


def test_baseline_engines_without_ray(tiny_dir):
    from modeling.eval_model import EvalModelWorker, generate_row, nll_row

    rows = [generate_row([{"role": "user", "content": "hi"}], 4, reference="REF", idx=0), nll_row("some text", idx=1)]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    with pytest.raises(ValueError, match="no likelihoods"):
        EvalModelWorker(str(tiny_dir), engine="reference")(batch)
    out = EvalModelWorker(str(tiny_dir), engine="reference")({k: v[:1] for k, v in batch.items()})
    assert list(out["response"]) == ["REF"]
    out = EvalModelWorker(str(tiny_dir), engine="constant", constant_response="x")({k: v[:1] for k, v in batch.items()})
    assert list(out["response"]) == ["x"]


def test_a_quantized_checkpoint_is_evaluated_quantized(tiny_dir, tmp_path):
    # jobs/quantize.py writes the float weights plus a recipe; the eval worker used to load only the float weights,
    # so a quantized column reported the original model's numbers (identical perplexity and answers).
    from modeling.eval_model import EvalModelWorker
    from modeling.quantize import load_quantized, save_quantized

    q_dir = save_quantized(tiny_dir, tmp_path / "int8", "int8_dynamic")
    text = "def add(a, b):\n    return a + b\n" * 4
    fp32, int8 = EvalModelWorker(str(tiny_dir)), EvalModelWorker(str(q_dir))
    reference = EvalModelWorker(str(tiny_dir))
    reference.model = load_quantized(q_dir)  # what the CPU serving engine runs for that directory
    assert int8.nll([text]) != fp32.nll([text])
    assert int8.nll([text]) == reference.nll([text])
    assert (fp32.quantization, int8.quantization) == ("none", "int8_dynamic")


class LengthRM:
    """A stand-in reward model for the Ray Data RM pass: reward = response length (known in advance)."""

    def __init__(self, rm_path: str):
        self.rm_path = rm_path

    def __call__(self, batch):
        import numpy as np

        return {"idx": np.asarray(batch["idx"]), "reward": np.asarray([float(len(r)) for r in batch["response"]])}


def test_rm_rewards_keep_each_checkpoint_aligned_with_its_prompts(ray_cluster):
    from cluster.batch_infer import BatchInferenceConfig
    from data.world import make_prompts

    prompts = make_prompts("math", 3, seed=0, split="heldout")
    responses = {"a": ["x", "xxx", "xx"], "b": ["yy", "yy", "yy"]}
    rewards = eval_job.rm_rewards("/unused", prompts, responses, BatchInferenceConfig(workers=1, batch_size=2),
                                  scorer_cls=LengthRM)
    assert rewards == {"a": [1.0, 3.0, 2.0], "b": [2.0, 2.0, 2.0]}
    # RM judge: a vs b per prompt = lose (1 < 2), win (3 > 2), tie (2 = 2) -> (0 + 1 + 0.5) / 3 = 0.5.
    # Annotator that prefers the longer answer (first shown on a tie): a wins "xxx", loses "x", splits "xx" vs "yy".
    rates = eval_job.win_rates(prompts, responses, "b", rewards, lambda p, x, y: 0 if len(x) >= len(y) else 1)
    assert set(rates) == {"a"}
    assert rates["a"]["rm"] == pytest.approx(0.5)
    assert rates["a"]["annotator"] == pytest.approx(0.5)
    assert rates["a"]["rm_by_domain"] == {"math": pytest.approx(0.5)}
    only_rm = eval_job.win_rates(prompts, responses, "b", rewards, None)
    assert only_rm["a"]["annotator"] is None


@pytest.mark.skipif(importlib.util.find_spec("actors.reward") is None,
                    reason="actors/reward.py (the conditional RM worker) is not built yet")
def test_rm_judge_through_the_real_reward_worker(ray_cluster, tiny_dir, tmp_path):
    """The RM adapter on the conditional RM worker (actors/reward.py), against in-process scores."""
    from actors import reward
    from cluster.batch_infer import BatchInferenceConfig
    from data.world import make_prompts
    from modeling.reward import RewardModel, RewardModelConfig

    model, tok = RewardModel.from_causal_lm(str(tiny_dir), RewardModelConfig())  # untrained: any scores will do
    rm_dir = model.save_pretrained(tmp_path / "rm", tok)
    prompts = make_prompts("math", 2, seed=0, split="heldout") + make_prompts("concise", 2, seed=0, split="heldout")
    responses = {"a": ["1 + 1 = 2.", "I do not know.", "Keep it dry.", "ok"], "b": ["2", "3", "Keep it dry.", "no"]}
    rewards = eval_job.rm_rewards(str(rm_dir), prompts, responses, BatchInferenceConfig(workers=1, batch_size=3))
    direct = reward.RewardWorker(str(rm_dir))
    for name, resp in responses.items():
        items = [{"domain": p.domain, "messages": p.messages, "response": r} for p, r in zip(prompts, resp)]
        assert rewards[name] == pytest.approx(direct.score(items), abs=1e-5)
    # The same response to the same prompt gets the same reward: that pair is a tie, counted half.
    assert eval_job.win_rates(prompts, responses, "b", rewards, None)["a"]["rm_by_domain"]["concise"] in (0.25, 0.75)
