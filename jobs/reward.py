"""Train and evaluate the conditional reward model (COOL RLHF, InternLM2 report §4.2.1) on Ray Train.

    python jobs/reward.py                                   # world pairs generated in-job, tiny model from scratch
    python jobs/reward.py model.path=outputs/sft/model data.world_dir=outputs/world
    python jobs/reward.py compare_unconditioned=true        # also train the unconditioned baseline, side by side
    python jobs/reward.py data.train_paths=[hh.jsonl] data.default_domain=helpful +rm.domains.poetry="Rate the poem."
    ray job submit --working-dir . -- python jobs/reward.py run.root=/shared/outputs model=hf \\
        model.path=/models/sft trainer=deepspeed_zero2 trainer.num_workers=8 trainer.gpus_per_worker=1

Steps: read pairs (coolray / Anthropic-HH / UltraFeedback JSONL, or the preference world) -> tokenize each
side as [domain system prompt] + conversation + reply + <|reward|> -> token-budget batches -> focal ranking
+ log-barrier loss (algo/rm_loss.py) through cluster.train.fit (DDP or DeepSpeed, LoRA optional) -> the RM
directory `model/` -> evaluation: pairwise accuracy per held-out domain, conflict pairs with and without the
condition, score distribution, and (world data) RM vs oracle per response style, which shows what the RM
over-rewards. Outputs: eval.json, eval.png, W&B table + image, summary.json.

`rm.conditional=false` trains the unconditioned baseline (same pairs, condition dropped);
`compare_unconditioned=true` trains both in one job (the baseline under <run dir>/baseline/).

Deviations from the report (spec §7.1): padded token-budget batches instead of packed varlen ones; the
barrier continues linearly outside +-(5 - 1e-3) (algo/rm_loss.py); the tiny defaults (conf/reward.yaml) use
LR 3e-3 and 2 epochs on a few thousand pairs, where the report uses 1e-5 -> 5e-6 and 1 epoch on 2.4M pairs.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

import dataclasses  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from algo.rm_loss import RMLossConfig  # noqa: E402
from cluster.runtime import ClusterConfig, init_ray  # noqa: E402
from data.preferences import FORMATS, PreferencePair  # noqa: E402
from data.world.config import WorldConfig  # noqa: E402
from jobs.common import LoggingConfig, Run, RunConfig, run_job  # noqa: E402
from modeling.config import ModelConfig  # noqa: E402
from modeling.reward import NO_CONDITION, RewardModelConfig  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402


@dataclass
class RewardDataConfig:
    # JSONL files or directories; [] = take that split from `world_dir`, else generate it from the world in-job.
    train_paths: list[str] = field(default_factory=list)
    heldout_paths: list[str] = field(default_factory=list)
    conflict_paths: list[str] = field(default_factory=list)  # pairs sharing prompt+replies across domains
    world_dir: str = ""  # a jobs/world.py run dir (pairs_train / pairs_heldout / pairs_conflict .jsonl)
    world: WorldConfig = field(default_factory=WorldConfig)  # in-job world pairs when neither is given
    format: str = "auto"  # auto (per row) | coolray | hh | ultrafeedback
    on_error: str = "fail"  # fail | skip (skipped rows are counted in the summary)
    default_domain: str = ""  # for rows without "domain" (e.g. Anthropic-HH files)
    max_tokens_per_batch: int = 16384  # padded tokens per micro-batch per rank [R: 16,384]

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"data.on_error must be fail or skip (got {self.on_error!r})")
        if self.max_tokens_per_batch < 16:
            raise ValueError(f"data.max_tokens_per_batch must be >= 16 (got {self.max_tokens_per_batch})")


@dataclass
class RewardEvalConfig:
    batch_size: int = 64  # items per forward pass
    style_prompts_per_domain: int = 16  # world only: held-out prompts per domain for RM-vs-oracle per style
    histogram_bins: int = 40


@dataclass
class RewardJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    eval: RewardEvalConfig = field(default_factory=RewardEvalConfig)
    compare_unconditioned: bool = False  # also train rm.conditional=false on the same pairs (<run dir>/baseline)

    def __post_init__(self) -> None:
        if self.trainer.lora.enabled and "head" not in self.trainer.lora.modules_to_save:
            raise ValueError("LoRA on the RM must also train its reward head: add trainer.lora.modules_to_save=[head]")
        if self.data.max_tokens_per_batch < 2 * self.rm.max_length:
            raise ValueError(f"data.max_tokens_per_batch={self.data.max_tokens_per_batch} must hold one pair of "
                             f"rm.max_length={self.rm.max_length} tokens: raise it to >= {2 * self.rm.max_length} "
                             "or lower rm.max_length")
        if self.compare_unconditioned and not self.rm.conditional:
            raise ValueError("compare_unconditioned=true compares against rm.conditional=true; drop one of the two")


# ---------------------------------------------------------------------------------------------- data


def _files(paths: list[str]) -> list[Path]:
    from jobs.sft import resolve_input

    return [f for p in paths for f in resolve_input(p)]


def _world_rows(cfg: RewardJobConfig, split: str) -> list[dict]:
    """A split's world rows: from data.world_dir when given, else generated (deterministic in data.world)."""
    from data.io import read_jsonl
    from data.world import files as wf

    if cfg.data.world_dir:
        name = {"train": wf.TRAIN_PAIRS, "heldout": wf.HELDOUT_PAIRS, "conflict": wf.CONFLICT_PAIRS}[split]
        path = Path(cfg.data.world_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"data.world_dir={cfg.data.world_dir} has no {name}: run jobs/world.py there first")
        return [row for _, row in read_jsonl(path)]
    return {"train": wf.train_pairs, "heldout": wf.heldout_pairs, "conflict": wf.conflicts}[split](cfg.data.world)


