"""The whole chain on the tiny embedded default, in one process and one Ray instance.

    make demo            # == python jobs/demo.py: the whole chain
    python jobs/demo.py stages=[data,pretrain,world,sft]   # a prefix of the chain
    python jobs/demo.py 'overrides.rlhf=["rounds=1"]'      # extra overrides for one stage (quoted: they hold '=')

Each stage is the real job (`jobs/<stage>.py`) run through the same config loading and run-dir contract as its
CLI, into `<run.root>/<run.name>/<stage>/`; later stages read earlier stages' `summary.json`. The demo's own
summary.json links every stage summary and repeats the headline figures; its last lines recap the RLHF
before/after oracle scores, the evaluation report's path and the served model's answer.
"""
from __future__ import annotations

import importlib
import json
import pathlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

from cluster.runtime import ClusterConfig, init_ray  # noqa: E402
from jobs.common import LoggingConfig, Run, RunConfig, execute, load_config, run_job  # noqa: E402

CHAIN = ["data", "pretrain", "world", "sft", "reward", "rlhf", "quantize", "eval", "serve"]
DEFAULT_STAGES = list(CHAIN)  # what `make demo` runs


@dataclass
class DemoJobConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="demo"))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    # Extra Hydra overrides per stage, e.g. 'overrides.sft=["trainer.max_steps=50"]' (each quoted, since it holds
    # '='). Every stage has an entry, so overrides.<stage>=... needs no '+'.
    overrides: dict[str, list[str]] = field(default_factory=lambda: {stage: [] for stage in CHAIN})

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in CHAIN]
        if unknown:
            raise ValueError(f"demo.stages has unknown stage(s) {unknown}; the chain is {CHAIN}")
        bad = [s for s in self.overrides if s not in CHAIN]
        if bad:
            raise ValueError(f"demo.overrides has unknown stage(s) {bad}; the chain is {CHAIN}")


def _model_dir(summaries: dict[str, dict], *stages: str) -> str:
    for stage in stages:
        if stage in summaries and summaries[stage].get("model_dir"):
            return summaries[stage]["model_dir"]
    raise RuntimeError(f"the demo needs one of the stages {stages} to have run first (it provides model_dir)")


# How each stage is wired to the ones before it: stage -> f(summaries) -> Hydra overrides.
WIRING: dict[str, Callable[[dict[str, dict]], list[str]]] = {}


def _wire(stage: str):
    def deco(fn):
        WIRING[stage] = fn
        return fn

    return deco


@_wire("data")
def _(s):
    return []


@_wire("pretrain")
def _(s):
    return [f"data.packed_dir={s['data']['packed_dir']}", f"model.tokenizer_path={s['data']['tokenizer_dir']}"]


@_wire("world")
def _(s):
    return []


# SFT on the world's 3,000 chats: 600 steps x 8 rows per worker (~1.6 epochs). The demonstrations mix good, bare
# and wrong answers (data/world: sft_mix); at 250 x 4 the tiny model had not learnt that mix (0.42 held-out, sampled,
# with garbled samples an RM cannot judge), at 600 x 8 it samples clean answers in the mix's proportions (0.67; 0.78
# since concise/detailed users state their wish, which it learns to follow).
# At 100 x 2 (sft.yaml's default, sized for the shipped samples) it is barely trained (docs/design.md).
DEMO_SFT = ["trainer.max_steps=600", "trainer.micro_batch_size=8"]


@_wire("sft")
def _(s):
    out = [f"model.path={_model_dir(s, 'pretrain')}"]
    if "world" in s:
        out += [f"data.paths=[{s['world']['sft_path']}]", *DEMO_SFT]
    return out


@_wire("reward")
def _(s):
    out = [f"model.path={_model_dir(s, 'sft', 'pretrain')}"]
    if "world" in s:
        out.append(f"data.world_dir={s['world']['run_dir']}")
    return out


@_wire("rlhf")
def _(s):
    out = [f"policy.path={_model_dir(s, 'sft')}", f"reward.path={s['reward']['model_dir']}"]
    if "data" in s:  # PTX: the pretraining rows the policy keeps modelling while PPO updates it
        out.append(f"ptx.packed_dir={s['data']['packed_dir']}")
    return out


