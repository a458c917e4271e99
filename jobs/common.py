"""What every job shares: Hydra config loading with clear errors, the run directory, metrics, the summary.

A job module defines a root config dataclass and `main(cfg, run) -> dict` and ends with
`run_job("sft", SFTJobConfig, main)`. The contract every job honours:
  - all outputs under `run.dir` (default `outputs/<job>`; rerunning the same command resumes there),
  - the resolved config in `<run.dir>/config.yaml` and in W&B,
  - metrics in W&B and `<run.dir>/metrics.jsonl`,
  - `<run.dir>/summary.json` with the headline figures, and `summary: <path>` as the last output line.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import sys
import time
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cluster.runtime_env import REPO_ROOT, apply_process_defaults
from data.io import atomic_write_json, atomic_write_text

CONF_DIR = REPO_ROOT / "conf"


@dataclass
class RunConfig:
    root: str = "outputs"  # relative paths resolve against the launch directory; use an absolute path with `ray job submit`
    name: str = ""  # "" = the job's name
    seed: int = 0
    resume: bool = True  # rerunning into an existing run dir continues from its latest checkpoint

    def dir_for(self, job: str) -> Path:
        return (Path(self.root) / (self.name or job)).resolve()


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | disabled
    project: str = "coolray"
    entity: str = ""
    progress: bool = True  # progress bars on long stages
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.wandb not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"logging.wandb must be one of auto, online, offline, disabled (got {self.wandb!r})")


class ConfigError(SystemExit):
    """Raised (and printed) before any work starts when the command line or YAML is wrong."""

    def __init__(self, message: str):
        print(f"config error: {message}", file=sys.stderr)
        super().__init__(2)


# ---------------------------------------------------------------------------------------------- config loading


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}


def _node_type(schema: type, dotted: str) -> type | None:
    """The dataclass type at a dotted path of the schema, or None when it is not a dataclass."""
    node: Any = schema
    for part in [p for p in dotted.split(".") if p]:
        hint = _field_types(node).get(part)
        if hint is None:
            return None
        args = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        node = hint if dataclasses.is_dataclass(hint) else (args[0] if args else None)
        if node is None:
            return None
    return node


def _unknown_key_message(schema: type, full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    node = _node_type(schema, parent)
    if node is None:
        grand, _, name = parent.rpartition(".")
        holder = _node_type(schema, grand)
        if holder is not None and typing.get_origin(_field_types(holder).get(name)) is dict:
            return (f"unknown key '{full_key}': '{parent}' is a mapping without a '{leaf}' entry yet; add one with "
                    f"'+{full_key}=<value>'")
        return f"unknown key '{full_key}'"
    valid = sorted(f.name for f in dataclasses.fields(node))
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean '{(parent + '.') if parent else ''}{close[0]}'?" if close else ""
    where = f"'{parent}'" if parent else "the top level"
    return f"unknown key '{full_key}'.{hint} Valid keys under {where}: {', '.join(valid)}"


def _composition_message(schema: type, exc: BaseException) -> str:
    """Turn Hydra/OmegaConf's exception chain into one line naming the key and what is valid there."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    chain, c = [], exc
    while c is not None and len(chain) < 10:
        chain.append(c)
        c = c.__cause__ or c.__context__
    for c in chain:
        key = getattr(c, "full_key", None)
        if key and isinstance(c, (ConfigAttributeError, ConfigKeyError)):
            return _unknown_key_message(schema, str(key))
        if key:
            first = str(c).splitlines()[0]
            return f"bad value for '{key}': {first}"
    return str(exc).strip()


