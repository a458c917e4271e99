"""How to train: the one owner of every training default (optimizer, schedule, batching, backend, LoRA, resources).

Defaults follow InternLM2 pretraining (spec §4): AdamW β=(0.9, 0.95), ε=1e-8, weight decay 0.1, cosine decay to
10% of the peak LR, gradient clipping 1.0 (InternEvo's default). Jobs override per stage in `conf/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("ddp", "deepspeed")
LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))
    # Extra modules trained in full next to the adapters (e.g. a reward head); saved and merged with them.
    modules_to_save: list[str] = field(default_factory=list)
    # QLoRA: base weights in 4-bit NF4 (bitsandbytes, CUDA only), adapters in full precision.
    qlora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"trainer.lora.r must be >= 1 (got {self.r})")
        if self.alpha <= 0:
            raise ValueError(f"trainer.lora.alpha must be > 0 (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"trainer.lora.dropout must be in [0, 1) (got {self.dropout})")
        if not self.target_modules:
            raise ValueError("trainer.lora.target_modules is empty; name the Linear layers to adapt, e.g. [q_proj,v_proj]")
        if self.qlora and not self.enabled:
            raise ValueError("trainer.lora.qlora=true needs trainer.lora.enabled=true (QLoRA trains LoRA adapters)")


@dataclass
class TrainerConfig:
    backend: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 2  # DeepSpeed ZeRO stage (2 or 3); ignored by ddp
    # Resources: one Ray Train worker per rank (Ray Train's ScalingConfig).
    num_workers: int = 2
    cpus_per_worker: float = 1.0  # also the torch thread count of a CPU worker
    gpus_per_worker: float = 0.0  # > 0 selects CUDA + NCCL
    # AdamW and the schedule: linear warmup over warmup_ratio of the steps, then cosine to min_lr_ratio * lr.
    lr: float = 3e-4
    weight_decay: float = 0.1  # on matrices only; norms and biases are not decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    # Length: max_steps > 0 stops there (the data repeats as needed); max_steps = 0 runs `epochs` passes.
    max_steps: int = 0
    epochs: int = 1
    # Batching: one optimizer step = micro_batch_size * grad_accum rows per rank.
    micro_batch_size: int = 8
    grad_accum: int = 1
    grad_clip: float = 1.0  # max global L2 norm of the gradients; 0 = no clipping
    bf16: bool = False  # DDP: autocast; DeepSpeed: bf16 weights with fp32 master copies
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Checkpoints under <run_dir>/checkpoints: every N optimizer steps (0 = only at the end), newest K kept.
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    max_failures: int = 0  # Ray Train restarts of the worker group; each restart resumes from the newest checkpoint
    # Extra DeepSpeed config merged over the generated one (e.g. {zero_optimization: {offload_optimizer: ...}}).
    deepspeed_config: dict[str, Any] = field(default_factory=dict)
    # Debug: return right after this many optimizer steps without checkpointing, like a crash (resume tests).
    stop_after_steps: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"trainer.backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.zero_stage not in (2, 3):
            raise ValueError(f"trainer.zero_stage must be 2 or 3 (got {self.zero_stage})")
        if self.num_workers < 1:
            raise ValueError(f"trainer.num_workers must be >= 1 (got {self.num_workers})")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("trainer.cpus_per_worker must be > 0 and trainer.gpus_per_worker >= 0")
        if self.lr <= 0:
            raise ValueError(f"trainer.lr must be > 0 (got {self.lr})")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"trainer.betas must be two numbers in [0, 1), e.g. [0.9,0.95] (got {self.betas})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"trainer.warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"trainer.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.max_steps < 0 or self.epochs < 0 or (self.max_steps == 0 and self.epochs == 0):
            raise ValueError("set trainer.max_steps > 0 or trainer.epochs > 0 (both are 0 or negative)")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("trainer.micro_batch_size and trainer.grad_accum must be >= 1")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("trainer.grad_clip and trainer.weight_decay must be >= 0 and trainer.eps > 0")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("trainer.checkpoint_every must be >= 0 (0 = only at the end) and trainer.keep_checkpoints >= 1")
        if self.stop_after_steps < 0 or self.max_failures < 0:
            raise ValueError("trainer.stop_after_steps and trainer.max_failures must be >= 0")
        if self.lora.qlora:
            if self.gpus_per_worker <= 0:
                raise ValueError(
                    "trainer.lora.qlora=true needs a CUDA GPU and bitsandbytes (4-bit NF4 weights): set "
                    "trainer.gpus_per_worker=1 on a GPU cluster, or use plain LoRA with trainer.lora.qlora=false"
                )
            if self.backend != "ddp":
                raise ValueError("trainer.lora.qlora=true is supported with trainer.backend=ddp only")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def use_deepspeed(self) -> bool:
        return self.backend == "deepspeed"
