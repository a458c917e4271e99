"""Write the embedded preference world to a run directory: SFT chats, preference pairs, held-out prompts.

    python jobs/world.py                                  # outputs/world/
    python jobs/world.py world.seed=3 world.train_pairs_per_domain=500
    ray job submit --working-dir . -- python jobs/world.py run.root=/shared/outputs

Files (all JSONL): sft.jsonl ({"messages": [user, assistant]} rows for the SFT job), pairs_train.jsonl,
pairs_heldout.jsonl, pairs_conflict.jsonl (coolray preference rows: messages, chosen, rejected, domain, plus
provenance), prompts/heldout_<domain>.jsonl (Prompt rows: id, domain, messages, meta). Deterministic in
world.seed (which defaults to run.seed). The world itself is described in data/world/__init__.py and
docs/design.md; nothing here needs Ray.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

from dataclasses import dataclass, field  # noqa: E402

from data.world.config import WorldConfig  # noqa: E402
from jobs.common import LoggingConfig, Run, RunConfig, run_job  # noqa: E402


@dataclass
class WorldJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    world: WorldConfig = field(default_factory=WorldConfig)


def main(cfg: WorldJobConfig, run: Run) -> dict:
    from data.world.files import write_world

    written = write_world(cfg.world, run.dir)
    counts = written["counts"]
    run.logger.log({f"world/{k}": v for k, v in counts.items() if isinstance(v, int)})
    run.logger.log_table("world/train_pairs_by_domain", ["domain", "pairs"],
                         [[d, n] for d, n in counts["train_pairs_by_domain"].items()])
    paths = written["paths"]
    return {
        "seed": cfg.world.seed,
        "domains": list(cfg.world.domains),
        "sft_path": paths["sft"],
        "train_pairs_path": paths["train_pairs"],
        "heldout_pairs_path": paths["heldout_pairs"],
        "conflict_pairs_path": paths["conflict_pairs"],
        "heldout_prompt_paths": paths["heldout_prompts"],
        "counts": counts,
    }


if __name__ == "__main__":
    run_job("world", WorldJobConfig, main)
