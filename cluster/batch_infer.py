"""Offline batch inference with Ray Data: rows in, a fixed-size pool of model actors, rows out in input order.

`map_batches` over a callable class gives one long-lived model per actor, so evaluation grows with the cluster:
more `workers` = more model replicas. Resources come from config (`cpus_per_worker`, `gpus_per_worker`), never
from a decorator. On GPU clusters the same pool takes `gpus_per_worker=1`; Ray's `ray.data.llm`
(`vLLMEngineProcessorConfig` + `build_processor`) is the faster generation path there and fits behind the same
rows-in/rows-out contract, but it is not wired in: vLLM is a GPU-only extra (docs/design.md, "Pins").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class BatchInferenceConfig:
    workers: int = 2  # actors in the pool (model replicas)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 1 on GPU nodes; fractions pack several small models on one GPU
    batch_size: int = 8  # rows per call of the worker
    # Every actor of the pool must be up before rows flow (so all replicas share the work), and a pool the
    # cluster cannot place fails with a clear timeout instead of waiting forever.
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"inference.workers must be >= 1 (got {self.workers})")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("inference.cpus_per_worker must be > 0 and inference.gpus_per_worker >= 0")
        if self.batch_size < 1:
            raise ValueError(f"inference.batch_size must be >= 1 (got {self.batch_size})")
        if self.start_timeout_s <= 0:
            raise ValueError(f"inference.start_timeout_s must be > 0 (got {self.start_timeout_s})")


def map_rows(rows: list[dict[str, Any]], worker_cls: type, constructor_kwargs: dict[str, Any],
             cfg: BatchInferenceConfig) -> list[dict[str, Any]]:
    """Run `worker_cls(**constructor_kwargs)(batch)` over `rows` on an actor pool; returns the output rows sorted
    by their `idx` column (every input row must carry a unique integer `idx`)."""
    import ray

    if not rows:
        return []
    # Enough blocks that every actor of the pool gets work, few enough that per-block overhead stays small.
    blocks = min(len(rows), max(cfg.workers * 2, -(-len(rows) // cfg.batch_size)))  # ceil(rows / batch)
    resources: dict[str, float] = {"num_cpus": cfg.cpus_per_worker}
    if cfg.gpus_per_worker > 0:
        resources["num_gpus"] = cfg.gpus_per_worker
    context = ray.data.DataContext.get_current()
    previous = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = cfg.start_timeout_s
    try:
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            worker_cls,
            fn_constructor_kwargs=constructor_kwargs,
            compute=ray.data.ActorPoolStrategy(size=cfg.workers),
            batch_size=cfg.batch_size,
            **resources,
        )
        out = ds.take_all()
    except ray.exceptions.GetTimeoutError as e:
        raise RuntimeError(
            f"could not start {cfg.workers} inference workers with {resources} each within "
            f"{cfg.start_timeout_s:.0f}s: the cluster lacks the resources. Lower inference.workers or "
            "inference.cpus_per_worker / inference.gpus_per_worker."
        ) from e
    finally:
        context.wait_for_min_actors_s = previous
    if len(out) != len(rows):
        raise RuntimeError(f"batch inference returned {len(out)} rows for {len(rows)} inputs")
    return sorted(out, key=lambda r: int(r["idx"]))
