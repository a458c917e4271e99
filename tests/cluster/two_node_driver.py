"""Driver for test_two_node.py, run as `python -m tests.cluster.two_node_driver <address>` in its own process (the
pytest process already holds an in-process Ray). Prints one JSON line with what it observed."""
from __future__ import annotations

import json
import sys
import time


class NodeProbe:
    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _log(t0: float, what: str) -> None:
    print(f"[two_node_driver +{time.monotonic() - t0:.1f}s] {what}", file=sys.stderr, flush=True)


def main(address: str) -> None:
    import ray

    from cluster.actor_group import ActorGroup
    from cluster.placement import PlacementError, RoleResources, cluster_snapshot, plan_placement
    from cluster.runtime import ClusterConfig, init_ray

    t0 = time.monotonic()
    init_ray(ClusterConfig(address=address))
    _log(t0, "connected")
    deadline = time.monotonic() + 90
    while sum(1 for n in ray.nodes() if n["Alive"]) < 2:  # the second raylet may still be registering
        if time.monotonic() > deadline:
            raise SystemExit(f"only {sum(1 for n in ray.nodes() if n['Alive'])} node(s) joined {address}")
        time.sleep(0.5)
    _log(t0, "two nodes alive")

    roles = {
        "policy": RoleResources(num_actors=1, cpus_per_actor=0.5, resources={"node_a": 0.01}),
        "rollout": RoleResources(num_actors=1, cpus_per_actor=0.5, resources={"node_b": 0.01}),
    }
    placement = plan_placement(roles, cluster_snapshot()).create_groups(timeout_s=60)
    groups = {role: ActorGroup(NodeProbe, role, res, placement=placement) for role, res in roles.items()}
    seen = {role: g.get(g.call("node_id"), phase="node_id", timeout_s=60)[0] for role, g in groups.items()}
    _log(t0, "actor groups placed")
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}

    start = time.monotonic()
    try:
        plan_placement({"judge": RoleResources(num_actors=1, cpus_per_actor=0.5, resources={"node_c": 1})}, cluster_snapshot())
        error = ""
    except PlacementError as e:
        error = str(e)
    error_s = time.monotonic() - start

    for g in groups.values():
        g.shutdown()
    placement.remove()
    print(json.dumps({
        "seen": seen,
        "planned": {role: g.node_ids[0] for role, g in groups.items()},
        "node_resources": nodes,
        "error": error,
        "error_seconds": error_s,
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
