"""Quantize an HF checkpoint and check its perplexity against the original on held-out text.

    python jobs/quantize.py model.path=outputs/sft/model                      # int8 on CPU (default)
    python jobs/quantize.py model.path=... quant.method=int8_weight_only      # torchao (the `quant` extra)
    python jobs/quantize.py model.path=... quant.method=fp8_dynamic           # GPU + llm-compressor -> vLLM

CPU methods (int8_dynamic, int8_weight_only) write `<run.dir>/model`: the float checkpoint plus
`coolray_quantization.json`, a recipe the CPU serving engine applies at load (modeling/quantize.py says why this
format). GPU methods (fp8_dynamic, w4a16_gptq, w4a16_awq) run llm-compressor and write a compressed-tensors
checkpoint that vLLM serves directly (serve.engine=vllm).

The perplexity check scores the original and the quantized model on the same token blocks (default: a held-out
slice of data/sample_corpus/, else Python's stdlib docstrings) and fails the job when
ppl_quantized / ppl_original exceeds quant.max_ppl_ratio. Deviation from InternLM2 (LMDeploy W4A16 AWQ + int8 KV
cache on TurboMind): int8 is what runs on a CPU; the GPU path uses llm-compressor + vLLM instead of LMDeploy.
"""
from __future__ import annotations

import copy
import math
import pathlib
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import REPO_ROOT, apply_process_defaults  # noqa: E402

apply_process_defaults()

from data import evalsets as ev  # noqa: E402
from jobs.common import LoggingConfig, Run, RunConfig, run_job  # noqa: E402
from modeling.config import ModelConfig  # noqa: E402

SAMPLE_CORPUS = REPO_ROOT / "data" / "sample_corpus"
CPU_METHODS = ("int8_dynamic", "int8_weight_only")
GPU_METHODS = ("fp8_dynamic", "w4a16_gptq", "w4a16_awq")


@dataclass
class QuantConfig:
    method: str = "int8_dynamic"  # CPU: int8_dynamic | int8_weight_only; GPU (llm-compressor): see GPU_METHODS
    max_ppl_ratio: float = 1.05  # fail when ppl_quantized / ppl_original is above this; 0 = report only
    # Fail when the mean KL(original || quantized) per scored token is above this (nats); 0 = report only. About
    # the drift of 4-bit weight formats; int8 of the demo's models is 0.0005 (pretrain) to 0.024 (SFT, scored on
    # web text it was not tuned for).
    max_kl: float = 0.05
    max_blocks: int = 32  # perplexity blocks (of perplexity.window tokens) scored per model
    calib_samples: int = 128  # GPTQ/AWQ calibration texts (taken from the training part, not the held-out slice)
    speed_tokens: int = 32  # greedy tokens generated to compare tokens/s; 0 = skip

    def __post_init__(self) -> None:
        if self.method not in CPU_METHODS + GPU_METHODS:
            raise ValueError(f"quant.method must be one of {', '.join(CPU_METHODS + GPU_METHODS)} (got {self.method!r})")
        if self.max_ppl_ratio < 0 or (0 < self.max_ppl_ratio < 1):
            raise ValueError(f"quant.max_ppl_ratio must be 0 (no check) or >= 1 (got {self.max_ppl_ratio})")
        if self.max_kl < 0:
            raise ValueError(f"quant.max_kl must be >= 0 nats (got {self.max_kl}); 0 = report only")
        if self.max_blocks < 1 or self.calib_samples < 1 or self.speed_tokens < 0:
            raise ValueError("quant.max_blocks and quant.calib_samples must be >= 1, quant.speed_tokens >= 0")


@dataclass
class QuantizeJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # model.path "" = newest model_dir under run.root
    quant: QuantConfig = field(default_factory=QuantConfig)
    perplexity: ev.PerplexityConfig = field(default_factory=ev.PerplexityConfig)


def eval_texts(cfg: ev.PerplexityConfig) -> tuple[list[str], list[str], str]:
    """(held-out texts, the rest for calibration, where they came from); the split matches jobs/eval.py."""
    if cfg.path:
        texts, source = ev.read_texts(cfg.path, cfg.text_field), cfg.path
    elif SAMPLE_CORPUS.is_dir():
        texts, source = ev.read_texts(SAMPLE_CORPUS, cfg.text_field), str(SAMPLE_CORPUS)
    else:
        from data.samples import stdlib_docstrings

        texts, source = stdlib_docstrings(), "stdlib docstrings"
    heldout = ev.heldout_slice(texts, cfg.heldout_fraction, cfg.max_docs)
    n_heldout = max(1, math.ceil(len(texts) * cfg.heldout_fraction))  # as heldout_slice cuts it
    return heldout, list(texts[: len(texts) - n_heldout]), source


def greedy_tokens_per_s(model, tokenizer, n_tokens: int) -> float:
    import torch

    ids = tokenizer("def main():", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)  # warm-up (first call builds kernels / caches)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    return n_tokens / (time.perf_counter() - start)


