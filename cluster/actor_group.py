"""N Ray actors of one plain worker class, wired as the ranks of a torch.distributed job, with bounded calls.

    group = ActorGroup(PolicyWorker, "policy", RoleResources(num_actors=2, cpus_per_actor=1),
                       placement=placement, init_args=(policy_cfg,))
    refs = group.call("train_step", batch)                  # list[ObjectRef], one per rank, same arguments
    refs = group.call_sharded("compute_logprobs", shards)   # list[ObjectRef], rank i gets shards[i]
    metrics = group.get(refs, phase="train_step", timeout_s=600)   # PhaseTimeout / RoleDied, never a silent hang

The worker class stays plain Python (constructible in a unit test without Ray). This module is the only place it
becomes an actor, through `ray.remote(worker_cls).options(num_cpus=..., num_gpus=..., resources=...,
scheduling_strategy=..., runtime_env=..., max_restarts=..., name=...)` with the numbers from config.

Every actor starts with the usual torch.distributed variables in its environment, so its constructor (or any later
method) can call `init_process_group_from_env()`:
    RANK, WORLD_SIZE            rank within this role's group
    LOCAL_RANK, LOCAL_WORLD_SIZE   index among this group's ranks on the same node
    MASTER_ADDR, MASTER_PORT    rank 0's node and a port that was free there just before the actors started
    COOLRAY_ROLE                the role name
With GPUs, Ray restricts each actor's CUDA_VISIBLE_DEVICES to the GPUs it was given, so the actor's device is
always `cuda:0` from its own point of view (colocated fractional-GPU roles see the same one).

max_restarts > 0 lets Ray restart a crashed actor (its constructor runs again); calls in flight still fail with
RoleDied because methods are not retried (a half-applied training step must not run twice).
"""
from __future__ import annotations

import socket
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cluster import timeouts
from cluster.placement import Placement, RoleResources, cluster_snapshot, plan_placement
from cluster.runtime_env import worker_env_vars

if TYPE_CHECKING:
    from ray import ObjectRef


