"""Supervised fine-tuning on chat data in XTuner's formats, on Ray Train workers; ends with one chat sample.

    python jobs/sft.py                                        # shipped data/sample_sft/*, tiny model, 2 CPU workers
    python jobs/sft.py model.path=outputs/pretrain/model data.paths=[my_chats.jsonl] trainer.lr=1e-4
    ray job submit --working-dir . -- python jobs/sft.py run.root=/shared/outputs model=hf \\
        model.path=/models/internlm2-7b trainer=deepspeed_zero3 trainer.num_workers=8 trainer.gpus_per_worker=1

Rows (Alpaca, MOSS-003-SFT, Guanaco/OpenAssistant, OpenAI messages, ShareGPT, XTuner, plain text) are read on the
driver (malformed rows fail with file:line:field, or are counted with data.on_error=skip), rendered with the
tokenizer's chat template with loss on assistant replies only, packed into data.max_length rows without
cross-sample attention, and written to `<run dir>/sft_data/` for the workers. After training the final model
answers `sample_prompt` greedily; the reply goes in the summary. With model.path empty the job starts from a
randomly initialised tiny model (tokenizer trained on the bundled bootstrap text), so it runs out of the box.
Deviations from InternLM2 SFT (spec §6): tiny data and model; LR / steps tuned for the tiny demo (the paper: 1
epoch, AdamW, LR 4e-5); packing keeps samples whole instead of cutting them at row boundaries.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from cluster.runtime import ClusterConfig, init_ray  # noqa: E402
from cluster.runtime_env import REPO_ROOT  # noqa: E402
from data.sft import ALPACA_SYSTEM, FORMATS  # noqa: E402
from jobs.common import LoggingConfig, Run, RunConfig, run_job  # noqa: E402
from modeling.config import ModelConfig  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402


@dataclass
class SFTDataConfig:
    # JSONL files or directories of them; relative paths are tried against the launch dir, then the repo root
    # (under `ray job submit` the job runs in Ray's unpacked copy of the working dir).
    paths: list[str] = field(default_factory=lambda: ["data/sample_sft"])
    format: str = "auto"  # auto (per row) | alpaca | moss | guanaco | openai | sharegpt | xtuner | text
    on_error: str = "fail"  # fail | skip (skipped rows are counted in the summary)
    max_length: int = 512  # tokens per packed row; longer conversations are truncated
    pack: bool = True  # pack several samples per row (block-diagonal attention); false = one sample per row
    alpaca_system: str = ALPACA_SYSTEM  # XTuner's system text for Alpaca rows ("" = none)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"data.on_error must be fail or skip (got {self.on_error!r})")
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8 (got {self.max_length})")
        if not self.paths:
            raise ValueError("data.paths is empty; give JSONL files or directories, e.g. data.paths=[chats.jsonl]")


@dataclass
class SFTJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    sample_prompt: str = "What is the capital of France?"
    sample_max_new_tokens: int = 32


def resolve_input(path: str) -> list[Path]:
    """A file or a directory of *.jsonl; relative paths: launch dir first, then the repo root."""
    if "://" in path:
        return [Path(path)]
    candidates = [Path(path).expanduser()]
    if not candidates[0].is_absolute():
        candidates.append(REPO_ROOT / path)
    for c in candidates:
        if c.is_dir():
            files = sorted(f.resolve() for f in c.glob("*.jsonl"))
            if not files:
                raise FileNotFoundError(f"data.paths entry {path!r}: directory {c} has no *.jsonl files")
            return files
        if c.is_file():
            return [c.resolve()]
    raise FileNotFoundError(f"data.paths entry {path!r} not found (looked in {', '.join(str(c) for c in candidates)})")


def tokenizer_dir(cfg: SFTJobConfig, run: Run) -> str:
    """The model's tokenizer; a from-scratch tiny run trains one on the bootstrap text (once per run dir)."""
    if cfg.model.tokenizer_dir:
        return cfg.model.tokenizer_dir
    out = run.dir / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from data.io import atomic_dir
        from data.samples import tokenizer_training_texts
        from modeling.tiny import train_tokenizer

        with atomic_dir(out) as tmp:
            train_tokenizer(tokenizer_training_texts(), cfg.model.tiny.vocab_size, tmp)
    return str(out)