def main(cfg: QuantizeJobConfig, run: Run) -> dict:
    import torch

    from jobs.serve import newest_model_dir
    from modeling.loading import load_causal_lm, load_tokenizer, resolve_checkpoint
    from modeling.quantize import (compare_models, llmcompressor_quantize, load_quantized, missing_dependency,
                                   quantize_model, save_quantized, token_blocks)

    method = cfg.quant.method
    if method in GPU_METHODS and not torch.cuda.is_available():
        raise RuntimeError(f"quant.method={method} runs on a CUDA GPU (llm-compressor); on CPU use one of "
                           f"{', '.join(CPU_METHODS)}")
    missing = missing_dependency(method)
    if missing:  # before minutes of loading and scoring, not after
        raise RuntimeError(f"quant.method={method}: {missing}")
    src = cfg.model.path or str(newest_model_dir(cfg.run.root, exclude_jobs=("quantize", "serve")))
    src = str(resolve_checkpoint(src))
    tokenizer = load_tokenizer(src)
    original = load_causal_lm(src, dtype=cfg.model.dtype).eval()
    heldout, train_part, source = eval_texts(cfg.perplexity)
    window = min(cfg.perplexity.window, int(original.config.max_position_embeddings))
    blocks = token_blocks(tokenizer, heldout, window, cfg.quant.max_blocks)
    print(f"quantize: {method} of {src}; perplexity on {blocks.shape[0]} x {window} tokens from {source}",
          file=sys.stderr, flush=True)

    out_dir = run.dir / "model"
    speed: dict = {}
    if method in CPU_METHODS:
        quantized = quantize_model(copy.deepcopy(original), method)
        scores = compare_models(original, quantized, blocks)  # one pass of each model: perplexities and drift
        ppl_original, ppl_quantized = scores["ppl_original"], scores["ppl_quantized"]
        save_quantized(src, out_dir, method, ppl_original=ppl_original, ppl_quantized=ppl_quantized,
                       eval_source=source)
        # Check the written checkpoint reloads into the very model we measured (what serving will run).
        reloaded = load_quantized(out_dir)
        with torch.inference_mode():
            same = torch.equal(reloaded(blocks[:1]).logits, quantized(blocks[:1]).logits)
        if not same:
            raise RuntimeError(f"{out_dir} does not reload to the measured {method} model; please report this")
        if cfg.quant.speed_tokens:
            speed = {"tokens_per_s_original": greedy_tokens_per_s(original, tokenizer, cfg.quant.speed_tokens),
                     "tokens_per_s_quantized": greedy_tokens_per_s(quantized, tokenizer, cfg.quant.speed_tokens)}
    else:
        calib = train_part[: cfg.quant.calib_samples] or heldout
        quantized = llmcompressor_quantize(copy.deepcopy(original).cuda(), tokenizer, method, calib, window, out_dir)
        scores = compare_models(original, quantized, blocks)
        ppl_original, ppl_quantized = scores["ppl_original"], scores["ppl_quantized"]

    ratio = ppl_quantized / ppl_original
    drift = {k: scores[k] for k in ("kl_mean", "top1_agreement")}
    run.logger.log({"quantize/ppl_original": ppl_original, "quantize/ppl_quantized": ppl_quantized,
                    "quantize/ppl_ratio": ratio, **{f"quantize/{k}": v for k, v in {**drift, **speed}.items()}})
    print(f"quantize: perplexity {ppl_original:.3f} -> {ppl_quantized:.3f} (x{ratio:.4f}); KL(original || "
          f"quantized) {drift['kl_mean']:.5f} nats/token, top-1 agreement {drift['top1_agreement']:.3f}",
          file=sys.stderr, flush=True)
    if cfg.quant.max_ppl_ratio and ratio > cfg.quant.max_ppl_ratio:
        raise RuntimeError(
            f"perplexity check failed: {method} gives {ppl_quantized:.3f} vs {ppl_original:.3f} for the original "
            f"(ratio {ratio:.4f} > quant.max_ppl_ratio={cfg.quant.max_ppl_ratio}). The checkpoint is in {out_dir} "
            "for inspection; try another quant.method or raise quant.max_ppl_ratio."
        )
    if cfg.quant.max_kl and drift["kl_mean"] > cfg.quant.max_kl:
        raise RuntimeError(
            f"fidelity check failed: {method} moves the next-token distribution by KL {drift['kl_mean']:.4f} nats "
            f"per token on average (> quant.max_kl={cfg.quant.max_kl}; top-1 agreement "
            f"{drift['top1_agreement']:.3f}). The checkpoint is in {out_dir} for inspection; try another "
            "quant.method or raise quant.max_kl."
        )
    return {"model_dir": str(out_dir), "source_model": src, "method": method, "ppl_original": ppl_original,
            "ppl_quantized": ppl_quantized, "ppl_ratio": ratio, **drift, "eval_source": source,
            "eval_tokens": int(blocks.numel()), **speed}


if __name__ == "__main__":
    run_job("quantize", QuantizeJobConfig, main)
