"""The one place where process environment variables are decided.

Everything the runtime needs (Ray auth, offline Hugging Face, DeepSpeed's accelerator, W&B) is set here,
both for the driver process (`apply_process_defaults`) and for Ray workers (`worker_env_vars`).
Nothing else in coolray reads or writes `os.environ` for these.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# setdefault semantics: a user's explicit export always wins.
_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",  # Ray 2.60 turns on token auth after the first local init; CLI clients then fail
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",  # nothing may download weights at run time
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",  # wandb must not wrap stdout: our last line is `summary: <path>`
    "WANDB_DISABLE_GIT": "true",
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_DEDUP_LOGS": "0",
}


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken driver: treat as CPU
        return False


def _fix_sys_path() -> None:
    """`python jobs/x.py` puts jobs/ first on sys.path, and Ray copies the script's directory into every
    worker's path; there jobs/data.py and jobs/serve.py would shadow the `data` and `serve` packages.
    Keep the repo root first and jobs/ off the path."""
    import sys

    jobs_dir = REPO_ROOT / "jobs"
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != jobs_dir]
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def apply_process_defaults() -> None:
    """Set runtime defaults in this process before heavy imports (deepspeed prints to stdout otherwise)."""
    _fix_sys_path()
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"
    pythonpath = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pythonpath.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), pythonpath) if p)


def worker_env_vars(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray workers: the defaults above plus anything the driver already has set for them."""
    apply_process_defaults()
    keys = list(_DEFAULTS) + ["DS_ACCELERATOR", "PYTHONPATH", "WANDB_MODE", "WANDB_DIR", "TORCH_EXTENSIONS_DIR"]
    env = {k: os.environ[k] for k in keys if k in os.environ}
    env.update(extra or {})
    return env
