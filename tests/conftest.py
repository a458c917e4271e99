"""Shared fixtures: offline env, one Ray cluster per session, the tiny model built once."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Before torch is imported (apply_process_defaults imports it): 2 cores are shared with Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["COOLRAY_PROGRESS"] = "0"


@pytest.fixture(scope="session")
def ray_cluster():
    """One in-process Ray for every Ray test (each init costs seconds and ~1 GB)."""
    import ray

    from cluster.runtime import ClusterConfig, init_ray

    started = init_ray(ClusterConfig(num_cpus=4, object_store_memory_mb=512))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny InternLM2-shaped model + tokenizer in HF format, built offline once per session."""
    from modeling.tiny import TinyModelSpec, build_tiny_model, save_pretrained, train_tokenizer
    from data.samples import tokenizer_training_texts

    out = tmp_path_factory.mktemp("tiny") / "model"
    tok = train_tokenizer(tokenizer_training_texts(), vocab_size=1024)
    model = build_tiny_model(TinyModelSpec(), tok)
    save_pretrained(model, tok, out)
    return out
