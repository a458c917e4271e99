"""Which role runs where: resource requests per role, a feasibility check before anything loads, placement groups.

Usage (the RLHF driver does this once, before any model is loaded):

    roles = {
        "policy":  RoleResources(num_actors=2, cpus_per_actor=1, gpus_per_actor=0.5),
        "critic":  RoleResources(num_actors=2, cpus_per_actor=1, gpus_per_actor=0.5, colocate_with="policy"),
        "rollout": RoleResources(num_actors=1, cpus_per_actor=1, gpus_per_actor=1, resources={"node_b": 0.01}),
    }
    plan = plan_placement(roles, cluster_snapshot())    # PlacementError with a table if it cannot fit
    placement = plan.create_groups(timeout_s=60)         # one Ray placement group per non-colocated role
    placement.actor_options("critic", rank=1)            # -> kwargs for ray.remote(Cls).options(...)

Semantics:
- `resources` are custom Ray resources asked *per actor*. Giving each node a marker resource (`ray start
  --resources='{"node_a": 1}'`) and asking `{"node_a": 0.01}` pins a role to that node while leaving room for
  100 actors there.
- `colocate_with="policy"`: this role's rank i shares bundle i of the policy's placement group, so their GPU
  fractions add up on the same device (e.g. 0.5 + 0.5). The colocated role may have fewer ranks than its host,
  never more; it inherits the host's strategy (leave `strategy` empty or give the same one).
- `strategy`: Ray's placement strategies. PACK/SPREAD are best effort; STRICT_PACK puts every bundle of the group
  on one node, STRICT_SPREAD each bundle on a different node.

`plan_placement` works on plain dicts (node id -> available resources), so it is unit-testable without Ray. It
raises only when a placement is certainly impossible (totals short, a bundle larger than every node, too few nodes
for STRICT_SPREAD, a STRICT_PACK group larger than every node); anything subtler is caught by the placement group's
own bounded wait in `create_groups`, which names the role that could not be placed.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Resources Ray reports per node that say nothing about what a role asks for; left out of tables.
_HIDDEN = ("memory", "object_store_memory")


class PlacementError(RuntimeError):
    """The roles cannot be placed on this cluster; the message holds the asked-vs-available table."""


@dataclass
class RoleResources:
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # fractions (< 1) share a GPU with colocated roles
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per actor, e.g. {"node_a": 0.01}
    colocate_with: str | None = None  # role whose bundles (and GPUs) this role shares
    strategy: str = ""  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD; "" = PACK, or the host's when colocated

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1 (got {self.num_actors})")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError(
                f"cpus_per_actor and gpus_per_actor must be >= 0 (got {self.cpus_per_actor}, {self.gpus_per_actor})"
            )
        if self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            raise ValueError(
                f"gpus_per_actor={self.gpus_per_actor}: Ray only shares a GPU in fractions below 1; "
                "use a whole number of GPUs above 1"
            )
        bad = {k: v for k, v in (self.resources or {}).items() if not isinstance(v, (int, float)) or v < 0}
        if bad:
            raise ValueError(f"resources must map names to amounts >= 0 (got {bad})")
        if self.strategy and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        self.resources = dict(self.resources or {})

    def per_actor(self) -> dict[str, float]:
        """What one actor asks Ray for, without zero entries."""
        out = {"CPU": float(self.cpus_per_actor), "GPU": float(self.gpus_per_actor)}
        out.update({k: float(v) for k, v in self.resources.items()})
        return {k: v for k, v in out.items() if v > 0}


@dataclass
class GroupSpec:
    """One placement group: the role that owns it, the roles colocated into it, its bundles."""

    owner: str
    members: list[str]  # owner first
    strategy: str
    bundles: list[dict[str, float]]


@dataclass
class Plan:
    """A feasible assignment of roles to placement-group bundles (no Ray objects yet)."""

    roles: dict[str, RoleResources]
    groups: dict[str, GroupSpec]  # owner role -> group
    group_of: dict[str, str]  # role -> owner role

    def create_groups(self, timeout_s: float = 120.0) -> "Placement":
        """Reserve every placement group; wait at most `timeout_s` in total, else PlacementError naming the role."""
        import time

        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        created: dict[str, Any] = {}
        tag = uuid.uuid4().hex[:6]
        for owner, spec in self.groups.items():
            created[owner] = placement_group(spec.bundles, strategy=spec.strategy, name=f"coolray-{owner}-{tag}")
        deadline = time.monotonic() + timeout_s
        for owner, pg in created.items():
            ready, _ = ray.wait([pg.ready()], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                spec = self.groups[owner]
                for other in created.values():
                    remove_placement_group(other)
                raise PlacementError(
                    f"placement group of role '{owner}' (with {', '.join(spec.members)}) was not ready after "
                    f"{timeout_s:g} s: {len(spec.bundles)} bundle(s) {spec.bundles} with strategy {spec.strategy}.\n"
                    + _available_table(cluster_snapshot())
                    + "\nAnother job may hold the resources, or the bundles cannot be arranged on these nodes with this "
                    "strategy; lower the role's num_actors / per-actor resources or add nodes."
                )
        return Placement(self, created)


class Placement:
    """Live placement groups of a Plan; hands out per-actor scheduling options."""

    def __init__(self, plan: Plan, pgs: dict[str, Any]):
        self.plan, self._pgs = plan, pgs

    def actor_options(self, role: str, rank: int) -> dict[str, Any]:
        """Keyword arguments for `ray.remote(Cls).options(...)` that put `role`'s rank into its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        res = self._role(role)
        if not 0 <= rank < res.num_actors:
            raise ValueError(f"role '{role}' has ranks 0..{res.num_actors - 1}; got rank {rank}")
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self._pgs[self.plan.group_of[role]], placement_group_bundle_index=rank
        )
        return {
            "num_cpus": res.cpus_per_actor,
            "num_gpus": res.gpus_per_actor,
            "resources": dict(res.resources),
            "scheduling_strategy": strategy,
        }

    def bundle_node_ids(self, role: str) -> list[str]:
        """Node id (hex) of each of `role`'s ranks."""
        from ray.util.placement_group import placement_group_table

        table = placement_group_table(self._pgs[self.plan.group_of[role]])
        nodes = table["bundles_to_node_id"]
        return [nodes[i] for i in range(self._role(role).num_actors)]

    def placement_group(self, role: str):
        return self._pgs[self.plan.group_of[role]]

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self._pgs.values():
            remove_placement_group(pg)
        self._pgs = {}

    def _role(self, role: str) -> RoleResources:
        if role not in self.plan.roles:
            raise KeyError(f"no role '{role}' in this placement (roles: {', '.join(self.plan.roles)})")
        return self.plan.roles[role]


