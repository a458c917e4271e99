"""The job contract: config errors before work, run dir layout, summary line last."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest

from cluster.runtime import ClusterConfig
from jobs import common
from jobs.common import LoggingConfig, RunConfig


@dataclass
class _Inner:
    lr: float = 1e-3
    steps: int = 3
    weights: dict[str, int] = field(default_factory=lambda: {"a": 1})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("toy.steps must be >= 1; set toy.steps=1 or more")


@dataclass
class _ToyJob:
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    toy: _Inner = field(default_factory=_Inner)


@pytest.fixture
def toy_conf(tmp_path, monkeypatch):
    (tmp_path / "toy.yaml").write_text("defaults:\n  - toy_schema\n  - _self_\ntoy:\n  steps: 5\n")
    monkeypatch.setattr(common, "CONF_DIR", tmp_path)
    return tmp_path


def test_override_and_yaml_delta(toy_conf):
    cfg = common.load_config("toy", _ToyJob, ["toy.lr=0.5", "toy.weights.a=3", "+toy.weights.b=2"])
    assert cfg.toy.lr == 0.5 and cfg.toy.steps == 5 and isinstance(cfg, _ToyJob)
    assert cfg.toy.weights == {"a": 3, "b": 2}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("toy.lrr=1", "unknown key 'toy.lrr'. Did you mean 'toy.lr'? Valid keys under 'toy': lr, steps"),
        ("toy.steps=0", "toy.steps must be >= 1"),
        ("toy.lr=abc", "bad value for 'toy.lr'"),
        ("nope=1", "Valid keys under the top level: cluster, logging, run, toy"),
        ("toy.weights.b=2", "'toy.weights' is a mapping without a 'b' entry yet; add one with '+toy.weights.b="),
    ],
)
def test_bad_config_fails_before_work_naming_the_key(toy_conf, capsys, override, expected):
    with pytest.raises(SystemExit) as exc:
        common.load_config("toy", _ToyJob, [override])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_execute_writes_the_run_dir_contract(toy_conf, tmp_path):
    cfg = common.load_config("toy", _ToyJob, [f"run.root={tmp_path / 'out'}", "logging.wandb=offline"])

    def main(cfg, run):
        for step in range(cfg.toy.steps):
            run.logger.log({"loss": 1.0 / (step + 1)}, step=step)
        return {"final_loss": 0.2}

    path = common.execute("toy", cfg, main)
    run_dir = tmp_path / "out" / "toy"
    assert path == run_dir / "summary.json"
    summary = json.loads(path.read_text())
    assert summary["final_loss"] == 0.2 and summary["job"] == "toy" and summary["run_dir"] == str(run_dir)
    assert "steps: 5" in (run_dir / "config.yaml").read_text()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"


def test_cli_last_line_is_summary(tmp_path):
    """A real process: stdout's last line is `summary: <path>` even with W&B and logging around it."""
    script = tmp_path / "toyjob.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(common.REPO_ROOT)!r})
            from pathlib import Path
            from tests.jobs.test_common import _ToyJob
            from jobs import common
            conf = Path({str(tmp_path)!r}) / "conf"; conf.mkdir(exist_ok=True)
            (conf / "toy.yaml").write_text("defaults:\\n  - toy_schema\\n  - _self_\\n")
            common.CONF_DIR = conf
            common.run_job("toy", _ToyJob, lambda cfg, run: {{"ok": True}})
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script), f"run.root={tmp_path}/o", "logging.wandb=offline"],
        capture_output=True, text=True, timeout=120, cwd=common.REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last == f"summary: {tmp_path}/o/toy/summary.json"


@pytest.mark.parametrize("override, key", [
    ("ppo.kl.estimator=k4", "ppo.kl.estimator"),  # algo/kl.py calls it kl.estimator
    ("ppo.loss.clip_eps=2", "ppo.loss.clip_eps"),  # algo/ppo.py calls it ppo.clip_eps
    ("ppo.advantage.gamma=3", "ppo.advantage.gamma"),  # algo/advantages.py calls it advantage.gamma
    ("online.rm_update.online_share=3", "online.rm_update.online_share"),  # already the full key: unchanged
])
def test_a_nested_dataclass_check_names_the_key_where_the_job_mounts_it(override, key, capsys):
    from jobs.rlhf import RLHFJobConfig

    with pytest.raises(common.ConfigError):
        common.load_config("rlhf", RLHFJobConfig, [override, "policy.path=p", "reward.path=r"])
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {key} must be"), err


def _run_toy(tmp_path, raise_line: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "failjob.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(common.REPO_ROOT)!r})
        from pathlib import Path
        from tests.jobs.test_common import _ToyJob
        from jobs import common
        conf = Path({str(tmp_path)!r}) / "conf"; conf.mkdir(exist_ok=True)
        (conf / "toy.yaml").write_text("defaults:\\n  - toy_schema\\n  - _self_\\n")
        common.CONF_DIR = conf
        def main(cfg, run):
            {raise_line}
        common.run_job("toy", _ToyJob, main)
        """))
    import os

    return subprocess.run([sys.executable, str(script), f"run.root={tmp_path}/o", "logging.wandb=disabled"],
                          capture_output=True, text=True, timeout=120, cwd=common.REPO_ROOT,
                          env={**os.environ, **(env or {})})


def test_an_explained_failure_ends_with_its_message_not_a_traceback(tmp_path):
    # The placement table (or an unreachable address, a file:line) is the whole story; a traceback buried it.
    out = _run_toy(tmp_path, "from cluster.placement import PlacementError; "
                             "raise PlacementError('the roles do not fit the cluster: CPU asked 3, cluster has 2')")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-2] == "error: the roles do not fit the cluster: CPU asked 3, cluster has 2"
    # The traceback is one variable away, and any other failure keeps it.
    assert "Traceback" in _run_toy(tmp_path, "from cluster.placement import PlacementError; raise PlacementError('x')",
                                   {"COOLRAY_TRACEBACK": "1"}).stderr
    other = _run_toy(tmp_path, "raise KeyError('a bug')")
    assert other.returncode == 1 and "Traceback" in other.stderr and "KeyError: 'a bug'" in other.stderr
