"""The between-round RM update of COOL RLHF and its evaluation (spec cool-rlhf.md 7.3): RM_k trained on the base
pairs plus every online pair so far (fast and slow pairs each repeated to a share of their own), into <round>/rm, then
old vs new RM on held-out, fast and slow pairs. Both run on a cluster.trainer_group.TrainerGroup: the driver keeps
one warm across rounds (its processes, imports and process group start once), or the round starts its own.

Called by `jobs.rlhf_rounds.end_of_round`; the round's config (`online.rm_update`) is `RMUpdateConfig` below.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.io import read_jsonl
from data.preferences import PreferencePair
from trainer.config import TrainerConfig

if TYPE_CHECKING:
    from cluster.trainer_group import TrainerGroup
    from jobs.rlhf_rounds import RoundContext
    from modeling.reward import RewardEncoder, RewardModelConfig
    from trainer.rm_task import EncodeStats


@dataclass
class RMUpdateConfig:
    mode: str = "finetune"  # finetune RM_{k-1} on base + all new pairs | retrain from the SFT backbone
    max_steps: int = 60
    lr: float = 5e-4
    max_tokens_per_batch: int = 4096
    # 20-100 pairs per pattern are a drop in a large base set: a finetune of max_steps sees few of them once and
    # learns none (measured: 83 slow pairs in 8,255 left the RM agreeing with them less after the update than
    # before). Online pairs (all rounds so far) are repeated until they are this share of the training pairs ...
    online_share: float = 0.2
    online_repeat: int = 1  # ... or this many times each, whichever is more
    # Fast-path pairs (every round's) get a share of their own, beside online_share for the slow-path ones: a patch
    # has to outweigh the base pairs that taught the hack. Sharing online_share with the slow pairs, 60 fast pairs of
    # a flattery hack were learnt to 0.48 (online_share 0.4: 0.62) and the hack came back (design.md, "Session 7").
    # 0 = fast pairs count as online pairs.
    fast_share: float = 0.2
    # The last round's RM would patch a PPO round that never comes: by default that round collects, labels, saves
    # and evaluates its pairs against the RM it ran with, and trains none (a third of a 3-round run's RM time). True
    # trains it anyway, e.g. to carry the patched RM into a follow-up run; a run resumed with more rounds trains the
    # skipped update before its next round.
    after_last_round: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("finetune", "retrain"):
            raise ValueError(f"online.rm_update.mode must be 'finetune' or 'retrain' (got {self.mode!r})")
        if self.max_steps < 1 or self.lr <= 0 or self.online_repeat < 1:
            raise ValueError("online.rm_update.max_steps and online.rm_update.online_repeat must be >= 1, "
                             "online.rm_update.lr > 0")
        if not 0.0 <= self.online_share < 1.0:
            raise ValueError(f"online.rm_update.online_share must be in [0, 1) (got {self.online_share}): the share "
                             "of the RM update's training pairs that are online pairs; 0 = online_repeat alone")
        if not 0.0 <= self.fast_share < 1.0 - self.online_share:
            raise ValueError(f"online.rm_update.fast_share must be >= 0 and below 1 - online_share (got fast_share="
                             f"{self.fast_share}, online_share={self.online_share}): base pairs need a share too")

    def repeats(self, base: int, online: int) -> int:
        """How many times each of `online` pairs goes into the RM update's data beside `base` base pairs: enough for
        online_share of the whole (rounded to the nearest count), at least online_repeat."""
        if online == 0 or self.online_share == 0.0:
            return self.online_repeat
        wanted = self.online_share / (1.0 - self.online_share) * base / online
        return max(self.online_repeat, round(wanted))

    def repeats_by_path(self, base: int, slow: int, fast: int) -> tuple[int, int]:
        """(slow repeat, fast repeat): slow-path pairs to online_share and fast-path pairs to fast_share of the
        whole; without fast pairs or with fast_share 0, both get `repeats(base, slow + fast)`."""
        if fast == 0 or self.fast_share == 0.0:
            r = self.repeats(base, slow + fast)
            return r, r
        total = base / (1.0 - self.online_share - self.fast_share)
        slow_r = max(self.online_repeat, round(self.online_share * total / slow)) if slow and self.online_share else \
            self.online_repeat
        return slow_r, max(self.online_repeat, round(self.fast_share * total / fast))


def prior_round_dirs(ctx: RoundContext) -> list[Path]:
    root = Path(ctx.run_dir) / "rounds"
    dirs = [d for d in root.glob("round_*") if d.name.removeprefix("round_").isdigit()]
    return sorted((d for d in dirs if int(d.name.removeprefix("round_")) < ctx.round),
                  key=lambda d: int(d.name.removeprefix("round_")))


# ---------------------------------------------------------------------------------------------- RM update


def online_pair_files(ctx: RoundContext) -> list[Path]:
    """All online pair files up to this round: the driver's list, earlier round dirs, and this round's pairs."""
    files = [Path(f) for f in ctx.prior_pair_files] + [d / "pairs.jsonl" for d in prior_round_dirs(ctx)]
    files.append(ctx.round_dir / "pairs.jsonl")
    unique = {f.resolve(): f for f in files if f.exists()}
    return list(unique.values())


def training_sets(ctx: RoundContext) -> tuple[list[PreferencePair], list[tuple[list[PreferencePair], int]], dict]:
    """(base pairs, [(slow-path pairs, repeat), (fast-path pairs, repeat)], counts): base ∪ every online pair so far,
    each pair id once, with how many times each online pair goes into the RM update (`rm_update.repeats_by_path`)."""
    from data.preferences import read_preferences

    base = read_preferences(ctx.base_pairs_path) if ctx.base_pairs_path else []
    online: dict[str, PreferencePair] = {}
    fast_ids: set[str] = set()
    for f in online_pair_files(ctx):
        for lineno, row in read_jsonl(f):
            if row["pair_id"] not in online and (row.get("lineage") or {}).get("path") == "fast":
                fast_ids.add(row["pair_id"])
            online.setdefault(row["pair_id"], parse_online_row(row, f, lineno))
    slow = [p for i, p in online.items() if i not in fast_ids]
    fast = [p for i, p in online.items() if i in fast_ids]
    slow_r, fast_r = ctx.cfg.rm_update.repeats_by_path(len(base), len(slow), len(fast))
    return base, [(slow, slow_r), (fast, fast_r)], {"base": len(base), "online": len(online), "online_repeat": slow_r,
                                                    "fast": len(fast), "fast_repeat": fast_r}


def training_pairs(ctx: RoundContext) -> tuple[list[PreferencePair], dict[str, int]]:
    """The RM update's training pairs in order: base, then each online pair repeated (training_sets)."""
    base, groups, counts = training_sets(ctx)
    return base + [p for pairs, times in groups for p in pairs for _ in range(times)], counts