# ---------------------------------------------------------------------------------------------- planning


def cluster_snapshot(available: bool = True) -> dict[str, dict[str, float]]:
    """Node id -> resources of every alive node of the connected Ray cluster (available ones by default)."""
    import ray

    if available:
        from ray._private.state import available_resources_per_node  # Ray DeveloperAPI

        return {node: dict(res) for node, res in available_resources_per_node().items()}
    return {n["NodeID"]: dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")}


def _resolve_hosts(roles: dict[str, RoleResources]) -> dict[str, str]:
    """role -> the role owning its placement group (following colocate_with chains), with clear errors."""
    group_of: dict[str, str] = {}
    for role in roles:
        seen, cur = [role], role
        while roles[cur].colocate_with is not None:
            nxt = roles[cur].colocate_with
            if nxt not in roles:
                raise ValueError(
                    f"role '{cur}' has colocate_with='{nxt}', which is not a role; roles: {', '.join(roles)}"
                )
            if nxt in seen:
                raise ValueError(f"colocate_with forms a cycle: {' -> '.join(seen + [nxt])}")
            seen.append(nxt)
            cur = nxt
        group_of[role] = cur
    return group_of


def check_layout(roles: dict[str, RoleResources]) -> dict[str, GroupSpec]:
    """The checks that need no cluster (colocation targets and cycles, guests per host bundle, strategies, empty or
    over-full bundles): a config can run them before Ray starts. Returns the placement groups the roles form."""
    return _build_groups(roles, _resolve_hosts(roles))


def _build_groups(roles: dict[str, RoleResources], group_of: dict[str, str]) -> dict[str, GroupSpec]:
    groups: dict[str, GroupSpec] = {}
    for owner in [r for r in roles if group_of[r] == r]:
        members = [owner] + [r for r in roles if group_of[r] == owner and r != owner]
        host = roles[owner]
        for m in members[1:]:
            guest = roles[m]
            if guest.num_actors > host.num_actors:
                raise ValueError(
                    f"role '{m}' has {guest.num_actors} actors but is colocated with '{owner}', which has "
                    f"{host.num_actors} bundles; a colocated role may have at most as many actors as its host"
                )
            if guest.strategy and guest.strategy != (host.strategy or "PACK"):
                raise ValueError(
                    f"role '{m}' asks strategy {guest.strategy} but shares the placement group of '{owner}' "
                    f"({host.strategy or 'PACK'}); leave '{m}'.strategy empty"
                )
        bundles = []
        for i in range(host.num_actors):
            bundle: dict[str, float] = {}
            for m in members:
                if i < roles[m].num_actors:
                    for k, v in roles[m].per_actor().items():
                        bundle[k] = bundle.get(k, 0.0) + v
            if not bundle:
                raise ValueError(
                    f"bundle {i} of role '{owner}' is empty (no CPU, GPU or custom resource asked); Ray cannot "
                    f"reserve an empty bundle: give '{owner}' cpus_per_actor > 0"
                )
            gpu = bundle.get("GPU", 0.0)
            if gpu > 1 and not math.isclose(gpu, round(gpu)):
                raise ValueError(
                    f"bundle {i} of role '{owner}' adds up to {gpu:g} GPUs across {', '.join(members)}; shared "
                    "GPU fractions must add up to at most 1 (or to a whole number)"
                )
            bundles.append(bundle)
        groups[owner] = GroupSpec(owner, members, host.strategy or "PACK", bundles)
    return groups


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _fmt(res: dict[str, float]) -> str:
    shown = {
        k: v for k, v in res.items() if k not in _HIDDEN and not k.startswith("node:") and "_group_" not in k
    }
    ordered = sorted(shown.items(), key=lambda kv: (kv[0] not in ("CPU", "GPU"), kv[0]))  # CPU, GPU, then custom
    return ", ".join(f"{k} {v:g}" for k, v in ordered) or "-"


def _roles_table(roles: dict[str, RoleResources], group_of: dict[str, str]) -> str:
    rows = [("role", "actors", "per actor", "total", "shares bundles of")]
    for role, r in roles.items():
        total = {k: v * r.num_actors for k, v in r.per_actor().items()}
        host = group_of[role] if group_of[role] != role else "-"
        rows.append((role, str(r.num_actors), _fmt(r.per_actor()), _fmt(total), host))
    return _table(rows)


def _available_table(cluster: dict[str, dict[str, float]]) -> str:
    rows = [("node", "available")] + [(node[:12], _fmt(res)) for node, res in cluster.items()]
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def plan_placement(roles: dict[str, RoleResources], cluster_resources: dict[str, dict[str, float]]) -> Plan:
    """Check that `roles` fit `cluster_resources` (node id -> available resources) and return the Plan.

    Raises PlacementError with a table of what every role asks for against what the cluster has, listing the
    resources and bundles that do not fit. Nothing is reserved or loaded here.
    """
    if not roles:
        raise ValueError("plan_placement needs at least one role")
    if not isinstance(cluster_resources, dict) or not all(isinstance(v, dict) for v in cluster_resources.values()):
        raise TypeError("cluster_resources must map node id -> {resource: amount} (see cluster_snapshot())")
    group_of = _resolve_hosts(roles)
    groups = _build_groups(roles, group_of)
    problems = _total_shortfalls(groups, cluster_resources) + _per_node_problems(groups, cluster_resources)
    if problems:
        raise PlacementError(
            "the roles do not fit the cluster (checked before anything was started):\n\n"
            + _roles_table(roles, group_of)
            + "\n\n"
            + "\n\n".join(problems)
            + "\n\ncluster:\n"
            + _available_table(cluster_resources)
            + "\n\nLower num_actors or the per-actor resources in the cluster config, or add nodes that offer them."
        )
    return Plan(roles=dict(roles), groups=groups, group_of=group_of)


def _total_shortfalls(groups: dict[str, GroupSpec], cluster: dict[str, dict[str, float]]) -> list[str]:
    asked: dict[str, float] = {}
    for spec in groups.values():
        for bundle in spec.bundles:
            for k, v in bundle.items():
                asked[k] = asked.get(k, 0.0) + v
    rows = [("resource", "asked", "cluster has", "short by")]
    for k, v in sorted(asked.items()):
        has = sum(node.get(k, 0.0) for node in cluster.values())
        if has + 1e-9 < v:
            note = "" if has > 0 else f"   (no node offers '{k}')"
            rows.append((k, f"{v:g}", f"{has:g}", f"{v - has:g}{note}"))
    return ["totals that do not fit:\n" + _table(rows)] if len(rows) > 1 else []


def _per_node_problems(groups: dict[str, GroupSpec], cluster: dict[str, dict[str, float]]) -> list[str]:
    out: list[str] = []
    biggest = max(cluster.values(), key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
    for owner, spec in groups.items():
        for i, bundle in enumerate(spec.bundles):
            if not any(_fits(bundle, node) for node in cluster.values()):
                out.append(
                    f"role '{owner}' bundle {i} asks {{{_fmt(bundle)}}} on one node; no node has that much "
                    f"(largest node: {{{_fmt(biggest)}}})"
                )
                break  # one line per role is enough to act on
        if spec.strategy == "STRICT_PACK":
            whole: dict[str, float] = {}
            for bundle in spec.bundles:
                for k, v in bundle.items():
                    whole[k] = whole.get(k, 0.0) + v
            if not any(_fits(whole, node) for node in cluster.values()):
                out.append(f"role '{owner}' is STRICT_PACK: all of {{{_fmt(whole)}}} must fit one node, and none has it")
        if spec.strategy == "STRICT_SPREAD":
            smallest = {k: min(b.get(k, 0.0) for b in spec.bundles) for k in spec.bundles[0]}
            nodes = sum(_fits(smallest, node) for node in cluster.values())
            if nodes < len(spec.bundles):
                out.append(
                    f"role '{owner}' is STRICT_SPREAD over {len(spec.bundles)} bundles, one per node, but only "
                    f"{nodes} node(s) can hold one"
                )
    return out
