"""The generic supervised loop over a TrainTask: epochs of micro-batches, optimizer steps, metrics, checkpoints.

Runs on every rank of a launcher's process group (Ray Train: `cluster.train.fit`) or alone in one process
(world size 1, no Ray) for tests and benchmarks. Restarting it on the same run dir resumes from the newest
complete checkpoint: same weights, optimizer, LR schedule, RNG and data position, so N steps straight and
N/2 + crash + rerun give the same model.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from trainer.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    remove_stale_temp_dirs,
    save_checkpoint,
)
from trainer.config import TrainerConfig
from trainer.engine import TrainEngine, build_engine
from trainer.task import TrainTask


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    final_loss: float | None
    tokens: int
    tokens_per_second: float  # this run's optimizer steps only (a resumed run counts its own part)
    model_dir: str | None  # None when stopped early (trainer.stop_after_steps)
    checkpoint_dir: str | None
    resumed_from_step: int
    stopped_early: bool = False

    def summary(self) -> dict:
        """The headline figures every training job puts in its summary.json (every field)."""
        return dataclasses.asdict(self)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def plan_steps(task: TrainTask, cfg: TrainerConfig, rank: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps). A trailing partial accumulation window is dropped."""
    per_epoch = task.num_batches(rank, world, 0) // cfg.grad_accum
    if per_epoch < 1:
        raise ValueError(
            f"task {task.name!r} gives rank {rank} only {task.num_batches(rank, world, 0)} micro-batches per epoch, "
            f"fewer than trainer.grad_accum={cfg.grad_accum}: add data, or lower trainer.micro_batch_size, "
            "trainer.grad_accum or trainer.num_workers"
        )
    total = cfg.max_steps if cfg.max_steps > 0 else per_epoch * cfg.epochs
    return per_epoch, total


def _reduce(values: list[float], device: torch.device, world: int) -> list[float]:
    """Sum over ranks (one small all-reduce per optimizer step)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class _Window:
    """Sums over the micro-batches of one optimizer step, reduced over ranks at its end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.loss = 0.0
        self.count = 0
        self.sums: dict[str, float] = {}

    def add(self, loss: torch.Tensor, metrics: dict[str, float]) -> None:
        self.loss += float(loss.detach().float())
        self.count += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def finish(self, engine: TrainEngine, out, state: TrainState) -> dict:
        keys = sorted(self.sums)
        summed = _reduce([self.loss, self.count] + [self.sums[k] for k in keys], engine.device, engine.world_size)
        seconds = time.perf_counter() - self.start
        cpu_seconds = time.process_time() - self.cpu_start
        loss_sum, count, rest = summed[0], summed[1], dict(zip(keys, summed[2:]))
        tokens = int(rest.pop("tokens", 0))
        row = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss_sum / count,  # mean of micro-batch losses over the window and the ranks
            "lr": out.lr,
            "grad_norm": out.grad_norm,
            "tokens": tokens,  # all ranks, this step
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "step_seconds": seconds,
            "step_cpu_seconds": cpu_seconds,  # this process, all threads: wall time minus waiting for the CPU
        }
        row.update({k: v / count for k, v in rest.items()})
        return row


