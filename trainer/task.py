"""The contract between a training job and the generic training loop.

A job (pretrain, SFT, reward model) describes *what* to train as a picklable TrainTask; `trainer.loop`
decides *how* (DDP or DeepSpeed ZeRO-2/3, accumulation, clipping, schedule, checkpoint/resume) and
`cluster.train.fit` runs it on Ray Train workers. The same task also runs in one process in tests.

Optional: a task may define `build_export_model()` returning the full-precision base without quantization
(QLoRA tasks load the training base in 4 bit); the loop uses it, else `build_model`, to rebuild the final model
when the live one cannot be copied (ZeRO-3, DeepSpeed bf16, QLoRA).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainTask(Protocol):
    name: str

    def build_model(self) -> torch.nn.Module:
        """Called once on every rank; returns the (unwrapped) module to train, on CPU."""

    def num_batches(self, rank: int, world_size: int, epoch: int) -> int:
        """Micro-batches this rank will see in `epoch` (all ranks must agree on the count)."""

    def batches(self, rank: int, world_size: int, epoch: int) -> Iterable[dict[str, torch.Tensor]]:
        """This rank's micro-batches for `epoch`, deterministic given (rank, world_size, epoch, seed)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch (already averaged the way the task wants) and metrics such as `tokens`."""

    def save_model(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Export the unwrapped, full-precision model in a self-contained format (HF dir) to `out_dir`."""
