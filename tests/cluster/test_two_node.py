"""Two raylets on this machine (a head marked node_a, a worker marked node_b), every port explicit: roles pinned by
custom resources land on different nodes, and an impossible pin fails fast with the numbers.

Both raylets are `ray start --block` subprocesses in their own sessions, stopped by SIGTERM to their PIDs (never
`ray stop`, which would kill every Ray on the machine); token auth is off (spec/stack.md §3)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.actor_group import free_port
from cluster.runtime_env import REPO_ROOT

RAY = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats"]


def _node_ports() -> list[str]:
    """Every port a raylet and its agents bind, each from the free-port finder (port 52365 clashes otherwise)."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--worker-port-list={','.join(str(free_port()) for _ in range(8))}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(RAY + args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` tears down what it started on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this test started
            proc.wait(timeout=10)


@pytest.fixture
def two_nodes(tmp_path):
    gcs = free_port()
    head = _start(
        ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1", "--num-gpus=0",
         '--resources={"node_a": 1}', f"--temp-dir=/tmp/rt{gcs}a", "--include-dashboard=false",
         f"--ray-client-server-port={free_port()}", "--object-store-memory=100000000", *_node_ports()],
        tmp_path / "head.log",
    )
    worker = None
    try:
        time.sleep(3)  # the worker raylet retries the GCS anyway; this just avoids noisy first attempts
        worker = _start(
            [f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
             '--resources={"node_b": 1}', f"--temp-dir=/tmp/rt{gcs}b", "--object-store-memory=100000000",
             *_node_ports()],
            tmp_path / "worker.log",
        )
        yield f"127.0.0.1:{gcs}", tmp_path
    finally:
        for proc in (worker, head):
            if proc is not None:
                _stop(proc)
        for suffix in ("a", "b"):
            shutil.rmtree(f"/tmp/rt{gcs}{suffix}", ignore_errors=True)


def test_roles_pinned_by_custom_resources_land_on_different_nodes(two_nodes):
    address, logs = two_nodes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.cluster.two_node_driver", address],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    if proc.returncode != 0:
        head_log = (logs / "head.log").read_text()[-2000:]
        pytest.fail(f"driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}\nhead log:\n{head_log}")
    seen = json.loads(proc.stdout.strip().splitlines()[-1])

    by_marker = {
        marker: node for node, res in seen["node_resources"].items() for marker in ("node_a", "node_b") if marker in res
    }
    assert seen["seen"] == {"policy": by_marker["node_a"], "rollout": by_marker["node_b"]}
    assert seen["planned"] == seen["seen"]  # ActorGroup.node_ids says where the actors really run
    # The impossible pin is refused by the plan, before any placement group waits (seconds, not a timeout).
    assert seen["error_seconds"] < 5
    error = seen["error"]
    line = next(line for line in error.splitlines() if line.startswith("node_c"))
    assert line.split()[:4] == ["node_c", "1", "0", "1"] and "no node offers 'node_c'" in line
    assert any(line.startswith("judge ") and "node_c 1" in line for line in error.splitlines())
