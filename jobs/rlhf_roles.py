"""The RLHF roles as Ray actor groups (or as objects in this process), and the remote phases the driver calls.

Each phase is one small function around visible `.call*()` / `.get()` pairs; every wait is bounded by a phase
timeout and names the role and phase when it fails (`cluster.timeouts`). `LocalGroup` offers the same surface over
plain worker objects, so `bench/rlhf_overhead.py` runs the identical driver code without Ray.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from actors.batch import chunk_rows, concat_rows, split_rows
from actors.critic import CriticWorker
from actors.policy import PolicyWorker, merge_rank_metrics
from actors.reference import ReferenceWorker
from actors.rollout import SamplingConfig
from cluster.weight_sync import WeightSyncConfig
from jobs.rlhf_state import DriverState

if TYPE_CHECKING:
    from jobs.rlhf import RLHFJobConfig

ROLES = ("policy", "critic", "reference", "reward", "rollout")


# ---------------------------------------------------------------------------------------------- roles


class LocalGroup:
    """ActorGroup's call/get surface over worker objects in this process (benchmarks and debugging): a call runs at
    once and `get` hands back its results. The driver code is the same for both."""

    def __init__(self, role: str, workers: list[Any]):
        self.role, self.workers = role, workers

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [getattr(w, method)(*args, **kwargs) for w in self.workers]

    def call_sharded(self, method: str, shards: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        return [getattr(w, method)(s, *args, **kwargs) for w, s in zip(self.workers, shards)]

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.workers[rank], method)(*args, **kwargs)

    def get(self, refs: list[Any], phase: str, timeout_s: float, ranks: list[int] | None = None) -> list[Any]:
        del phase, timeout_s, ranks
        return list(refs)

    def shutdown(self) -> None:
        self.workers = []


class LocalSyncer:
    """WeightSyncer's `push` for in-process engines: same buckets and fingerprint check, no object store."""

    def __init__(self, cfg: WeightSyncConfig, engines: LocalGroup, source: Any, role: str = "rollout"):
        self.cfg, self.engines, self.source, self.role = cfg, engines, source, role

    def setup(self) -> None:
        """Nothing to set up in-process (WeightSyncer.setup opens the broadcast group; the driver calls both)."""

    def push(self, version: int):
        from cluster.weight_sync import check_fingerprint, make_offer

        offer = make_offer(self.source.sync_state_dict(), version, self.cfg, put=False)
        for rank, engine in enumerate(self.engines.workers):
            check_fingerprint(offer.expected, engine.update_weights(offer.buckets, version, self.cfg.fingerprint),
                              self.role, rank)
        return offer.expected


def role_workers(cfg: RLHFJobConfig, rm_dir: str) -> dict[str, tuple[type, tuple]]:
    """role -> (plain worker class, constructor args): what ActorGroup (or a test) instantiates."""
    from actors.reward import RewardWorker
    from actors.rollout import HFRolloutEngine, VLLMRolloutEngine

    batch, place = cfg.ppo.rollout_batch_size, cfg.placement
    micro_policy = batch // (place.policy.num_actors * cfg.policy.trainer.micro_batch_size)
    micro_critic = batch // (place.critic.num_actors * cfg.critic.trainer.micro_batch_size)
    policy_steps = max(1, cfg.total_iterations - cfg.ppo.critic_warmup_iterations) * cfg.ppo.epochs
    sampling = cfg.rollout.sampling
    reference = dataclasses.replace(cfg.reference, path=cfg.reference.path or cfg.policy.path)
    critic = dataclasses.replace(cfg.critic, path=cfg.critic.path or rm_dir)
    ro = cfg.rollout
    model_path = ro.model_path or cfg.policy.path
    rollout = (
        (VLLMRolloutEngine, (model_path, ro.dtype, ro.gpu_memory_utilization, ro.enforce_eager, ro.max_model_len))
        if ro.engine == "vllm" else (HFRolloutEngine, (model_path, ro.dtype, ro.device, ro.max_batch_size))
    )
    temperature = 1.0 if sampling.greedy else sampling.temperature
    return {
        "policy": (PolicyWorker, (cfg.policy, cfg.ppo.loss, sampling, micro_policy, policy_steps, cfg.fault)),
        "critic": (CriticWorker, (critic, cfg.ppo.loss, micro_critic, cfg.total_iterations * cfg.ppo.epochs, cfg.fault)),
        "reference": (ReferenceWorker, (reference, temperature)),
        "reward": (RewardWorker, reward_args(cfg, rm_dir)),
        "rollout": rollout,
    }


