"""jobs/rlhf.py on a 2-node local cluster (two raylets marked node_a / node_b, see tests/cluster/test_two_node.py):
`rlhf/placement=spread` pins policy + critic to node_a and reference + reward + rollout to node_b."""
from __future__ import annotations

import json
import os
import subprocess
import sys


from cluster.runtime_env import REPO_ROOT
from tests.cluster.test_two_node import two_nodes  # noqa: F401  (fixture)
from tests.jobs.rlhf_helpers import rlhf_inputs, small_run  # noqa: F401  (fixture)


# The second raylet may still be registering when the fixture yields (the job's placement check would then
# rightly refuse node_b pins), so wait for both nodes from a separate client process first.
WAIT_FOR_TWO_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 120
while sum(n["Alive"] for n in ray.nodes()) < 2:
    if time.monotonic() > deadline:
        raise SystemExit("the second node never joined")
    time.sleep(0.5)
"""


def test_roles_run_on_the_nodes_the_placement_names(two_nodes, rlhf_inputs):  # noqa: F811
    address, root = two_nodes
    # Each node has 1 CPU: a fifth of one per role leaves room for Ray's own tasks.
    cpus = [f"placement.{role}.cpus_per_actor=0.2" for role in ("policy", "critic", "reference", "reward", "rollout")]
    args = small_run(rlhf_inputs, root, "two_node", "rlhf/placement=spread", f"cluster.address={address}",
                     "rounds=1", "iterations_per_round=4", "stop_after_iterations=2", *cpus)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([sys.executable, "-c", WAIT_FOR_TWO_NODES, address], env=env, check=True, timeout=150)
    proc = subprocess.run([sys.executable, "jobs/rlhf.py", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: ")
    summary = json.loads(open(last.removeprefix("summary: ")).read())
    assert summary["iterations"] == 2
    where = summary["placement"]
    for role, marker in (("policy", "node_a"), ("critic", "node_a"), ("reference", "node_b"), ("reward", "node_b"),
                         ("rollout", "node_b")):
        assert [marker in rank["resources"] for rank in where[role]] == [True], (role, where[role])
    assert where["policy"][0]["node"] != where["rollout"][0]["node"]
