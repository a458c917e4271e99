"""The PPO critic: a transformer backbone with a scalar value head read at every position.

    values = head( backbone(input_ids).last_hidden_state )[..., 0]        # [B, L]: V(s_t) for every prefix

COOL RLHF initialises the critic from the reward model [R §4.2.3; spec cool-rlhf.md §7.4]: the RM's backbone, but
*not* its linear head ("excluding the linear head"). The RM head maps the hidden state at the `<|reward|>` token to a
score of the whole conversation; a value head must instead predict the return from any prefix, so it starts fresh.
We zero-initialise it, so the first values are exactly 0 and the first GAE advantages equal the shaped rewards (the
report's Fig. 9 shows the RM-initialised critic overtaking an SFT-initialised one after ~20 iterations).

Saved format (a plain HF directory):
    config.json + model.safetensors      the backbone (AutoModel)
    value_head.safetensors               {"weight": [1, hidden]}
    tokenizer files                      when a tokenizer is passed to `modeling.tiny.save_pretrained`
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """`backbone` is a base transformer (an HF `AutoModel`, no LM head) returning `last_hidden_state`."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config  # lets generic HF helpers (and `save_pretrained` callers) find the config
        self.value_head = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Values `[B, L]` (fp32): entry t is V of the prefix ending at token t."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()

    # -------------------------------------------------------------------------------------------- build / io

    @classmethod
    def from_reward_model(cls, rm_dir: str | os.PathLike, dtype: str = "float32") -> "ValueModel":
        """The RM's backbone (its `<|reward|>` head is left out) with a fresh, zero value head."""
        from transformers import AutoModel

        from modeling.loading import resolve_checkpoint

        local = resolve_checkpoint(str(rm_dir))
        backbone = AutoModel.from_pretrained(str(local), dtype=getattr(torch, dtype))
        return cls(backbone)

    def save_pretrained(self, out_dir: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write the backbone and the head into `out_dir` (non-atomic; wrap with `data.io.atomic_dir`)."""
        from safetensors.torch import save_file

        del safe_serialization  # always safetensors; the argument keeps the HF call signature
        self.backbone.save_pretrained(str(out_dir), safe_serialization=True)
        save_file({"weight": self.value_head.weight.detach().cpu().contiguous()}, str(Path(out_dir) / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "float32") -> "ValueModel":
        """Load a directory written by `save_pretrained`."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        from modeling.loading import resolve_checkpoint

        local = resolve_checkpoint(str(path))
        if not (local / HEAD_FILE).exists():
            raise FileNotFoundError(
                f"{local} has no {HEAD_FILE}: it is not a saved value model. To start a critic from a reward model "
                "use ValueModel.from_reward_model(rm_dir)"
            )
        model = cls(AutoModel.from_pretrained(str(local), dtype=getattr(torch, dtype)))
        model.value_head.weight.data.copy_(load_file(str(local / HEAD_FILE))["weight"])
        return model
