"""Steady-state training throughput: the tiny model under Ray Train (1 worker, coolray's loop and engine) vs a
bare single-process PyTorch loop with the same model, batches, optimizer, thread count and steps.

    python bench/train_overhead.py                 # 1 thread, 60 steps of 8 x 128 tokens, first 10 steps excluded
    python bench/train_overhead.py --threads 2 --steps 100

Startup (Ray, worker processes, imports, model build) is excluded on both sides: only optimizer steps after the
warm-up count, timed inside the training process. Two measures: wall-clock tokens/s (tokens per step / median step
time) and tokens per CPU-second of the training process (all its threads, Ray's own included), which stays
meaningful when other processes compete for the cores. The bare loop runs before and after the Ray run and the
two are averaged; a gap between them shows the machine's load changed. The bare loop runs in a fresh process with
OMP_NUM_THREADS set before torch loads, as Ray sets it for its workers, so both sides get the same threads.
Goal: the Ray Train path within 10% of the bare loop.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()


def make_corpus(root: pathlib.Path, seq_len: int, rows: int) -> tuple[str, str]:
    """A tokenizer trained on the bootstrap text and packed rows of it (what jobs/data.py would produce)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.samples import tokenizer_training_texts
    from modeling.tiny import train_tokenizer

    tok = train_tokenizer(tokenizer_training_texts(), 2048, root / "tokenizer")
    stream: list[int] = []
    for text in tokenizer_training_texts():
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream = (stream * (1 + seq_len * rows // max(len(stream), 1)))[: seq_len * rows]
    (root / "packed").mkdir()
    pq.write_table(pa.table({"input_ids": [stream[i * seq_len : (i + 1) * seq_len] for i in range(rows)]}),
                   root / "packed" / "part-00000.parquet")
    return str(root / "packed"), str(root / "tokenizer")


def bare_loop(task, cfg, steps: int, warmup: int, threads: int) -> tuple[float, float]:
    """model(...).loss -> backward -> clip -> AdamW -> LR schedule, nothing else.
    Returns (tokens per wall second, tokens per CPU second) after the warm-up."""
    import torch

    from trainer.engine import build_optimizer_and_schedule

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    opt, sched = build_optimizer_and_schedule(model, cfg, steps)
    batches = list(task.batches(0, 1, 0))
    times, cpu = [], []
    for step in range(steps):
        batch = batches[step % len(batches)]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                     use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    tokens = int(batches[0]["num_tokens"])
    return tokens / statistics.median(times[warmup:]), tokens / statistics.median(cpu[warmup:])


class _Rows:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, row: dict, step: int | None = None) -> None:
        self.rows.append({"step": step, **row})


def ray_train(task, cfg, run_dir: pathlib.Path, warmup: int) -> tuple[float, float]:
    from cluster.runtime import ClusterConfig, init_ray
    from cluster.train import fit

    init_ray(ClusterConfig(num_cpus=max(1, int(cfg.cpus_per_worker))))
    rows = _Rows()
    fit(task, cfg, run_dir, logger=rows, show_progress=False)
    steady = [r for r in rows.rows if r["step"] > warmup]
    tokens = steady[0]["train/tokens"]
    return (tokens / statistics.median(r["train/step_seconds"] for r in steady),
            tokens / statistics.median(r["train/step_cpu_seconds"] for r in steady))


def _setup(args, packed: str, tok: str):
    from trainer.config import TrainerConfig
    from trainer.lm_tasks import PretrainTask

    task = PretrainTask(data_dir=packed, tokenizer_path=tok, micro_batch_size=args.batch)
    cfg = TrainerConfig(num_workers=1, cpus_per_worker=args.threads, max_steps=args.steps, warmup_ratio=0.0,
                        micro_batch_size=args.batch, checkpoint_every=0)
    return task, cfg


def bare_in_subprocess(args, packed: str, tok: str) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--bare", packed, tok, "--threads", str(args.threads), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--bare", nargs=2, metavar=("PACKED", "TOKENIZER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare:  # the child process of bare_in_subprocess
        task, cfg = _setup(args, *args.bare)
        print(json.dumps(bare_loop(task, cfg, args.steps, args.warmup, args.threads)))
        return

    with tempfile.TemporaryDirectory(prefix="coolray-bench-") as tmp:
        root = pathlib.Path(tmp)
        packed, tok = make_corpus(root, args.seq_len, rows=args.batch * 16)
        task, cfg = _setup(args, packed, tok)
        before = bare_in_subprocess(args, packed, tok)
        ray = ray_train(task, cfg, root / "run", args.warmup)
        after = bare_in_subprocess(args, packed, tok)
    bare = [(x + y) / 2 for x, y in zip(before, after)]
    print(f"tiny model, batch {args.batch} x {args.seq_len} tokens, {args.threads} thread(s), "
          f"steps {args.warmup + 1}..{args.steps} timed (medians)")
    print(f"{'':30s}{'tokens/s (wall)':>16s}{'tokens/CPU-s':>14s}")
    print(f"  {'bare PyTorch loop':28s}{bare[0]:16.0f}{bare[1]:14.0f}")
    print(f"  {'Ray Train (1 worker, ddp)':28s}{ray[0]:16.0f}{ray[1]:14.0f}")
    print(f"  {'overhead (goal <= 10 %)':28s}{100 * (1 - ray[0] / bare[0]):15.1f}%{100 * (1 - ray[1] / bare[1]):13.1f}%")
    print(f"  bare loop before / after the Ray run: wall {before[0]:.0f} / {after[0]:.0f}, "
          f"cpu {before[1]:.0f} / {after[1]:.0f} (a large gap = the machine's load changed)")


if __name__ == "__main__":
    main()