def reward_args(cfg: RLHFJobConfig, rm_dir: str) -> tuple:
    """RewardWorker(model_dir, batch_size, device, dtype); the device follows the role's GPU share."""
    device = "cuda" if cfg.placement.reward.gpus_per_actor > 0 else "cpu"
    return (rm_dir, cfg.reward.batch_size, device, cfg.reward.dtype)


@dataclass
class Roles:
    groups: dict[str, Any]  # role -> ActorGroup | LocalGroup
    policy_sync: Any  # pushes the policy's weights (live, or the snapshot it was told to serve)
    sft_sync: Any  # pushes the reference (SFT) weights
    placement: Any = None
    holds: str = "policy"  # which weights the rollout engines serve: policy | sft | r<k>/early | stale
    # The between-round RM update's workers (cluster.trainer_group.TrainerGroup), started at the first round's end
    # with these TrainerConfig overrides and kept until shutdown unless rm_update_workers.keep_warm=false. Kept, not
    # recomputed: rm_update_overrides sizes the workers from the CPUs free at that moment, which the started group
    # itself then holds.
    rm_trainer: Any = None
    rm_trainer_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def policy(self) -> Any:
        return self.groups["policy"]

    @property
    def critic(self) -> Any:
        return self.groups["critic"]

    @property
    def reference(self) -> Any:
        return self.groups["reference"]

    @property
    def reward(self) -> Any:
        return self.groups["reward"]

    @property
    def rollout(self) -> Any:
        return self.groups["rollout"]

    def shutdown(self) -> None:
        self.shutdown_rm_trainer()
        for group in self.groups.values():
            group.shutdown()
        if self.placement is not None:
            self.placement.remove()

    def shutdown_rm_trainer(self) -> None:
        if self.rm_trainer is not None:
            self.rm_trainer.shutdown()
        self.rm_trainer, self.rm_trainer_overrides = None, {}

    def where(self) -> dict[str, list[dict]]:
        """role -> per rank {"node": id, "resources": that node's custom resources}: where the roles really run."""
        if self.placement is None:
            return {}
        import ray

        custom = {n["NodeID"]: sorted(k for k in n["Resources"] if k not in ("CPU", "GPU", "memory",
                  "object_store_memory") and not k.startswith("node:") and "_group_" not in k)
                  for n in ray.nodes() if n.get("Alive")}
        return {role: [{"node": node, "resources": custom.get(node, [])} for node in group.node_ids]
                for role, group in self.groups.items()}


def start_roles(cfg: RLHFJobConfig, rm_dir: str) -> Roles:
    """Check the placement against the cluster (PlacementError with the numbers, before any model loads), reserve
    the placement groups, then start every role's actors in parallel."""
    from cluster.actor_group import ActorGroup
    from cluster.placement import cluster_snapshot, plan_placement
    from cluster.weight_sync import WeightSyncer

    resources = cfg.placement.as_dict()
    plan = plan_placement(resources, cluster_snapshot())
    placement = plan.create_groups(timeout_s=cfg.timeouts.start_s)
    workers = role_workers(cfg, rm_dir)

    def spawn(role: str) -> ActorGroup:
        cls, args = workers[role]
        return ActorGroup(cls, role, resources[role], placement=placement, init_args=args,
                          start_timeout_s=cfg.timeouts.start_s)

    groups: dict[str, Any] = {}
    try:
        with ThreadPoolExecutor(len(ROLES)) as pool:
            futures = {role: pool.submit(spawn, role) for role in ROLES}
            for role, future in futures.items():
                groups[role] = future.result()
        engines = groups["rollout"]
        policy_sync = WeightSyncer(cfg.weight_sync, engines, source=groups["policy"].actors[0])
        policy_sync.setup()
        object_store = dataclasses.replace(cfg.weight_sync, transport="object_store")
        sft_sync = WeightSyncer(object_store, engines, source=groups["reference"].actors[0])
    except BaseException:
        for group in groups.values():
            group.shutdown()
        placement.remove()
        raise
    return Roles(groups, policy_sync, sft_sync, placement)


def start_local_roles(cfg: RLHFJobConfig, rm_dir: str) -> Roles:
    """The same roles as plain objects in this process, one rank each (bench/rlhf_overhead.py)."""
    workers = role_workers(cfg, rm_dir)

    def spawn(role: str) -> LocalGroup:
        cls, args = workers[role]
        return LocalGroup(role, [cls(*args)])

    groups = {role: spawn(role) for role in ROLES}
    policy_sync = LocalSyncer(cfg.weight_sync, groups["rollout"], groups["policy"].workers[0])
    sft_sync = LocalSyncer(cfg.weight_sync, groups["rollout"], groups["reference"].workers[0])
    return Roles(groups, policy_sync, sft_sync)


