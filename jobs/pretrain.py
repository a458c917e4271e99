"""Pretraining: next-token loss on the packed corpus from `jobs/data.py`, on Ray Train workers.

    python jobs/pretrain.py                                   # tiny model on <run.root>/data/packed, 2 CPU workers
    python jobs/pretrain.py trainer=deepspeed_zero3 trainer.max_steps=50
    ray job submit --working-dir . -- python jobs/pretrain.py run.root=/shared/outputs \\
        model=hf model.path=/models/base trainer=deepspeed_zero3 trainer.num_workers=8 trainer.gpus_per_worker=1

Reads `data.packed_dir` (Parquet, an `input_ids` list column: fixed-length rows of concatenated documents) and the
tokenizer at `model.tokenizer_path`; with `model.path` empty it trains the tiny InternLM2-shaped model from random
init. Writes checkpoints under `<run dir>/checkpoints` (rerunning resumes) and the final HF model at
`<run dir>/model`. Deviations from InternLM2 (spec §4): no 4K→32K phase schedule or capability-specific phase
(one phase at the data's sequence length); warmup ratio 3% (unpublished in the report); tiny scale.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

import shutil  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from cluster.runtime import ClusterConfig, init_ray  # noqa: E402
from jobs.common import LoggingConfig, Run, RunConfig, run_job  # noqa: E402
from modeling.config import ModelConfig  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402


@dataclass
class PretrainDataConfig:
    packed_dir: str = "outputs/data/packed"  # the data job's <run dir>/packed (conf/pretrain.yaml follows run.root)


@dataclass
class PretrainJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)


def _existing(path: str, what: str, fix: str) -> str:
    p = Path(path).expanduser()
    if "://" not in path and not p.exists():
        raise FileNotFoundError(f"{what} {path!r} does not exist: {fix}")
    return path if "://" in path else str(p.resolve())


def build_task(cfg: PretrainJobConfig):
    from trainer.lm_tasks import PretrainTask

    packed = _existing(
        cfg.data.packed_dir, "data.packed_dir",
        "run `python jobs/data.py` first (it writes <run.root>/data/packed) or set data.packed_dir=<dir of Parquet>",
    )
    tok = cfg.model.tokenizer_dir
    if not tok:
        raise ValueError("set model.tokenizer_path (the data job's <run.root>/data/tokenizer) or model.path")
    tok = _existing(tok, "model.tokenizer_path", "run `python jobs/data.py` first or point it at a tokenizer dir")
    return PretrainTask(
        data_dir=packed,
        tokenizer_path=tok,
        micro_batch_size=cfg.trainer.micro_batch_size,
        model_path=cfg.model.path,
        tiny=cfg.model.tiny,
        dtype=cfg.model.dtype,
        seed=cfg.trainer.seed,
        load_in_4bit=cfg.trainer.lora.qlora,
    )


def start_over(run: Run, resume: bool) -> None:
    """run.resume=false: the user asked to start over, so earlier checkpoints must not be picked up later."""
    ckpts = run.dir / "checkpoints"
    if not resume and ckpts.exists():
        print(f"run.resume=false: removing earlier checkpoints in {ckpts}", file=sys.stderr)
        shutil.rmtree(ckpts)


def main(cfg: PretrainJobConfig, run: Run) -> dict:
    from cluster.train import fit
    from trainer.loop import plan_steps

    task = build_task(cfg)
    plan_steps(task, cfg.trainer, 0, cfg.trainer.num_workers)  # data too small? fail before Ray starts
    start_over(run, cfg.run.resume)
    init_ray(cfg.cluster)
    result = fit(task, cfg.trainer, run.dir, logger=run.logger, show_progress=cfg.logging.progress)
    return {
        **result.summary(),
        "rows": task.num_rows(),
        "backend": cfg.trainer.backend if cfg.trainer.backend == "ddp" else f"deepspeed_zero{cfg.trainer.zero_stage}",
        "num_workers": cfg.trainer.num_workers,
    }


if __name__ == "__main__":
    run_job("pretrain", PretrainJobConfig, main)
