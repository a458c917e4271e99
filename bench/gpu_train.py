"""Training throughput, MFU and peak memory of coolray's engine per backend on one device: DDP (bf16 autocast) as
the baseline, DeepSpeed ZeRO-2 and ZeRO-3 (bf16 weights, fp32 master) beside it. No Ray: the engine alone, one
process, random token batches, so the numbers are the engine's and the device's.

    python bench/gpu_train.py                                  # on a GPU: a 0.28B-parameter Llama, 1024 tokens x 8
    python bench/gpu_train.py --hidden 2048 --layers 16 --batch 4 --peak-tflops 989
    python bench/gpu_train.py --device cpu --hidden 128 --layers 2 --heads 4 --kv-heads 2 --seq 64 --batch 2 --steps 3 --warmup 1   # smoke

MFU = 6 x parameters x tokens/s / peak (the dense-matmul count; attention's own FLOPs are left out, so it is a lower
bound), with --peak-tflops the device's dense bf16 peak (H100 SXM: 989; H200: 989). Steps after --warmup count.
Peak memory is torch.cuda.max_memory_allocated over each backend's run (weights, grads, optimizer, activations).
Without a CUDA device and without --device it measures nothing and says so (`make bench` runs every script here).
"""
from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

BACKENDS = {"ddp": ("ddp", 2), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}


def run_backend(name: str, args, tok, device) -> dict:
    import torch

    from modeling.tiny import TinyModelSpec, build_tiny_model
    from trainer.config import TrainerConfig
    from trainer.engine import build_engine

    backend, stage = BACKENDS[name]
    spec = TinyModelSpec(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 32 * 32,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(1024, args.seq))
    cfg = TrainerConfig(backend=backend, zero_stage=stage, num_workers=1, cpus_per_worker=1,
                        gpus_per_worker=1 if device.type == "cuda" else 0, bf16=args.bf16, lr=1e-4, warmup_ratio=0.0,
                        max_steps=args.steps, micro_batch_size=args.batch, checkpoint_every=0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_tiny_model(spec, tok)
    params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, cfg, args.steps, device=device, model_factory=lambda: build_tiny_model(spec, tok))
    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for step in range(args.steps):
        ids = torch.randint(0, len(tok), (args.batch, args.seq), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with engine.autocast():
            loss = engine.model(input_ids=ids, labels=ids).loss
        engine.step(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach().float()))
    tokens_per_s = args.batch * args.seq / statistics.median(times)
    out = {"backend": name, "params": params, "tokens_per_s": tokens_per_s, "loss_first": losses[0],
           "loss_last": losses[-1],
           "mfu": 6 * params * tokens_per_s / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    del engine, model
    gc.collect()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--backends", default="ddp,zero2,zero3")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): only steps after it count")

    import torch

    from data.samples import tokenizer_training_texts
    from modeling.tiny import train_tokenizer

    if args.device == "auto" and not torch.cuda.is_available():
        print("bench/gpu_train.py: no CUDA device here, nothing measured (--device cpu runs it anyway; give small "
              "sizes)")
        return
    device = torch.device("cuda" if args.device == "auto" else args.device)
    tok = train_tokenizer(tokenizer_training_texts(), vocab_size=2048)
    rows = [run_backend(name, args, tok, device) for name in args.backends.split(",")]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}; {rows[0]['params'] / 1e6:.0f}M parameters, batch {args.batch} x {args.seq} tokens, "
          f"{'bf16' if args.bf16 else 'fp32'}, median of steps {args.warmup + 1}-{args.steps}")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        mfu = f"{100 * r['mfu']:5.1f} %" if r["mfu"] is not None else "    -  "
        mem = f"{r['peak_gib']:6.2f} GiB" if r["peak_gib"] is not None else "      -   "
        print(f"  {r['backend']:6s} {r['tokens_per_s']:10.0f} tokens/s  x{r['tokens_per_s'] / base:.2f}  MFU {mfu}  "
              f"peak {mem}  loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")


if __name__ == "__main__":
    main()
