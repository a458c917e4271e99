"""Running `trainer.loop.train` on Ray Train workers, with live metrics and a progress bar on the driver.

    result = fit(task, trainer_cfg, run_dir, logger=run.logger)

One Ray Train `TorchTrainer` worker per rank (`trainer.num_workers` x `cpus_per_worker` / `gpus_per_worker`),
gloo on CPU and NCCL on GPU. Rank 0 streams one row per optimizer step to a zero-CPU channel actor without
waiting for it (ordered, and it works across nodes with no shared disk); the driver drains it twice a second
into `logger.log` (W&B + metrics.jsonl) and the progress bar; the final TrainResult comes the same way.
Every rank calls `ray.train.report(metrics)` after each checkpoint, so Ray Train's own view follows too.

Checkpoints and the final model are written by the workers under `run_dir`, so on a multi-node cluster
`run.root` must be shared storage (as Ray Train's own `storage_path`, here `<run_dir>/ray_train`, must be).
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster.runtime_env import worker_env_vars
from trainer.config import TrainerConfig
from trainer.loop import TrainResult
from trainer.task import TrainTask


class MetricsChannel:
    """Rows from rank 0 to the driver (actor; fire-and-forget puts keep the training step unblocked)."""

    def __init__(self) -> None:
        self._rows: list[dict] = []

    def put(self, row: dict) -> None:
        self._rows.append(row)

    def drain(self) -> list[dict]:
        rows, self._rows = self._rows, []
        return rows


def _worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker: the generic loop on this rank's device."""
    import ray.train
    import torch
    from ray.train.torch import get_device

    from trainer.loop import train

    cfg: TrainerConfig = config["cfg"]
    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    channel = config["channel"]

    def on_metrics(row: dict) -> None:
        channel.put.remote(row)

    def on_checkpoint(row: dict) -> None:
        ray.train.report({k: v for k, v in row.items() if v is not None})

    result = train(
        config["task"], cfg, config["run_dir"], device=device,
        on_metrics=on_metrics, on_checkpoint=on_checkpoint, resume=config["resume"],
    )
    if ray.train.get_context().get_world_rank() == 0:
        # Ray Train V2 keeps only metrics attached to checkpoints in its Result, so the outcome takes the channel.
        ray.get(channel.put.remote({"event": "result", "result": dataclasses.asdict(result)}))


def fit(
    task: TrainTask,
    cfg: TrainerConfig,
    run_dir: str | Path,
    *,
    logger: Any = None,
    show_progress: bool = True,
    resume: bool = True,
    poll_s: float = 0.5,
) -> TrainResult:
    """Train `task` on Ray Train workers into `run_dir`; returns rank 0's TrainResult. Needs Ray initialised."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resources(cfg)
    channel = ray.remote(MetricsChannel).options(num_cpus=0).remote()
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"task": task, "cfg": cfg, "run_dir": str(run_dir), "channel": channel, "resume": resume},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=task.name,
            storage_path=str(run_dir / "ray_train"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": worker_env_vars()},
        ),
    )
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=_run_fit, args=(trainer, outcome), name="ray-train-fit", daemon=True)
    thread.start()
    final = follow_metrics(channel, thread, logger, show_progress, poll_s, task.name)
    thread.join()
    ray.kill(channel)
    if "error" in outcome:
        raise outcome["error"]
    if final is None:
        raise RuntimeError(f"Ray Train finished {task.name!r} without a result from rank 0; see the worker logs above")
    return TrainResult(**final)


def check_resources(cfg: TrainerConfig) -> None:
    """Fail fast on a cluster with no GPU at all when GPUs are asked for (Ray Train would wait forever);
    only warn on too few CPUs/GPUs, which an autoscaling cluster may still add."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": cfg.num_workers * cfg.gpus_per_worker}
    if need["GPU"] > 0 and have.get("GPU", 0) == 0:
        why = " (QLoRA needs a CUDA GPU and bitsandbytes)" if cfg.lora.qlora else ""
        raise ValueError(
            f"trainer.gpus_per_worker={cfg.gpus_per_worker} but this Ray cluster has no GPU{why}; run on a GPU "
            "cluster or set trainer.gpus_per_worker=0"
        )
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0)}
    if short:
        print(
            f"warning: Ray Train needs {need} but the cluster has {{'CPU': {have.get('CPU', 0)}, 'GPU': "
            f"{have.get('GPU', 0)}}}; it waits until enough nodes join (lower trainer.num_workers otherwise)",
            file=sys.stderr,
        )


def _run_fit(trainer, outcome: dict) -> None:
    try:
        outcome["result"] = trainer.fit()
    except BaseException as e:  # re-raised in the caller's thread
        outcome["error"] = e


def follow_metrics(channel, thread: threading.Thread, logger, show_progress: bool, poll_s: float,
                   name: str) -> dict | None:
    """Drain step rows into the logger and the progress bar until the fit thread ends; returns rank 0's result
    (the row of event "result", when rank 0 sends one). Rows of other events are markers and are skipped."""
    import ray
    from tqdm.auto import tqdm

    bar, final = None, None
    while True:
        alive = thread.is_alive()
        for row in ray.get(channel.drain.remote()):
            if row.get("event") == "result":
                final = row["result"]
                continue
            if row.get("event") == "start":
                if bar is None:  # stderr: stdout stays clean for the job's `summary:` line
                    bar = tqdm(total=row["total_steps"], initial=row["resumed_from_step"], desc=f"{name} steps",
                               disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
                continue
            if "event" in row:
                continue
            if logger is not None:
                logger.log({f"train/{k}": v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])
            if bar is not None:
                bar.n = row["step"]
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
                bar.refresh()
        if not alive:
            break
        time.sleep(poll_s)
    if bar is not None:
        bar.close()
    return final
