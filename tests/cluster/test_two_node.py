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


def _wait_started(proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> bool:
    """Block until `ray start --block` says the runtime is up; False if it exited first (a port taken between
    `free_port()` and the bind). A driver that connects while a loaded machine is still starting the GCS can hang in
    Ray's connect instead of failing, so nothing connects before this line appears."""
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            pytest.fail(f"`ray start` did not report a started runtime in {timeout_s:.0f}s:\n{_tail(log, 3000)}")
        time.sleep(0.5)
    return True


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _start_node(make_args, log: Path, attempts: int = 3) -> tuple[subprocess.Popen, list[str]]:
    """Start a raylet, with fresh ports on each of `attempts` tries (free ports can be taken before Ray binds them)."""
    for _ in range(attempts):
        args = make_args()
        proc = _start(args, log)
        if _wait_started(proc, log):
            return proc, args
        for d in _temp_dirs(args):
            shutil.rmtree(d, ignore_errors=True)
    pytest.fail(f"`ray start` exited {proc.returncode} before the runtime started, {attempts} times:\n{_tail(log, 3000)}")


def _temp_dirs(*arg_lists: list[str]) -> list[str]:
    return [a.split("=", 1)[1] for args in arg_lists for a in args if a.startswith("--temp-dir=")]


@pytest.fixture
def two_nodes(tmp_path):
    def head_args() -> list[str]:
        gcs = free_port()
        return ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1", "--num-gpus=0",
                '--resources={"node_a": 1}', f"--temp-dir=/tmp/rt{gcs}a", "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}", "--object-store-memory=100000000", *_node_ports()]

    head, hargs = _start_node(head_args, tmp_path / "head.log")
    gcs = next(a.split("=", 1)[1] for a in hargs if a.startswith("--port="))
    worker, wargs = None, []
    try:
        worker, wargs = _start_node(
            lambda: [f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                     '--resources={"node_b": 1}', f"--temp-dir=/tmp/rt{gcs}b", "--object-store-memory=100000000",
                     *_node_ports()],
            tmp_path / "worker.log",
        )
        yield f"127.0.0.1:{gcs}", tmp_path
    finally:
        for proc in (worker, head):
            if proc is not None:
                _stop(proc)
        for d in _temp_dirs(hargs, wargs):
            shutil.rmtree(d, ignore_errors=True)


def test_roles_pinned_by_custom_resources_land_on_different_nodes(two_nodes):
    address, logs = two_nodes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.cluster.two_node_driver", address],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
        )
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"driver hung for 240s; its stderr:\n{stderr[-4000:]}\nhead log:\n{_tail(logs / 'head.log')}"
                    f"\nworker log:\n{_tail(logs / 'worker.log')}")
    if proc.returncode != 0:
        pytest.fail(f"driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}\nhead log:\n{_tail(logs / 'head.log')}"
                    f"\nworker log:\n{_tail(logs / 'worker.log')}")
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
