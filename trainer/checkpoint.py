"""Full training-state checkpoints: written atomically by all ranks together, newest K kept, resumed exactly.

Layout of `<run_dir>/checkpoints/step_00000040/` (the name appears only once everything is written):
    meta.json            TrainState: step, epoch, data cursor (micro-batch index in the epoch), tokens, last loss
    engine/              model + optimizer + LR schedule (DDP: rank 0's *.pt; DeepSpeed: every rank's ZeRO shards)
    rng/rank_<r>.pt      python / numpy / torch (and CUDA) RNG states of each rank

On a multi-node cluster the run dir must be on storage every node sees (as Ray Train's storage_path must be).
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.io import atomic_dir, atomic_write_json

PREFIX = "step_"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of `epoch` already consumed (the data cursor)
    tokens: int = 0  # tokens trained on so far, all ranks
    last_loss: float | None = None
    world_size: int = 1
    backend: str = "ddp"
    zero_stage: int = 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints (a meta.json inside a renamed directory), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def read_state(ckpt: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(ckpt) / "meta.json").read_text()))


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _share_path(path: Path | None) -> Path:
    """Rank 0 picked the temp dir name; everyone else learns it."""
    if not _distributed():
        return path
    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def save_checkpoint(engine, root: str | Path, state: TrainState, keep: int) -> Path:
    """Collective: every rank writes its part into one temp dir; rank 0 renames it into place and prunes."""
    final = Path(root) / f"{PREFIX}{state.step:08d}"
    if _rank() == 0:
        with atomic_dir(final) as tmp:
            (tmp / "engine").mkdir()
            (tmp / "rng").mkdir()
            _write_parts(engine, _share_path(tmp))
            atomic_write_json(tmp / "meta.json", asdict(state))  # last: its presence marks the checkpoint complete
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    else:
        _write_parts(engine, _share_path(None))
    if _distributed():
        dist.barrier()
    return final


def _write_parts(engine, tmp: Path) -> None:
    engine.save(tmp / "engine")
    torch.save(capture_rng(), tmp / "rng" / f"rank_{_rank()}.pt")
    if _distributed():
        dist.barrier()


def load_checkpoint(engine, ckpt: str | Path) -> TrainState:
    """Restore engine state and this rank's RNG; returns where training stopped."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    engine.load(ckpt / "engine")
    # Our own file (python/numpy RNG tuples are not plain tensors), so the full unpickler is fine here.
    restore_rng(torch.load(ckpt / "rng" / f"rank_{_rank()}.pt", map_location="cpu", weights_only=False))
    return state


def remove_stale_temp_dirs(root: str | Path) -> None:
    """Temp dirs left by a run killed mid-write are never complete checkpoints; drop them (rank 0)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(f".{PREFIX}") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