def prepare_rows(cfg: SFTJobConfig, run: Run, tokenizer) -> dict:
    """JSONL -> conversations -> token ids + labels -> packed rows in <run dir>/sft_data; returns data stats."""
    from data.sft import encode_all, read_conversations
    from data.sft_packing import one_per_row, pack_samples, write_rows

    files = [f for p in cfg.data.paths for f in resolve_input(p)]
    convs, stats = read_conversations(files, cfg.data.format, cfg.data.on_error, cfg.data.alpaca_system)
    samples = encode_all(convs, tokenizer, cfg.data.max_length, stats.errors)
    if not samples:
        raise ValueError(f"no usable SFT samples in {[str(f) for f in files]} ({stats.skipped} rows skipped)")
    rows = pack_samples(samples, cfg.data.max_length, seed=cfg.trainer.seed) if cfg.data.pack else one_per_row(samples)
    write_rows(rows, run.dir / "sft_data")
    return {
        "files": [str(f) for f in files],
        "rows_read": stats.rows,
        "conversations": stats.conversations,
        "samples": len(samples),
        "packed_rows": len(rows),
        "trained_tokens_per_epoch": sum(sum(1 for x in r.labels if x != -100) for r in rows),
        "skipped_rows": stats.skipped,
        "skipped_examples": stats.errors.examples,
        "dropped_rows": stats.dropped,
    }


def sample_reply(cfg: SFTJobConfig, model_dir: str) -> str:
    """Greedy chat reply of the final model. CPU runs answer in the driver; GPU runs in a Ray task on a GPU."""
    from trainer.lm_tasks import chat_sample

    if not cfg.trainer.use_gpu:
        return chat_sample(model_dir, cfg.sample_prompt, cfg.sample_max_new_tokens)
    import ray

    remote = ray.remote(chat_sample).options(num_cpus=cfg.trainer.cpus_per_worker, num_gpus=cfg.trainer.gpus_per_worker)
    return ray.get(remote.remote(model_dir, cfg.sample_prompt, cfg.sample_max_new_tokens, "cuda"))


def main(cfg: SFTJobConfig, run: Run) -> dict:
    from cluster.train import fit
    from jobs.pretrain import start_over
    from trainer.lm_tasks import SFTTask, load_any_tokenizer
    from trainer.loop import plan_steps

    tok_dir = tokenizer_dir(cfg, run)
    stats = prepare_rows(cfg, run, load_any_tokenizer(tok_dir))
    run.logger.log({f"data/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
    task = SFTTask(
        data_dir=str(run.dir / "sft_data"),
        tokenizer_path=tok_dir,
        micro_batch_size=cfg.trainer.micro_batch_size,
        model_path=cfg.model.path,
        tiny=cfg.model.tiny,
        dtype=cfg.model.dtype,
        seed=cfg.trainer.seed,
        load_in_4bit=cfg.trainer.lora.qlora,
    )
    plan_steps(task, cfg.trainer, 0, cfg.trainer.num_workers)  # too little data fails here, before Ray
    start_over(run, cfg.run.resume)
    init_ray(cfg.cluster)
    result = fit(task, cfg.trainer, run.dir, logger=run.logger, show_progress=cfg.logging.progress)
    reply = sample_reply(cfg, result.model_dir) if result.model_dir else None
    return {
        **result.summary(),
        "sample_prompt": cfg.sample_prompt,
        "sample_response": reply,
        **stats,
    }


if __name__ == "__main__":
    run_job("sft", SFTJobConfig, main)
