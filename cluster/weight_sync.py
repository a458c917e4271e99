"""Pushing the policy's weights into the rollout engines after every update: versioned, bucketed, verified.

Three parties, one class each:

- `WeightSource` (mixin for the trainer worker that holds the full policy weights, usually policy rank 0): implement
  `sync_state_dict() -> {hf_name: tensor}`; `hf_state_dict(model)` below builds it for plain, DDP-wrapped and peft
  LoRA models (LoRA is merged into the base weights, so the engine always receives plain base-model weights;
  an adapter-only transfer with merging on the engine side is not implemented).
- `WeightSink` (mixin for a rollout engine): implement `_load_weights(iterator of (name, tensor))` and
  `_live_fingerprint(method)`.
- `WeightSyncer` (driver): `syncer.push(version)` moves the weights and checks every engine's fingerprint.

Transports (`WeightSyncConfig.transport`):

- `object_store` (default; any hardware): the source splits its state dict into buckets of about `bucket_mb`, one
  flat tensor per dtype, and `ray.put`s each bucket; engines fetch the buckets one at a time
  (`update_weights(bucket_refs, version)`), so the driver never holds weights.
- `broadcast`: a private torch.distributed process group (its own TCPStore, not the default group, so the trainer's
  DDP group is untouched) between the source (rank 0) and every engine (ranks 1..n); each bucket is flattened,
  broadcast and unflattened. `backend="nccl"` on GPUs, `gloo` on CPU (the CPU test suite runs this path with gloo).
  NCCL needs a distinct GPU per rank: when the engines share the trainer's GPU (colocated fractional GPUs), use
  `object_store` (CUDA IPC is not implemented).

Verification: every sync carries a `version`, which must increase; an engine refuses an older or equal one. After
loading, each engine returns a `Fingerprint` of the weights it now holds, and the driver compares it with the one
the source computed from what it sent; any difference raises `WeightSyncError` naming the version, the engine rank
and the first differing tensor. Fingerprint methods (per tensor: shape, dtype and a hash):

- `sample` (default): blake2b of 1024 evenly strided elements (and the last one) of each tensor, after casting to
  the dtype that is sent. Cost O(number of tensors x 1024) - milliseconds even for a 7B model, and it reads only those
  elements from GPU memory. Catches stale, missing, reordered, wrong-dtype or wrong-shape tensors (an optimizer step
  changes essentially every element); blind to a corruption that only touches unsampled elements.
- `full`: blake2b of every byte. Cost O(model bytes) - about 1-2 GB/s on one CPU core plus a device-to-host copy of
  the whole model; right for small models and debugging.

Hashes are of raw bytes, so they are exact and independent of the machine (no floating-point sums whose order
depends on SIMD width).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cluster import timeouts

SAMPLES_PER_TENSOR = 1024
TRANSPORTS = ("object_store", "broadcast")
BACKENDS = ("auto", "gloo", "nccl")
FINGERPRINTS = ("sample", "full")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightSyncError(RuntimeError):
    """The engine does not hold the weights the trainer sent (or refused them)."""


@dataclass
class WeightSyncConfig:
    transport: str = "object_store"  # object_store | broadcast
    backend: str = "auto"  # broadcast only: auto (nccl when the source has CUDA, else gloo) | nccl | gloo
    bucket_mb: float = 256.0  # size of one transfer unit; bounds the extra memory a sync needs on both sides
    dtype: str = ""  # cast to this before sending: the engine's dtype ("" = keep the trainer's dtype)
    fingerprint: str = "sample"  # sample | full (see the module docstring for cost)
    timeout_s: float = 600.0  # per sync, all engines together

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"weight_sync.transport must be one of {', '.join(TRANSPORTS)} (got {self.transport!r})")
        if self.backend not in BACKENDS:
            raise ValueError(f"weight_sync.backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.bucket_mb <= 0:
            raise ValueError(f"weight_sync.bucket_mb must be > 0 (got {self.bucket_mb})")
        if self.dtype and self.dtype not in _DTYPES:
            raise ValueError(f"weight_sync.dtype must be '' or one of {', '.join(_DTYPES)} (got {self.dtype!r})")
        if self.fingerprint not in FINGERPRINTS:
            raise ValueError(f"weight_sync.fingerprint must be one of {', '.join(FINGERPRINTS)} (got {self.fingerprint!r})")
        if self.timeout_s <= 0:
            raise ValueError(f"weight_sync.timeout_s must be > 0 (got {self.timeout_s})")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.dtype] if self.dtype else None


# ---------------------------------------------------------------------------------------------- fingerprints


def tensor_digest(tensor: torch.Tensor, method: str = "sample", dtype: torch.dtype | None = None) -> str:
    """'shape|dtype|hash' of one tensor as it would be after casting to `dtype` (see module docstring)."""
    flat = tensor.detach().reshape(-1)
    if method == "sample" and flat.numel() > SAMPLES_PER_TENSOR:
        stride = flat.numel() // SAMPLES_PER_TENSOR
        flat = torch.cat([flat[::stride][:SAMPLES_PER_TENSOR], flat[-1:]])
    if dtype is not None:
        flat = flat.to(dtype)
    data = flat.contiguous().cpu()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()
    shown_dtype = str(dtype or tensor.dtype).removeprefix("torch.")
    return f"{list(tensor.shape)}|{shown_dtype}|{digest}"


@dataclass(frozen=True)
class Fingerprint:
    """What a set of weights looks like: per-tensor digests plus the version they claim to be."""

    version: int
    method: str
    tensors: dict[str, str] = field(default_factory=dict)  # name -> tensor_digest

    @property
    def digest(self) -> str:
        text = "".join(f"{k}={v};" for k, v in sorted(self.tensors.items()))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def differences(self, other: "Fingerprint") -> list[str]:
        """Tensors of `self` (the expected side) that `other` lacks or holds differently, in name order."""
        out = []
        for name in sorted(self.tensors):
            if name not in other.tensors:
                out.append(f"tensor '{name}' is missing on the engine")
            elif other.tensors[name] != self.tensors[name]:
                out.append(f"tensor '{name}': sent {self.tensors[name]}, engine holds {other.tensors[name]}")
        return out


def fingerprint(
    named: Iterable[tuple[str, torch.Tensor]], version: int, method: str = "sample", dtype: torch.dtype | None = None
) -> Fingerprint:
    if method not in FINGERPRINTS:
        raise ValueError(f"fingerprint method must be one of {', '.join(FINGERPRINTS)} (got {method!r})")
    return Fingerprint(version, method, {name: tensor_digest(t, method, dtype) for name, t in named})


def check_fingerprint(expected: Fingerprint, got: Fingerprint, role: str, rank: int) -> None:
    """Raise WeightSyncError unless engine `rank` reports exactly the weights and version that were sent."""
    if got.version != expected.version:
        raise WeightSyncError(
            f"weight sync v{expected.version}: {role} rank {rank} reports version {got.version}; "
            "the engine did not apply this update"
        )
    if got.method != expected.method:
        raise WeightSyncError(f"{role} rank {rank} fingerprinted with '{got.method}', expected '{expected.method}'")
    diffs = expected.differences(got)
    if diffs:
        raise WeightSyncError(
            f"weight sync v{expected.version}: {role} rank {rank} does not hold the weights that were sent "
            f"({len(diffs)} of {len(expected.tensors)} tensors differ). First: {diffs[0]}"
        )


# ---------------------------------------------------------------------------------------------- buckets


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements, inside the bucket's flat tensor
    numel: int


@dataclass(frozen=True)
class BucketLayout:
    """Where each tensor lives inside one flat transfer buffer (all slots share one dtype)."""

    index: int
    count: int  # buckets in this sync
    dtype: str
    numel: int
    slots: tuple[TensorSlot, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Bucket:
    """Object-store payload: a layout and its flat tensor (on CPU)."""

    layout: BucketLayout
    flat: torch.Tensor
    version: int


def plan_buckets(
    state: Mapping[str, torch.Tensor], bucket_mb: float, dtype: torch.dtype | None = None
) -> list[BucketLayout]:
    """Group tensors by (sent) dtype, in state-dict order, into buffers of about `bucket_mb` (a bigger tensor gets
    a bucket of its own)."""
    limit = int(bucket_mb * 1024**2)
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in state.items():
        by_dtype.setdefault(dtype or t.dtype, []).append((name, t))
    groups: list[tuple[torch.dtype, list[TensorSlot]]] = []
    for dt, items in by_dtype.items():
        size = torch.empty((), dtype=dt).element_size()
        slots: list[TensorSlot] = []
        offset = 0
        for name, t in items:
            if slots and (offset + t.numel()) * size > limit:
                groups.append((dt, slots))
                slots, offset = [], 0
            slots.append(TensorSlot(name, tuple(t.shape), offset, t.numel()))
            offset += t.numel()
        if slots:
            groups.append((dt, slots))
    return [
        BucketLayout(i, len(groups), str(dt).removeprefix("torch."), sum(s.numel for s in slots), tuple(slots))
        for i, (dt, slots) in enumerate(groups)
    ]


def pack_bucket(
    state: Mapping[str, torch.Tensor], layout: BucketLayout, device: torch.device | str | None = None
) -> torch.Tensor:
    """One flat tensor holding every slot of `layout`, cast to the layout's dtype."""
    first = state[layout.slots[0].name]
    flat = torch.empty(layout.numel, dtype=layout.torch_dtype, device=device or first.device)
    for slot in layout.slots:
        t = state.get(slot.name)
        if t is None or tuple(t.shape) != slot.shape:
            raise WeightSyncError(
                f"tensor '{slot.name}' changed since the sync layout was planned "
                f"(layout {slot.shape}, now {None if t is None else tuple(t.shape)}); plan the buckets again"
            )
        flat[slot.offset : slot.offset + slot.numel].copy_(t.detach().reshape(-1))
    return flat


