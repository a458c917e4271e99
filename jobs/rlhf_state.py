"""Driver-side state of an RLHF run: the prompt stream, the PTX stream, and the checkpoint that makes a run resumable.

Everything random in an iteration is a function of (run seed, iteration index): the prompt batch comes from a
per-epoch permutation indexed by a cursor, the rollout sampling seed is derived from the iteration, the PTX rows from
a cursor. A checkpoint therefore only needs cursors and counters (plus model/optimiser states, which the trainer
engine saves), and a resumed run replays exactly what the uninterrupted one would have done.

Checkpoint layout (one directory per save, written under a temp name and renamed, so a crash never leaves a
half-written checkpoint; `latest` names the newest complete one):

    <run_dir>/checkpoints/latest                     "iter_000004_r01"
    <run_dir>/checkpoints/iter_000004_r01/state.json  DriverState (cursors, stats, KL controller, rounds, versions)
                                        /rng.pt      driver RNG states (python, numpy, torch)
                                        /policy/     policy engine: weights + optimiser + schedule (every rank)
                                        /critic/     critic engine: the same
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data.io import atomic_write_json, atomic_write_text

STATE_FILE = "state.json"


@dataclass
class DriverState:
    iteration: int = 0  # completed PPO iterations over all rounds
    prompt_cursor: int = 0  # prompts drawn so far
    ptx_cursor: int = 0  # pretraining rows drawn so far
    weight_version: int = 0  # last version pushed to the rollout engines (versions only grow)
    policy_version: int = 0  # policy optimiser steps so far (the lineage tag of the policy's samples)
    rm_dir: str = ""  # the reward model the reward role serves now
    reward_stats: dict = field(default_factory=dict)  # algo.stats.RewardNormalizer.state_dict()
    kl_ctl: dict = field(default_factory=dict)  # algo.kl controller state_dict()
    round_results: list[dict] = field(default_factory=list)  # one RoundResult (as a dict) per finished round
    snapshots: dict[str, str] = field(default_factory=dict)  # "r1/early" -> HF dir of that policy snapshot
    snapshot_versions: dict[str, int] = field(default_factory=dict)  # "r1/early" -> policy version
    oracle_sft: dict = field(default_factory=dict)  # {"mean": float, "by_domain": {...}}
    last_metrics: dict = field(default_factory=dict)  # the newest iteration's logged metrics
    seconds: float = 0.0  # wall time spent in all attempts so far

    @classmethod
    def from_dict(cls, data: dict) -> "DriverState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------- checkpoints


class Checkpointer:
    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(
                f"{pointer} names {path.name}, which has no {STATE_FILE}; the checkpoint directory was changed by hand. "
                "Point `latest` at a complete checkpoint or rerun with run.resume=false to start over"
            )
        return path

    def save(self, state: DriverState, write_models: Callable[[Path], None]) -> Path:
        """Write `state` and let `write_models(tmp_dir)` add the engine states; publish atomically."""
        import torch

        name = f"iter_{state.iteration:06d}_r{len(state.round_results):02d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_models(tmp)
        torch.save(_rng_states(), tmp / "rng.pt")
        atomic_write_json(tmp / STATE_FILE, dataclasses.asdict(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(self.root / "latest", name + "\n")
        self._prune(keep_name=name)
        return final

    def load_state(self, path: Path) -> DriverState:
        import torch

        state = DriverState.from_dict(json.loads((path / STATE_FILE).read_text()))
        if (path / "rng.pt").exists():
            _set_rng_states(torch.load(path / "rng.pt", weights_only=False))
        return state

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _prune(self, keep_name: str) -> None:
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir())
        for old in [p for p in done if p.name != keep_name][: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)


def _rng_states() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_states(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


# ---------------------------------------------------------------------------------------------- data streams


class PromptStream:
    """Training prompts of every domain, balanced: draw i is domain i mod D, taking that domain's prompts in a seeded
    per-epoch order. Every window of D draws holds each domain once, so batch rewards do not swing with the domain
    mix, and the whole stream is a function of the cursor."""

    def __init__(self, domains: list[str], per_domain: int, seed: int):
        from data.world import make_prompts

        if not domains or per_domain < 1:
            raise ValueError("the prompt stream needs at least one domain and prompts.pool_per_domain >= 1")
        self.pools = [make_prompts(d, per_domain, seed=seed, split="train") for d in domains]
        self.seed = seed
        self._orders: dict[tuple[int, int], list[int]] = {}

    @property
    def pool(self) -> list:
        return [p for pool in self.pools for p in pool]

    def batch(self, cursor: int, size: int) -> list:
        return [self._at(i) for i in range(cursor, cursor + size)]

    def _at(self, index: int):
        turn, d = divmod(index, len(self.pools))
        pool = self.pools[d]
        epoch, offset = divmod(turn, len(pool))
        if (d, epoch) not in self._orders:
            order = list(range(len(pool)))
            random.Random(f"rlhf-prompts:{self.seed}:{d}:{epoch}").shuffle(order)
            self._orders[(d, epoch)] = order
        return pool[self._orders[(d, epoch)][offset]]


class PTXStream:
    """Rows of the packed pretraining corpus (`jobs/data.py`'s `packed_dir`: Parquet, `input_ids` per row), read by
    index so that a cursor is all the state it needs."""

    def __init__(self, packed_dir: str, max_len: int, seed: int):
        import pyarrow.dataset as ds

        if not Path(packed_dir).is_dir():
            raise FileNotFoundError(
                f"ptx.packed_dir={packed_dir!r} is not a directory; give the packed_dir from jobs/data.py's summary.json "
                "or leave it empty to train without the pretraining loss"
            )
        self.dataset = ds.dataset(packed_dir, format="parquet")
        if "input_ids" not in self.dataset.schema.names:
            raise ValueError(f"{packed_dir}: the packed Parquet files have no 'input_ids' column "
                             f"(columns: {self.dataset.schema.names}); rebuild it with jobs/data.py")
        self.rows = self.dataset.count_rows()
        if self.rows == 0:
            raise ValueError(f"{packed_dir} holds no packed sequences; rerun jobs/data.py with more documents")
        self.max_len, self.seed = max_len, seed

    def batch(self, cursor: int, size: int) -> list[list[int]]:
        # Stride through the corpus with a seed-dependent offset: rows differ between iterations, no shuffle state.
        start = random.Random(f"rlhf-ptx:{self.seed}").randrange(self.rows)
        indices = [(start + i) % self.rows for i in range(cursor, cursor + size)]
        table = self.dataset.take(indices, columns=["input_ids"])
        return [list(map(int, ids))[: self.max_len] for ids in table.column("input_ids").to_pylist()]


def iteration_seed(run_seed: int, iteration: int) -> int:
    # Distinct per (run seed, iteration) and far apart, since prompt i of a call samples with seed + i.
    return (run_seed * 1_000_003 + iteration * 65_537) % 2**31
