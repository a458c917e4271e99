"""cluster/runtime.py: joining a cluster that is not there fails within cluster.init_timeout_s, naming the address."""
from __future__ import annotations

import socket
import time

import pytest

from cluster.runtime import ClusterConfig, ClusterUnreachable, init_ray


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_nobody_listens_on_fails_within_init_timeout(monkeypatch, scheme):
    # ray.init retried 127.0.0.1:6399 (no Ray there) forever; cluster.init_timeout_s was never read.
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called for an unreachable address"))
    address = f"{scheme}127.0.0.1:{_closed_port()}"
    started = time.time()
    with pytest.raises(ClusterUnreachable) as err:
        init_ray(ClusterConfig(address=address, init_timeout_s=2.0))
    assert time.time() - started < 15
    assert address in str(err.value) and "cluster.init_timeout_s=2" in str(err.value)


def test_an_address_that_answers_goes_on_to_ray_init(monkeypatch):
    import ray

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        calls = []
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k["address"]))
        assert init_ray(ClusterConfig(address=address, init_timeout_s=2.0)) is True
    assert calls == [address]


def test_init_timeout_must_be_positive():
    with pytest.raises(ValueError, match="init_timeout_s"):
        ClusterConfig(init_timeout_s=0)
