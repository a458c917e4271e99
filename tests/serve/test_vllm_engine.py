"""The vLLM engine adapter for real, on vLLM's CPU build (`make test-vllm`: its own venv, see Makefile).

Skipped in the main venv (no vLLM there; the `vllm` marker is also deselected by default). One AsyncLLM is
started per module (engine start ~20-35 s on 2 cores) and driven from one event loop, as Serve's replica does.
"""
from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(tiny_dir, loop):
    from serve.engines.vllm_engine import VLLMEngine, VLLMEngineConfig

    # The tiny model has head_dim 32, the smallest vLLM's CPU attention accepts.
    eng = VLLMEngine(str(tiny_dir), VLLMEngineConfig(dtype="float32", enforce_eager=True, max_model_len=512,
                                                     max_num_seqs=8))
    eng.load()
    yield eng
    loop.run_until_complete(eng.shutdown())


def _run(loop, engine, prompt_ids, **options):
    from serve.engines.base import SamplingOptions

    async def collect():
        return [c async for c in engine.stream(prompt_ids, SamplingOptions(**options))]

    return loop.run_until_complete(collect())


def _hf_greedy(tiny_dir, ids, n):
    import torch

    from modeling.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(str(tiny_dir)), load_causal_lm(str(tiny_dir)).eval()
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
    return out[:cut]


def test_greedy_tokens_match_transformers(engine, loop, tiny_dir):
    tok = engine.tokenizer
    ids = tok("def add(a, b):")["input_ids"]
    chunks = _run(loop, engine, ids, max_tokens=8, temperature=0)
    want = _hf_greedy(tiny_dir, ids, 8)
    assert chunks[-1].completion_tokens == len(want)
    assert "".join(c.text for c in chunks) == tok.decode(want, skip_special_tokens=True)
    assert chunks[-1].finish_reason == ("length" if len(want) == 8 else "stop")
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_seed_reproduces_and_stop_string_cuts(engine, loop):
    ids = engine.tokenizer("The quick brown")["input_ids"]
    a = "".join(c.text for c in _run(loop, engine, ids, max_tokens=16, temperature=1.0, seed=11))
    b = "".join(c.text for c in _run(loop, engine, ids, max_tokens=16, temperature=1.0, seed=11))
    assert a == b
    full = "".join(c.text for c in _run(loop, engine, ids, max_tokens=24, temperature=0))
    starts = [i for i in range(len(full) // 2, len(full) - 1)
              if full[i:i + 2].isascii() and full[i:i + 2].isprintable() and " " not in full[i:i + 2]]
    assert starts, f"greedy text has no usable stop string: {full!r}"
    stop = full[starts[0]: starts[0] + 2]
    cut = _run(loop, engine, ids, max_tokens=24, temperature=0, stop=(stop,))
    assert "".join(c.text for c in cut) == full[: full.find(stop)]
    assert cut[-1].finish_reason == "stop"


def test_concurrent_requests_are_batched_continuously(engine, loop):
    from serve.engines.base import SamplingOptions

    prompts = [engine.tokenizer(f"def f{i}(x):")["input_ids"] for i in range(6)]
    solo = ["".join(c.text for c in _run(loop, engine, p, max_tokens=10, temperature=0)) for p in prompts]

    async def one(p, n):
        return "".join([c.text async for c in engine.stream(p, SamplingOptions(max_tokens=n, temperature=0))])

    async def together():
        # Different lengths: short requests finish and leave while long ones keep decoding.
        return await asyncio.gather(*[one(p, 10) for p in prompts], one(prompts[0], 40))

    got = loop.run_until_complete(together())
    assert got[:6] == solo
    assert got[6].startswith(solo[0])


def test_fp8_kv_cache_from_config(tiny_dir, loop):
    """kv_cache_dtype=fp8 halves KV memory; it runs on the CPU build too. (On-the-fly `quantization="fp8"`
    weights do not: the CPU build lacks the fp8 quant kernel, "_C::static_scaled_fp8_quant() expected at most 0
    argument(s)", so FP8 weights are GPU-only.)"""
    from serve.engines.vllm_engine import VLLMEngine, VLLMEngineConfig

    eng = VLLMEngine(str(tiny_dir), VLLMEngineConfig(dtype="float32", enforce_eager=True, max_model_len=256,
                                                     max_num_seqs=4, kv_cache_dtype="fp8"))
    eng.load()
    try:
        assert eng.engine.vllm_config.cache_config.cache_dtype == "fp8"
        chunks = _run(loop, eng, eng.tokenizer("def add(a, b):")["input_ids"], max_tokens=6, temperature=0)
        assert 1 <= chunks[-1].completion_tokens <= 6 and chunks[-1].finish_reason in ("length", "stop")
    finally:
        loop.run_until_complete(eng.shutdown())


def test_openai_app_serves_through_vllm(ray_cluster, tiny_dir):
    """The GPU deployment path end to end: the Serve app with serve.engine=vllm, over HTTP."""
    pytest.importorskip("ray.serve")
    import json
    import socket

    import requests
    from ray import serve

    from serve.app import run_app
    from serve.config import ServeConfig
    from serve.engines.vllm_engine import VLLMEngineConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(model_path=str(tiny_dir), engine="vllm", port=port, served_model_name="tiny-vllm",
                      vllm=VLLMEngineConfig(dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8))
    try:
        base = run_app(cfg)
        body = {"model": "tiny-vllm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                "temperature": 0}
        whole = requests.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
        assert whole["object"] == "chat.completion" and 1 <= whole["usage"]["completion_tokens"] <= 8
        with requests.post(f"{base}/v1/chat/completions", json={**body, "stream": True}, stream=True,
                           timeout=120) as r:
            events = [line for line in r.iter_lines(decode_unicode=True) if line]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text == whole["choices"][0]["message"]["content"]
        too_long = requests.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 300}, timeout=60)
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    finally:
        serve.shutdown()