def free_port() -> int:
    """A TCP port that is free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> tuple[str, int]:
    """(this node's IP as Ray sees it, a free port here): the rendezvous point for a group whose rank 0 runs here."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


def init_process_group_from_env(backend: str | None = None, timeout_s: float = 300.0) -> str:
    """Join the role's torch.distributed group from the RANK/WORLD_SIZE/MASTER_* variables ActorGroup set.

    backend: None picks nccl when this actor has a GPU, else gloo. Returns the backend used.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_backend()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(0)  # Ray narrowed CUDA_VISIBLE_DEVICES to this actor's GPU(s)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return backend


class ActorGroup:
    """`resources.num_actors` actors of `worker_cls` for `role`; see the module docstring."""

    def __init__(
        self,
        worker_cls: type,
        role: str,
        resources: RoleResources,
        placement: Placement | None = None,
        init_args: Sequence[Any] = (),
        init_kwargs: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        max_restarts: int = 0,
        start_timeout_s: float = 300.0,
    ):
        import ray

        if isinstance(worker_cls, ray.actor.ActorClass):
            raise TypeError(
                f"{worker_cls} is already a Ray actor class; pass the plain Python class (no @ray.remote), "
                "ActorGroup applies the resources from config"
            )
        if max_restarts < -1:
            raise ValueError(f"max_restarts must be >= -1 (-1 = unlimited), got {max_restarts}")
        self.worker_cls, self.role, self.resources = worker_cls, role, resources
        self.init_args, self.init_kwargs = tuple(init_args), dict(init_kwargs or {})
        self.env, self.max_restarts, self.start_timeout_s = dict(env or {}), max_restarts, start_timeout_s
        self._owns_placement = placement is None
        if placement is None:
            plan = plan_placement({role: resources}, cluster_snapshot())
            placement = plan.create_groups(timeout_s=start_timeout_s)
        self.placement = placement
        self.actors: list[Any] = []
        self.node_ids: list[str] = []
        self.master: tuple[str, int] = ("", 0)
        try:
            self._spawn()
        except BaseException:
            self.shutdown()  # no half-started group keeps actors or reserved resources
            raise

    @property
    def world_size(self) -> int:
        return self.resources.num_actors

    # ------------------------------------------------------------------------------------------ fan-out calls

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ObjectRef]:
        """Call `method(*args, **kwargs)` on every rank; returns list[ray.ObjectRef], index = rank."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call_sharded(self, method: str, shards: Sequence[Any], *args: Any, **kwargs: Any) -> list[ObjectRef]:
        """Call `method(shards[rank], *args, **kwargs)` on each rank; returns list[ray.ObjectRef], index = rank."""
        if len(shards) != self.world_size:
            raise ValueError(
                f"{self.role}.{method}: got {len(shards)} shards for {self.world_size} ranks; split the batch into "
                "exactly one shard per rank"
            )
        return [getattr(actor, method).remote(shard, *args, **kwargs) for actor, shard in zip(self.actors, shards)]

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> ObjectRef:
        """Call `method` on one rank; returns one ray.ObjectRef."""
        return getattr(self.actors[rank], method).remote(*args, **kwargs)

    def get(
        self, refs: Sequence[ObjectRef], phase: str, timeout_s: float, ranks: Sequence[int] | None = None
    ) -> list[Any]:
        """Wait for this group's refs (index = rank unless `ranks` says otherwise), bounded and named by phase."""
        return timeouts.get(refs, role=self.role, phase=phase, timeout_s=timeout_s, ranks=ranks, describe=self.describe)

    def describe(self, rank: int) -> str:
        actor = self.actors[rank]
        return f"actor {actor._actor_id.hex()[:12]} on node {self.node_ids[rank][:12]}"

    # ------------------------------------------------------------------------------------------ lifecycle

    def check_health(self, timeout_s: float = 30.0) -> None:
        """Raise RoleDied / PhaseTimeout unless every rank answers a no-op call within `timeout_s`."""
        self.get([a.__ray_ready__.remote() for a in self.actors], phase="health check", timeout_s=timeout_s)

    def health(self, timeout_s: float = 30.0) -> dict[int, str]:
        """rank -> "ok" or the reason it is not, without raising (for logs and dashboards)."""
        out: dict[int, str] = {}
        for rank, actor in enumerate(self.actors):
            try:
                self.get([actor.__ray_ready__.remote()], phase="health check", timeout_s=timeout_s, ranks=[rank])
                out[rank] = "ok"
            except (timeouts.RoleDied, timeouts.PhaseTimeout) as e:
                out[rank] = str(e)
        return out

    def restart(self) -> None:
        """Kill every rank and start them again in the same bundles (fresh constructors, new rendezvous port)."""
        self._kill()
        try:
            self._spawn()
        except BaseException:
            self._kill()
            raise

    def shutdown(self) -> None:
        """Kill the actors, and release the placement groups if this group created them."""
        self._kill()
        if self._owns_placement:
            self.placement.remove()

    def _kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def _spawn(self) -> None:
        import ray

        self.node_ids = self.placement.bundle_node_ids(self.role)
        self.master = self._probe_rank0()
        local_ranks = _local_ranks(self.node_ids)
        actor_cls = ray.remote(self.worker_cls)
        tag = uuid.uuid4().hex[:6]
        self.actors = []
        for rank in range(self.world_size):
            local_rank, local_size = local_ranks[rank]
            env = worker_env_vars(
                {
                    **self.env,
                    "RANK": str(rank),
                    "WORLD_SIZE": str(self.world_size),
                    "LOCAL_RANK": str(local_rank),
                    "LOCAL_WORLD_SIZE": str(local_size),
                    "MASTER_ADDR": self.master[0],
                    "MASTER_PORT": str(self.master[1]),
                    "COOLRAY_ROLE": self.role,
                }
            )
            options = self.placement.actor_options(self.role, rank)
            actor = actor_cls.options(
                **options,
                runtime_env={"env_vars": env},
                max_restarts=self.max_restarts,
                name=f"{self.role}-{rank}-{tag}",
            ).remote(*self.init_args, **self.init_kwargs)
            self.actors.append(actor)
        # Surface constructor failures now (as RoleDied naming the rank), not at the first real call.
        self.get([a.__ray_ready__.remote() for a in self.actors], phase="start", timeout_s=self.start_timeout_s)

    def _probe_rank0(self) -> tuple[str, int]:
        """Ask rank 0's node for its address and a free port, by a zero-resource task in rank 0's bundle."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement.placement_group(self.role), placement_group_bundle_index=0
        )
        probe = ray.remote(node_address).options(num_cpus=0, scheduling_strategy=strategy)
        ref = probe.remote()
        ip, port = timeouts.get_one(ref, role=self.role, phase="rendezvous probe", timeout_s=self.start_timeout_s)
        return ip, port


def _local_ranks(node_ids: list[str]) -> list[tuple[int, int]]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) per rank: position among the ranks sharing its node, in rank order."""
    counts: dict[str, int] = {}
    out = []
    for node in node_ids:
        out.append(counts.get(node, 0))
        counts[node] = out[-1] + 1
    return [(lr, counts[node]) for lr, node in zip(out, node_ids)]
