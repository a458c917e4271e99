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
        if self.init_timeout_s <= 0:
            raise ValueError(f"cluster.init_timeout_s must be > 0 (got {self.init_timeout_s})")
        if self.object_store_memory_mb < 64:
            raise ValueError(f"cluster.object_store_memory_mb must be >= 64 (got {self.object_store_memory_mb})")


class ClusterUnreachable(ConnectionError):
    """Nothing answers at the Ray address the config (or RAY_ADDRESS) names."""


def wait_for_address(address: str, timeout_s: float) -> None:
    """Wait up to timeout_s for a TCP connection to a `host:port` / `ray://host:port` address (a head may still be
    starting). ray.init itself retries an address nobody listens on forever: cluster.address=127.0.0.1:6399 with no
    Ray there hung the job for good, printing GCS connection warnings. "auto" and other forms are left to Ray."""
    import socket
    import time

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in target:
        return
    deadline = time.time() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, max(timeout_s, 0.1))):
                return
        except OSError as e:
            if time.time() >= deadline:
                raise ClusterUnreachable(
                    f"no Ray cluster answers at {address} (cluster.address or RAY_ADDRESS) within "
                    f"cluster.init_timeout_s={timeout_s:g} s ({e}); start one there with `ray start --head`, fix the "
                    "address, or leave cluster.address empty to start Ray in this process"
                ) from None
            time.sleep(1.0)


def init_ray(cfg: ClusterConfig) -> bool:
    """Connect to (or start) Ray. Returns True when this call started it, so the caller shuts it down."""
    import ray

    if ray.is_initialized():
        return False
    apply_process_defaults()
    runtime_env = {"env_vars": worker_env_vars()}
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        wait_for_address(address, cfg.init_timeout_s)
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
