"""`trainer.loop.train` on a group of Ray actors that stay up between fits: the RLHF driver's RM updates.

    group = TrainerGroup.for_config(trainer_cfg, name="rm_update", threads=0)   # processes start once
    result = group.fit(task, trainer_cfg, run_dir, timeout_s=3600)            # -> rank 0's TrainResult
    accs = group.run(rm_accuracies, models, sets, "cpu", phase="rm eval", timeout_s=600)   # rank 0, same process
    group.shutdown()

`cluster.train.fit` (Ray Train) starts a controller and fresh worker processes for every fit. For a job that
trains once that is nothing; for the online RLHF loop, which finetunes the RM between every pair of PPO rounds,
it was 16 of the 37 seconds an update took on the demo (process start, imports, controller and worker-group
set-up and tear-down), twice a run. Here the processes, their imports and their torch.distributed group are made
once; each fit is one call per rank of the same generic loop (`trainer.loop.train`), with the same progress bar
and per-step rows through a `MetricsChannel`, the same checkpoint/resume contract, and the same
`trainer.max_failures` meaning: a rank that dies restarts the whole group, which resumes from the newest
checkpoint in `run_dir`. A fit that hangs fails with a PhaseTimeout naming the group and phase.

Between fits a rank holds no model (`train`'s model and optimizer are gone when it returns; on a GPU the cache
is emptied), only its process, imports and process group.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any, Callable

from cluster.actor_group import ActorGroup, init_process_group_from_env
from cluster.placement import RoleResources
from cluster.timeouts import RoleDied
from cluster.train import MetricsChannel, check_resources, follow_metrics
from trainer.config import TrainerConfig
from trainer.loop import TrainResult


def default_threads(local_world_size: int) -> int:
    """The CPUs this process may run on, shared among the group's ranks on its node (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_world_size))


class TrainerWorker:
    """One rank (plain class; TrainerGroup makes it an actor). `threads` 0 = default_threads."""

    def __init__(self, threads: int = 0):
        import torch

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.threads = threads if threads > 0 else default_threads(local)
        torch.set_num_threads(self.threads)
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1:
            init_process_group_from_env()

    def fit(self, task, cfg: TrainerConfig, run_dir: str, channel=None, resume: bool = True) -> dict | None:
        """Rank 0 returns the TrainResult as a dict (and streams per-step rows to `channel`); other ranks None."""
        import torch

        from trainer.loop import train

        device = torch.device("cuda", 0) if cfg.use_gpu else torch.device("cpu")
        on_metrics = (lambda row: channel.put.remote(row)) if channel is not None else None
        try:
            result = train(task, cfg, run_dir, device=device, on_metrics=on_metrics, resume=resume)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the model and optimizer are gone; leave the memory to the roles
        if self.rank != 0:
            return None
        if channel is not None:  # calls from one caller run in order: every step row is in before this returns
            import ray

            ray.get(channel.put.remote({"event": "done"}))
        return dataclasses.asdict(result)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` in this warm process (e.g. scoring with the model just trained)."""
        import torch

        try:
            return fn(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # whatever fn loaded is gone with it


class TrainerGroup:
    """`num_workers` TrainerWorker ranks with the given resources, in a placement group of their own."""

    def __init__(self, name: str, num_workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0,
                 threads: int = 0, start_timeout_s: float = 600.0):
        self.name = name
        self.resources = RoleResources(num_actors=num_workers, cpus_per_actor=cpus_per_worker,
                                       gpus_per_actor=gpus_per_worker)
        self.group = ActorGroup(TrainerWorker, name, self.resources, init_kwargs={"threads": threads},
                                start_timeout_s=start_timeout_s)

    @classmethod
    def for_config(cls, cfg: TrainerConfig, name: str, threads: int = 0, start_timeout_s: float = 600.0):
        check_resources(cfg)
        return cls(name, cfg.num_workers, cfg.cpus_per_worker, cfg.gpus_per_worker if cfg.use_gpu else 0.0,
                   threads, start_timeout_s)

    def fit(self, task, cfg: TrainerConfig, run_dir: str | Path, *, timeout_s: float, logger: Any = None,
            show_progress: bool = True, resume: bool = True, poll_s: float = 0.5) -> TrainResult:
        """Train `task` under `cfg` into `run_dir` on this group; rank 0's TrainResult. Restarts the group and
        resumes from the newest checkpoint on a rank's death, up to cfg.max_failures times."""
        import ray

        if cfg.num_workers != self.group.world_size:
            raise ValueError(f"{self.name}: trainer.num_workers={cfg.num_workers} but this group has "
                             f"{self.group.world_size} ranks; make a TrainerGroup for the new size")
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        failures = 0
        while True:
            channel = ray.remote(MetricsChannel).options(num_cpus=0).remote()
            outcome: dict[str, Any] = {}
            refs = self.group.call("fit", task, cfg, str(run_dir), channel, resume)

            def wait(refs=refs, outcome=outcome) -> None:
                try:
                    outcome["results"] = self.group.get(refs, phase=f"fit {task.name}", timeout_s=timeout_s)
                except BaseException as e:  # re-raised in the caller's thread
                    outcome["error"] = e

            thread = threading.Thread(target=wait, name=f"{self.name}-fit", daemon=True)
            thread.start()
            follow_metrics(channel, thread, logger, show_progress, poll_s, task.name)
            thread.join()
            ray.kill(channel)
            error = outcome.get("error")
            if error is None:
                return TrainResult(**outcome["results"][0])
            if not isinstance(error, RoleDied) or failures >= cfg.max_failures:
                raise error
            failures += 1
            print(f"{error}\nrestarting {self.name} ({failures}/{cfg.max_failures}); it resumes from the newest "
                  f"checkpoint in {run_dir}", flush=True)
            self.group.restart()

    def run(self, fn: Callable[..., Any], *args: Any, phase: str, timeout_s: float, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on rank 0 (with the group's device and threads); its return value."""
        (out,) = self.group.get([self.group.call_rank(0, "run", fn, *args, **kwargs)], phase=phase,
                                timeout_s=timeout_s, ranks=[0])
        return out

    def shutdown(self) -> None:
        self.group.shutdown()
