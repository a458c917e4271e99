"""The per-rank training engine: one object that owns the wrapped model, the optimizer and the LR schedule.

Used by the generic loop (`trainer.loop.train`) and, directly, by RLHF actors for their own train steps:

    engine = build_engine(model, cfg, total_steps, device=device, model_factory=build_fn)
    with engine.autocast():                       # bf16 autocast under DDP; a no-op otherwise
        loss = my_loss(engine.model, batch)       # forward through engine.model (DDP / DeepSpeed wrapper)
    out = engine.step(loss)                       # backward; on an accumulation boundary also clip + AdamW + LR step
    if out.stepped: print(out.lr, out.grad_norm)
    engine.module                                 # the unwrapped model (a peft model under LoRA): eval, generation
    engine.save(dir); engine.load(dir)            # model + optimizer + scheduler, collective (every rank calls)
    plain = engine.full_model()                   # rank 0: merged, unsharded fp32 CPU copy; None elsewhere (collective)
    engine.export_hf(dir, tokenizer)              # rank 0 writes an HF directory from full_model() (collective)

Rules the caller keeps: exactly one `step(loss)` per micro-batch forward (DDP decides at forward time whether a
backward all-reduces, from the count of `step` calls), and every rank calls the collective methods.
`model_factory` returns a fresh, unsharded, full-precision base model (before LoRA); it is needed to export
under ZeRO-3, DeepSpeed bf16 and QLoRA, where the live model cannot simply be copied.

ZeRO-3 partitions a normally built model inside `deepspeed.initialize` (no `zero.Init()`: transformers models
crash under a raw `zero.Init`, stack.md §5), so each rank briefly holds the full model in CPU memory. Under
DeepSpeed bf16 the export takes the fp32 master weights.

Backends: `ddp` is torch DDP over the process group the launcher made (gloo on CPU, NCCL on GPU; no wrapper at
world size 1). `deepspeed` is ZeRO-2/3 via `deepspeed.initialize` reusing that process group (one is made for a
single process), with the client torch AdamW (`zero_allow_untested_optimizer`) so CPU needs no FusedAdam build.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from trainer.config import TrainerConfig


@dataclass
class StepOutput:
    stepped: bool  # an optimizer step happened (end of an accumulation window)
    lr: float  # the LR the step used (the LR the next step will use when stepped=False)
    grad_norm: float | None  # global L2 norm before clipping, on optimizer steps


def build_engine(
    model: torch.nn.Module,
    cfg: TrainerConfig,
    total_steps: int,
    *,
    device: torch.device | str | None = None,
    model_factory: Callable[[], torch.nn.Module] | None = None,
) -> "TrainEngine":
    """The engine for `cfg.backend`; `total_steps` optimizer steps size the LR schedule."""
    cls = DeepSpeedEngine if cfg.use_deepspeed else DDPEngine
    return cls(model, cfg, total_steps, device=device, model_factory=model_factory)


def default_device(cfg: TrainerConfig) -> torch.device:
    if cfg.use_gpu:
        if not torch.cuda.is_available():
            raise ValueError("trainer.gpus_per_worker > 0 but this process sees no CUDA GPU; set trainer.gpus_per_worker=0")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms and biases (1-D) keep their scale (the Megatron/InternEvo convention)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer_and_schedule(model: torch.nn.Module, cfg: TrainerConfig, total_steps: int):
    """AdamW plus linear warmup then cosine decay to min_lr_ratio * lr:
    lr(t) = lr * t / w                                              for t < w = ceil(warmup_ratio * T)
    lr(t) = lr * (m + (1 - m) * 0.5 * (1 + cos(pi * (t - w) / (T - w))))  after, m = min_lr_ratio."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1), min_lr_rate=cfg.min_lr_ratio
    )
    return opt, sched


def apply_lora(model: torch.nn.Module, cfg: TrainerConfig) -> torch.nn.Module:
    """Wrap `model` with peft LoRA adapters (only adapters and modules_to_save stay trainable)."""
    import peft

    lc = cfg.lora
    if lc.qlora:
        _require_qlora_runtime()
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    peft_cfg = peft.LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules),
        modules_to_save=list(lc.modules_to_save) or None,
        bias="none",
    )
    return peft.get_peft_model(model, peft_cfg)


