from __future__ import annotations

import pytest

from tests.trainer.lm_data import make_packed_corpus


@pytest.fixture(scope="session")
def packed_corpus(tiny_dir, tmp_path_factory):
    return make_packed_corpus(tiny_dir, tmp_path_factory.mktemp("packed") / "packed")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process training with one thread, as a Ray Train worker with cpus_per_worker=1 runs (torch was imported
    before conftest's OMP_NUM_THREADS=1, so it took both cores; two spinning threads crawl on a busy 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
