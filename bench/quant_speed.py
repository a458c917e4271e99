"""int8 vs fp32 on CPU: greedy tokens/s (batch 1 and 8) and held-out perplexity, side by side.

    python bench/quant_speed.py                    # tiny (128 hidden) + 512 + 1024 hidden, random init
    python bench/quant_speed.py --model outputs/demo/sft/model   # perplexity on a trained checkpoint

Speed needs no trained weights, so the larger shapes are built from config with random init; perplexity is only
meaningful on a trained model (--model, default: the newest checkpoint under outputs/ if there is one).
int8_weight_only is measured when torchao is importable (`pip install -e '.[quant]'`).
Not a test: numbers depend on the machine and its load (printed with the results).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

import torch  # noqa: E402

from modeling.quantize import QUANTIZERS, perplexity, quantize_model, token_blocks  # noqa: E402

SHAPES = {  # name -> (hidden, layers, heads, kv heads); head_dim 32..64 as vLLM's CPU kernels need
    "tiny-128": (128, 2, 4, 2),
    "h512-4L": (512, 4, 8, 4),
    "h1024-4L": (1024, 4, 16, 8),
}


def methods() -> list[str]:
    out = ["int8_dynamic"]
    try:
        import torchao  # noqa: F401

        out.append("int8_weight_only")
    except ImportError:
        pass
    return out


def tokens_per_s(model, batch: int, new_tokens: int, prompt_len: int = 32, repeats: int = 3) -> float:
    ids = torch.randint(10, model.config.vocab_size - 1, (batch, prompt_len))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    best = float("inf")
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        for _ in range(repeats):  # best of N: the least disturbed by other processes on a shared box
            start = time.perf_counter()
            model.generate(ids, **kw)
            best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


def speed_table(tokenizer, new_tokens: int) -> None:
    from modeling.tiny import TinyModelSpec, build_tiny_model

    print(f"\n== greedy tokens/s ({new_tokens} new tokens, torch threads={torch.get_num_threads()}, "
          f"load avg {os.getloadavg()[0]:.1f})")
    header = f"{'shape':<10} {'params':>8} {'batch':>5} {'fp32':>9}" + "".join(f" {m:>17} {'x':>5}" for m in methods())
    print(header)
    for name, (hidden, layers, heads, kv) in SHAPES.items():
        spec = TinyModelSpec(hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 31) // 32 * 32,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv)
        model = build_tiny_model(spec, tokenizer).eval()
        quantized = {m: quantize_model(copy.deepcopy(model), m) for m in methods()}
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for batch in (1, 8):
            base = tokens_per_s(model, batch, new_tokens)
            row = f"{name:<10} {params:>7.1f}M {batch:>5} {base:>9.0f}"
            for m, q in quantized.items():
                t = tokens_per_s(q, batch, new_tokens)
                row += f" {t:>17.0f} {t / base:>5.2f}"
            print(row, flush=True)


def ppl_table(model_dir: str, window: int, max_blocks: int) -> None:
    from data import evalsets as ev
    from jobs.quantize import eval_texts
    from modeling.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    heldout, _, source = eval_texts(ev.PerplexityConfig(window=window))
    blocks = token_blocks(tok, heldout, min(window, model.config.max_position_embeddings), max_blocks)
    base = perplexity(model, blocks)
    print(f"\n== perplexity of {model_dir} on {blocks.shape[0]}x{blocks.shape[1]} held-out tokens ({source})")
    print(f"{'method':<17} {'ppl':>10} {'ratio':>7}")
    print(f"{'fp32':<17} {base:>10.3f} {1.0:>7.4f}")
    for m in methods():
        p = perplexity(quantize_model(copy.deepcopy(model), m), blocks)
        print(f"{m:<17} {p:>10.3f} {p / base:>7.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="trained HF checkpoint for the perplexity table")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-blocks", type=int, default=16)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from data.samples import tokenizer_training_texts
    from modeling.tiny import train_tokenizer

    model_dir = args.model
    if not model_dir:
        from jobs.serve import newest_model_dir

        try:
            model_dir = str(newest_model_dir("outputs", exclude_jobs=("quantize", "serve")))
        except FileNotFoundError:
            model_dir = ""
    tokenizer = train_tokenizer(tokenizer_training_texts(), vocab_size=2048)
    print(f"int8 methods measured: {', '.join(methods())} (of {', '.join(QUANTIZERS)})")
    speed_table(tokenizer, args.new_tokens)
    if model_dir:
        ppl_table(model_dir, args.window, args.max_blocks)
    else:
        print("\n(no trained checkpoint under outputs/ and no --model: perplexity table skipped; run `make demo`)")


if __name__ == "__main__":
    main()