def _require_qlora_runtime() -> None:
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "QLoRA needs a CUDA GPU and the bitsandbytes package (4-bit NF4 weights); this worker has "
            f"cuda={torch.cuda.is_available()}, bitsandbytes={importlib.util.find_spec('bitsandbytes') is not None}. "
            "Run on a GPU node with `pip install bitsandbytes`, or set trainer.lora.qlora=false for plain LoRA."
        )


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process; make a single-rank one when no launcher did."""
    if dist.is_available() and dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # This function is the launcher of a one-process run, so it sets what torchrun / Ray Train would set
    # (DeepSpeed asserts on LOCAL_RANK even when the process group already exists).
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


class TrainEngine:
    """Shared behaviour; see the module docstring for the API."""

    backend = ""

    def __init__(self, model, cfg: TrainerConfig, total_steps: int, *, device=None, model_factory=None):
        self.cfg = cfg
        self.total_steps = total_steps
        self.device = torch.device(device) if device is not None else default_device(cfg)
        self.model_factory = model_factory
        self.rank, self.world_size = _dist_rank_world()
        self.micro_steps = 0  # step() calls so far
        self.global_step = 0  # optimizer steps so far
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        if cfg.lora.enabled:
            model = apply_lora(model, cfg)
        self._setup(model)

    # -- subclass hooks
    def _setup(self, model: torch.nn.Module) -> None:
        raise NotImplementedError

    @property
    def module(self) -> torch.nn.Module:
        raise NotImplementedError

    def step(self, loss: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def load(self, directory: str | Path) -> None:
        raise NotImplementedError

    def _gathered_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def _can_copy_module(self) -> bool:
        return not self.cfg.lora.qlora

    # -- shared
    def autocast(self):
        if self.cfg.bf16 and not self.cfg.use_deepspeed:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def full_model(self) -> torch.nn.Module | None:
        """Rank 0: an unsharded fp32 CPU copy with LoRA merged in; other ranks: None. Every rank must call."""
        if self.model_factory is None and not self._can_copy_module():
            raise ValueError(
                "exporting under ZeRO-3, DeepSpeed bf16 or QLoRA rebuilds the model: pass model_factory= to build_engine "
                "(a function returning a fresh full-precision base model)"
            )
        lora = self.cfg.lora.enabled
        if self.model_factory is not None and not self._can_copy_module():
            sd = self._gathered_state_dict(trainable_only=lora)
            if self.rank != 0:
                return None
            return self._rebuild(sd)
        out = None
        if self.rank == 0:
            out = copy.deepcopy(self.module).to("cpu").float()
            if lora:
                out = out.merge_and_unload()
        _barrier()
        return out

    def _rebuild(self, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A fresh base from model_factory with the trained weights (all, or LoRA adapters only) put in."""
        base = self.model_factory().to("cpu").float()
        if not self.cfg.lora.enabled:
            _load_all(base, sd)
            return base
        # LoRA keeps the base frozen, so the factory's base plus the trained adapters is the trained model.
        wrapped = apply_lora(base, _without_qlora(self.cfg))
        missing = [k for k in sd if k not in wrapped.state_dict()]
        if missing:
            raise RuntimeError(f"adapter keys not found in the rebuilt model: {missing[:3]} (model_factory mismatch?)")
        wrapped.load_state_dict(sd, strict=False)
        return wrapped.merge_and_unload()

    def export_hf(self, out_dir: str | Path, tokenizer=None) -> Path | None:
        """Write an HF model directory (merged, fp32) atomically from rank 0. Every rank must call."""
        model = self.full_model()
        if model is not None:
            from modeling.tiny import save_pretrained

            if tokenizer is None:
                from data.io import atomic_dir

                with atomic_dir(out_dir) as tmp:
                    model.save_pretrained(str(tmp), safe_serialization=True)
            else:
                save_pretrained(model, tokenizer, out_dir)
        _barrier()
        return Path(out_dir) if self.rank == 0 else None


