"""Weight sync: buckets, fingerprints, LoRA merging, and real syncs into rollout-engine actors (object store and a
gloo broadcast group on CPU; NCCL under the gpu marker)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from actors.rollout import HFRolloutEngine, SamplingConfig
from cluster import weight_sync as ws
from cluster.actor_group import ActorGroup
from cluster.placement import RoleResources
from cluster.weight_sync import (
    Bucket,
    WeightSource,
    WeightSyncConfig,
    WeightSyncError,
    WeightSyncer,
    check_fingerprint,
    fingerprint,
    hf_state_dict,
    make_offer,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)

PROMPTS = [[1, 201, 57, 300, 12], [1, 33, 34], [1, 500, 501, 502, 6, 7, 8]]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8, ignore_eos=True)


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A changed copy of `state`, as one optimizer step would leave it (every element moves)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def load_state(tiny_dir) -> dict[str, torch.Tensor]:
    from modeling.loading import load_causal_lm

    return hf_state_dict(load_causal_lm(str(tiny_dir)))


# ---------------------------------------------------------------------------------------------- pure pieces


def test_buckets_split_by_size_and_dtype_and_round_trip():
    state = {
        "a": torch.arange(100, dtype=torch.float32),
        "b": torch.arange(300, dtype=torch.float32).view(3, 100),
        "c": torch.arange(50, dtype=torch.bfloat16),
        "d": torch.arange(10, dtype=torch.float32),
    }
    # 1 KiB buckets: a (400 B) alone, since a + b = 1600 B > 1024; b (1200 B) gets its own; d (40 B) fits after b?
    # No: b already fills more than the limit, so d starts a new float32 bucket; c is bfloat16 and goes apart.
    layouts = plan_buckets(state, bucket_mb=1 / 1024)
    assert [[s.name for s in lay.slots] for lay in layouts] == [["a"], ["b"], ["d"], ["c"]]
    assert [lay.dtype for lay in layouts] == ["float32", "float32", "float32", "bfloat16"]
    assert {lay.count for lay in layouts} == {4} and [lay.index for lay in layouts] == [0, 1, 2, 3]
    for lay in layouts:
        for name, view in unpack_bucket(pack_bucket(state, lay), lay):
            assert torch.equal(view, state[name]) and view.shape == state[name].shape
    # A big bucket holds all float32 tensors together, cast to bfloat16 when the engine wants that dtype.
    (one,) = [lay for lay in plan_buckets(state, 1.0, torch.bfloat16)]
    assert one.dtype == "bfloat16" and [s.name for s in one.slots] == ["a", "b", "c", "d"]


def test_sample_fingerprint_reads_strided_elements_full_reads_all():
    t = torch.arange(10_000, dtype=torch.float32)
    # 10_000 elements / 1024 samples -> stride 9: elements 0, 9, 18, ... and the last one are hashed.
    base_sample, base_full = ws.tensor_digest(t, "sample"), ws.tensor_digest(t, "full")
    unsampled, sampled = t.clone(), t.clone()
    unsampled[1] += 1
    sampled[9] += 1
    assert ws.tensor_digest(unsampled, "sample") == base_sample  # the documented blind spot of `sample`
    assert ws.tensor_digest(unsampled, "full") != base_full
    assert ws.tensor_digest(sampled, "sample") != base_sample
    # Shape and dtype are part of the digest.
    assert ws.tensor_digest(t.view(100, 100), "full") != base_full
    assert ws.tensor_digest(t, "full", torch.bfloat16).split("|")[1] == "bfloat16"


def test_check_fingerprint_names_version_rank_and_first_tensor():
    sent = fingerprint({"w1": torch.ones(3), "w2": torch.zeros(3)}.items(), version=4)
    held = fingerprint({"w1": torch.ones(3), "w2": torch.ones(3)}.items(), version=4)
    with pytest.raises(WeightSyncError, match=r"v4: rollout rank 1 does not hold .* \(1 of 2 tensors differ\). First: tensor 'w2'"):
        check_fingerprint(sent, held, "rollout", 1)
    with pytest.raises(WeightSyncError, match="rank 0 reports version 3"):
        check_fingerprint(sent, dataclasses.replace(sent, version=3), "rollout", 0)
    missing = fingerprint({"w1": torch.ones(3)}.items(), version=4)
    with pytest.raises(WeightSyncError, match="tensor 'w2' is missing on the engine"):
        check_fingerprint(sent, missing, "rollout", 0)
    check_fingerprint(sent, fingerprint({"w2": torch.zeros(3), "w1": torch.ones(3)}.items(), version=4), "rollout", 0)


def test_lora_is_merged_without_touching_the_training_model(tiny_dir):
    from peft import LoraConfig, get_peft_model

    from modeling.loading import load_causal_lm

    model = get_peft_model(load_causal_lm(str(tiny_dir)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft initialises B to 0 (a no-op adapter); make it a real update
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    merged = hf_state_dict(model)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()  # peft's own merge, on a copy
    assert set(merged) == set(reference)
    for name in reference:
        torch.testing.assert_close(merged[name], reference[name], atol=1e-6, rtol=0)
    base = load_causal_lm(str(tiny_dir)).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], base[q])  # the adapter is in the synced weights...
    assert any("lora_A" in n for n, _ in model.named_parameters())  # ...and the training model is still unmerged


# ---------------------------------------------------------------------------------------------- one engine, no Ray


def test_in_process_sync_loads_verifies_and_refuses_old_versions(tiny_dir):
    engine = HFRolloutEngine(str(tiny_dir))
    before = [r.response_ids for r in engine.generate(PROMPTS, GREEDY)]
    new = perturbed(load_state(tiny_dir), seed=1)
    offer = make_offer(new, 1, WeightSyncConfig(bucket_mb=0.1), put=False)
    assert len(offer.buckets) > 1 and all(isinstance(b, Bucket) for b in offer.buckets)
    check_fingerprint(offer.expected, engine.update_weights(offer.buckets, 1), "rollout", 0)
    after = engine.generate(PROMPTS, GREEDY)
    assert [r.response_ids for r in after] != before and {r.weight_version for r in after} == {1}
    for name, t in new.items():
        assert torch.equal(engine.model.state_dict()[name], t)
    with pytest.raises(WeightSyncError, match="refusing weights v1: this engine already holds v1"):
        engine.update_weights(make_offer(new, 1, WeightSyncConfig(), put=False).buckets, 1)
    partial = make_offer(new, 2, WeightSyncConfig(bucket_mb=0.1), put=False).buckets[1:]
    with pytest.raises(WeightSyncError, match=r"received buckets \[1, 2, .*\], expected 0\.\."):
        engine.update_weights(partial, 2)


# ---------------------------------------------------------------------------------------------- Ray actors


class ToyPolicy(WeightSource):
    """The trainer end: holds a model and hands out its weights (what the policy actor will do)."""

    def __init__(self, model_dir: str):
        from modeling.loading import load_causal_lm

        self.model = load_causal_lm(model_dir)

    def sync_state_dict(self) -> dict[str, torch.Tensor]:
        return hf_state_dict(self.model)

    def step(self, seed: int) -> None:
        with torch.no_grad():
            for name, value in perturbed(self.sync_state_dict(), seed).items():
                self.model.state_dict()[name].copy_(value)


@pytest.fixture(scope="module")
def engines(ray_cluster, tiny_dir):
    group = ActorGroup(HFRolloutEngine, "rollout", RoleResources(num_actors=2, cpus_per_actor=0.5), init_args=(str(tiny_dir),))
    yield group
    group.shutdown()


def _greedy(group) -> list[list[list[int]]]:
    rollouts = group.get(group.call("generate", PROMPTS, GREEDY), phase="generate", timeout_s=120)
    return [[r.response_ids for r in per_engine] for per_engine in rollouts]


def test_object_store_sync_into_two_engines_changes_their_outputs(engines, tiny_dir, monkeypatch):
    before = _greedy(engines)
    new = perturbed(load_state(tiny_dir), seed=1)
    syncer = WeightSyncer(WeightSyncConfig(bucket_mb=0.1), engines)
    report = syncer.push(1, state_dict=new)
    expected = report.fingerprint
    # 21 float32 tensors of the tiny model, 4 bytes per element, 2 engines verified.
    assert report.nbytes == 4 * sum(t.numel() for t in new.values()) and report.engines == 2 and report.seconds > 0
    for got in engines.get(engines.call("fingerprint"), phase="fingerprint", timeout_s=60):
        assert got.digest == expected.digest and got.version == 1
    after = _greedy(engines)
    reference = HFRolloutEngine(str(tiny_dir))
    reference.update_weights(make_offer(new, 1, WeightSyncConfig(), put=False).buckets, 1)
    assert after[0] == after[1] == [r.response_ids for r in reference.generate(PROMPTS, GREEDY)]
    assert after[0] != before[0]

    # A bucket that loses a tensor on the way: the engines keep v1's value for it, and the check says which.
    dropped = "model.layers.1.mlp.down_proj.weight"
    real_make_offer = ws.make_offer

    def lossy_make_offer(state, version, cfg, put=True):
        offer = real_make_offer(state, version, cfg, put=False)
        offer.buckets = [_without(b, dropped) for b in offer.buckets]
        offer.buckets = [ray_put(b) for b in offer.buckets] if put else offer.buckets
        return offer

    monkeypatch.setattr(ws, "make_offer", lossy_make_offer)
    with pytest.raises(WeightSyncError, match=rf"v2: rollout rank 0 does not hold .* First: tensor '{dropped}': sent"):
        syncer.push(2, state_dict=perturbed(new, seed=2))
    monkeypatch.undo()

    # Versions only go up: the driver refuses to go back, an engine refuses a version it already has.
    with pytest.raises(ValueError, match="weight version must increase: pushed v1 before, now v1"):
        syncer.push(1, state_dict=new)
    with pytest.raises(WeightSyncError, match="refusing weights v2: this engine already holds v2"):
        syncer.push(2, state_dict=new)
    syncer.push(3, state_dict=new)  # a complete sync repairs the engines
    assert _greedy(engines) == after


def ray_put(obj):
    import ray

    return ray.put(obj)


def _without(bucket: Bucket, name: str) -> Bucket:
    kept = [(n, t) for n, t in unpack_bucket(bucket.flat, bucket.layout) if n != name]
    if len(kept) == len(bucket.layout.slots):
        return bucket
    if not kept:  # the tensor filled the bucket alone: an empty bucket arrives in its place
        return Bucket(dataclasses.replace(bucket.layout, numel=0, slots=()), bucket.flat[:0], bucket.version)
    layout = plan_buckets(dict(kept), bucket_mb=1e6)[0]
    layout = dataclasses.replace(layout, index=bucket.layout.index, count=bucket.layout.count)
    return Bucket(layout, pack_bucket(dict(kept), layout), bucket.version)


def test_broadcast_group_sync_from_a_policy_actor(engines, tiny_dir):
    import ray

    policy_cls = ray.remote(ToyPolicy).options(num_cpus=0.5)
    policy = policy_cls.remote(str(tiny_dir))
    try:
        before = _greedy(engines)
        version = 1 + max(engines.get(engines.call("fingerprint"), phase="fingerprint", timeout_s=60), key=lambda f: f.version).version
        syncer = WeightSyncer(WeightSyncConfig(transport="broadcast", backend="auto", bucket_mb=0.1), engines, source=policy)
        syncer.setup()  # gloo on this CPU machine: policy = rank 0, engines = ranks 1, 2
        ray.get(policy.step.remote(seed=5))
        expected = syncer.push(version).fingerprint
        assert len(expected.tensors) == len(load_state(tiny_dir))
        after = _greedy(engines)
        assert after[0] == after[1] != before[0]
        # The object-store transport from the same source actor reaches the same weights after another step.
        ray.get(policy.step.remote(seed=6))
        store = WeightSyncer(WeightSyncConfig(bucket_mb=0.1), engines, source=policy)
        store.last_version = version
        assert store.push(version + 1).fingerprint.digest != expected.digest
    finally:
        ray.kill(policy)


@pytest.mark.gpu
def test_nccl_broadcast_between_gpu_actors(ray_cluster, tiny_dir):
    import ray

    if ray_cluster.cluster_resources().get("GPU", 0) < 3:
        pytest.skip("needs 3 GPUs in the Ray cluster (NCCL gives each rank its own device)")
    engines = ActorGroup(
        HFRolloutEngine, "rollout", RoleResources(num_actors=2, gpus_per_actor=1), init_args=(str(tiny_dir), "float32", "cuda")
    )
    policy = ray.remote(ToyPolicy).options(num_gpus=1).remote(str(tiny_dir))
    try:
        syncer = WeightSyncer(WeightSyncConfig(transport="broadcast", backend="nccl", bucket_mb=0.1), engines, source=policy)
        syncer.setup()
        ray.get(policy.step.remote(seed=5))
        syncer.push(1)
    finally:
        ray.kill(policy)
        engines.shutdown()
