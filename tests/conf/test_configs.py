"""Every YAML in conf/ composes and validates against its job's schema (with every option of its groups)."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from jobs.common import CONF_DIR, load_config

JOB_YAMLS = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _schema(job: str) -> type:
    module = importlib.import_module(f"jobs.{job}")
    classes = [v for k, v in vars(module).items() if k.endswith("JobConfig") and dataclasses.is_dataclass(v)]
    assert len(classes) == 1, f"jobs/{job}.py must define exactly one *JobConfig dataclass, found {classes}"
    return classes[0]


def _groups(job: str) -> list[str]:
    defaults = yaml.safe_load((CONF_DIR / f"{job}.yaml").read_text()).get("defaults", [])
    return [next(iter(d)) for d in defaults if isinstance(d, dict) and not next(iter(d)).startswith("override")]


def _cases() -> list[tuple[str, list[str]]]:
    cases = []
    for job in JOB_YAMLS:
        cases.append((job, []))
        for group in _groups(job):
            for option in sorted((CONF_DIR / group).glob("*.yaml")):
                cases.append((job, [f"{group}={option.stem}"]))
    return cases


def test_there_are_job_configs():
    assert JOB_YAMLS, "conf/ has no job YAMLs"


@pytest.mark.parametrize("job, overrides", _cases(), ids=lambda x: x if isinstance(x, str) else ",".join(x) or "default")
def test_yaml_composes_and_validates(job, overrides):
    cfg = load_config(job, _schema(job), overrides)
    assert dataclasses.is_dataclass(cfg)


def test_every_group_option_is_used_by_some_job():
    used = {g for job in JOB_YAMLS for g in _groups(job)}
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        if any(group_dir.glob("*.yaml")):
            assert group_dir.name in used, f"conf/{group_dir.name}/ is not used by any job's defaults list"


def test_yaml_headers_say_how_to_launch():
    for job in JOB_YAMLS:
        text = (CONF_DIR / f"{job}.yaml").read_text()
        assert text.startswith("#"), f"conf/{job}.yaml needs a header comment (what, hardware, launch line)"
        if job != "demo":
            assert f"jobs/{job}.py" in text.split("defaults")[0], f"conf/{job}.yaml header lacks its launch line"
