"""cluster.trainer_group: the generic loop on actors that stay up between fits (the RLHF driver's RM updates).

It must train exactly what Ray Train's `fit` trains, keep its processes between fits, and survive a rank's death
the way `trainer.max_failures` promises (restart, resume from the newest checkpoint) or fail naming the group.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainerConfig
from trainer.lm_tasks import PretrainTask


class Rows:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, row: dict, step: int | None = None) -> None:
        self.rows.append({**row, "step": step})


def _world_and_pid() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_world_size(), os.getpid()


def test_two_warm_ranks_train_what_ray_train_trains_and_keep_their_processes(ray_cluster, packed_corpus, tiny_dir,
                                                                              tmp_path):
    from cluster.train import fit
    from cluster.trainer_group import TrainerGroup

    task = PretrainTask(data_dir=str(packed_corpus), tokenizer_path=str(tiny_dir), micro_batch_size=4, seed=0)
    cfg = TrainerConfig(num_workers=2, cpus_per_worker=1, lr=5e-3, warmup_ratio=0.0, max_steps=3, micro_batch_size=4,
                        checkpoint_every=0)
    ray_train, warm = Rows(), Rows()
    expected = fit(task, cfg, tmp_path / "ray_train", logger=ray_train, show_progress=False)

    group = TrainerGroup.for_config(cfg, name="rm_update", threads=1)  # Ray Train's workers run 1 thread at 1 CPU
    try:
        world, pid = group.run(_world_and_pid, phase="probe", timeout_s=60)
        assert world == 2  # the ranks joined one process group when they started
        got = group.fit(task, cfg, tmp_path / "warm", timeout_s=300, logger=warm, show_progress=False)
        # A second fit (another run dir) runs in the same, already warm process.
        again = group.fit(task, cfg, tmp_path / "warm_again", timeout_s=300, show_progress=False)
        assert group.run(_world_and_pid, phase="probe", timeout_s=60) == (2, pid)
    finally:
        group.shutdown()

    assert (got.steps, got.resumed_from_step, got.stopped_early) == (3, 0, False)
    assert got.final_loss == pytest.approx(expected.final_loss, rel=1e-6) and again.final_loss == got.final_loss
    # every step row reached the driver's logger, the same as through Ray Train
    assert [r["step"] for r in warm.rows] == [1, 2, 3]
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/tokens"):
        assert [r[key] for r in warm.rows] == pytest.approx([r[key] for r in ray_train.rows], rel=1e-6), key
    ref = load_file(str(Path(expected.model_dir) / "model.safetensors"))
    for name, tensor in load_file(str(Path(got.model_dir) / "model.safetensors")).items():
        torch.testing.assert_close(tensor, ref[name], atol=1e-6, rtol=0, msg=name)


@dataclass
class CrashOnceTask(PretrainTask):
    """Kills its process at the 3rd micro-batch unless `marker` exists (it is written first: one crash per test)."""

    marker: str = ""

    def loss(self, model, batch):
        self._seen = getattr(self, "_seen", 0) + 1
        if self._seen == 3 and not Path(self.marker).exists():
            Path(self.marker).write_text("crashed")
            os._exit(1)
        return super().loss(model, batch)


def test_a_dead_rank_restarts_the_group_and_resumes_or_fails_naming_it(ray_cluster, packed_corpus, tiny_dir, tmp_path,
                                                                      capsys):
    from cluster.timeouts import RoleDied
    from cluster.trainer_group import TrainerGroup

    task = CrashOnceTask(data_dir=str(packed_corpus), tokenizer_path=str(tiny_dir), micro_batch_size=4, seed=0,
                         marker=str(tmp_path / "crashed_once"))
    cfg = TrainerConfig(num_workers=1, cpus_per_worker=1, lr=5e-3, max_steps=4, micro_batch_size=4,
                        checkpoint_every=2, max_failures=1)
    group = TrainerGroup.for_config(cfg, name="rm_update", threads=1)
    try:
        result = group.fit(task, cfg, tmp_path / "run", timeout_s=300, show_progress=False)
        assert (tmp_path / "crashed_once").exists()
        # the restarted rank picked up the step-2 checkpoint and finished the remaining two steps
        assert (result.resumed_from_step, result.steps) == (2, 4) and Path(result.model_dir).is_dir()
        assert "restarting rm_update (1/1)" in capsys.readouterr().out

        (tmp_path / "crashed_once").unlink()
        no_retry = dataclasses.replace(cfg, max_failures=0)
        with pytest.raises(RoleDied, match="rm_update") as err:
            group.fit(task, no_retry, tmp_path / "run_no_retry", timeout_s=300, show_progress=False)
        assert "fit pretrain" in str(err.value)
    finally:
        group.shutdown()
