"""jobs/serve.py as users run it: foreground server stopped by Ctrl-C, and the demo's smoke mode."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_foreground_server_answers_then_stops_cleanly_on_ctrl_c(ray_cluster, tiny_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "jobs/serve.py", f"model.path={tiny_dir}", f"serve.port={port}", f"run.root={tmp_path}",
           "logging.wandb=disabled"]
    err_path = tmp_path / "stderr.log"
    with err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        # Blocks until the model is loaded and /ready answered. Ray forwards worker and raylet output to the
        # driver's stdout too (e.g. a previous Serve controller's shutdown notice), so skip lines until ours.
        first = ""
        for line in proc.stdout:
            if line.startswith("serving: "):
                first = line.strip()
                break
        if not first:  # the job exited before serving: show why
            proc.wait(timeout=60)
            pytest.fail(f"jobs/serve.py exited with {proc.returncode} before serving; stderr tail:\n"
                        + err_path.read_text()[-3000:])
        assert first == f"serving: http://127.0.0.1:{port}/v1", first
        r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == Path(tiny_dir).name  # served name defaults to the checkpoint dir name
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("jobs/serve.py still running 120 s after Ctrl-C; stderr tail:\n" + err_path.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            from ray import serve

            serve.shutdown()  # the killed job ran Serve in this test's Ray: do not leave it to the next test
    assert proc.returncode == 0
    lines = [line for line in rest.splitlines() if line.strip()]
    assert lines[-1].startswith("summary: ") and not any(line.startswith("serving:") for line in lines)
    summary = json.loads(Path(lines[-1].removeprefix("summary: ")).read_text())
    assert summary["url"] == first.removeprefix("serving: ")
    assert summary["model_dir"] == str(tiny_dir)
    assert summary["stopped_by"] == "signal"
    assert summary["requests_served"] == 1 and summary["status_counts"] == {"200": 1}
    with pytest.raises(requests.ConnectionError):  # Serve was shut down with the job
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_smoke_mode_sends_one_chat_request_and_shuts_down(ray_cluster, tiny_dir, tmp_path, capsys):
    from jobs import serve as serve_job
    from jobs.common import execute, load_config

    port = _free_port()
    cfg = load_config("serve", serve_job.ServeJobConfig, [
        f"model.path={tiny_dir}", f"serve.port={port}", f"run.root={tmp_path}", "logging.wandb=disabled",
        "smoke=true", "smoke_max_tokens=6", "serve.api_key=s3cret", "serve.served_model_name=demo-model"])
    summary = json.loads(execute("serve", cfg, serve_job.main).read_text())
    out = capsys.readouterr().out
    assert out.count("serving: ") == 1 and f"serving: http://127.0.0.1:{port}/v1" in out
    assert summary["stopped_by"] == "smoke" and summary["model"] == "demo-model"
    assert isinstance(summary["smoke_reply"], str)
    assert 1 <= summary["smoke_usage"]["completion_tokens"] <= 6
    assert summary["requests_served"] == 1
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_busy_port_and_missing_key_env_fail_before_serving(ray_cluster, tiny_dir, tmp_path):
    from jobs import serve as serve_job
    from jobs.common import execute, load_config

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = load_config("serve", serve_job.ServeJobConfig, [
            f"model.path={tiny_dir}", f"serve.port={busy.getsockname()[1]}", f"run.root={tmp_path}",
            "logging.wandb=disabled"])
        with pytest.raises(OSError, match="serve.port="):
            execute("serve", cfg, serve_job.main)
    cfg = load_config("serve", serve_job.ServeJobConfig, [
        f"model.path={tiny_dir}", f"run.root={tmp_path}", "logging.wandb=disabled",
        "serve.api_key_env=COOLRAY_TEST_NOT_SET_ANYWHERE"])
    with pytest.raises(ValueError, match="COOLRAY_TEST_NOT_SET_ANYWHERE"):
        execute("serve", cfg, serve_job.main)


def test_first_ctrl_c_asks_the_server_to_stop_and_a_second_one_interrupts():
    from jobs.serve import _StopSignals

    before = signal.getsignal(signal.SIGINT)
    with _StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.wait(5) == "signal"  # the first one is a request: the job shuts Serve down and writes summary
        with pytest.raises(KeyboardInterrupt):  # the second one is for a load or shutdown that does not return
            os.kill(os.getpid(), signal.SIGINT)
            signals.stop.wait(5)
    assert signal.getsignal(signal.SIGINT) is before
    with _StopSignals() as signals:
        assert signals.wait(0.2) == "duration"
