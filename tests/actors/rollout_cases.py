"""Rollout-engine behaviour every engine must show; run against the HF engine (test_rollout.py) and, in vLLM's
venv, against the vLLM engine too (test_rollout_vllm.py). Each check takes the engine and a reference HF model."""
from __future__ import annotations

import torch

from actors.rollout import Rollout, SamplingConfig

# Prompts of different lengths (left padding is exercised whenever they share a batch).
PROMPTS = [
    [1, 201, 57, 300, 12, 88, 9, 410, 77, 5, 60],
    [1, 33],
    [1, 500, 501, 502, 6],
    [1, 42, 43, 44, 45, 46, 47],
]


def greedy(max_new_tokens: int = 12, **kw) -> SamplingConfig:
    return SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, **kw)


def check_greedy_is_deterministic(engine) -> None:
    a = engine.generate(PROMPTS, greedy())
    b = engine.generate(PROMPTS, greedy())
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert all(len(r.response_ids) == len(r.response_logprobs) >= 1 for r in a)
    assert all(r.prompt_ids == p for r, p in zip(a, PROMPTS))


def check_seeded_sampling_is_reproducible(engine) -> None:
    s = SamplingConfig(temperature=1.5, top_p=1.0, max_new_tokens=10, ignore_eos=True, seed=7)
    a, b = engine.generate(PROMPTS, s), engine.generate(PROMPTS, s)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    other = engine.generate(PROMPTS, SamplingConfig(temperature=1.5, top_p=1.0, max_new_tokens=10, ignore_eos=True, seed=8))
    assert [r.response_ids for r in a] != [r.response_ids for r in other]
    # The same prompt twice in one call is two samples (prompt i uses seed + i), not one sample copied.
    twin = engine.generate([PROMPTS[1], PROMPTS[1]], s)
    assert twin[0].response_ids != twin[1].response_ids


def teacher_forced_logprobs(model, rollout: Rollout, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(processed, raw) log-probs of the response tokens from one full forward pass of prompt + response.

    The processing is transformers' own logits warpers (temperature -> top-k -> top-p), an implementation
    independent of the engine's.
    """
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    n = len(rollout.prompt_ids)
    # logits[t] predicts token t + 1: the response tokens are predicted by positions n-1 .. n+T-2.
    step_logits = logits[n - 1 : -1]
    scores = TemperatureLogitsWarper(sampling.temperature)(ids, step_logits)
    if sampling.top_k > 0:
        scores = TopKLogitsWarper(sampling.top_k)(ids, scores)
    scores = TopPLogitsWarper(sampling.top_p)(ids, scores)
    target = torch.tensor(rollout.response_ids)[:, None]
    processed = torch.log_softmax(scores, -1).gather(-1, target)[:, 0]
    raw = torch.log_softmax(step_logits, -1).gather(-1, target)[:, 0]
    return processed, raw


def check_logprobs_match_teacher_forcing(engine, model, atol: float) -> None:
    s = SamplingConfig(temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=12, ignore_eos=True, seed=3)
    rollouts = engine.generate(PROMPTS, s)
    largest_gap = 0.0
    for r in rollouts:
        processed, raw = teacher_forced_logprobs(model, r, s)
        got = torch.tensor(r.response_logprobs)
        assert torch.isfinite(got).all(), "a sampled token must have a finite processed log-prob"
        torch.testing.assert_close(got, processed, atol=atol, rtol=0)
        largest_gap = max(largest_gap, float((processed - raw).abs().max()))
    # Temperature 0.7 and top-p do change the numbers: the test would notice raw log-probs being returned.
    assert largest_gap > 0.05


def check_stop_token_ends_generation(engine) -> None:
    base = engine.generate(PROMPTS, greedy(ignore_eos=True))
    row = base[0].response_ids
    # The first token of the greedy response that did not occur before it: generation must stop right there.
    j = next(j for j in range(1, len(row)) if row[j] not in row[:j])
    stop = row[j]
    got = engine.generate(PROMPTS, greedy(ignore_eos=True, stop_token_ids=[stop]))
    assert got[0].response_ids == row[: j + 1]
    assert (got[0].finish_reason, got[0].stop_reason) == ("stop", stop)
    for b, g in zip(base[1:], got[1:]):
        cut = b.response_ids.index(stop) + 1 if stop in b.response_ids else len(b.response_ids)
        assert g.response_ids == b.response_ids[:cut]
        assert g.finish_reason == ("stop" if stop in b.response_ids else "length")


def check_stop_string_ends_generation(engine, tokenizer) -> None:
    base = engine.generate(PROMPTS[:1], greedy(ignore_eos=True))[0].response_ids
    # A stop string taken from the text of token j that the text before it does not contain yet.
    j, text = next(
        (j, t) for j in range(1, len(base))
        if (t := tokenizer.decode(base[j : j + 1]).strip()) and t not in tokenizer.decode(base[:j])
    )
    got = engine.generate(PROMPTS[:1], greedy(ignore_eos=True, stop=[text]))[0]
    assert got.response_ids == base[: j + 1]
    assert (got.finish_reason, got.stop_reason) == ("stop", text)


def check_max_new_tokens_is_respected(engine) -> None:
    s = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=5, ignore_eos=True, seed=1)
    for r in engine.generate(PROMPTS, s):
        assert len(r.response_ids) == len(r.response_logprobs) == 5
        assert (r.finish_reason, r.stop_reason) == ("length", None)


def check_batch_equals_one_by_one(engine, atol: float) -> None:
    batched = engine.generate(PROMPTS, greedy(ignore_eos=True))
    for prompt, b in zip(PROMPTS, batched):
        single = engine.generate([prompt], greedy(ignore_eos=True))[0]
        assert single.response_ids == b.response_ids
        torch.testing.assert_close(torch.tensor(single.response_logprobs), torch.tensor(b.response_logprobs), atol=atol, rtol=0)