def load_split(cfg: RewardJobConfig, split: str, errors) -> tuple[list[PreferencePair], str]:
    """(pairs, source) of one split: the configured files, else the preference world."""
    from data.preferences import pair_from_row, read_preferences

    paths = {"train": cfg.data.train_paths, "heldout": cfg.data.heldout_paths, "conflict": cfg.data.conflict_paths}[split]
    if paths:
        pairs = [p for f in _files(paths) for p in read_preferences(f, cfg.data.format, cfg.data.default_domain, errors)]
        return pairs, "files"
    if split != "train" and cfg.data.train_paths:
        return [], "none"  # own training files and no own eval files: nothing to evaluate on for this split
    return [pair_from_row(r) for r in _world_rows(cfg, split)], "world"


def tokenizer_dir(cfg: RewardJobConfig, run: Run) -> str:
    """The model's tokenizer; a from-scratch tiny run trains one on bootstrap text plus world text."""
    if cfg.model.tokenizer_dir:
        return cfg.model.tokenizer_dir
    out = run.dir / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from data.io import atomic_dir
        from data.samples import tokenizer_training_texts
        from data.world import sft_conversations
        from modeling.tiny import train_tokenizer

        world_text = [m["content"] for row in sft_conversations(2000, cfg.run.seed) for m in row["messages"]]
        with atomic_dir(out) as tmp:
            train_tokenizer(tokenizer_training_texts() + world_text, cfg.model.tiny.vocab_size, tmp)
    return str(out)


# ---------------------------------------------------------------------------------------------- training


