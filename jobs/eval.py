"""Evaluate one or more checkpoints side by side: perplexity, per-domain oracle scores, win rates against a
baseline, needle-in-a-haystack; writes results.json, report.md and PNG plots, and logs them to W&B.

    python jobs/eval.py checkpoints.sft=/abs/sft checkpoints.rlhf=/abs/rlhf baseline=sft rm_path=/abs/rm
    ray job submit --working-dir . -- python jobs/eval.py checkpoints.sft=/abs/sft run.root=/abs/runs
    python jobs/eval.py +checkpoints.upper=/abs/sft +engines.upper=reference   # an upper-bound column

Generation and likelihoods run as Ray Data batch inference: `map_batches` over a pool of `inference.workers`
model actors per checkpoint (cluster/batch_infer.py), so evaluation scales with the cluster. World oracle
scoring and annotator judgements are cheap pure functions and run in the driver; the conditional RM runs as a
second actor pool.

Deviations from the InternLM2 report (spec cool-rlhf.md section 9):
  - the needle is a numeric pass key in English filler (stdlib docstrings), not the Chinese internship
    sentence in zh_finance text; lengths are counted with the checkpoint's own tokenizer, not GPT-4's; the
    scoring is CDME's (whitespace stripped, 100 * (1 - Lev / max length)).
  - subjective evaluation (AlpacaEval, MT-Bench...) is replaced by the preference world: its oracle scores,
    its annotators (judged in both orders, ties half) and the conditional RM as judges.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

import json  # noqa: E402
import re  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

from cluster.batch_infer import BatchInferenceConfig, map_rows  # noqa: E402
from cluster.runtime import ClusterConfig, init_ray  # noqa: E402
from cluster.runtime_env import REPO_ROOT  # noqa: E402
from data import evalsets as ev  # noqa: E402
from data.io import atomic_write_json, atomic_write_jsonl, atomic_write_text  # noqa: E402
from jobs import report  # noqa: E402
from jobs.common import LoggingConfig, Run, RunConfig, progress, run_job  # noqa: E402
from modeling.eval_model import (ENGINES, EvalModelWorker, SamplingConfig, context_limit,  # noqa: E402
                                 count_prompt_tokens, generate_row, nll_row)

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
SAMPLE_CORPUS = REPO_ROOT / "data" / "sample_corpus"


@dataclass
class EvalJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # name -> HF checkpoint dir (or fsspec URL). The chain's three slots exist so `checkpoints.sft=PATH` works;
    # empty slots are skipped. Other names: `+checkpoints.NAME=PATH`. Columns follow this order.
    checkpoints: dict[str, str] = field(default_factory=lambda: {"pretrain": "", "sft": "", "rlhf": ""})
    # name -> engine (hf | reference | constant, see modeling/eval_model.py); unlisted names use hf.
    # Baseline engines still read their checkpoint's tokenizer and context limit (for the needle prompts).
    engines: dict[str, str] = field(default_factory=dict)
    constant_response: str = ""  # what the `constant` engine answers
    baseline: str = ""  # the checkpoint the win rates are against; "" = the first one
    rm_path: str = ""  # conditional reward model dir: adds the RM as a win-rate judge
    rlhf_run_dir: str = ""  # an RLHF run dir: its metrics.jsonl gives reward / KL / length curves per round
    dtype: str = "float32"
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    inference: BatchInferenceConfig = field(default_factory=BatchInferenceConfig)
    perplexity: ev.PerplexityConfig = field(default_factory=ev.PerplexityConfig)
    domain_scores: ev.DomainScoresConfig = field(default_factory=ev.DomainScoresConfig)
    win_rate: ev.WinRateConfig = field(default_factory=ev.WinRateConfig)
    needle: ev.NeedleConfig = field(default_factory=ev.NeedleConfig)

    def __post_init__(self) -> None:
        bad = [n for n in self.checkpoints if not _NAME.match(n)]
        if bad:
            raise ValueError(f"checkpoint names {bad} may use only letters, digits, '_', '.', '-' (they name files)")
        unknown = [n for n in self.engines if n not in self.checkpoints]
        if unknown:
            raise ValueError(f"engines names {unknown} are not checkpoints; set +checkpoints.{unknown[0]}=PATH too")
        wrong = {n: e for n, e in self.engines.items() if e not in ENGINES}
        if wrong:
            raise ValueError(f"engines {wrong}: each must be one of {ENGINES}")
        if self.baseline and not self.checkpoints.get(self.baseline):
            raise ValueError(f"baseline={self.baseline!r} is not a checkpoint with a path; "
                             f"set checkpoints.{self.baseline}=PATH or pick one of {list(self.active_checkpoints)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16 (got {self.dtype!r})")

    @property
    def active_checkpoints(self) -> dict[str, str]:
        return {n: p for n, p in self.checkpoints.items() if p}

    @property
    def baseline_name(self) -> str:
        return self.baseline or next(iter(self.active_checkpoints), "")

    def engine(self, name: str) -> str:
        return self.engines.get(name, "hf")


# ---------------------------------------------------------------------------------------------- eval sets


def _world():
    try:
        import data.world as world
    except ImportError as e:
        raise RuntimeError(f"the preference world (data.world) cannot be imported ({e}); turn its suites off with "
                           "domain_scores.enabled=false win_rate.enabled=false") from None
    return world


def reference_answer(world, prompt) -> str:
    """The best of the world's "good" response styles for `prompt` by its own oracle: what the `reference`
    engine answers (an upper bound for a column of the report)."""
    candidates = [world.respond(prompt, style) for style in world.styles(prompt)["good"]]
    return max(candidates, key=lambda r: world.score(prompt, r))


def domain_prompts(cfg: EvalJobConfig, world) -> list:
    domains = cfg.domain_scores.domains or list(world.DOMAINS)
    unknown = [d for d in domains if d not in world.DOMAINS]
    if unknown:
        raise ValueError(f"domain_scores.domains has unknown {unknown}; the world's domains are {list(world.DOMAINS)}")
    n, seed = cfg.domain_scores.n_per_domain, cfg.domain_scores.seed
    return [p for d in domains for p in world.make_prompts(d, n, seed, split="heldout")]


def perplexity_texts(cfg: ev.PerplexityConfig) -> tuple[list[str], str]:
    if cfg.path:
        texts, source = ev.read_texts(cfg.path, cfg.text_field), cfg.path
    elif SAMPLE_CORPUS.is_dir():
        texts, source = ev.read_texts(SAMPLE_CORPUS, cfg.text_field), str(SAMPLE_CORPUS)
    else:
        from data.samples import stdlib_docstrings

        texts, source = stdlib_docstrings(), "stdlib docstrings"
    return ev.heldout_slice(texts, cfg.heldout_fraction, cfg.max_docs), source


def needle_cases(cfg: ev.NeedleConfig, path: str) -> list[ev.NeedleCase]:
    from modeling.loading import load_tokenizer

    tok = load_tokenizer(path)
    limit = context_limit(path) - cfg.max_new_tokens
    lengths = list(cfg.lengths) or ev.needle_lengths(limit, cfg.n_lengths)
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ValueError(f"needle.lengths {too_long} exceed {path}'s limit: max_position_embeddings minus "
                         f"needle.max_new_tokens = {limit} tokens")
    if cfg.filler_path:
        filler = ev.read_texts(cfg.filler_path)
    else:
        from data.samples import stdlib_docstrings

        filler = stdlib_docstrings()
    return ev.build_needle_cases(
        filler, lengths, ev.needle_depths(cfg.depths), cfg.repeats, cfg.seed,
        encode=lambda s: tok(s, add_special_tokens=False).input_ids,
        decode=lambda ids: tok.decode(list(ids)),
        count_prompt=lambda m: count_prompt_tokens(tok, m),
    )


# ---------------------------------------------------------------------------------------------- one checkpoint


@dataclass
class Plan:
    """Rows for one checkpoint and which slice of them belongs to which suite."""

    rows: list[dict] = field(default_factory=list)
    spans: dict[str, range] = field(default_factory=dict)

    def add(self, suite: str, rows: list[dict]) -> None:
        start = len(self.rows)
        for i, row in enumerate(rows):
            row["idx"] = start + i
        self.rows.extend(rows)
        self.spans[suite] = range(start, len(self.rows))


def plan_rows(cfg: EvalJobConfig, engine: str, texts: list[str], prompts: list, references: list[str],
              cases: list[ev.NeedleCase]) -> Plan:
    plan = Plan()
    if texts and engine == "hf":
        plan.add("perplexity", [nll_row(t) for t in texts])
    if prompts:
        plan.add("domain", [generate_row(p.messages, cfg.generation.max_new_tokens, ref)
                            for p, ref in zip(prompts, references, strict=True)])
    if cases:
        plan.add("needle", [generate_row(c.messages, cfg.needle.max_new_tokens, c.reference) for c in cases])
    return plan


def evaluate_checkpoint(cfg: EvalJobConfig, name: str, path: str, texts: list[str], prompts: list,
                        references: list[str], scorer, run: Run) -> dict:
    engine = cfg.engine(name)
    cases = needle_cases(cfg.needle, path) if cfg.needle.enabled else []
    plan = plan_rows(cfg, engine, texts, prompts, references, cases)
    kwargs = {"model_path": path, "engine": engine, "dtype": cfg.dtype, "temperature": cfg.generation.temperature,
              "top_p": cfg.generation.top_p, "seed": cfg.generation.seed, "nll_window": cfg.perplexity.window,
              "constant_response": cfg.constant_response}
    out = map_rows(plan.rows, EvalModelWorker, kwargs, cfg.inference)
    result: dict[str, Any] = {"path": path, "engine": engine, "perplexity": None, "domain_scores": None,
                              "win_rate": None, "needle": None, "workers": sorted({str(r["worker"]) for r in out})}
    dumps: list[dict] = []
    if "perplexity" in plan.spans:
        part = [out[i] for i in plan.spans["perplexity"]]
        result["perplexity"] = {"value": ev.perplexity([r["nll_sum"] for r in part], [r["n_tokens"] for r in part]),
                                "tokens": int(sum(r["n_tokens"] for r in part)), "documents": len(part)}
    if "domain" in plan.spans:
        responses = [str(out[i]["response"]) for i in plan.spans["domain"]]
        result["responses"] = responses
        if cfg.domain_scores.enabled:
            result["domain_scores"] = ev.domain_scores(prompts, responses, scorer)
        dumps += [{"suite": "domain", "id": p.id, "domain": p.domain, "response": r}
                  for p, r in zip(prompts, responses)]
    if "needle" in plan.spans:
        preds = [str(out[i]["response"]) for i in plan.spans["needle"]]
        scores = [ev.cdme_score(p, c.reference) for p, c in zip(preds, cases)]
        result["needle"] = ev.aggregate_needle(cases, scores)
        # CDME gives partial credit for near misses; this is the share of answers that are the needle exactly.
        result["needle"]["exact_match"] = ev.mean([ev.exact_match(p, c.reference) for p, c in zip(preds, cases)])
        dumps += [{"suite": "needle", "id": c.id, "length": c.length, "depth": c.depth, "prompt_tokens": c.n_tokens,
                   "reference": c.reference, "response": p, "score": s} for c, p, s in zip(cases, preds, scores)]
    atomic_write_jsonl(run.path("responses", f"{name}.jsonl"), dumps)
    return result


# ---------------------------------------------------------------------------------------------- win rates


class RewardBatchScorer:
    """Ray Data callable around the conditional RM worker: rows of (domain, messages, response) -> reward."""

    def __init__(self, rm_path: str):
        from actors.reward import RewardWorker

        self.worker = RewardWorker(rm_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [{"domain": str(d), "messages": json.loads(m), "response": str(r)}
                 for d, m, r in zip(batch["domain"], batch["messages"], batch["response"])]
        return {"idx": np.asarray(batch["idx"]), "reward": np.asarray(self.worker.score(items), dtype=np.float64)}


def rm_rewards(rm_path: str, prompts: list, responses: dict[str, list[str]], inference: BatchInferenceConfig,
               scorer_cls: type = RewardBatchScorer) -> dict[str, list[float]]:
    """RM reward of every checkpoint's response to every prompt, scored in one pass over an actor pool."""
    names = list(responses)
    rows = [{"idx": k * len(prompts) + i, "domain": p.domain, "messages": ev.messages_json(p.messages),
             "response": responses[n][i]} for k, n in enumerate(names) for i, p in enumerate(prompts)]
    rewards = [float(r["reward"]) for r in map_rows(rows, scorer_cls, {"rm_path": rm_path}, inference)]
    return {n: rewards[k * len(prompts):(k + 1) * len(prompts)] for k, n in enumerate(names)}


