"""CPU int8 quantization of a causal LM, the recipe file that makes it reloadable, and perplexity.

Two int8 flavours, both data-free and deterministic (the int8 weights are a pure function of the float weights):
  - `int8_dynamic`: torch's `quantize_dynamic` on every nn.Linear: int8 weights with per-channel scales, activations
    quantized per batch at run time (fbgemm int8 GEMMs). Ships with torch.
  - `int8_weight_only`: torchao's `Int8WeightOnlyConfig`: int8 weights dequantized inside the matmul, activations
    stay float. Needs the optional `quant` extra (torchao==0.18.0).

A quantized checkpoint is the source HF directory (float safetensors, tokenizer, configs) plus `RECIPE_FILE`
naming the method; loaders apply the method after loading. Because the quantization is deterministic this
reproduces the same int8 weights every time, stays safetensors (no pickled fbgemm packed params, which are tied
to the torch build and CPU backend), and the directory still loads in any float runtime (vLLM, training).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

RECIPE_FILE = "coolray_quantization.json"
RECIPE_FORMAT = "coolray-quant-recipe/1"
CPU_METHODS = ("int8_dynamic", "int8_weight_only")


def quantize_int8_dynamic(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear by torch's dynamically quantized int8 Linear (in place; returns the model)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch 2.13 still ships torch.ao.quantization but marks it deprecated (the message names 2.10 for removal).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def quantize_int8_weight_only(model: nn.Module) -> nn.Module:
    """torchao int8 weight-only quantization of every nn.Linear (in place; returns the model)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError(
            "quantization method 'int8_weight_only' needs torchao: pip install -c constraints.txt -e '.[quant]' "
            "(or use 'int8_dynamic', which ships with torch)"
        ) from e
    quantize_(model, Int8WeightOnlyConfig())
    return model


QUANTIZERS = {"int8_dynamic": quantize_int8_dynamic, "int8_weight_only": quantize_int8_weight_only}


# The package each method imports beyond torch, and how to get it: checked before any model is loaded.
_NEEDS = {
    "int8_weight_only": ("torchao", "pip install -c constraints.txt -e '.[quant]' (or use 'int8_dynamic', which "
                                    "ships with torch)"),
}


def missing_dependency(method: str) -> str | None:
    """Why `method` cannot run in this environment (a package it imports is absent), or None."""
    import importlib.util

    package, how = _NEEDS.get(method, (None, ""))
    if method in LLMCOMPRESSOR_METHODS:
        package = "llmcompressor"
        how = f"pip install llmcompressor on a GPU box; on CPU use one of {', '.join(QUANTIZERS)}"
    if package and importlib.util.find_spec(package) is None:
        return f"quantization method {method!r} needs {package}, which is not installed: {how}"
    return None


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    if method not in QUANTIZERS:
        raise ValueError(f"unknown CPU quantization method {method!r}; choose one of {', '.join(QUANTIZERS)}")
    return QUANTIZERS[method](model.eval())


def write_recipe(model_dir: str | Path, method: str, **info) -> Path:
    from data.io import atomic_write_json

    if method not in QUANTIZERS:
        raise ValueError(f"unknown CPU quantization method {method!r}; choose one of {', '.join(QUANTIZERS)}")
    return atomic_write_json(Path(model_dir) / RECIPE_FILE, {"format": RECIPE_FORMAT, "method": method, **info})


def read_recipe(model_dir: str | Path) -> dict | None:
    """The recipe of a coolray-quantized checkpoint, or None for a plain float checkpoint."""
    path = Path(model_dir) / RECIPE_FILE
    if not path.exists():
        return None
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); re-run jobs/quantize.py to rewrite it") from e
    if recipe.get("format") != RECIPE_FORMAT or recipe.get("method") not in QUANTIZERS:
        raise ValueError(
            f"{path}: field 'format'/'method' is {recipe.get('format')!r}/{recipe.get('method')!r}; expected format "
            f"{RECIPE_FORMAT!r} and a method in {list(QUANTIZERS)}. Re-run jobs/quantize.py on the source model."
        )
    return recipe


def save_quantized(src_dir: str | Path, out_dir: str | Path, method: str, **info) -> Path:
    """Write a CPU-quantized checkpoint: a copy of the float HF dir plus the recipe (atomically)."""
    import shutil

    from data.io import atomic_dir

    if method not in QUANTIZERS:
        raise ValueError(f"unknown CPU quantization method {method!r}; choose one of {', '.join(QUANTIZERS)}")
    src = Path(src_dir)
    with atomic_dir(out_dir) as tmp:
        for item in src.iterdir():
            if item.name == RECIPE_FILE or item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        write_recipe(tmp, method, source_model=str(src.resolve()), **info)
    return Path(out_dir)


def load_quantized(model_dir: str | Path, dtype: str = "float32") -> nn.Module:
    """Load an HF dir and apply its recipe (if any): what the CPU serving engine runs."""
    from modeling.loading import load_causal_lm

    model = load_causal_lm(str(model_dir), dtype=dtype).eval()
    recipe = read_recipe(model_dir)
    return quantize_model(model, recipe["method"]) if recipe else model


# ---------------------------------------------------------------------------------------------- GPU: llm-compressor

# method -> (llm-compressor modifier, scheme, needs calibration data). The results are compressed-tensors
# checkpoints that vLLM loads as they are (serve.engine=vllm, serve.vllm.quantization="").
LLMCOMPRESSOR_METHODS = {
    "fp8_dynamic": ("QuantizationModifier", "FP8_DYNAMIC", False),  # FP8 weights + per-token dynamic FP8 acts
    "w4a16_gptq": ("GPTQModifier", "W4A16", True),  # 4-bit weights, GPTQ error compensation
    "w4a16_awq": ("AWQModifier", "W4A16_ASYM", True),  # 4-bit weights, activation-aware scales
}


