"""The PPO actor ("policy"): log-probs of rollouts, and the clipped-surrogate + PTX update, one rank of N.

Every formula comes from `algo/`; this class only moves tensors: forward passes, micro-batching, and the training
engine (`trainer.engine`: DDP or DeepSpeed ZeRO-2/3, optional LoRA) for the optimiser step.

Loss aggregation is exact under any split. The driver passes, with each shard, the *global* denominators of the
whole rollout batch (`denominator`: response tokens or sequences, `compute_aggregation_denominator`; PTX: its token
count). Each micro-batch contributes `sum(its terms) / global denominator`; the engine divides every micro-batch loss
by its accumulation count and DDP/ZeRO average gradients over ranks, so the worker multiplies by both
(`n_micro * world_size`) and the step applies exactly the gradient of the full-batch loss (see `algo/masked.py`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actors.batch import (
    Batch,
    causal_lm_response_logits,
    chunk_rows,
    micro_batches,
    num_rows,
    response_tokens,
    response_width,
    to_device,
)
from actors.faults import FaultConfig, FaultPoint
from actors.reference import pick_device
from algo.masked import compute_entropy_from_logits, compute_logprobs_from_logits
from algo.ppo import PPOLossConfig, compute_policy_loss, compute_ptx_loss
from cluster.weight_sync import WeightSource, hf_state_dict
from trainer.config import TrainerConfig


def rlhf_trainer_defaults(lr: float) -> TrainerConfig:
    """RLHF optimiser defaults: constant LR (no warmup/decay within PPO), no weight decay, grad clip 1.0
    (XTuner Ray RLHF's DeepSpeed config, spec §7.4); one rank per actor, so Ray Train's fields are unused."""
    return TrainerConfig(lr=lr, weight_decay=0.0, warmup_ratio=0.0, min_lr_ratio=1.0, micro_batch_size=12,
                         num_workers=1, grad_clip=1.0)


@dataclass
class PolicyConfig:
    path: str = ""  # HF directory of the SFT model (policy, reference and rollout engines start from it)
    dtype: str = "float32"
    # Tiny-run LR; the report uses 1e-6 for 7B/20B actors (conf/rlhf/scale/paper.yaml).
    trainer: TrainerConfig = field(default_factory=lambda: rlhf_trainer_defaults(lr=5e-5))
    forward_batch_size: int = 16  # rows per no-grad forward
    device: str = "auto"  # auto (cuda when this actor has a GPU) | cpu | cuda

    def __post_init__(self) -> None:
        if self.forward_batch_size < 1:
            raise ValueError(f"policy.forward_batch_size must be >= 1 (got {self.forward_batch_size})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"policy.device must be auto, cpu or cuda (got {self.device!r})")
        if self.trainer.grad_accum != 1:
            raise ValueError(
                "policy.trainer.grad_accum is derived in RLHF (one optimiser step per rollout batch = "
                "rows per rank / micro_batch_size micro-batches); leave it at 1 and set policy.trainer.micro_batch_size"
            )


def join_process_group_if_distributed() -> None:
    """Ranks of a multi-actor role form their own torch.distributed group (ActorGroup set RANK/WORLD_SIZE/...)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from cluster.actor_group import init_process_group_from_env

        init_process_group_from_env()


def _pad_right(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


def engine_config(trainer: TrainerConfig, micro_per_step: int) -> TrainerConfig:
    return dataclasses.replace(trainer, grad_accum=micro_per_step)


class RankMetrics:
    """Token-weighted means of per-micro-batch metrics on one rank, plus summed losses."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.totals: dict[str, float] = {}

    def add_means(self, metrics: dict[str, torch.Tensor], weight: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
            self.weights[k] = self.weights.get(k, 0.0) + weight

    def add_total(self, key: str, value: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + float(value)

    def result(self) -> dict:
        means = {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}
        return {"means": means, "weights": dict(self.weights), "totals": dict(self.totals)}


def merge_rank_metrics(per_rank: list[dict]) -> dict[str, float]:
    """Combine `RankMetrics.result()` of every rank: weighted means stay weighted, totals add up."""
    out: dict[str, float] = {}
    keys = {k for r in per_rank for k in r["means"]}
    for k in sorted(keys):
        weight = sum(r["weights"].get(k, 0.0) for r in per_rank if k in r["means"])
        if weight > 0:
            out[k] = sum(r["means"][k] * r["weights"][k] for r in per_rank if k in r["means"]) / weight
    for r in per_rank:
        for k, v in r["totals"].items():
            out[k] = out.get(k, 0.0) + v
    return out


class EngineCheckpoints:
    """Checkpoint and export methods of a trained role (policy, critic) over its `self.engine`.

    All three are collectives: every rank calls them (DeepSpeed gathers shards; rank 0 writes the HF export)."""

    engine = None
    tokenizer = None  # written next to the HF export when set

    def save(self, directory: str) -> None:
        """Weights + optimiser + schedule."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.engine.save(directory)

    def load(self, directory: str) -> None:
        self.engine.load(directory)

    def export_hf(self, directory: str) -> str | None:
        """An HF model directory (rank 0 writes; other ranks get None)."""
        out = self.engine.export_hf(directory, self.tokenizer)
        return str(out) if out is not None else None


class PolicyWorker(EngineCheckpoints, WeightSource):
    """One policy rank. `micro_per_step`: micro-batches in this rank's shard of one rollout batch."""

    role = "policy"

    def __init__(self, cfg: PolicyConfig, loss: PPOLossConfig, sampling=None, micro_per_step: int = 1,
                 total_steps: int = 1, fault: FaultConfig | None = None):
        from modeling.loading import load_causal_lm, load_tokenizer
        from trainer.engine import build_engine

        if not cfg.path:
            raise ValueError("policy.path is empty: set it to the SFT model directory (policy.path=<sft model_dir>)")
        join_process_group_if_distributed()
        torch.manual_seed(cfg.trainer.seed)
        self.cfg, self.loss_cfg = cfg, loss
        self.temperature = sampling.temperature if sampling is not None and not sampling.greedy else 1.0
        self.sampling = sampling
        self.micro_per_step = micro_per_step
        self.device = pick_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg.path)
        model = load_causal_lm(cfg.path, cfg.dtype)
        self.engine = build_engine(
            model, engine_config(cfg.trainer, micro_per_step), total_steps, device=self.device,
            model_factory=lambda: load_causal_lm(cfg.path, "float32"),
        )
        self.fault = FaultPoint(fault, self.role)
        self._sync_cache: dict[str, torch.Tensor] | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------ forward

    @torch.no_grad()
    def compute_logprobs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """`logprobs` `[B, T]` (log pi_theta, temperature-scaled: what PPO's ratio and the KL use), `entropy` `[B, T]`,
        and `processed_logprobs` `[B, T]`: the same tokens under the rollout engine's processed distribution
        (temperature, top-k, top-p) - the like-for-like value for the train-rollout mismatch metric."""
        from actors.rollout import processed_logprobs

        self.fault.check("compute_logprobs")
        module = self.engine.module
        module.eval()
        logprobs, processed, entropy = [], [], []
        for micro in micro_batches(batch, self.cfg.forward_batch_size):
            micro = to_device(micro, self.device)
            with self.engine.autocast():
                logits = causal_lm_response_logits(module, micro).float()
            tokens = response_tokens(micro)
            logprobs.append(compute_logprobs_from_logits(logits, tokens, self.temperature).cpu())
            entropy.append(compute_entropy_from_logits(logits / self.temperature).cpu())
            if self.sampling is not None:
                lp = processed_logprobs(logits, self.sampling.temperature, self.sampling.top_k, self.sampling.top_p)
                processed.append(lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).cpu())
        out = {"logprobs": torch.cat(logprobs), "entropy": torch.cat(entropy)}
        if processed:
            out["processed_logprobs"] = torch.cat(processed)
        return out

    # ------------------------------------------------------------------------------------------ update

    def train_step(self, batch: Batch, ptx_batch: Batch | None = None) -> dict:
        """One optimiser step on this rank's shard: clipped PPO loss (+ ptx_coef * LM loss on `ptx_batch`).

        `batch` needs `old_logprobs`, `advantages`, `response_mask` and the global `denominator`; `ptx_batch` needs
        `loss_mask` and its global `denominator`. Returns `RankMetrics.result()` (merge ranks with
        `merge_rank_metrics`).
        """
        self.fault.check("train_step")
        micros = list(micro_batches(batch, self.cfg.trainer.micro_batch_size))
        if len(micros) != self.micro_per_step:
            raise ValueError(
                f"policy rank got {num_rows(batch)} rows = {len(micros)} micro-batches of "
                f"{self.cfg.trainer.micro_batch_size}, but was built for {self.micro_per_step} per step; every rank "
                "must get the same number (ppo.rollout_batch_size / policy ranks / micro_batch_size)"
            )
        ptx_chunks = chunk_rows(ptx_batch, len(micros)) if self.loss_cfg.ptx_coef > 0 else [None] * len(micros)
        scale = len(micros) * self.engine.world_size
        module = self.engine.model
        module.train()  # (DeepSpeed's engine.train() returns None, so not chained)
        metrics = RankMetrics()
        for micro, ptx in zip(micros, ptx_chunks):
            micro = to_device(micro, self.device)
            ptx = to_device(ptx, self.device) if ptx is not None else None
            logits, ptx_logits = self._train_logits(module, micro, ptx)
            logprobs = compute_logprobs_from_logits(logits, response_tokens(micro), self.temperature)
            loss, m = compute_policy_loss(logprobs, micro["old_logprobs"], micro["advantages"],
                                          micro["response_mask"], self.loss_cfg, denominator=micro["denominator"])
            metrics.add_means(m, float(micro["response_mask"].sum()))
            metrics.add_total("policy/loss", loss.detach())
            if ptx is not None:
                # logits[:, l] predicts token l + 1
                ptx_logprobs = compute_logprobs_from_logits(ptx_logits, ptx["input_ids"][:, 1:])
                ptx_loss, pm = compute_ptx_loss(ptx_logprobs, ptx["loss_mask"], self.loss_cfg,
                                                denominator=ptx["denominator"])
                metrics.add_means(pm, float(ptx["loss_mask"].sum()))
                metrics.add_total("ptx/loss", ptx_loss.detach())
                loss = loss + ptx_loss
            out = self.engine.step(loss * scale)
        metrics.add_means({"policy/grad_norm": torch.tensor(out.grad_norm or 0.0), "policy/lr": torch.tensor(out.lr)}, 1.0)
        return metrics.result()

    def _train_logits(self, module: torch.nn.Module, micro: Batch, ptx: Batch | None):
        """Response logits `[b, T, V]` of the rollout rows and, with PTX, next-token logits `[p, L - 1, V]` of the
        pretraining rows - from ONE forward of both stacked, because DDP allows one forward per backward."""
        if ptx is None:
            with self.engine.autocast():
                return causal_lm_response_logits(module, micro).float(), None
        rows, width_ptx = num_rows(micro), ptx["input_ids"].shape[1]
        width = max(micro["input_ids"].shape[1], width_ptx)
        ptx_positions = (ptx["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        # Right padding (attention 0) never changes earlier positions under causal attention.
        stacked = {key: torch.cat([_pad_right(micro[key], width), _pad_right(ptx_value, width)])
                   for key, ptx_value in (("input_ids", ptx["input_ids"]), ("attention_mask", ptx["attention_mask"]),
                                          ("position_ids", ptx_positions))}
        with self.engine.autocast():
            logits = module(**stacked, use_cache=False).logits.float()
        width_p, width_t = response_width(micro)
        return logits[:rows, width_p - 1 : width_p - 1 + width_t], logits[rows:, : width_ptx - 1]

    # ------------------------------------------------------------------------------------------ weights

    def gather_for_sync(self) -> None:
        """Collective (every rank): under ZeRO-3 assemble the full weights on rank 0 before a sync."""
        if self.engine.backend == "deepspeed" and self.cfg.trainer.zero_stage == 3:
            full = self.engine.full_model()
            self._sync_cache = hf_state_dict(full) if full is not None else None

    def use_sync_snapshot(self, hf_dir: str | None) -> None:
        """Serve the weights of an exported snapshot (e.g. the round's early policy) to the next syncs instead of the
        live ones, so the rollout engines can sample from it; None goes back to the live weights."""
        if hf_dir is None:
            self._snapshot = None
            return
        from safetensors.torch import load_file

        files = sorted(Path(hf_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{hf_dir} holds no *.safetensors weights; export the snapshot with export_hf()")
        self._snapshot = {k: v for f in files for k, v in load_file(str(f)).items()}

    def sync_state_dict(self) -> dict[str, torch.Tensor]:
        if self._snapshot is not None:
            return self._snapshot
        if self._sync_cache is not None:
            state, self._sync_cache = self._sync_cache, None
            return state
        return hf_state_dict(self.engine.module)

    def state_for_sync(self) -> dict[str, torch.Tensor]:
        return self.sync_state_dict()

    def weight_checksum(self) -> float:
        """Sum of every parameter, in float64: a cheap equality probe for tests and resume checks."""
        return float(sum(p.detach().double().sum() for p in self.engine.module.parameters()))

