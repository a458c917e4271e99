"""The PPO critic: V(s_t) for every response position, and the value-regression update, one rank of N.

Initialised from the reward model's backbone with a fresh value head [R §4.2.3] (`modeling.value.ValueModel`).
The value of the state before response token t is read at the hidden state that predicts token t (column P - 1 + t,
see `actors.batch`). Loss 1/2 (V - R)^2 without clipping by default, aggregated exactly like the policy's (see
`actors.policy` for the scaling by micro-batches and ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actors.batch import Batch, micro_batches, num_rows, response_width, to_device
from actors.faults import FaultConfig, FaultPoint
from actors.policy import EngineCheckpoints, RankMetrics, engine_config, join_process_group_if_distributed, rlhf_trainer_defaults
from actors.reference import pick_device
from algo.ppo import PPOLossConfig, compute_value_loss
from trainer.config import TrainerConfig


@dataclass
class CriticConfig:
    path: str = ""  # "" = the reward model (reward.path): its backbone, with a fresh value head
    dtype: str = "float32"
    # Tiny-run LR; the report uses 5e-6 (conf/rlhf/scale/paper.yaml).
    trainer: TrainerConfig = field(default_factory=lambda: rlhf_trainer_defaults(lr=5e-4))
    forward_batch_size: int = 16
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.forward_batch_size < 1:
            raise ValueError(f"critic.forward_batch_size must be >= 1 (got {self.forward_batch_size})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"critic.device must be auto, cpu or cuda (got {self.device!r})")
        if self.trainer.lora.enabled and "value_head" not in self.trainer.lora.modules_to_save:
            raise ValueError(
                "critic.trainer.lora is on but the fresh value head would stay frozen: add it to the fully trained "
                "modules with critic.trainer.lora.modules_to_save=[value_head]"
            )
        if self.trainer.grad_accum != 1:
            raise ValueError(
                "critic.trainer.grad_accum is derived in RLHF (rows per rank / micro_batch_size); leave it at 1 "
                "and set critic.trainer.micro_batch_size"
            )


class CriticWorker(EngineCheckpoints):
    role = "critic"

    def __init__(self, cfg: CriticConfig, loss: PPOLossConfig, micro_per_step: int = 1, total_steps: int = 1,
                 fault: FaultConfig | None = None):
        from modeling.value import ValueModel
        from trainer.engine import build_engine

        if not cfg.path:
            raise ValueError("critic.path is empty: set it to the reward model directory (reward.path)")
        join_process_group_if_distributed()
        torch.manual_seed(cfg.trainer.seed)
        self.cfg, self.loss_cfg, self.micro_per_step = cfg, loss, micro_per_step
        self.device = pick_device(cfg.device)
        model = ValueModel.from_reward_model(cfg.path, cfg.dtype)
        self.engine = build_engine(
            model, engine_config(cfg.trainer, micro_per_step), total_steps, device=self.device,
            model_factory=lambda: ValueModel.from_reward_model(cfg.path, "float32"),
        )
        self.fault = FaultPoint(fault, self.role)

    def _response_values(self, model: torch.nn.Module, micro: Batch) -> torch.Tensor:
        width_p, width_t = response_width(micro)
        with self.engine.autocast():
            values = model(micro["input_ids"], micro["attention_mask"], micro["position_ids"])
        # V(s_t) is read where token t is predicted: columns P - 1 .. P + T - 2
        return values[:, width_p - 1 : width_p - 1 + width_t].float()

    @torch.no_grad()
    def compute_values(self, batch: Batch) -> dict[str, torch.Tensor]:
        """`{"values": [B, T]}`."""
        self.fault.check("compute_values")
        module = self.engine.module
        module.eval()
        out = [self._response_values(module, to_device(m, self.device)).cpu()
               for m in micro_batches(batch, self.cfg.forward_batch_size)]
        return {"values": torch.cat(out)}

    def train_step(self, batch: Batch) -> dict:
        """One optimiser step on this shard; `batch` needs `returns`, `values` (at rollout, for optional value
        clipping), `response_mask` and the global `denominator`."""
        self.fault.check("train_step")
        micros = list(micro_batches(batch, self.cfg.trainer.micro_batch_size))
        if len(micros) != self.micro_per_step:
            raise ValueError(
                f"critic rank got {num_rows(batch)} rows = {len(micros)} micro-batches of "
                f"{self.cfg.trainer.micro_batch_size}, but was built for {self.micro_per_step} per step"
            )
        scale = len(micros) * self.engine.world_size
        module = self.engine.model
        module.train()  # (DeepSpeed's engine.train() returns None, so not chained)
        metrics = RankMetrics()
        for micro in micros:
            micro = to_device(micro, self.device)
            values = self._response_values(module, micro)
            loss, m = compute_value_loss(values, micro["returns"], micro["response_mask"], self.loss_cfg,
                                         old_values=micro.get("values"), denominator=micro["denominator"])
            metrics.add_means(m, float(micro["response_mask"].sum()))
            metrics.add_total("critic/value_loss", loss.detach())
            out = self.engine.step(loss * scale)
        metrics.add_means({"critic/grad_norm": torch.tensor(out.grad_norm or 0.0), "critic/lr": torch.tensor(out.lr)}, 1.0)
        return metrics.result()

    def value_head_weight(self) -> torch.Tensor:
        return self.engine.module.value_head.weight.detach().cpu().clone()