def llmcompressor_quantize(model: nn.Module, tokenizer, method: str, calib_texts: list[str], max_seq_len: int,
                           out_dir: str | Path) -> nn.Module:
    """Quantize with llm-compressor's `oneshot` and save in compressed-tensors format; returns the in-memory
    (fake-quantized) model so its perplexity can be measured."""
    if method not in LLMCOMPRESSOR_METHODS:
        raise ValueError(f"unknown llm-compressor method {method!r}; choose one of {', '.join(LLMCOMPRESSOR_METHODS)}")
    try:
        from llmcompressor import oneshot
    except ImportError as e:
        raise ImportError(
            f"quantization method {method!r} needs llm-compressor (GPU boxes): pip install llmcompressor. "
            f"On CPU use one of {', '.join(QUANTIZERS)}."
        ) from e
    modifier_name, scheme, calibrated = LLMCOMPRESSOR_METHODS[method]
    if modifier_name == "AWQModifier":
        from llmcompressor.modifiers.awq import AWQModifier as modifier_cls
    elif modifier_name == "GPTQModifier":
        from llmcompressor.modifiers.quantization import GPTQModifier as modifier_cls
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier as modifier_cls
    recipe = modifier_cls(targets="Linear", scheme=scheme, ignore=["lm_head"])
    kwargs: dict = {}
    if calibrated:
        from datasets import Dataset

        rows = [tokenizer(t, truncation=True, max_length=max_seq_len, add_special_tokens=False) for t in calib_texts]
        kwargs = dict(dataset=Dataset.from_list([dict(r) for r in rows]), max_seq_length=max_seq_len,
                      num_calibration_samples=len(rows))
    oneshot(model=model, recipe=recipe, **kwargs)
    model.save_pretrained(str(out_dir), save_compressed=True)
    tokenizer.save_pretrained(str(out_dir))
    return model


# ---------------------------------------------------------------------------------------------- perplexity


def token_blocks(tokenizer, texts: Iterable[str], block_len: int, max_blocks: int) -> torch.Tensor:
    """Concatenate texts (eos between them) and cut into non-overlapping [N, block_len] blocks; the tail that does
    not fill a block is dropped so every block is scored on the same context length."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        if len(ids) >= block_len * max_blocks:
            break
    n = min(len(ids) // block_len, max_blocks)
    if n == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one block of {block_len}; "
                         "give more text or a smaller block length")
    return torch.tensor(ids[: n * block_len]).view(n, block_len)


@torch.inference_mode()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Token-level perplexity over [N, T] blocks: exp(sum of token NLLs / number of scored tokens).

    Each block scores its T - 1 next-token predictions, -log p(x_t | x_<t) for t = 1..T-1; HF's `labels=` loss
    is their mean, so loss * (T - 1) is the block's NLL sum. data.evalsets.perplexity does the exp(sum / count).
    """
    from data.evalsets import perplexity as ppl_from_sums

    model.eval()
    device = next(model.parameters()).device  # the embedding stays a float parameter under every int8 method
    nll_sums, counts = [], []
    for batch in blocks.split(batch_size):
        loss = model(input_ids=batch.to(device), labels=batch.to(device)).loss
        n = batch.shape[0] * (batch.shape[1] - 1)  # equal-length blocks: the mean is over exactly n tokens
        nll_sums.append(float(loss) * n)
        counts.append(n)
    return ppl_from_sums(nll_sums, counts)


@torch.inference_mode()
def compare_models(original: nn.Module, quantized: nn.Module, blocks: torch.Tensor,
                   batch_size: int = 8) -> dict[str, float]:
    """One forward pass of each model over `blocks` gives both perplexities (as `perplexity` defines them) and
    the `fidelity` figures below: `ppl_original`, `ppl_quantized`, `kl_mean`, `top1_agreement`."""
    from data.evalsets import perplexity as ppl_from_sums

    nll_o, nll_q, counts = [], [], []
    kl_sum, agree = 0.0, 0
    dev_o = next(original.parameters()).device
    dev_q = next(quantized.parameters()).device
    for batch in blocks.split(batch_size):
        lp = torch.log_softmax(original(input_ids=batch.to(dev_o)).logits[:, :-1].float().cpu(), dim=-1)
        lq = torch.log_softmax(quantized(input_ids=batch.to(dev_q)).logits[:, :-1].float().cpu(), dim=-1)
        target = batch[:, 1:].unsqueeze(-1).cpu()
        nll_o.append(-float(lp.gather(-1, target).sum()))
        nll_q.append(-float(lq.gather(-1, target).sum()))
        counts.append(target.numel())
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    count = sum(counts)
    return {"ppl_original": ppl_from_sums(nll_o, counts), "ppl_quantized": ppl_from_sums(nll_q, counts),
            "kl_mean": kl_sum / count, "top1_agreement": agree / count}


def fidelity(original: nn.Module, quantized: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """How far the quantized model's next-token distributions are from the original's on the same blocks:
    `kl_mean`, the mean over scored positions of KL(p_original || p_quantized) in nats, and `top1_agreement`, the
    share of positions where both put their highest probability on the same token.

    Unlike the perplexity ratio this measures the change quantization makes, not how well either model fits the
    text, so it means the same for a base model on web text and for a chat policy on text it was never tuned for
    (where both perplexities are in the thousands and their ratio is noise).
    """
    out = compare_models(original, quantized, blocks, batch_size)
    return {"kl_mean": out["kl_mean"], "top1_agreement": out["top1_agreement"]}