def encode_training(ctx: RoundContext, encoder: RewardEncoder, tok_path: str) -> tuple[list, EncodeStats, dict]:
    """training_pairs(ctx) encoded, in the same order: the base pairs from the run's cache (encoded once per
    tokenizer, RM registry and base file: every round's update trains on them), each online pair encoded once and
    repeated. Returns (encoded pairs, stats counting every copy, counts)."""
    from trainer.rm_task import EncodeStats, encode_pairs

    base, groups, counts = training_sets(ctx)
    out, base_stats = encoded_base(ctx, base, encoder, tok_path)
    stats = EncodeStats(too_long=base_stats.too_long, identical=base_stats.identical)
    for pairs, times in groups:
        encoded, st = encode_pairs(pairs, encoder)
        out += [p for p in encoded for _ in range(times)]
        stats.too_long += st.too_long * times
        stats.identical += st.identical * times
    stats.pairs = len(out)
    return out, stats, counts


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")


def encoded_base(ctx: RoundContext, base: list[PreferencePair], encoder: RewardEncoder,
                 tok_path: str) -> tuple[list, EncodeStats]:
    """The base pairs encoded, cached under <run>/rounds/base_encoded/<key>: the key hashes the base file, the
    tokenizer's files and the RM config (domain prompts, max length), everything the encoding depends on."""
    import dataclasses
    import hashlib

    import fsspec

    from modeling.loading import resolve_checkpoint
    from trainer.rm_task import EncodeStats, encode_pairs, read_encoded, write_encoded

    if not base:
        return [], EncodeStats()
    key = hashlib.sha256()
    with fsspec.open(ctx.base_pairs_path, "rb") as f:
        key.update(f.read())
    tok_dir = resolve_checkpoint(tok_path)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            key.update(name.encode() + b"\0" + (tok_dir / name).read_bytes())
    key.update(json.dumps(dataclasses.asdict(encoder.cfg), sort_keys=True, default=str).encode())
    cache = Path(ctx.run_dir) / "rounds" / "base_encoded" / key.hexdigest()[:16]
    if (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        return read_encoded(cache), EncodeStats(**meta["stats"])
    encoded, stats = encode_pairs(base, encoder)
    write_encoded(encoded, cache, meta={"stats": dataclasses.asdict(stats), "base_pairs_path": ctx.base_pairs_path,
                                        "tokenizer": str(tok_path)})
    return encoded, stats


def parse_online_row(row: dict, path: Path, lineno: int) -> PreferencePair:
    """An online pair row (preference fields + lineage) as the RM's PreferencePair, keyed by its pair id. A reply
    may be empty: the policy can stop at once, and the RM has to learn where that ranks."""
    from data.preferences import parse_row

    fields = {k: v for k, v in row.items() if k != "lineage"}
    return parse_row({**fields, "id": row["pair_id"]}, "coolray", path, lineno, allow_empty_replies=True)


def trainer_config(ctx: RoundContext) -> TrainerConfig:
    """The RM update's trainer: the RM recipe of spec 7.1 (AdamW, weight decay 0.01), online.rm_update's LR and
    steps, then the driver's overrides (workers, GPUs, backend) on top."""
    up = ctx.cfg.rm_update
    base = {"lr": up.lr, "max_steps": up.max_steps, "weight_decay": 0.01, "checkpoint_every": 0, "keep_checkpoints": 1,
            "seed": ctx.seed}
    return TrainerConfig(**{**base, **ctx.trainer_overrides})


class RoundTrainer:
    """Where the round's RM update and evaluation run (`.group`): the driver's warm TrainerGroup
    (RoundContext.rm_trainer), else one started on first use from trainer_config(ctx) and stopped when the `with`
    block ends."""

    def __init__(self, ctx: RoundContext):
        self.ctx, self._own = ctx, None

    @property
    def group(self) -> TrainerGroup:
        if self.ctx.rm_trainer is not None:
            return self.ctx.rm_trainer
        if self._own is None:
            from cluster.trainer_group import TrainerGroup

            self._own = TrainerGroup.for_config(trainer_config(self.ctx), name="rm_update")
        return self._own

    def __enter__(self) -> RoundTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            self._own.shutdown()
            self._own = None


def update_rm(ctx: RoundContext, trainer: RoundTrainer) -> dict:
    """Train RM_k on base + all online pairs into <round>/rm on `trainer` (skipped when it is already there).
    Returns the training figures (model_dir and counts; only model_dir when the RM was already trained)."""
    from modeling.reward import CONFIG_FILE, RewardEncoder
    from trainer.lm_tasks import load_any_tokenizer
    from trainer.rm_task import RewardTask, write_encoded

    final, work = ctx.round_dir / "rm", ctx.round_dir / "rm_train"
    if (final / CONFIG_FILE).exists():
        return {"model_dir": str(final)}
    up = ctx.cfg.rm_update
    rm_cfg = registry_of(ctx.rm_dir)  # the domain system prompts the RM was trained with
    # finetune: RM_{k-1} (backbone + head); retrain: a fresh head on the SFT backbone, as the reward job does.
    tok_path, init = (ctx.rm_dir, ctx.rm_dir) if up.mode == "finetune" else (ctx.sft_dir, "")
    encoded, stats, counts = encode_training(ctx, RewardEncoder(load_any_tokenizer(tok_path), rm_cfg), tok_path)
    if not encoded:
        raise ValueError(f"round {ctx.round}: no trainable preference pairs ({counts}; {stats.too_long} longer than "
                         f"rm.max_length={rm_cfg.max_length}, {stats.identical} with chosen == rejected)")
    task = RewardTask(data_path=str(write_encoded(encoded, work / "rm_data")), tokenizer_path=tok_path,
                      model_path="" if init else ctx.sft_dir, init_rm_path=init, rm=rm_cfg,
                      max_tokens_per_batch=up.max_tokens_per_batch, seed=ctx.seed)
    started = time.time()
    # No logger: fit's per-step rows carry their own step counter, which would collide with the PPO driver's.
    result = trainer.group.fit(task, trainer_config(ctx), work, timeout_s=ctx.rm_timeout_s, logger=None)
    os.replace(result.model_dir, final)  # same directory tree, so the rename is atomic
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # optimizer state x RM size; the model is in rm/
    return {"model_dir": str(final), "train_pairs": stats.pairs, "train_base_pairs": counts["base"],
            "train_online_pairs": counts["online"], "train_online_repeat": counts["online_repeat"],
            "train_fast_pairs": counts["fast"], "train_fast_repeat": counts["fast_repeat"],
            "dropped_too_long": stats.too_long,
            "train_steps": result.steps, "final_loss": result.final_loss,
            "train_seconds": round(time.time() - started, 2)}


def registry_of(rm_dir: str) -> "RewardModelConfig":
    """The RewardModelConfig saved with an RM (its domain registry, conditional flag, max length)."""
    from modeling.loading import resolve_checkpoint
    from modeling.reward import CONFIG_FILE, RewardModelConfig

    path = resolve_checkpoint(rm_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{rm_dir} has no {CONFIG_FILE}: RoundContext.rm_dir must be a coolray RM directory")
    meta = json.loads(path.read_text())
    return RewardModelConfig(**{k: v for k, v in meta.items() if k in RewardModelConfig.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------- evaluation


def heldout_pairs(ctx: RoundContext, domains: list[str]) -> list[PreferencePair]:
    """Held-out pairs: RoundContext.heldout_pairs_path, else the world's held-out pairs of `domains`."""
    from data.preferences import pair_from_row, read_preferences
    from data.world.config import WorldConfig
    from data.world.files import heldout_pairs as world_heldout

    if ctx.heldout_pairs_path:
        return read_preferences(ctx.heldout_pairs_path)
    drawn = {k: v for k, v in ctx.world.items() if k in WorldConfig.__dataclass_fields__
             and k not in ("seed", "domains", "heldout_pairs_per_domain")}
    world = WorldConfig(**drawn, seed=ctx.seed, domains=domains, heldout_pairs_per_domain=ctx.cfg.eval_pairs_per_domain)
    return [pair_from_row(r) for r in world_heldout(world)]


def rm_accuracies(model_dirs: dict[str, str], sets: dict[str, list[PreferencePair]], device: str) -> dict[str, dict]:
    """{model: {set: {"accuracy", "by_domain"}}} with the reward job's scoring and accuracy (ties count half)."""
    from actors.reward import RewardWorker
    from jobs.reward import accuracy, by_domain, pair_scores

    out: dict[str, dict] = {}
    for name, model_dir in model_dirs.items():
        worker = RewardWorker(model_dir, device=device)
        out[name] = {}
        for set_name, pairs in sets.items():
            if pairs:
                c, r = pair_scores(worker, pairs)
                out[name][set_name] = {"accuracy": accuracy(c, r), "by_domain": by_domain(pairs, c, r)}
    return out


def evaluate_round(ctx: RoundContext, trainer: RoundTrainer, trained: dict | None) -> dict:
    """Old vs new RM on held-out pairs (per domain), on this round's fast pairs and on its slow pairs; the old RM
    alone (`*_acc_after` None) when the round trained none (`trained` None).

    Runs on rank 0 of `trainer.group` (the RM update's process: its device, its threads, its imports), not in the driver."""
    rm_cfg = registry_of(trained["model_dir"] if trained else ctx.rm_dir)
    domains = [d for d in ctx.cfg.prompt_domains if d in rm_cfg.domains]
    sets = {"heldout": heldout_pairs(ctx, domains)}
    for kind in ("fast", "slow"):
        rows = list(read_jsonl(ctx.round_dir / f"{kind}_pairs.jsonl"))
        sets[f"{kind}_pairs"] = [parse_online_row(row, ctx.round_dir / f"{kind}_pairs.jsonl", n) for n, row in rows]
    models = {"before": ctx.rm_dir, **({"after": trained["model_dir"]} if trained else {})}
    device = "cuda" if trainer_config(ctx).use_gpu else "cpu"
    acc = trainer.group.run(rm_accuracies, models, sets, device, phase="rm eval", timeout_s=ctx.rm_timeout_s)
    out: dict[str, Any] = {k: v for k, v in (trained or {}).items() if k != "model_dir"}
    for set_name, pairs in sets.items():
        out["heldout_pairs" if set_name == "heldout" else set_name] = len(pairs)
        for when in ("before", "after"):
            got = acc.get(when, {}).get(set_name)
            out[f"{set_name}_acc_{when}"] = got["accuracy"] if got else None
            if set_name == "heldout" and got:
                out.update({f"heldout_acc_{when}/{d}": a for d, a in got["by_domain"].items()})
    return out