def win_rates(prompts: list, responses: dict[str, list[str]], baseline: str, rewards: dict[str, list[float]] | None,
              prefer: Callable | None) -> dict[str, dict]:
    """Each checkpoint against `baseline` on the same prompts, per judge: the RM (`rewards`, higher wins) and the
    annotators (`prefer(prompt, a, b)`, asked in both orders); a judge that is None is left out. Ties count half."""
    domains = [p.domain for p in prompts]
    out = {}
    for name, resp in responses.items():
        if name == baseline:
            continue
        entry: dict[str, Any] = {"baseline": baseline, "rm": None, "annotator": None}
        if rewards is not None:
            wins = ev.reward_wins(rewards[name], rewards[baseline])
            entry["rm"], entry["rm_by_domain"] = ev.mean(wins), ev.mean_by_domain(domains, wins)
        if prefer is not None:
            wins = ev.judged_wins(prompts, resp, responses[baseline], prefer)
            entry["annotator"], entry["annotator_by_domain"] = ev.mean(wins), ev.mean_by_domain(domains, wins)
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------------------- report


def write_report(cfg: EvalJobConfig, run: Run, results: dict[str, dict], notes: list[str]) -> dict:
    plots: dict[str, str] = {}
    for name, r in results.items():
        if r["needle"]:
            plots[f"needle/{name}"] = str(report.needle_heatmap(r["needle"], name, run.path(f"needle_{name}.png")))
    scores = {n: r["domain_scores"] for n, r in results.items() if r["domain_scores"]}
    if scores:
        plots["domain_scores"] = str(report.domain_bars(scores, run.path("domain_scores.png")))
    rounds = None
    if cfg.rlhf_run_dir:
        metrics = Path(cfg.rlhf_run_dir) / "metrics.jsonl"
        rows = report.rlhf_rows(report.read_metrics(metrics)) if metrics.exists() else []
        curve = report.rlhf_curves(rows, run.path("rlhf_curves.png")) if rows else None
        if curve:
            plots["rlhf_curves"] = str(curve)
            rounds = report.rlhf_round_means(rows)
        else:
            notes.append(f"no RLHF curves: {metrics} is missing or has none of "
                         f"{[k for k, _ in report.RLHF_CURVES]}")
    baseline = cfg.baseline_name if any(r["win_rate"] for r in results.values()) else None
    for name, r in results.items():
        r["is_baseline"] = name == baseline
    md = atomic_write_text(run.path("report.md"), report.markdown_report(results, baseline, plots, rounds, notes))
    columns, rows = report.summary_rows(results, baseline)
    run.logger.log_table("eval/summary", columns, [[report.fmt(v) for v in row] for row in rows])
    for key, p in plots.items():
        run.logger.log_image(f"eval/{key}", p)
    if rounds:
        keys = sorted({k for r in rounds for k in r})
        run.logger.log_table("eval/rlhf_rounds", keys, [[r.get(k) for k in keys] for r in rounds])
    return {"report": str(md), "plots": plots, "rlhf_rounds": rounds}