class _Throughput:
    """Tokens per second over this run's steps, the first one (lazy init, allocator warm-up) left out."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.first = 0, 0.0, None

    def add(self, row: dict) -> None:
        if self.first is None:
            self.first = row
            return
        self.tokens += row["tokens"]
        self.seconds += row["step_seconds"]

    def value(self) -> float:
        if self.seconds > 0:
            return self.tokens / self.seconds
        return self.first["tokens_per_second"] if self.first else 0.0


def _checkpoint_due(cfg: TrainerConfig, step: int, total: int) -> bool:
    return step >= total or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)


def train(
    task: TrainTask,
    cfg: TrainerConfig,
    run_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train `task` under `cfg` into `run_dir` (checkpoints/ and model/); every rank calls it.

    `on_metrics(row)` gets, on rank 0 only, one `{"event": "start", "total_steps", ...}` row and then one row
    per optimizer step (step, epoch, loss, lr, grad_norm, tokens, tokens_per_second, task metrics).
    `on_checkpoint(row)` runs on every rank right after each checkpoint (safe for collectives)."""
    run_dir = Path(run_dir)
    rank, world = _rank_world()
    ckpt_root = run_dir / "checkpoints"
    if rank == 0:
        remove_stale_temp_dirs(ckpt_root)

    # Same seed on every rank before building: identical initial weights and LoRA adapters everywhere.
    seed_all(cfg.seed)
    model = task.build_model()
    per_epoch, total = plan_steps(task, cfg, rank, world)
    factory = getattr(task, "build_export_model", task.build_model)
    engine = build_engine(model, cfg, total, device=device, model_factory=factory)

    state = TrainState(world_size=world, backend=cfg.backend, zero_stage=cfg.zero_stage if cfg.use_deepspeed else 0)
    latest = latest_checkpoint(ckpt_root) if resume else None
    if latest is not None:
        state = _resume(engine, latest, state)
    else:
        seed_all(cfg.seed + rank)  # per-rank streams for dropout and the like
    resumed_from = state.step
    if on_metrics is not None and rank == 0:
        on_metrics({"event": "start", "total_steps": total, "resumed_from_step": resumed_from, "steps_per_epoch": per_epoch})

    meter = _Throughput()
    stopped = _run_steps(task, cfg, engine, state, total, ckpt_root, meter, on_metrics, on_checkpoint)
    model_dir = None if stopped else _export(task, engine, run_dir / "model")
    last = latest_checkpoint(ckpt_root)
    return TrainResult(
        steps=state.step,
        total_steps=total,
        final_loss=state.last_loss,
        tokens=state.tokens,
        tokens_per_second=meter.value(),
        model_dir=str(model_dir) if model_dir else None,
        checkpoint_dir=str(last) if last else None,
        resumed_from_step=resumed_from,
        stopped_early=stopped,
    )


def _resume(engine: TrainEngine, ckpt: Path, fresh: TrainState) -> TrainState:
    saved = read_state(ckpt)
    if (saved.world_size, saved.backend, saved.zero_stage) != (fresh.world_size, fresh.backend, fresh.zero_stage):
        raise ValueError(
            f"{ckpt} was written with world_size={saved.world_size}, backend={saved.backend}, "
            f"zero_stage={saved.zero_stage}; this run has world_size={fresh.world_size}, backend={fresh.backend}, "
            f"zero_stage={fresh.zero_stage}. Resume with the same trainer settings, or start a fresh run dir "
            "(a new run.name, or run.resume=false)"
        )
    return load_checkpoint(engine, ckpt)


def _run_steps(task, cfg, engine, state, total, ckpt_root, meter, on_metrics, on_checkpoint) -> bool:
    """Advance `state` to `total` optimizer steps; True when stopped early by trainer.stop_after_steps."""
    rank, world = engine.rank, engine.world_size
    while state.step < total:
        usable = task.num_batches(rank, world, state.epoch) // cfg.grad_accum * cfg.grad_accum
        # The data cursor: skip what this epoch already trained on (batches are deterministic per epoch).
        batches = itertools.islice(task.batches(rank, world, state.epoch), state.micro_batch, usable)
        window = _Window()
        for batch in batches:
            batch = _to_device(batch, engine.device)
            with engine.autocast():
                loss, metrics = task.loss(engine.model, batch)
            out = engine.step(loss)
            state.micro_batch += 1
            window.add(loss, metrics)
            if not out.stepped:
                continue
            state.step += 1
            row = window.finish(engine, out, state)
            window = _Window()
            state.tokens += row["tokens"]
            state.last_loss = row["loss"]
            meter.add(row)
            if on_metrics is not None and rank == 0:
                on_metrics(row)
            if cfg.stop_after_steps and state.step >= cfg.stop_after_steps and state.step < total:
                return True
            if _checkpoint_due(cfg, state.step, total):
                save_checkpoint(engine, ckpt_root, state, cfg.keep_checkpoints)
                if on_checkpoint is not None:
                    on_checkpoint(row)
            if state.step >= total:
                return False
        state.epoch += 1
        state.micro_batch = 0
    return False


def _export(task: TrainTask, engine: TrainEngine, out_dir: Path) -> Path:
    """The final HF directory: merged, unsharded, written by rank 0 through the task (model + tokenizer)."""
    full = engine.full_model()
    if full is not None:
        task.save_model(full, out_dir)
    if engine.world_size > 1:
        dist.barrier()
    return out_dir
