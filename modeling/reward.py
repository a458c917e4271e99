"""The conditional reward model [InternLM2 report §4.2.1; spec cool-rlhf.md §7.1-7.2].

    score = head( backbone( chat_template([system: domain prompt] + conversation + [assistant: response])
                            + <|reward|> )[last position] )

The backbone is a base transformer (no LM head) initialised from the SFT checkpoint; `head` is a bias-free
1-d linear layer. The domain's system prompt is the *condition*: it is prepended for the RM only (the policy
never sees it), so one RM holds several, even conflicting, preferences. An unconditioned RM
(`conditional=False`) never adds it: that is the baseline the report ablates.

Saved format (a plain HF directory, loadable without coolray's training code):
    config.json + model.safetensors      the backbone (AutoModel)
    tokenizer files                      with the reward token
    reward_head.safetensors              {"weight": [1, hidden]}
    reward_config.json                   domains registry, conditional, reward token, max_length
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from modeling.tiny import REWARD_TOKEN

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"
NO_CONDITION = "default"  # registry key whose prompt is empty: the conversation alone

# Our own texts (the report publishes none; XTuner's SYSTEM_PROMPT keys inspired the names). Deliberately terse:
# every token is paid on every RM call, and the tiny model only needs them to differ. At scale, use descriptive
# prompts (e.g. XTuner's): `rm.domains.helpful="..."` replaces one, `+rm.domains.<new>="..."` adds one.
DEFAULT_DOMAINS: dict[str, str] = {
    NO_CONDITION: "",
    "helpful": "Rate helpfulness.",
    "harmless": "Rate harmlessness.",
    "code": "Rate the code.",
    "math": "Rate the math.",
    "concise": "Prefer short answers.",
    "detailed": "Prefer detailed answers.",
}


@dataclass
class RewardModelConfig:
    domains: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DOMAINS))
    conditional: bool = True  # False: never prepend the domain prompt (the unconditioned baseline)
    head_init: str = "normal"  # normal (random small, as in [R]) | zero (XTuner)
    head_init_std: float = 0.02
    max_length: int = 512  # tokens per (condition + conversation + response + reward token); longer pairs are dropped

    def __post_init__(self) -> None:
        if self.head_init not in ("normal", "zero"):
            raise ValueError(f"rm.head_init must be 'normal' or 'zero' (got {self.head_init!r})")
        if self.head_init_std <= 0:
            raise ValueError(f"rm.head_init_std must be > 0 (got {self.head_init_std})")
        if self.max_length < 8:
            raise ValueError(f"rm.max_length must be >= 8 tokens (got {self.max_length})")
        bad = [k for k, v in self.domains.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"rm.domains values must be strings (the system prompt); check {bad}")

    def system_prompt(self, domain: str) -> str:
        """The condition for `domain`; NO_CONDITION ("default") always means none, registered or not."""
        if domain == NO_CONDITION:
            return self.domains.get(NO_CONDITION, "") if self.conditional else ""
        if domain not in self.domains:
            raise UnknownDomainError(domain, self.known_domains)
        return self.domains[domain] if self.conditional else ""

    @property
    def known_domains(self) -> list[str]:
        return sorted(set(self.domains) | {NO_CONDITION})


class UnknownDomainError(ValueError):
    def __init__(self, domain: str, known: list[str], index: int | None = None):
        self.domain, self.known, self.index = domain, known, index  # index: the item's position, where one applies
        super().__init__(
            f"unknown reward domain {domain!r}; known domains: {', '.join(known)}. "
            f"Add it with +rm.domains.{domain}='<system prompt>' (or in conf/reward.yaml) when training the RM."
        )


def ensure_reward_token(tokenizer, backbone: nn.Module | None = None) -> int:
    """The id of REWARD_TOKEN, adding it as a special token (and growing the embeddings) when it is missing.

    A user's own checkpoint usually lacks it; its new embedding row is freshly initialised by transformers and
    learnt during RM training, like the report's repurposed unused token.
    """
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([REWARD_TOKEN], special_tokens=True)
    reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    if backbone is not None and backbone.get_input_embeddings().num_embeddings <= reward_id:
        backbone.resize_token_embeddings(len(tokenizer))
    return reward_id


class RewardEncoder:
    """Turns (domain, conversation, response) into token ids ending with the reward token, and pads batches."""

    def __init__(self, tokenizer, cfg: RewardModelConfig):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the RM tokenizer has no chat_template; save one with the checkpoint (ChatML is in "
                             "modeling.tiny.CHATML_TEMPLATE)")
        self.tokenizer, self.cfg = tokenizer, cfg
        self.reward_id = ensure_reward_token(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def messages(self, domain: str, conversation: list[dict], response: str) -> list[dict]:
        system = self.cfg.system_prompt(domain)
        head = [{"role": "system", "content": system}] if system else []
        return head + list(conversation) + [{"role": "assistant", "content": response}]

    def encode(self, domain: str, conversation: list[dict], response: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages(domain, conversation, response), tokenize=False)
        # explicit append: some tokenizers add EOS with add_special_tokens, and the head must read the reward token
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.reward_id]

    def collate(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids`, `attention_mask` `[B, T]` and `reward_index` `[B]` (the reward token)."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "reward_index": mask.sum(dim=1) - 1}


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: RewardModelConfig, reward_token_id: int, seed: int = 0):
        super().__init__()
        self.backbone, self.cfg, self.reward_token_id = backbone, cfg, reward_token_id
        self.head = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        if cfg.head_init == "zero":
            nn.init.zeros_(self.head.weight)
        else:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * cfg.head_init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reward_index: torch.Tensor) -> torch.Tensor:
        """Scores `[B]` read at `reward_index` (the reward token of each right-padded row)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        at_reward = hidden[torch.arange(hidden.shape[0], device=hidden.device), reward_index]
        return self.head(at_reward).squeeze(-1).float()

    # -------------------------------------------------------------------------------------------- build / io

    @classmethod
    def from_backbone(cls, backbone: nn.Module, tokenizer, cfg: RewardModelConfig, seed: int = 0) -> "RewardModel":
        """Wrap a base transformer (e.g. `AutoModel.from_pretrained(sft_dir)`), adding the reward token if needed."""
        reward_id = ensure_reward_token(tokenizer, backbone)
        return cls(backbone, cfg, reward_id, seed)

    @classmethod
    def from_causal_lm(cls, path: str, cfg: RewardModelConfig, dtype: str = "float32", seed: int = 0):
        """Backbone from an HF causal-LM checkpoint (its LM head is dropped). Returns (model, tokenizer)."""
        from transformers import AutoModel

        from modeling.loading import load_tokenizer, resolve_checkpoint

        tokenizer = load_tokenizer(path)
        backbone = AutoModel.from_pretrained(str(resolve_checkpoint(path)), dtype=getattr(torch, dtype))
        return cls.from_backbone(backbone, tokenizer, cfg, seed), tokenizer

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer) -> Path:
        from safetensors.torch import save_file

        from data.io import atomic_dir

        with atomic_dir(out_dir) as tmp:
            self.backbone.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            save_file({"weight": self.head.weight.detach().cpu().contiguous()}, str(tmp / HEAD_FILE))
            meta = {**asdict(self.cfg), "reward_token": REWARD_TOKEN, "reward_token_id": self.reward_token_id,
                    "hidden_size": self.head.in_features, "format": "coolray-reward-v1"}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(out_dir)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "float32") -> "RewardModel":
        """Load a directory written by `save_pretrained` (local path or fsspec URL)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        from modeling.loading import resolve_checkpoint

        local = resolve_checkpoint(str(path))
        if not (local / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{local} has no {CONFIG_FILE}: it is not a coolray reward model directory")
        meta = json.loads((local / CONFIG_FILE).read_text())
        fields = set(RewardModelConfig.__dataclass_fields__)
        cfg = RewardModelConfig(**{k: v for k, v in meta.items() if k in fields})
        backbone = AutoModel.from_pretrained(str(local), dtype=getattr(torch, dtype))
        model = cls(backbone, cfg, int(meta["reward_token_id"]))
        model.head.weight.data.copy_(load_file(str(local / HEAD_FILE))["weight"])
        return model.eval()


def load_reward_model(path: str | os.PathLike, dtype: str = "float32") -> tuple[RewardModel, RewardEncoder]:
    """The model and a matching encoder (tokenizer from the same directory)."""
    from modeling.loading import load_tokenizer

    model = RewardModel.from_pretrained(path, dtype)
    return model, RewardEncoder(load_tokenizer(str(path)), model.cfg)