def log_scalars(run: Run, name: str, r: dict) -> None:
    metrics: dict[str, float] = {}
    if r["perplexity"]:
        metrics[f"eval/{name}/perplexity"] = r["perplexity"]["value"]
    for d, s in (r["domain_scores"] or {}).items():
        metrics[f"eval/{name}/domain/{d}"] = s
    if r["needle"]:
        metrics[f"eval/{name}/needle_mean"] = r["needle"]["mean"]
    for judge in ("rm", "annotator"):
        if (r["win_rate"] or {}).get(judge) is not None:
            metrics[f"eval/{name}/win_rate_{judge}"] = r["win_rate"][judge]
    if metrics:
        run.logger.log(metrics)


# ---------------------------------------------------------------------------------------------- main


def main(cfg: EvalJobConfig, run: Run) -> dict:
    from modeling.loading import resolve_checkpoint

    checkpoints = cfg.active_checkpoints
    if not checkpoints:
        raise ValueError("no checkpoint to evaluate: set checkpoints.sft=/abs/path (or +checkpoints.NAME=PATH)")
    for path in [*checkpoints.values(), *([cfg.rm_path] if cfg.rm_path else [])]:
        resolve_checkpoint(path)  # a wrong path fails here, before any cluster work
    init_ray(cfg.cluster)
    notes: list[str] = []
    texts: list[str] = []
    if cfg.perplexity.enabled:
        texts, source = perplexity_texts(cfg.perplexity)
        notes.append(f"perplexity on {len(texts)} held-out documents of {source}")
    world, prompts, references = None, [], []
    if cfg.domain_scores.enabled or (cfg.win_rate.enabled and len(checkpoints) > 1):
        world = _world()
        prompts = domain_prompts(cfg, world)
        uses_reference = "reference" in (cfg.engine(n) for n in checkpoints)
        references = [reference_answer(world, p) if uses_reference else "" for p in prompts]
    scorer = world.score if world is not None else None
    results: dict[str, dict] = {}
    for name, path in progress(checkpoints.items(), total=len(checkpoints), desc="eval checkpoints",
                               enabled=cfg.logging.progress):
        results[name] = evaluate_checkpoint(cfg, name, path, texts, prompts, references, scorer, run)
    if cfg.win_rate.enabled and world is not None and len(results) > 1:
        responses = {n: r["responses"] for n, r in results.items()}
        rewards = rm_rewards(cfg.rm_path, prompts, responses, cfg.inference) if cfg.rm_path else None
        prefer = (lambda p, a, b: world.annotator(p.domain).prefer(p, a, b)) if cfg.win_rate.annotators else None
        for name, entry in win_rates(prompts, responses, cfg.baseline_name, rewards, prefer).items():
            results[name]["win_rate"] = entry
    elif cfg.win_rate.enabled:
        notes.append("win rates need at least two checkpoints")
    for name, r in results.items():
        log_scalars(run, name, r)
    paths = write_report(cfg, run, results, notes)
    for r in results.values():
        r.pop("responses", None)
    results_path = atomic_write_json(run.path("results.json"), {"baseline": cfg.baseline_name, "checkpoints": results,
                                                                "rlhf_rounds": paths["rlhf_rounds"], "notes": notes})
    print(f"report: {paths['report']}", flush=True)
    keys = ("engine", "perplexity", "domain_scores", "win_rate", "needle")
    return {
        "checkpoints": {n: {k: (r[k]["value"] if k == "perplexity" and r[k] else r[k]) for k in keys}
                        for n, r in results.items()},
        "baseline": cfg.baseline_name,
        "report": paths["report"],
        "results": str(results_path),
        "plots": paths["plots"],
    }


if __name__ == "__main__":
    run_job("eval", EvalJobConfig, main)