@_wire("quantize")
def _(s):
    return [f"model.path={_model_dir(s, 'rlhf', 'sft', 'pretrain')}"]


@_wire("eval")
def _(s):
    ckpts = {name: s[name]["model_dir"] for name in ("pretrain", "sft", "rlhf") if name in s}
    out = ["checkpoints={" + ",".join(f"{k}:'{v}'" for k, v in ckpts.items()) + "}"]
    if "sft" in s:
        out.append("baseline=sft")
    if "reward" in s:
        out.append(f"rm_path={s['reward']['model_dir']}")
    if "rlhf" in s:
        out.append(f"rlhf_run_dir={s['rlhf']['run_dir']}")
    return out


@_wire("serve")
def _(s):
    return [f"model.path={s['quantize']['model_dir'] if 'quantize' in s else _model_dir(s, 'rlhf', 'sft')}", "smoke=true"]


def run_stage(stage: str, demo_dir: Path, cfg: DemoJobConfig, summaries: dict[str, dict]) -> dict:
    module = importlib.import_module(f"jobs.{stage}")
    schema = next(v for k, v in vars(module).items() if k.endswith("JobConfig"))
    overrides = [f"run.root={demo_dir}", f"run.name={stage}", f"run.seed={cfg.run.seed}",
                 f"logging.wandb={cfg.logging.wandb}", f"logging.project={cfg.logging.project}"]
    overrides += WIRING[stage](summaries) + list(cfg.overrides.get(stage, []))
    print(f"\n=== demo stage: {stage}\n    python jobs/{stage}.py {' '.join(overrides)}", file=sys.stderr, flush=True)
    stage_cfg = load_config(stage, schema, overrides)
    path = execute(stage, stage_cfg, module.main)
    print(f"    {stage} summary: {path}", file=sys.stderr, flush=True)
    return json.loads(Path(path).read_text())


def main(cfg: DemoJobConfig, run: Run) -> dict:
    init_ray(cfg.cluster)
    demo_dir = run.dir
    summaries: dict[str, dict] = {}
    for stage in cfg.stages:
        summaries[stage] = run_stage(stage, demo_dir, cfg, summaries)
        run.logger.log({f"demo/{stage}_seconds": summaries[stage].get("seconds", 0.0)})
    recap(summaries)
    return {
        "stages": {k: str(Path(v["run_dir"]) / "summary.json") for k, v in summaries.items()},
        "headline": {k: {h: v[h] for h in v if h not in ("job", "run_dir")} for k, v in summaries.items()},
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def recap(summaries: dict[str, dict]) -> None:
    """What a person wants to see last: did RLHF help, where is the report, what does the served model say."""
    lines = []
    if "rlhf" in summaries:
        r = summaries["rlhf"]
        greedy = ""
        if "oracle_score_greedy_sft" in r:
            greedy = f" [greedy {r['oracle_score_greedy_sft']:.3f} -> {r['oracle_score_greedy_final']:.3f}]"
        se = r.get("oracle_score_gain_se")
        gain = f" (gain {r['oracle_score_final'] - r['oracle_score_sft']:+.3f} +- {se:.3f})" if se is not None else ""
        lines.append(f"RLHF: held-out oracle score {r['oracle_score_sft']:.3f} (SFT) -> {r['oracle_score_final']:.3f} "
                     f"(after {r['rounds']} rounds){gain}{greedy}, KL {_fmt(r.get('kl_final_k3'))} (k3), hack rate by round "
                     f"{[round(h, 3) for h in r['hack_rate_by_round']]}, RM agrees with the labeler on the policy's replies "
                     f"{[None if a is None else round(a, 2) for a in r.get('rm_label_agreement_by_round', [])]}")
    if "eval" in summaries:
        lines.append(f"evaluation report: {summaries['eval']['report']}")
    if "serve" in summaries and summaries["serve"].get("smoke_reply") is not None:
        s = summaries["serve"]
        lines.append(f"served {s.get('model_dir', '')} at {s.get('url', '')}; asked {s.get('smoke_prompt', '')!r}, "
                     f"it answered {s['smoke_reply']!r}")
    if lines:
        print("\n=== demo recap\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
    run_job("demo", DemoJobConfig, main)