def train_variant(cfg: RewardJobConfig, run: Run, rm_cfg: RewardModelConfig, out_dir: Path, tok_dir: str,
                  train: list[PreferencePair]) -> dict:
    """Encode `train` for `rm_cfg`, fit the RM into `out_dir`; returns the training figures (incl. model_dir)."""
    from cluster.train import fit
    from jobs.pretrain import start_over
    from modeling.reward import RewardEncoder
    from trainer.lm_tasks import load_any_tokenizer
    from trainer.loop import plan_steps
    from trainer.rm_task import RewardTask, encode_pairs, write_encoded

    encoded, stats = encode_pairs(train, RewardEncoder(load_any_tokenizer(tok_dir), rm_cfg))
    if not encoded:
        raise ValueError(f"no trainable pairs: {stats.too_long} longer than rm.max_length={rm_cfg.max_length}, "
                         f"{stats.identical} with chosen == rejected")
    data_path = write_encoded(encoded, out_dir / "rm_data")
    task = RewardTask(
        data_path=str(data_path), tokenizer_path=tok_dir, model_path=cfg.model.path, rm=rm_cfg, loss_cfg=cfg.loss,
        max_tokens_per_batch=cfg.data.max_tokens_per_batch, tiny=cfg.model.tiny, dtype=cfg.model.dtype,
        seed=cfg.trainer.seed,
    )
    plan_steps(task, cfg.trainer, 0, cfg.trainer.num_workers)  # too little data fails before Ray
    start_over(run if out_dir == run.dir else dataclasses.replace(run, dir=out_dir), cfg.run.resume)
    init_ray(cfg.cluster)
    result = fit(task, cfg.trainer, out_dir, logger=run.logger if out_dir == run.dir else None,
                 show_progress=cfg.logging.progress)
    return {**result.summary(), "train_pairs": stats.pairs, "dropped_too_long": stats.too_long,
            "dropped_identical": stats.identical}


# ---------------------------------------------------------------------------------------------- evaluation


def pair_scores(worker, pairs: list[PreferencePair], condition: bool = True) -> tuple[list[float], list[float]]:
    """Raw RM scores of (chosen, rejected) for each pair; condition=False scores without any system prompt."""
    def items(side: str) -> list[dict]:
        return [{"domain": p.domain if condition else NO_CONDITION, "messages": p.messages,
                 "response": getattr(p, side)} for p in pairs]

    return worker.score(items("chosen"), clamp=False), worker.score(items("rejected"), clamp=False)


def accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Share of pairs ranked right (a tie counts half)."""
    if not chosen:
        return float("nan")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(chosen)


def by_domain(pairs: list[PreferencePair], chosen: list[float], rejected: list[float]) -> dict[str, float]:
    out = {}
    for d in sorted({p.domain for p in pairs}):
        idx = [i for i, p in enumerate(pairs) if p.domain == d]
        out[d] = accuracy([chosen[i] for i in idx], [rejected[i] for i in idx])
    return out


def style_scores(worker, domains: list[str], n_prompts: int, seed: int) -> dict[str, dict]:
    """World only: mean RM score and mean oracle score of each response style on held-out prompts.

    `over_rewarded` lists the hack styles the RM scores above the SFT policy's own style while the oracle scores
    them below it: moving there raises PPO's reward and lowers the truth, the reward hacking the online RLHF
    fast path has to patch."""
    from data.world import get_domain, make_prompts, respond, score, styles

    out: dict[str, dict] = {}
    for d in domains:
        prompts = make_prompts(d, n_prompts, seed=seed, split="heldout")
        kinds = {s: k for k, names in styles(prompts[0]).items() for s in names}
        sft = get_domain(d).sft_style
        kinds.setdefault(sft, "sft")
        rows: dict[str, dict] = {}
        for style, kind in kinds.items():
            replies = [respond(p, style, seed) for p in prompts]
            rm = worker.score([{"domain": d, "messages": p.messages, "response": r} for p, r in zip(prompts, replies)])
            oracle = [score(p, r) for p, r in zip(prompts, replies)]
            rows[style] = {"kind": kind, "rm": sum(rm) / len(rm), "oracle": sum(oracle) / len(oracle)}
        base = rows[sft]
        out[d] = {"sft_style": sft, "styles": rows,
                  "over_rewarded": [s for s, v in rows.items() if v["kind"] == "hack" and v["rm"] > base["rm"]
                                    and v["oracle"] < base["oracle"]]}
    return out


def histogram(values: list[float], bins: int, lo: float = -5.0, hi: float = 5.0) -> dict:
    counts = [0] * bins
    for v in values:
        k = min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))
        counts[k] += 1
    return {"lo": lo, "hi": hi, "counts": counts}


def evaluate(model_dir: str, heldout: list[PreferencePair], conflicts: list[PreferencePair], cfg: RewardJobConfig,
             world_domains: list[str] | None, device: str = "cpu") -> dict:
    """Everything eval.json holds for one RM directory (scores are the head's raw output, unclamped)."""
    from actors.reward import RewardWorker

    worker = RewardWorker(model_dir, batch_size=cfg.eval.batch_size, device=device)
    out: dict = {"model_dir": model_dir, "conditional": worker.conditional}
    all_scores: list[float] = []
    if heldout:
        c, r = pair_scores(worker, heldout)
        all_scores += c + r
        out["accuracy"] = accuracy(c, r)
        out["accuracy_by_domain"] = by_domain(heldout, c, r)
        out["heldout_pairs"] = len(heldout)
    if conflicts:
        c, r = pair_scores(worker, conflicts)
        cu, ru = pair_scores(worker, conflicts, condition=False)
        all_scores += c + r
        out["conflict_accuracy"] = accuracy(c, r)
        out["conflict_accuracy_by_domain"] = by_domain(conflicts, c, r)
        # Without the condition both rows of a conflict get the same two scores with opposite labels, so any
        # unconditioned scorer gets exactly one of them right: 0.5 overall, the split per domain shows its lean.
        out["conflict_accuracy_unconditioned"] = accuracy(cu, ru)
        out["conflict_accuracy_unconditioned_by_domain"] = by_domain(conflicts, cu, ru)
        out["conflict_pairs"] = len(conflicts)
    if all_scores:
        mean = sum(all_scores) / len(all_scores)
        out.update(score_min=min(all_scores), score_max=max(all_scores), score_mean=mean,
                   score_std=(sum((x - mean) ** 2 for x in all_scores) / len(all_scores)) ** 0.5,
                   scores_inside_bounds=sum(-5 < x < 5 for x in all_scores) / len(all_scores),
                   score_histogram=histogram(all_scores, cfg.eval.histogram_bins))
    if world_domains and cfg.eval.style_prompts_per_domain > 0:
        out["style_scores"] = style_scores(worker, world_domains, cfg.eval.style_prompts_per_domain, cfg.run.seed)
    return out


def run_evaluate(model_dir: str, heldout: list[PreferencePair], conflicts: list[PreferencePair],
                 cfg: RewardJobConfig, world_domains: list[str] | None) -> dict:
    """CPU runs evaluate in the driver; GPU runs in a Ray task holding one training worker's resources."""
    if not cfg.trainer.use_gpu:
        return evaluate(model_dir, heldout, conflicts, cfg, world_domains)
    import ray

    task = ray.remote(evaluate).options(num_cpus=cfg.trainer.cpus_per_worker, num_gpus=cfg.trainer.gpus_per_worker)
    return ray.get(task.remote(model_dir, heldout, conflicts, cfg, world_domains, "cuda"))


def plot(evals: dict[str, dict], path: Path) -> Path:
    """Per-domain held-out accuracy (and conflict accuracy) bars per model, and the score histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(evals)
    cats = sorted({d for e in evals.values() for d in e.get("accuracy_by_domain", {})})
    cats += [f"conflict:{d}" for d in sorted({d for e in evals.values() for d in e.get("conflict_accuracy_by_domain", {})})]
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        e = evals[name]
        vals = [e.get("conflict_accuracy_by_domain", {}).get(c.removeprefix("conflict:"), 0.0) if c.startswith("conflict:")
                else e.get("accuracy_by_domain", {}).get(c, 0.0) for c in cats]
        left.bar([i + k * width for i in range(len(cats))], vals, width, label=name)
    left.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    left.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(cats))], cats, rotation=35, ha="right")
    left.set_ylim(0, 1.05)
    left.set_ylabel("pairwise accuracy (held out)")
    left.legend()
    for name in names:
        h = evals[name].get("score_histogram")
        if h:
            step = (h["hi"] - h["lo"]) / len(h["counts"])
            right.stairs(h["counts"], [h["lo"] + i * step for i in range(len(h["counts"]) + 1)], label=name)
    right.axvline(-5, color="red", linewidth=1)
    right.axvline(5, color="red", linewidth=1)
    right.set_xlabel("RM score (barrier keeps it in (-5, 5))")
    right.set_ylabel("count")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_eval(run: Run, evals: dict[str, dict], png: Path) -> None:
    rows = []
    for name, e in evals.items():
        for d, a in e.get("accuracy_by_domain", {}).items():
            rows.append([name, "heldout", d, a])
        for d, a in e.get("conflict_accuracy_by_domain", {}).items():
            rows.append([name, "conflict", d, a])
        for d, a in e.get("conflict_accuracy_unconditioned_by_domain", {}).items():
            rows.append([name, "conflict_unconditioned", d, a])
        flat = {f"eval/{name}/accuracy/{d}": a for d, a in e.get("accuracy_by_domain", {}).items()}
        flat.update({f"eval/{name}/{k}": e[k] for k in ("accuracy", "conflict_accuracy", "conflict_accuracy_unconditioned",
                                                        "score_min", "score_max") if k in e})
        run.logger.log(flat)
    run.logger.log_table("eval/accuracy", ["model", "set", "domain", "accuracy"], rows)
    run.logger.log_image("eval/plot", png)


# ---------------------------------------------------------------------------------------------- main


def main(cfg: RewardJobConfig, run: Run) -> dict:
    from data.io import RowErrors, atomic_write_json

    errors = RowErrors(cfg.data.on_error)
    train, train_src = load_split(cfg, "train", errors)
    heldout, _ = load_split(cfg, "heldout", errors)
    conflicts, _ = load_split(cfg, "conflict", errors)
    if not train:
        raise ValueError("no training pairs: give data.train_paths, data.world_dir, or leave both empty for world pairs")
    tok_dir = tokenizer_dir(cfg, run)
    world_domains = list(cfg.data.world.domains) if train_src == "world" else None

    variants = {"conditional" if cfg.rm.conditional else "unconditioned": (cfg.rm, run.dir)}
    if cfg.compare_unconditioned:
        variants["unconditioned"] = (dataclasses.replace(cfg.rm, conditional=False), run.dir / "baseline")
    trained, evals = {}, {}
    for name, (rm_cfg, out_dir) in variants.items():
        trained[name] = train_variant(cfg, run, rm_cfg, out_dir, tok_dir, train)
        evals[name] = run_evaluate(trained[name]["model_dir"], heldout, conflicts, cfg, world_domains)
    png = plot(evals, run.dir / "eval.png")
    atomic_write_json(run.dir / "eval.json", {"train": trained, "eval": evals})
    log_eval(run, evals, png)

    main_name = next(iter(variants))
    e = evals[main_name]
    summary = {
        "model_dir": trained[main_name]["model_dir"],
        "conditional": cfg.rm.conditional,
        "accuracy": e.get("accuracy"),
        "accuracy_by_domain": e.get("accuracy_by_domain", {}),
        "conflict_accuracy": e.get("conflict_accuracy"),
        "conflict_accuracy_by_domain": e.get("conflict_accuracy_by_domain", {}),
        "conflict_accuracy_unconditioned": e.get("conflict_accuracy_unconditioned"),
        "conflict_accuracy_unconditioned_by_domain": e.get("conflict_accuracy_unconditioned_by_domain", {}),
        "score_min": e.get("score_min"),
        "score_max": e.get("score_max"),
        "over_rewarded_styles": {d: v["over_rewarded"] for d, v in e.get("style_scores", {}).items() if v["over_rewarded"]},
        "eval_path": str(run.dir / "eval.json"),
        "plot_path": str(png),
        "data_source": train_src,
        "heldout_pairs": len(heldout),
        "conflict_pairs": len(conflicts),
        "skipped_rows": errors.skipped,
        "skipped_examples": errors.examples,
        **{k: v for k, v in trained[main_name].items() if k != "model_dir"},
    }
    if cfg.compare_unconditioned:
        b = evals["unconditioned"]
        summary["baseline"] = {"model_dir": trained["unconditioned"]["model_dir"], "accuracy": b.get("accuracy"),
                               "accuracy_by_domain": b.get("accuracy_by_domain", {}),
                               "conflict_accuracy": b.get("conflict_accuracy"),
                               "conflict_accuracy_by_domain": b.get("conflict_accuracy_by_domain", {}),
                               "steps": trained["unconditioned"]["steps"]}
    return summary


if __name__ == "__main__":
    run_job("reward", RewardJobConfig, main)
