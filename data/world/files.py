"""The world written to disk: the files jobs/world.py produces and jobs/reward.py (or anyone) reads back."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from data.io import atomic_write_jsonl
from data.world.config import WorldConfig
from data.world.pairs import conflict_pairs, preference_pairs, sft_conversations
from data.world.registry import make_prompts

SFT_FILE = "sft.jsonl"
TRAIN_PAIRS = "pairs_train.jsonl"
HELDOUT_PAIRS = "pairs_heldout.jsonl"
CONFLICT_PAIRS = "pairs_conflict.jsonl"
PROMPTS_DIR = "prompts"


def train_pairs(cfg: WorldConfig) -> list[dict]:
    return [r for d in cfg.domains
            for r in preference_pairs(d, cfg.train_pairs(d), seed=cfg.seed, split="train", flattery=cfg.flattery_pairs)]


def heldout_pairs(cfg: WorldConfig) -> list[dict]:
    # a different seed stream from training, and heldout prompts only
    return [r for d in cfg.domains for r in preference_pairs(d, cfg.heldout_pairs_per_domain, seed=cfg.seed + 1,
                                                             split="heldout", flattery=cfg.flattery_pairs)]


def conflicts(cfg: WorldConfig) -> list[dict]:
    return conflict_pairs(cfg.conflict_pairs, seed=cfg.seed + 2, split="heldout") if cfg.has_conflict_domains else []


def write_world(cfg: WorldConfig, out_dir: str | Path) -> dict:
    """Every file of the world under `out_dir`; returns {"paths": {...}, "counts": {...}}."""
    out = Path(out_dir)
    rows = {
        "sft": (SFT_FILE, sft_conversations(cfg.sft_conversations, cfg.seed, cfg.flattery_sft)),
        "train_pairs": (TRAIN_PAIRS, train_pairs(cfg)),
        "heldout_pairs": (HELDOUT_PAIRS, heldout_pairs(cfg)),
        "conflict_pairs": (CONFLICT_PAIRS, conflicts(cfg)),
    }
    paths, counts = {}, {}
    for key, (name, data) in rows.items():
        paths[key] = str(atomic_write_jsonl(out / name, data))
        counts[key] = len(data)
    prompt_paths, prompt_counts = {}, {}
    for d in cfg.domains:
        prompts = make_prompts(d, cfg.heldout_prompts_per_domain, seed=cfg.seed, split="heldout")
        p = atomic_write_jsonl(out / PROMPTS_DIR / f"heldout_{d}.jsonl", [dataclasses.asdict(x) for x in prompts])
        prompt_paths[d], prompt_counts[d] = str(p), len(prompts)
    counts["train_pairs_by_domain"] = _by_domain(rows["train_pairs"][1])
    counts["heldout_prompts"] = prompt_counts
    return {"paths": {**paths, "heldout_prompts": prompt_paths}, "counts": counts}


def _by_domain(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["domain"]] = out.get(r["domain"], 0) + 1
    return out