def _load_all(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load parameter weights; keys only a tied alias has (e.g. a tied lm_head) may be absent."""
    result = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters())  # tied weights appear once here
    missing = [k for k in result.missing_keys if k in params]
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"rebuilt model does not match the trained one (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}): model_factory must build the same architecture"
        )


def _without_qlora(cfg: TrainerConfig) -> TrainerConfig:
    c = copy.copy(cfg)
    c.lora = copy.copy(cfg.lora)
    c.lora.qlora = False
    return c


class DDPEngine(TrainEngine):
    backend = "ddp"

    def _setup(self, model: torch.nn.Module) -> None:
        if not self.cfg.lora.qlora:  # 4-bit models are placed on the GPU by their loader
            model = model.to(self.device)
        self._module = model
        self._ddp = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DDP(model, device_ids=ids)
        self.model = self._ddp or model
        self.optimizer, self.scheduler = build_optimizer_and_schedule(model, self.cfg, self.total_steps)
        self._set_sync()

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def _set_sync(self) -> None:
        # DDP reads this flag in forward: only the last micro-batch of a window all-reduces its gradients.
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = (self.micro_steps + 1) % self.cfg.grad_accum == 0

    def step(self, loss: torch.Tensor) -> StepOutput:
        # Mean over the window: each micro-batch contributes loss / grad_accum.
        (loss / self.cfg.grad_accum).backward()
        self.micro_steps += 1
        lr = self.lr
        stepped, norm = self.micro_steps % self.cfg.grad_accum == 0, None
        if stepped:
            params = [p for p in self._module.parameters() if p.requires_grad]
            max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
        self._set_sync()
        return StepOutput(stepped=stepped, lr=lr, grad_norm=norm)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(self._module.state_dict(), directory / "model.pt")
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(
                {"scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps, "global_step": self.global_step},
                directory / "engine.pt",
            )
        _barrier()

    def load(self, directory: str | Path) -> None:
        directory = Path(directory)
        loc = self.device if not self.cfg.lora.qlora else "cpu"
        self._module.load_state_dict(torch.load(directory / "model.pt", map_location=loc, weights_only=True))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=loc, weights_only=True))
        state = torch.load(directory / "engine.pt", map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.global_step = int(state["micro_steps"]), int(state["global_step"])
        self._set_sync()

    def _gathered_state_dict(self, trainable_only: bool):
        return _state_dict_copy(self._module, trainable_only) if self.rank == 0 else None


def _state_dict_copy(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    names = {n for n, p in module.named_parameters() if p.requires_grad} if trainable_only else None
    return {k: v.detach().cpu().float().clone() for k, v in module.state_dict().items() if names is None or k in names}


class DeepSpeedEngine(TrainEngine):
    backend = "deepspeed"
    _TAG = "deepspeed"

    def _setup(self, model: torch.nn.Module) -> None:
        import deepspeed

        ensure_process_group(self.device)
        self.rank, self.world_size = _dist_rank_world()
        optimizer, scheduler = build_optimizer_and_schedule(model, self.cfg, self.total_steps)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config(), dist_init_required=False
        )

    def ds_config(self) -> dict:
        c = self.cfg
        conf = {
            "train_micro_batch_size_per_gpu": c.micro_batch_size,
            "gradient_accumulation_steps": c.grad_accum,
            "train_batch_size": c.micro_batch_size * c.grad_accum * self.world_size,
            "gradient_clipping": c.grad_clip,
            "zero_optimization": {"stage": c.zero_stage},
            "bf16": {"enabled": c.bf16},
            "zero_allow_untested_optimizer": True,  # the client torch AdamW: no FusedAdam JIT build on CPU
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        return _deep_merge(conf, c.deepspeed_config)

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module

    def _can_copy_module(self) -> bool:
        # ZeRO-3 holds shards only; under bf16 the module holds bf16 copies and the fp32 masters sit in the
        # optimizer. Both export through _gathered_state_dict.
        return self.cfg.zero_stage < 3 and not self.cfg.bf16

    def step(self, loss: torch.Tensor) -> StepOutput:
        lr = self.lr
        stepped = self.model.is_gradient_accumulation_boundary()
        self.model.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        self.model.step()  # reduces, clips, steps AdamW and the LR schedule only on the boundary
        self.micro_steps += 1
        norm = None
        if stepped:
            self.global_step += 1
            g = self.model.get_global_grad_norm()
            norm = float(g) if g is not None else None
        return StepOutput(stepped=stepped, lr=lr, grad_norm=norm)

    def save(self, directory: str | Path) -> None:
        # Every rank writes its own ZeRO shards; DeepSpeed saves the LR scheduler with them.
        state = {"micro_steps": self.micro_steps, "global_step": self.global_step}
        self.model.save_checkpoint(str(directory), tag=self._TAG, client_state=state, save_latest=False)
        _barrier()

    def load(self, directory: str | Path) -> None:
        path, state = self.model.load_checkpoint(
            str(directory), tag=self._TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
        self.micro_steps, self.global_step = int(state["micro_steps"]), int(state["global_step"])

    def _gathered_state_dict(self, trainable_only: bool):
        """Full fp32 weights on rank 0 (collective): trained parameters from DeepSpeed's fp32 master copies,
        frozen ones from the module (ZeRO-3 shards gathered first)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad or not trainable_only]
        out: dict[str, torch.Tensor] = {}
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            for name, p in named:
                master = safe_get_full_fp32_param(p) if p.requires_grad else None  # all ranks take part
                if self.rank == 0:
                    out[name] = (master if master is not None else p.data).detach().cpu().float().clone()
        return out if self.rank == 0 else None


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in (extra or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