# ---------------------------------------------------------------------------------------------- phases


class PhaseTimer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts) if n * (i + 1) // parts > n * i // parts]


def generate(roles: Roles, prompt_ids: list[list[int]], sampling: SamplingConfig, timeout_s: float) -> list:
    """Rollouts of every prompt, spread over the rollout ranks; prompt i always samples with seed + i."""
    bounds = _bounds(len(prompt_ids), roles.rollout.world_size)
    refs = [
        roles.rollout.call_rank(rank, "generate", prompt_ids[a:b],
                                sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + a))
        for rank, (a, b) in enumerate(bounds)
    ]
    parts = roles.rollout.get(refs, phase="generate", timeout_s=timeout_s, ranks=list(range(len(bounds))))
    return [r for part in parts for r in part]


def score(roles: Roles, items: list[dict], timeout_s: float) -> list[float]:
    """Conditional RM scores; each item is {"domain", "messages", "response"} (the RM adds the domain's prompt)."""
    bounds = _bounds(len(items), roles.reward.world_size)
    refs = [roles.reward.call_rank(rank, "score", items[a:b]) for rank, (a, b) in enumerate(bounds)]
    parts = roles.reward.get(refs, phase="score", timeout_s=timeout_s, ranks=list(range(len(bounds))))
    return [float(s) for part in parts for s in part]


def forward_passes(roles: Roles, batch: dict, timer: PhaseTimer, timeout_s: float) -> dict[str, torch.Tensor]:
    """Reference log-probs, critic values and policy log-probs of the rollout batch, launched together.

    Each `time/<role>` runs from the common launch to that role's last result (on Ray the three overlap)."""
    start = time.perf_counter()
    launched = {
        role: getattr(roles, role).call_sharded(method, split_rows(batch, getattr(roles, role).world_size))
        for role, method in (("reference", "compute_logprobs"), ("critic", "compute_values"),
                             ("policy", "compute_logprobs"))
    }
    out: dict[str, torch.Tensor] = {}
    for role, phase in (("reference", "reference log-probs"), ("critic", "critic values"), ("policy", "policy log-probs")):
        parts = getattr(roles, role).get(launched[role], phase=phase, timeout_s=timeout_s)
        for key in parts[0]:
            out[f"ref_{key}" if role == "reference" else key] = concat_rows([p[key] for p in parts])
        timer.times[f"time/{role}" if role != "policy" else "time/policy_forward"] = time.perf_counter() - start
    return out


def train(roles: Roles, batch: dict, ptx: dict | None, train_policy: bool, timeout_s: float) -> dict[str, float]:
    """Critic step always; policy step (PPO + PTX) unless in the critic warm-up. Both run at the same time."""
    critic_refs = roles.critic.call_sharded("train_step", split_rows(batch, roles.critic.world_size))
    policy_refs = []
    if train_policy:
        ranks = roles.policy.world_size
        ptx_shards = chunk_rows(ptx, ranks)
        policy_refs = [roles.policy.call_rank(r, "train_step", shard, ptx_shards[r])
                       for r, shard in enumerate(split_rows(batch, ranks))]
    metrics = merge_rank_metrics(roles.critic.get(critic_refs, phase="critic train", timeout_s=timeout_s))
    if train_policy:
        metrics.update(merge_rank_metrics(roles.policy.get(policy_refs, phase="policy train", timeout_s=timeout_s)))
    return metrics


def push_policy(roles: Roles, state: DriverState, timeout_s: float) -> None:
    """Versioned sync of the live policy to every rollout engine (fingerprints checked by the syncer)."""
    roles.policy.get(roles.policy.call("gather_for_sync"), phase="weight sync", timeout_s=timeout_s)
    state.weight_version += 1
    roles.policy_sync.push(state.weight_version)
    roles.holds = "policy"


def serve_weights(roles: Roles, state: DriverState, source: str, snapshot_dir: str = "", timeout_s: float = 600.0) -> None:
    """Make the rollout engines serve `source`: "policy" (live), "sft" (the reference), or "r<k>/early" (a snapshot)."""
    if roles.holds == source:
        return
    if source == "policy":
        push_policy(roles, state, timeout_s)
        return
    state.weight_version += 1
    if source == "sft":
        roles.sft_sync.push(state.weight_version)
    else:
        roles.policy.get([roles.policy.call_rank(0, "use_sync_snapshot", snapshot_dir)], phase="weight sync",
                         timeout_s=timeout_s)
        try:
            roles.policy_sync.push(state.weight_version)
        finally:
            roles.policy.get([roles.policy.call_rank(0, "use_sync_snapshot", None)], phase="weight sync",
                             timeout_s=timeout_s)
    roles.holds = source
