"""`ray job submit` of jobs/sft.py to a real local cluster started with `ray start --head`, as a user would.

The head runs as our own subprocess with every port chosen free (other Ray clusters may share the machine: a
fixed default port such as the agent's 52365 would clash) and is stopped by SIGTERM to its PID; `ray stop`
would kill every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster.runtime_env import REPO_ROOT
from tests.jobs.rlhf_helpers import rlhf_inputs, small_run  # noqa: F401  (fixture)

EXCLUDES = [".venv", ".venv-*", ".git", "outputs", "multirun", "wandb", "**/__pycache__", "*.egg-info",
            ".pytest_cache", ".device", ".whl", ".gl", "build"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {url} did not answer in {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head started as a user would (`ray start --head`, 2 CPUs, with its dashboard): the cluster every job in this
    module is submitted to; its URL."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    gcs, dash, agent_listen, agent_grpc, runtime_env_agent, metrics, client = _free_ports(7)
    temp_dir = f"/tmp/rt{gcs}"  # short: unix socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--num-cpus=2",
        "--object-store-memory=268435456", "--disable-usage-stats",
    ]
    log = tmp_path / "ray_head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120, proc, log)
        yield f"http://127.0.0.1:{dash}"
    finally:
        proc.send_signal(signal.SIGTERM)  # only our head; it tears down what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session (start_new_session), nobody else's
            proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(client, **kwargs) -> str:
    """The dashboard answers before its job agent registers ('No available agent'): retry for a while."""
    deadline = time.time() + 60
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def _run_job(ray_head: str, entrypoint: str, timeout_s: float = 420) -> str:
    """Submit `entrypoint` with this checkout as the working dir, wait for it to succeed; its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    job_id = _submit(client, entrypoint=entrypoint,
                     runtime_env={"working_dir": str(REPO_ROOT), "excludes": EXCLUDES})
    deadline = time.time() + timeout_s
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"{entrypoint.split()[1]} ended {status}:\n{logs[-4000:]}"
    return logs


def test_sft_job_through_ray_job_submit(ray_head, tmp_path):
    root = tmp_path / "runs"
    overrides = [
        f"run.root={root}", "trainer.lr=5e-4", "trainer.max_steps=3", "trainer.checkpoint_every=0",
        "data.paths=[data/sample_sft/openai.jsonl]", "data.max_length=128", "sample_max_new_tokens=4",
        "logging.wandb=disabled", "logging.progress=false",
    ]
    logs = _run_job(ray_head, "python jobs/sft.py " + " ".join(overrides))

    last = [line for line in logs.splitlines() if line.strip()][-1]
    assert last == f"summary: {root / 'sft' / 'summary.json'}"
    summary = json.loads((root / "sft" / "summary.json").read_text())
    assert summary["steps"] == 3 and Path(summary["model_dir"], "config.json").exists()
    # The files came from Ray's unpacked copy of the working dir, not from this checkout.
    assert all("working_dir_files" in f for f in summary["files"]), summary["files"]
    config = yaml.safe_load((root / "sft" / "config.yaml").read_text())
    assert config["trainer"]["lr"] == 5e-4 and config["trainer"]["max_steps"] == 3


def test_rlhf_job_through_ray_job_submit(ray_head, rlhf_inputs, tmp_path):  # noqa: F811
    # The user's command: `ray job submit --working-dir . -- python jobs/rlhf.py <overrides>`, on a cluster of its
    # own (not this process's Ray), with a Hydra group override among the key=value ones.
    root = tmp_path / "runs"
    overrides = small_run(rlhf_inputs, root, "submitted", "rounds=1", "iterations_per_round=2",
                          "rlhf/placement=colocated", "ppo.kl.estimator=k3")
    logs = _run_job(ray_head, "python jobs/rlhf.py " + " ".join(overrides), timeout_s=600)

    run_dir = root / "submitted"
    last = [line for line in logs.splitlines() if line.strip()][-1]
    assert last == f"summary: {run_dir / 'summary.json'}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["iterations"] == 2 and summary["rounds"] == 1
    assert Path(summary["model_dir"], "config.json").exists()
    # The job joined the cluster it was submitted to (whose dashboard took the submission), not a Ray of its own.
    assert "Connecting to existing Ray cluster" in logs and ray_head.removeprefix("http://") in logs
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["ppo"]["kl"]["estimator"] == "k3" and config["iterations_per_round"] == 2
