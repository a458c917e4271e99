"""Starting or joining a Ray cluster, from config."""
from __future__ import annotations

import os
from dataclasses import dataclass

from cluster.runtime_env import apply_process_defaults, worker_env_vars


@dataclass
class ClusterConfig:
    # "" = start Ray in this process (laptop), or join the cluster a `ray job submit` driver runs in
    # (RAY_ADDRESS is set there). "auto" or "ray://host:port" join an existing cluster explicitly.
    address: str = ""
    num_cpus: int | None = None  # local Ray only; None = all cores
    num_gpus: int | None = None  # local Ray only
    object_store_memory_mb: int = 512  # local Ray only
    resources: dict[str, float] | None = None  # local Ray only: custom node resources
    init_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"cluster.num_cpus must be >= 1 (got {self.num_cpus}); leave it unset to use all cores")
        if self.object_store_memory_mb < 64:
            raise ValueError(f"cluster.object_store_memory_mb must be >= 64 (got {self.object_store_memory_mb})")


def init_ray(cfg: ClusterConfig) -> bool:
    """Connect to (or start) Ray. Returns True when this call started it, so the caller shuts it down."""
    import ray

    if ray.is_initialized():
        return False
    apply_process_defaults()
    runtime_env = {"env_vars": worker_env_vars()}
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return True
    ray.init(
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        resources=cfg.resources,
        object_store_memory=cfg.object_store_memory_mb * 1024**2,
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=True,
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = os.environ.get("COOLRAY_PROGRESS", "1") == "1"
    return True
