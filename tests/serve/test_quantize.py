"""CPU int8 quantization helpers, the reloadable recipe checkpoint, and perplexity (no Ray, no Serve)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from modeling.loading import load_causal_lm, load_tokenizer

    return load_tokenizer(str(tiny_dir)), load_causal_lm(str(tiny_dir)).eval()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny):
    from modeling.quantize import perplexity

    tok, model = tiny
    uniform = copy.deepcopy(model)
    nn.init.zeros_(uniform.lm_head.weight)
    # Zero logits -> p(x) = 1/V for every token -> NLL = log V per token -> PPL = exp(log V) = V.
    blocks = torch.randint(0, uniform.config.vocab_size, (3, 17))
    assert perplexity(uniform, blocks, batch_size=2) == pytest.approx(uniform.config.vocab_size, rel=1e-5)


def test_perplexity_equals_exp_mean_token_nll(tiny):
    from modeling.quantize import perplexity

    _, model = tiny
    blocks = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        logp = torch.log_softmax(model(blocks).logits.float(), dim=-1)
    # -log p(x_t | x_<t) for t = 1..8 in each block: 2 * 8 = 16 scored tokens.
    nll = -logp[:, :-1].gather(-1, blocks[:, 1:, None]).squeeze(-1)
    assert nll.numel() == 16
    assert perplexity(model, blocks, batch_size=1) == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


def test_token_blocks_concatenate_with_eos_and_drop_the_tail():
    from modeling.quantize import token_blocks

    class WordTok:  # one token per character, eos id 0
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    # "abc" + eos + "de" + eos = 7 ids -> two blocks of 3, the 7th id (eos) dropped.
    blocks = token_blocks(WordTok(), ["abc", "de"], block_len=3, max_blocks=10)
    assert blocks.tolist() == [[97, 98, 99], [0, 100, 101]]
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(WordTok(), ["a"], block_len=3, max_blocks=10)


def test_int8_dynamic_replaces_every_linear_and_stays_close(tiny):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from modeling.quantize import perplexity, quantize_model, token_blocks
    from data.samples import stdlib_docstrings

    tok, model = tiny
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    q = quantize_model(copy.deepcopy(model), "int8_dynamic")
    assert sum(isinstance(m, DynamicInt8Linear) for m in q.modules()) == n_linear
    assert not any(type(m) is nn.Linear for m in q.modules())
    blocks = token_blocks(tok, stdlib_docstrings()[-40:], 128, 4)
    with torch.no_grad():
        ref, got = model(blocks).logits, q(blocks).logits
    # Relative L2 error of the logits: ~5 % on the random tiny model (each int8 rounding is up to half a step of
    # max|x|/127 per channel/tensor; 15 quantized matmuls compound). What users feel is perplexity: within 2 %.
    assert ((got - ref).norm() / ref.norm()).item() < 0.1
    assert perplexity(q, blocks) / perplexity(model, blocks) == pytest.approx(1.0, abs=0.02)


def test_recipe_checkpoint_reloads_to_the_same_int8_model(tiny, tiny_dir, tmp_path):
    from modeling.quantize import RECIPE_FILE, load_quantized, quantize_model, read_recipe, save_quantized

    _, model = tiny
    out = save_quantized(tiny_dir, tmp_path / "q", "int8_dynamic", note="test")
    recipe = read_recipe(out)
    assert recipe["method"] == "int8_dynamic" and recipe["note"] == "test"
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    ids = torch.arange(20)[None]
    with torch.no_grad():
        reloaded = load_quantized(out)(ids).logits
        direct = quantize_model(copy.deepcopy(model), "int8_dynamic")(ids).logits
    assert torch.equal(reloaded, direct)  # int8 weights are a pure function of the float weights
    assert read_recipe(tiny_dir) is None  # a float checkpoint has no recipe

    (out / RECIPE_FILE).write_text(json.dumps({"format": "coolray-quant-recipe/1", "method": "int3"}))
    with pytest.raises(ValueError, match=f"{RECIPE_FILE}.*'method'"):
        read_recipe(out)
    (out / RECIPE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{RECIPE_FILE}:1: not valid JSON"):
        read_recipe(out)


def test_unknown_method_and_missing_torchao_say_what_to_do(tiny):
    from modeling.quantize import quantize_model

    _, model = tiny
    with pytest.raises(ValueError, match="int8_dynamic"):
        quantize_model(model, "int4")
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"\.\[quant\]"):
            quantize_model(copy.deepcopy(model), "int8_weight_only")
    else:
        pytest.skip("torchao is installed here; the missing-package message cannot be observed")