def load_config(job: str, schema: type, overrides: list[str], config_name: str | None = None):
    """Compose conf/<config_name>.yaml with overrides, validate against `schema`, return the dataclass."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name=f"{job}_schema", node=schema)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job):
            cfg = compose(config_name=config_name or job, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_composition_message(schema, e)) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        obj = OmegaConf.to_object(cfg)
    except (ValueError, TypeError, OmegaConfBaseException) as e:
        raise ConfigError(_located(cfg, str(e).strip())) from None
    return obj


def _located(cfg, message: str) -> str:
    """A dataclass's own check names its keys as it knows them ("kl.estimator must be ..."), not where the job
    mounts it (ppo.kl.estimator). Find the deepest node whose own validation fails and, when the message starts
    with <name>.<one of that node's fields>, put the node's full key in front of the field instead."""
    from omegaconf import DictConfig, OmegaConf

    def culprit(node, path: str) -> tuple[str, DictConfig] | None:
        for key in node.keys():
            child = node[key]  # None for an unset optional section
            if isinstance(child, DictConfig):
                found = culprit(child, f"{path}.{key}" if path else str(key))
                if found:
                    return found
        try:
            OmegaConf.to_object(node)
        except Exception:  # noqa: BLE001: any failure marks this node; the original message is what is shown
            return path, node
        return None

    try:
        found = culprit(cfg, "")
    except Exception:  # noqa: BLE001: locating is a courtesy; never hide the real message behind a second error
        return message
    if not found or not found[0]:
        return message
    path, node = found
    head, space, rest = message.partition(" ")
    _, dot, field_name = head.rpartition(".")
    if dot and field_name in node.keys():
        return f"{path}.{field_name}{space}{rest}"
    return message


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


# ---------------------------------------------------------------------------------------------- metrics


class MetricsLogger:
    """W&B (offline unless a key is configured; never blocks on network) plus a local metrics.jsonl."""

    def __init__(self, run_dir: Path, job: str, cfg: LoggingConfig, config: dict):
        self.run_dir, self.cfg = run_dir, cfg
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        mode = cfg.wandb
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        self.mode = mode
        self._wandb = None
        if mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            atomic_write_text(id_file, run_id)
            self._wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity or None,
                name=f"{job}-{run_dir.name}",
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                mode=mode,
                config=config,
                job_type=job,
                reinit="create_new",  # the demo holds its own run while each stage logs to another
                settings=wandb.Settings(x_disable_stats=True, console="off", silent=True),
            )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **row}, default=str) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self._wandb is not None:
            import wandb

            # commit=False: attach to the next metrics row instead of advancing W&B's step (which would make
            # W&B drop a following log(..., step=n) row with the same n).
            self._wandb.log({key: wandb.Table(columns=columns, data=rows)}, commit=False)

    def log_image(self, key: str, path: str | os.PathLike) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, commit=False)

    def finish(self, summary: dict | None = None) -> None:
        self._jsonl.close()
        if self._wandb is not None:
            if summary:
                for k, v in summary.items():
                    if isinstance(v, (int, float, str)):
                        self._wandb.summary[k] = v
            self._wandb.finish()


def progress(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True):
    """A tqdm bar on stderr (stdout stays clean for the `summary:` line)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- the job runner


@dataclass
class Run:
    """Handed to a job's main(): where to write, how to log."""

    job: str
    dir: Path
    logger: MetricsLogger
    started: float = field(default_factory=time.time)

    def path(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_summary(run: Run, summary: dict) -> Path:
    out = {"job": run.job, "run_dir": str(run.dir), "seconds": round(time.time() - run.started, 2), **summary}
    return atomic_write_json(run.dir / "summary.json", out)


def execute(job: str, cfg: Any, main: Callable[[Any, Run], dict]) -> Path:
    """Run an already-validated config; returns the summary path. Used by the CLI and by in-process callers."""
    import ray
    from omegaconf import OmegaConf

    apply_process_defaults()
    run_dir = cfg.run.dir_for(job)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    seed_everything(cfg.run.seed)
    logger = MetricsLogger(run_dir, job, cfg.logging, config_to_dict(cfg))
    run = Run(job=job, dir=run_dir, logger=logger)
    ray_was_up = ray.is_initialized()
    summary: dict = {}
    try:
        summary = main(cfg, run) or {}
        path = write_summary(run, summary)
    finally:
        logger.finish(summary)
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
    return path


def _explained(exc: BaseException) -> bool:
    """Errors whose message already says what went wrong and what to do (the placement table, the unreachable
    address, the file:line of bad data, the role and phase that hung or died, the weight sync that did not take):
    the CLI prints them without a traceback, which would only bury that message under library frames."""
    from cluster.placement import PlacementError
    from cluster.runtime import ClusterUnreachable
    from cluster.timeouts import PhaseTimeout, RoleDied
    from data.io import DataError

    return isinstance(exc, (PlacementError, ClusterUnreachable, PhaseTimeout, RoleDied, DataError))


def run_job(job: str, schema: type, main: Callable[[Any, Run], dict], argv: list[str] | None = None) -> Path:
    """CLI entry: parse Hydra overrides, run, and print `summary: <path>` as the very last line. A failure whose
    message is its own explanation (see _explained) ends the process with `error: <message>` and exit code 1;
    COOLRAY_TRACEBACK=1 shows the traceback as well."""
    apply_process_defaults()
    cfg = load_config(job, schema, sys.argv[1:] if argv is None else argv)
    try:
        path = execute(job, cfg, main)
    except Exception as e:
        if os.environ.get("COOLRAY_TRACEBACK") == "1" or not _explained(e):
            raise
        sys.stdout.flush()
        print(f"error: {e}\n(COOLRAY_TRACEBACK=1 prints the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    sys.stderr.flush()
    print(f"summary: {path}", flush=True)
    return path
