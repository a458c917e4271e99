"""Import layers (docs/design.md): algo/, data/ and modeling/ must load without Ray, Hydra, DeepSpeed or vLLM;
trainer/ may use DeepSpeed (its ZeRO engine) but not Ray, Hydra or vLLM (Ray Train wraps it from cluster/).

Each module is imported in a fresh interpreter, one after the other, so the failure names the first module that
pulled a forbidden package in. A module that fails to import at all is reported too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "hydra", "deepspeed", "vllm")
TRAINER_FORBIDDEN = ("ray", "hydra", "vllm")
# algo/ is pure math: beyond the standard library it may only use these.
ALGO_ALLOWED_THIRD_PARTY = ("torch", "numpy")

_PROBE = r"""
import importlib, json, pkgutil, sys
forbidden = set(sys.argv[1].split(","))
packages = sys.argv[2].split(",")
report = {"culprits": {}, "errors": {}, "loaded": [], "third_party_after_algo": []}

def walk(package):
    pkg = importlib.import_module(package)
    yield package
    for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
        yield info.name

def imported_roots():
    return {name.split(".")[0] for name in sys.modules}

baseline = imported_roots()
for package in packages:
    try:
        names = list(walk(package))
    except Exception as exc:
        report["errors"][package] = repr(exc)
        continue
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            report["errors"][name] = repr(exc)
            continue
        report["loaded"].append(name)
        for root in sorted(forbidden & imported_roots()):
            report["culprits"].setdefault(root, name)
    if package == "algo":
        report["third_party_after_algo"] = sorted(imported_roots() - baseline)
print(json.dumps(report))
"""


def _probe(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(forbidden), ",".join(packages)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**_clean_env(), "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, f"layering probe crashed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report() -> dict:
    return _probe(("algo", "data", "modeling"), FORBIDDEN)


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_algo_data_modeling_import_without_ray_hydra_deepspeed_vllm(report):
    assert "algo.ppo" in report["loaded"]  # the walk really reached the submodules
    assert not report["errors"], f"modules that failed to import: {report['errors']}"
    assert not report["culprits"], (
        "forbidden packages imported (package -> first module that pulled it in): "
        f"{report['culprits']}. Move that import into cluster/, trainer/ or jobs/, or import it inside the function "
        "that needs it."
    )


def test_trainer_imports_deepspeed_at_most_not_ray_hydra_vllm():
    report = _probe(("trainer",), TRAINER_FORBIDDEN)
    assert "trainer.engine" in report["loaded"] and "trainer.loop" in report["loaded"]
    assert not report["errors"], f"modules that failed to import: {report['errors']}"
    assert not report["culprits"], (
        f"trainer/ imported {report['culprits']} (package -> first module). trainer/ is the per-rank engine and may "
        "use torch, transformers, peft and deepspeed only; Ray Train wraps it from cluster/train.py."
    )


def test_algo_uses_only_torch_and_numpy(report):
    stdlib = set(sys.stdlib_module_names)
    extra = [m for m in report["third_party_after_algo"]
             if m not in stdlib and not m.startswith("_") and m != "algo"
             and not any(m == a or m.startswith(a) for a in ALGO_ALLOWED_THIRD_PARTY)]
    # torch itself drags in a few helper packages; everything left must come from torch, not from algo/.
    torch_deps = _torch_import_roots()
    offending = sorted(set(extra) - torch_deps)
    assert not offending, f"algo/ imported {offending}; algo/ may only use torch and numpy (docs/design.md)"


def _torch_import_roots() -> set[str]:
    code = "import json, sys, numpy, torch; print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))
