"""The frozen reference policy (the SFT model): log-probs of sampled responses for the per-token KL penalty.

COOL RLHF initialises actor and reference from the same SFT weights and never updates the reference [R §4.2.3].
It is also the "sft" weight source of the online paths: the rollout engines load its weights to sample the SFT
responses the slow path compares (`sync_state_dict`, via `cluster.weight_sync`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.batch import Batch, causal_lm_response_logits, micro_batches, response_tokens, to_device
from algo.masked import compute_logprobs_from_logits
from cluster.weight_sync import WeightSource, hf_state_dict


@dataclass
class ReferenceConfig:
    path: str = ""  # HF directory; "" = the policy's initial (SFT) checkpoint
    dtype: str = "float32"
    forward_batch_size: int = 16  # rows per no-grad forward (bounds activation memory)
    device: str = "auto"  # auto (cuda when this actor has a GPU) | cpu | cuda

    def __post_init__(self) -> None:
        if self.forward_batch_size < 1:
            raise ValueError(f"reference.forward_batch_size must be >= 1 (got {self.forward_batch_size})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"reference.device must be auto, cpu or cuda (got {self.device!r})")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ReferenceWorker(WeightSource):
    def __init__(self, cfg: ReferenceConfig, temperature: float = 1.0):
        from modeling.loading import load_causal_lm

        if not cfg.path:
            raise ValueError("reference.path is empty: set it to the SFT checkpoint (the RLHF job does by default)")
        self.cfg, self.temperature = cfg, temperature
        self.device = pick_device(cfg.device)
        self.model = load_causal_lm(cfg.path, cfg.dtype).to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def compute_logprobs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """`{"logprobs": [B, T]}`: log pi_ref of each response token (temperature-scaled like the policy's)."""
        out = []
        for micro in micro_batches(batch, self.cfg.forward_batch_size):
            micro = to_device(micro, self.device)
            logits = causal_lm_response_logits(self.model, micro)
            out.append(compute_logprobs_from_logits(logits, response_tokens(micro), self.temperature).cpu())
        return {"logprobs": torch.cat(out, dim=0)}

    def sync_state_dict(self) -> dict[str, torch.Tensor]:
        return hf_state_dict(self.model)

    def state_for_sync(self) -> dict[str, torch.Tensor]:
        return self.sync_state_dict()
