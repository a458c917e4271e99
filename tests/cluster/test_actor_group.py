"""ActorGroup on the local test Ray: rank wiring for torch.distributed, fan-out calls, bounded waits, dead actors."""
from __future__ import annotations

import os
import time

import pytest

from cluster.actor_group import ActorGroup
from cluster.placement import PlacementError, RoleResources
from cluster.timeouts import PhaseTimeout, RoleDied


class ToyWorker:
    """A plain class, as every coolray role is; ActorGroup makes it an actor."""

    def __init__(self, scale: int = 1):
        self.scale = scale

    def env(self) -> dict:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "COOLRAY_ROLE", "TOY")
        return {k: os.environ.get(k) for k in keys}

    def all_reduce(self) -> float:
        import torch
        import torch.distributed as dist

        from cluster.actor_group import init_process_group_from_env

        backend = init_process_group_from_env()
        assert backend == "gloo"
        t = torch.tensor([float(int(os.environ["RANK"]) + 1)])
        dist.all_reduce(t)
        return float(t)

    def times(self, shard: int) -> int:
        return shard * self.scale * (int(os.environ["RANK"]) + 1)

    def nap(self, seconds_by_rank: dict) -> int:
        rank = int(os.environ["RANK"])
        time.sleep(seconds_by_rank.get(rank, 0))
        return rank

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def pid(self) -> int:
        return os.getpid()


class BrokenWorker:
    def __init__(self):
        raise RuntimeError("checkpoint directory /nowhere does not exist")


@pytest.fixture(scope="module")
def group(ray_cluster):
    g = ActorGroup(ToyWorker, "toy", RoleResources(num_actors=2, cpus_per_actor=1), init_args=(3,), env={"TOY": "yes"})
    yield g
    g.shutdown()


def test_ranks_are_wired_for_torch_distributed(group):
    envs = group.get(group.call("env"), phase="env", timeout_s=60)
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"}
    # One node: local ranks follow the global ones.
    assert [(e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in envs] == [("0", "2"), ("1", "2")]
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1 and int(envs[0]["MASTER_PORT"]) > 0
    assert {e["COOLRAY_ROLE"] for e in envs} == {"toy"} and {e["TOY"] for e in envs} == {"yes"}
    # gloo all-reduce of rank+1 over 2 ranks: 1 + 2 = 3 on both.
    assert group.get(group.call("all_reduce"), phase="all_reduce", timeout_s=120) == [3.0, 3.0]


def test_call_sharded_gives_each_rank_its_shard(group):
    # rank r returns shard * scale * (r + 1) with scale 3: 10*3*1 and 20*3*2.
    assert group.get(group.call_sharded("times", [10, 20]), phase="times", timeout_s=60) == [30, 120]
    with pytest.raises(ValueError, match="3 shards for 2 ranks"):
        group.call_sharded("times", [1, 2, 3])


def test_a_slow_rank_times_out_naming_role_phase_and_rank(group):
    refs = group.call("nap", {1: 3.0})
    start = time.monotonic()
    with pytest.raises(PhaseTimeout) as err:
        group.get(refs, phase="reference logprobs", timeout_s=1.0)
    assert time.monotonic() - start < 3.0
    e = err.value
    assert (e.role, e.phase, e.missing, e.answered) == ("toy", "reference logprobs", [1], [0])
    assert "toy: phase 'reference logprobs' timed out after 1 s; rank(s) [1] did not answer" in str(e)
    assert "rank 1: actor " in str(e) and " on node " in str(e)
    group.get(refs, phase="drain", timeout_s=30)  # let the nap finish before the next test


def test_worker_exception_keeps_its_type_and_says_where(group):
    with pytest.raises(ValueError, match="bad shard") as err:
        group.get([group.call_rank(1, "fail", "bad shard")], phase="train_step", timeout_s=60, ranks=[1])
    assert "raised by toy rank 1 during phase 'train_step'" in "".join(getattr(err.value, "__notes__", []))


def test_constructor_failure_names_the_role_and_rank(ray_cluster):
    with pytest.raises(RoleDied, match=r"judge: rank 0 died during phase 'start'") as err:
        ActorGroup(BrokenWorker, "judge", RoleResources(num_actors=1, cpus_per_actor=0.5))
    assert str(err.value).endswith("RuntimeError: checkpoint directory /nowhere does not exist")
    # The half-started group gave its placement group back.
    from ray.util.placement_group import placement_group_table

    states = [pg["state"] for pg in placement_group_table().values() if pg["name"].startswith("coolray-judge-")]
    assert states == ["REMOVED"]


def test_a_group_that_cannot_fit_fails_before_starting_anything(ray_cluster):
    with pytest.raises(PlacementError, match=r"CPU\s+128\s+\d+"):
        ActorGroup(ToyWorker, "policy", RoleResources(num_actors=2, cpus_per_actor=64))


def test_decorated_classes_are_refused(ray_cluster):
    with pytest.raises(TypeError, match="pass the plain Python class"):
        ActorGroup(ray_cluster.remote(ToyWorker), "toy", RoleResources())


def test_killed_actor_is_reported_as_role_died_then_restart_recovers(group, ray_cluster):
    # Last test of the module: it kills a rank of the shared group, then restarts the group.
    old_pid = group.get([group.call_rank(1, "pid")], phase="pid", timeout_s=60, ranks=[1])[0]
    ray_cluster.kill(group.actors[1], no_restart=True)
    refs = group.call("nap", {0: 0.0, 1: 0.0})
    start = time.monotonic()
    with pytest.raises(RoleDied, match=r"toy: rank 1 died during phase 'value forward'") as err:
        group.get(refs, phase="value forward", timeout_s=60)
    assert time.monotonic() - start < 20, "a dead actor must be reported promptly, not after the timeout"
    assert err.value.rank == 1 and "killed by `ray.kill`" in str(err.value)
    health = group.health(timeout_s=10)
    assert health[0] == "ok" and health[1].startswith("toy: rank 1 died during phase 'health check'")
    group.restart()
    group.check_health(timeout_s=60)
    assert group.get([group.call_rank(1, "pid")], phase="pid", timeout_s=60, ranks=[1])[0] != old_pid
    # The restarted ranks rendezvous again (a fresh MASTER_PORT) and can all-reduce.
    assert group.get(group.call("all_reduce"), phase="all_reduce", timeout_s=120) == [3.0, 3.0]