def unpack_bucket(flat: torch.Tensor, layout: BucketLayout) -> list[tuple[str, torch.Tensor]]:
    """(name, view into `flat`) for every slot."""
    if flat.numel() != layout.numel:
        raise WeightSyncError(f"bucket {layout.index} holds {flat.numel()} elements, its layout says {layout.numel}")
    return [(s.name, flat[s.offset : s.offset + s.numel].view(s.shape)) for s in layout.slots]


def iter_buckets(buckets: Sequence[Any], version: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Engine side of `object_store`: fetch buckets (ObjectRefs or Buckets) one at a time, check they belong
    together, yield each one's (name, tensor) list."""
    seen: list[int] = []
    count = None
    for item in buckets:
        bucket = item if isinstance(item, Bucket) else _ray_get(item)
        if bucket.version != version:
            raise WeightSyncError(f"bucket {bucket.layout.index} belongs to v{bucket.version}, not v{version}")
        count = bucket.layout.count if count is None else count
        seen.append(bucket.layout.index)
        yield unpack_bucket(bucket.flat, bucket.layout)
    if count is None or sorted(seen) != list(range(count)):
        raise WeightSyncError(f"v{version}: received buckets {sorted(seen)}, expected 0..{(count or 0) - 1}")


def _ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


# ---------------------------------------------------------------------------------------------- broadcast group


class BroadcastGroup:
    """A torch.distributed process group of its own (TCPStore rendezvous), independent of the default group."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str, timeout_s: float):
        from datetime import timedelta

        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
        store = dist.PrefixStore("coolray-weight-sync", store)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        if backend == "nccl":
            torch.cuda.set_device(0)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
            self.device = torch.device("cuda", 0)
        elif backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"broadcast backend must be gloo or nccl (got {backend!r})")

    def broadcast(self, flat: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([flat], opts).wait()

    def send(self, state: Mapping[str, torch.Tensor], layouts: Sequence[BucketLayout]) -> None:
        for layout in layouts:
            self.broadcast(pack_bucket(state, layout, self.device))

    def receive(self, layouts: Sequence[BucketLayout]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        for layout in layouts:
            flat = torch.empty(layout.numel, dtype=layout.torch_dtype, device=self.device)
            self.broadcast(flat)
            yield unpack_bucket(flat, layout)


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


# ---------------------------------------------------------------------------------------------- the two ends


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights under Hugging Face names: unwraps DDP (`.module`) and merges peft LoRA adapters.

    Tensors share storage with the live model (no copy), except merged LoRA weights; clone them to keep a snapshot.

    LoRA: for every LoRA layer, W = W_base + sum over active adapters of get_delta_weight (peft's own scale * B @ A),
    computed without touching the training model (it stays unmerged). `modules_to_save` copies replace the originals.
    ZeRO-3 sharded parameters must be gathered by the caller first (deepspeed.zero.GatheredParameters).
    """
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if not hasattr(model, "get_base_model"):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    active = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(f".modules_to_save.{active}.", ".")
        if re.search(r"\.modules_to_save\.", key):
            continue  # an inactive adapter's copy
        out[key] = value.detach()
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and not module.merged:
                weight = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                out[f"{name}.weight"] = (weight + delta).detach() if torch.is_tensor(delta) else weight.detach()
    return out


class WeightSource:
    """Mixin for the worker that holds the full policy weights (rank 0 of the policy group)."""

    def sync_state_dict(self) -> dict[str, torch.Tensor]:
        """{hf_name: tensor} of the current policy; usually `hf_state_dict(self.model)`."""
        raise NotImplementedError(f"{type(self).__name__} must implement sync_state_dict()")

    def weight_offer(self, version: int, cfg: WeightSyncConfig) -> "WeightOffer":
        return make_offer(self.sync_state_dict(), version, cfg)

    def weight_group_address(self, backend: str) -> tuple[str, int, str]:
        from cluster.actor_group import node_address

        ip, port = node_address()
        return ip, port, resolve_backend(backend)

    def join_weight_group(self, addr: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        self._weight_group = BroadcastGroup(addr, port, 0, world_size, backend, timeout_s)

    def weight_layout(self, cfg: WeightSyncConfig) -> list[BucketLayout]:
        return plan_buckets(self.sync_state_dict(), cfg.bucket_mb, cfg.torch_dtype)

    def broadcast_weights(self, version: int, layouts: Sequence[BucketLayout], cfg: WeightSyncConfig) -> Fingerprint:
        state = self.sync_state_dict()
        expected = fingerprint(state.items(), version, cfg.fingerprint, cfg.torch_dtype)
        self._weight_group.send(state, layouts)
        return expected


class WeightSink:
    """Mixin for a rollout engine. Implement `_load_weights` and `_live_fingerprint`; `weight_version` starts at 0."""

    weight_version: int = 0

    def _load_weights(self, named: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Copy every (HF name, tensor) of one sync into the serving model. The iterator fetches one bucket at a
        time, so consuming it lazily bounds the extra memory to about one bucket."""
        raise NotImplementedError

    def _live_fingerprint(self, method: str) -> Fingerprint | None:
        """Fingerprint of the serving model under HF names, or None if the engine cannot name its weights that way
        (the fingerprint of what was received is reported instead)."""
        raise NotImplementedError

    def _finish_weight_update(self) -> None:
        """Hook after the last tensor (e.g. drop caches computed with the old weights)."""

    def fingerprint(self, method: str = "sample") -> Fingerprint:
        live = self._live_fingerprint(method)
        if live is not None:
            return live
        return getattr(self, "_received_fingerprint", None) or Fingerprint(self.weight_version, method, {})

    def update_weights(self, buckets: Sequence[Any], version: int, method: str = "sample") -> Fingerprint:
        """object_store transport: load `buckets` (ObjectRefs of Bucket, or Buckets) as weights `version`."""
        return self._apply(iter_buckets(buckets, version), version, method)

    def join_weight_group(self, addr: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        self._weight_group = BroadcastGroup(addr, port, rank, world_size, backend, timeout_s)

    def receive_weights(self, layouts: Sequence[BucketLayout], version: int, method: str = "sample") -> Fingerprint:
        """broadcast transport: receive one sync from rank 0 of the weight group."""
        if version <= self.weight_version:
            for _ in self._weight_group.receive(layouts):
                pass  # take part in every broadcast anyway, or rank 0 and the other engines would hang
        return self._apply(self._weight_group.receive(layouts), version, method)

    def _check_version(self, version: int) -> None:
        if not isinstance(version, int) or version <= self.weight_version:
            raise WeightSyncError(
                f"refusing weights v{version}: this engine already holds v{self.weight_version} (versions must increase)"
            )

    def _apply(self, buckets: Iterator[list[tuple[str, torch.Tensor]]], version: int, method: str) -> Fingerprint:
        self._check_version(version)
        received: dict[str, str] = {}

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for named in buckets:
                for name, t in named:
                    received[name] = tensor_digest(t, method)
                    yield name, t

        self._load_weights(stream())
        self._finish_weight_update()
        self.weight_version = version
        self._received_fingerprint = Fingerprint(version, method, received)
        return self.fingerprint(method)


@dataclass
class WeightOffer:
    """One sync prepared by the source: bucket ObjectRefs (or Buckets in-process) and the expected fingerprint."""

    version: int
    buckets: list[Any]
    expected: Fingerprint
    nbytes: int = 0


@dataclass
class SyncReport:
    """What one push did, for the driver's metrics (`weight_sync/seconds`, `weight_sync/mb`)."""

    version: int
    fingerprint: Fingerprint
    seconds: float
    nbytes: int
    engines: int


def layout_nbytes(layouts: Sequence[BucketLayout]) -> int:
    return sum(lay.numel * torch.empty((), dtype=lay.torch_dtype).element_size() for lay in layouts)


def make_offer(state: Mapping[str, torch.Tensor], version: int, cfg: WeightSyncConfig, put: bool = True) -> WeightOffer:
    """Bucket `state` (cast to cfg.dtype, moved to CPU) and `ray.put` each bucket unless `put` is False."""
    expected = fingerprint(state.items(), version, cfg.fingerprint, cfg.torch_dtype)
    layouts = plan_buckets(state, cfg.bucket_mb, cfg.torch_dtype)
    buckets: list[Any] = []
    for layout in layouts:
        bucket = Bucket(layout, pack_bucket(state, layout, "cpu"), version)
        buckets.append(_ray_put(bucket) if put else bucket)
    return WeightOffer(version, buckets, expected, layout_nbytes(layouts))


def _ray_put(obj: Any) -> Any:
    import ray

    return ray.put(obj)


# ---------------------------------------------------------------------------------------------- the driver


class WeightSyncer:
    """Driver side: after each policy update, `push(version)` moves the weights from the source actor (a
    WeightSource) to every engine actor (WeightSink) and verifies them; `push(version, state_dict=...)` sends a
    state dict the driver holds instead (object_store only)."""

    def __init__(self, cfg: WeightSyncConfig, engines: Any, source: Any = None, role: str = "rollout"):
        self.cfg, self.source, self.role = cfg, source, role
        self.engines = list(getattr(engines, "actors", engines))  # an ActorGroup or a list of actor handles
        self.last_version = 0
        self._layouts: list[BucketLayout] | None = None
        if not self.engines:
            raise ValueError("WeightSyncer needs at least one engine")

    def setup(self) -> None:
        """Form the broadcast group (broadcast transport only; a no-op otherwise)."""
        if self.cfg.transport != "broadcast":
            return
        if self.source is None:
            raise ValueError("weight_sync.transport=broadcast needs the source actor (policy rank 0)")
        phase, t = "weight sync setup", self.cfg.timeout_s
        addr, port, backend = timeouts.get_one(
            self.source.weight_group_address.remote(self.cfg.backend), role="policy", phase=phase, timeout_s=t
        )
        world = 1 + len(self.engines)
        src = self.source.join_weight_group.remote(addr, port, world, backend, t)
        sinks = [e.join_weight_group.remote(addr, port, 1 + i, world, backend, t) for i, e in enumerate(self.engines)]
        timeouts.get([src] + sinks, role=f"policy+{self.role}", phase=phase, timeout_s=t, ranks=list(range(world)))
        self._layouts = timeouts.get_one(self.source.weight_layout.remote(self.cfg), role="policy", phase=phase, timeout_s=t)

    def push(self, version: int, state_dict: Mapping[str, torch.Tensor] | None = None) -> SyncReport:
        """Sync weights `version` (must be greater than the last one) to every engine and verify each of them."""
        import time

        if version <= self.last_version:
            raise ValueError(f"weight version must increase: pushed v{self.last_version} before, now v{version}")
        phase, start = f"weight sync v{version}", time.monotonic()
        if self.cfg.transport == "object_store":
            expected, results, nbytes = self._push_object_store(version, state_dict, phase)
        else:
            if state_dict is not None:
                raise ValueError("push(state_dict=...) is for transport=object_store; broadcast sends from the source")
            if self._layouts is None:
                raise RuntimeError("call WeightSyncer.setup() before the first push with transport=broadcast")
            expected, results, nbytes = self._push_broadcast(version, phase)
        for rank, got in enumerate(results):
            check_fingerprint(expected, got, self.role, rank)
        self.last_version = version
        return SyncReport(version, expected, time.monotonic() - start, nbytes, len(self.engines))

    def _push_object_store(self, version: int, state_dict, phase: str) -> tuple[Fingerprint, list[Fingerprint], int]:
        t = self.cfg.timeout_s
        if state_dict is not None:
            offer = make_offer(state_dict, version, self.cfg)
        elif self.source is not None:
            ref = self.source.weight_offer.remote(version, self.cfg)
            offer = timeouts.get_one(ref, role="policy", phase=phase, timeout_s=t)
        else:
            raise ValueError("push needs a source actor or a state_dict")
        refs = [e.update_weights.remote(offer.buckets, version, self.cfg.fingerprint) for e in self.engines]
        return offer.expected, timeouts.get(refs, role=self.role, phase=phase, timeout_s=t), offer.nbytes

    def _push_broadcast(self, version: int, phase: str) -> tuple[Fingerprint, list[Fingerprint], int]:
        t = self.cfg.timeout_s
        sinks = [e.receive_weights.remote(self._layouts, version, self.cfg.fingerprint) for e in self.engines]
        src = self.source.broadcast_weights.remote(version, self._layouts, self.cfg)
        expected = timeouts.get_one(src, role="policy", phase=phase, timeout_s=t)
        return expected, timeouts.get(sinks, role=self.role, phase=phase, timeout_s=t), layout_nbytes(self._layouts)
