"""What jobs/rlhf.py checks before (and between) attempts, so a wrong input or a layout that cannot work fails at
once with the numbers instead of after a round of PPO: the model directories and label file, room for the
between-round RM update beside the roles (and how its workers are sized from what the roles leave), and, before a
restart, that Ray has freed the failed attempt's reservation.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.common import ConfigError

if TYPE_CHECKING:
    from jobs.rlhf import RLHFJobConfig, RMUpdateWorkers

RM_UPDATE_MIN_FREE_CPU = 0.05  # per RM-update worker sized from what the roles leave free (cpus_per_worker=0)
RM_UPDATE_SPARE_CPU = 0.05  # left for other tasks when the workers take what the roles leave free


def rm_update_cpus_needed(workers: RMUpdateWorkers) -> float:
    """The CPUs the RM update's workers need free beside the roles: what they ask, or for workers sized from the
    free CPUs (cpus_per_worker=0) a minimal share each plus the spare."""
    if workers.cpus_per_worker:
        return workers.num_workers * workers.cpus_per_worker
    return workers.num_workers * RM_UPDATE_MIN_FREE_CPU + RM_UPDATE_SPARE_CPU


def rm_update_overrides(workers: RMUpdateWorkers) -> dict[str, Any]:
    """TrainerConfig fields for the RM update's workers (a TrainerGroup), sized to what the roles leave free."""
    import ray

    cpus = workers.cpus_per_worker
    if cpus == 0:
        free = ray.available_resources().get("CPU", 0.0)
        if free < rm_update_cpus_needed(workers):
            raise RuntimeError(
                f"the RLHF roles leave {free:g} CPU free, so the RM update's {workers.num_workers} worker(s) cannot "
                "start; lower placement.<role>.cpus_per_actor, or cluster.num_cpus above the roles' total"
            )
        # the free CPUs (a little left for other tasks) shared by the workers, at most 1 each
        cpus = min(1.0, math.floor((free - RM_UPDATE_SPARE_CPU) / workers.num_workers * 100) / 100)
    return {"num_workers": workers.num_workers, "cpus_per_worker": cpus, "gpus_per_worker": workers.gpus_per_worker,
            "backend": workers.backend}


def check_rm_update_room(cfg: RLHFJobConfig) -> None:
    """Before any work: will the between-round RM update's workers find CPUs beside the roles? They start at the
    first round's end, while the roles keep their reservations; a run whose roles fill the cluster otherwise failed
    there, a whole round of PPO later. Skipped when the roles themselves do not fit (start_roles says so) and when
    no RM update will run."""
    from cluster.placement import cluster_snapshot

    if cfg.rounds < 2 and not cfg.online.rm_update.after_last_round:
        return
    free = sum(res.get("CPU", 0.0) for res in cluster_snapshot().values())
    roles = sum(r.num_actors * r.cpus_per_actor for r in cfg.placement.as_dict().values())
    w = cfg.rm_update_workers
    need = rm_update_cpus_needed(w)
    if roles <= free + 1e-9 and free - roles < need - 1e-9:
        raise ConfigError(
            f"the roles reserve {roles:g} of the cluster's {free:g} free CPUs for the whole run, which leaves "
            f"{max(free - roles, 0):g} for the between-round RM update's {w.num_workers} worker(s) (they need "
            f"{need:g}); lower placement.<role>.cpus_per_actor, or rm_update_workers.num_workers / cpus_per_worker"
        )



def check_inputs(cfg: RLHFJobConfig) -> None:
    """The model directories and label file every run needs; a config error (exit 2) before any work when they are
    wrong (a reward model given as the policy trained a random LM head to a 0.000 score without a word)."""
    from modeling.reward import CONFIG_FILE as RM_CONFIG

    for key, path in (("policy.path", cfg.policy.path), ("reward.path", cfg.reward.path)):
        if not path:
            raise ConfigError(f"{key} is required: pass {key}=<dir> (the SFT job's model_dir for policy.path, the "
                              "reward job's model_dir for reward.path)")
        if "://" not in path and not Path(path).is_dir():
            raise ConfigError(f"{key}={path!r} is not a directory")
    if "://" not in cfg.reward.path and not (Path(cfg.reward.path) / RM_CONFIG).is_file():
        raise ConfigError(f"reward.path={cfg.reward.path!r} is not a reward model directory (it has no {RM_CONFIG}); "
                          "pass the reward job's model_dir (its summary.json: model_dir)")
    for key, path in (("policy.path", cfg.policy.path), ("reference.path", cfg.reference.path),
                      ("rollout.model_path", cfg.rollout.model_path)):
        if path and "://" not in path and (Path(path) / RM_CONFIG).is_file():
            raise ConfigError(f"{key}={path!r} is a reward model directory (it has {RM_CONFIG}), not a language "
                              "model; pass the SFT job's model_dir")
    if cfg.online.labeler == "file" and Path(cfg.online.labels_path).exists():
        from data.io import DataError
        from data.world import FileLabeler

        try:  # read now, not at the first round's end: a bad line is fixed before any PPO, not after a round of it
            FileLabeler(cfg.online.labels_path).label([])
        except DataError as e:
            raise ConfigError(f"online.labels_path: {e}") from None


def wait_until_roles_fit(cfg: RLHFJobConfig, timeout_s: float) -> bool:
    """Wait (bounded) until the roles fit the cluster again. Ray frees a removed placement group's and its killed
    actors' resources asynchronously: checked at once, a restart on a cluster the roles fill more than half of (the
    2-core default layout) saw the failed attempt's reservation still held and stopped with a PlacementError. False
    when they still do not fit after timeout_s; the restart's own check then fails with the numbers."""
    from cluster.placement import PlacementError, cluster_snapshot, plan_placement

    deadline = time.time() + timeout_s
    while True:
        try:
            plan_placement(cfg.placement.as_dict(), cluster_snapshot())
            return True
        except PlacementError:
            if time.time() >= deadline:
                return False
            time.sleep(0.5)
