"""The conditional reward model as a TrainTask: token-budget batches of preference pairs, focal + barrier loss.

    pairs = encode_pairs(read_preferences(...), encoder)          # driver: tokenize once (RewardEncoder)
    write_encoded(pairs, run_dir / "rm_data.parquet")
    task = RewardTask(data_path=..., tokenizer_path=..., model_path=<SFT dir>, rm=RewardModelConfig(...))
    cluster.train.fit(task, trainer_cfg, run_dir)                # DDP / DeepSpeed / LoRA: trainer.config

A micro-batch is built by token budget (`max_tokens_per_batch`, data.preferences.token_budget_batches), so
`trainer.micro_batch_size` is not used here. Rows 0..n-1 of a batch are the chosen replies and rows n..2n-1
the rejected ones of the same pairs. Each epoch draws a new seeded batch plan, dealt round-robin to the ranks
and cut to the same count on every rank. The loss is the mean over the micro-batch's pairs (spec §7.1);
because batches hold different pair counts, a pair in a small batch weighs a little more than in a large one
(XTuner divides by the global pair count instead).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from algo.rm_loss import RMLossConfig, compute_rm_loss
from data.preferences import PreferencePair, token_budget_batches
from modeling.reward import RewardEncoder, RewardModel, RewardModelConfig
from modeling.tiny import TinyModelSpec


@dataclass
class EncodedPair:
    domain: str
    chosen: list[int]
    rejected: list[int]


@dataclass
class EncodeStats:
    pairs: int = 0
    too_long: int = 0  # dropped: a side exceeds rm.max_length tokens
    identical: int = 0  # dropped: chosen == rejected (no preference to learn)


def encode_pairs(pairs: list[PreferencePair], encoder: RewardEncoder) -> tuple[list[EncodedPair], EncodeStats]:
    """Tokenize pairs with their domain condition; unknown domains raise (naming the pair and the known ones)."""
    out, stats = [], EncodeStats()
    limit = encoder.cfg.max_length
    for p in pairs:
        try:
            chosen = encoder.encode(p.domain, p.messages, p.chosen)
        except ValueError as e:
            raise ValueError(f"preference pair {p.id}: {e}") from None
        rejected = encoder.encode(p.domain, p.messages, p.rejected)
        if chosen == rejected:
            stats.identical += 1
        elif max(len(chosen), len(rejected)) > limit:
            stats.too_long += 1
        else:
            out.append(EncodedPair(p.domain, chosen, rejected))
    stats.pairs = len(out)
    return out, stats


def write_encoded(pairs: list[EncodedPair], path: str | Path, meta: dict | None = None) -> Path:
    """One Parquet file (domain, chosen, rejected), written atomically; what the workers read. `meta` goes beside
    it as meta.json, in the same atomic directory."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.io import atomic_dir

    path = Path(path)
    with atomic_dir(path) as tmp:
        table = pa.table({
            "domain": pa.array([p.domain for p in pairs], type=pa.string()),
            "chosen": pa.array([p.chosen for p in pairs], type=pa.list_(pa.int32())),
            "rejected": pa.array([p.rejected for p in pairs], type=pa.list_(pa.int32())),
        })
        pq.write_table(table, tmp / "pairs.parquet")
        if meta is not None:
            (tmp / "meta.json").write_text(json.dumps(meta))
    return path


def read_encoded(path: str | Path) -> list[EncodedPair]:
    import pyarrow.parquet as pq

    table = pq.read_table(str(Path(path) / "pairs.parquet")).to_pydict()
    return [EncodedPair(d, c, r) for d, c, r in zip(table["domain"], table["chosen"], table["rejected"])]


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows of the same pairs, right-padded (see RewardEncoder.collate)."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "reward_index": mask.sum(dim=1) - 1}


@dataclass
class RewardTask:
    name: ClassVar[str] = "reward"
    data_path: str  # write_encoded output
    tokenizer_path: str  # the tokenizer the pairs were encoded with (model dir or tokenizer dir)
    model_path: str = ""  # HF causal-LM checkpoint (the SFT model); "" = tiny random model from `tiny`
    init_rm_path: str = ""  # continue from a saved RM (backbone + head) instead, e.g. the previous online round's
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    loss_cfg: RMLossConfig = field(default_factory=RMLossConfig)
    max_tokens_per_batch: int = 16384  # padded tokens per micro-batch (the report: 16,384 per batch, packed)
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens_per_batch < 2 * self.rm.max_length:
            raise ValueError(
                f"max_tokens_per_batch={self.max_tokens_per_batch} cannot hold one pair of rm.max_length="
                f"{self.rm.max_length} tokens (needs >= {2 * self.rm.max_length}); raise it or lower rm.max_length"
            )
        self._pairs: list[EncodedPair] | None = None
        self._tokenizer = None
        self._plans: dict[int, list[list[int]]] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pairs"], state["_tokenizer"], state["_plans"] = None, None, {}  # re-read on the worker
        return state

    # -- data
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from modeling.reward import ensure_reward_token
            from trainer.lm_tasks import load_any_tokenizer

            self._tokenizer = load_any_tokenizer(self.tokenizer_path)
            ensure_reward_token(self._tokenizer)  # same id the driver encoded with (appended last)
        return self._tokenizer

    @property
    def pairs(self) -> list[EncodedPair]:
        if self._pairs is None:
            self._pairs = read_encoded(self.data_path)
            if not self._pairs:
                raise ValueError(f"{self.data_path} holds no preference pairs")
        return self._pairs

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            lengths = [(len(p.chosen), len(p.rejected)) for p in self.pairs]
            self._plans = {epoch: token_budget_batches(lengths, self.max_tokens_per_batch, seed=self.seed * 1000 + epoch)}
        return self._plans[epoch]

    def num_batches(self, rank: int, world_size: int, epoch: int) -> int:
        return len(self._plan(epoch)) // world_size

    def batches(self, rank: int, world_size: int, epoch: int):
        plan = self._plan(epoch)
        n = len(plan) // world_size
        pad = self.tokenizer.pad_token_id
        for idx in plan[rank::world_size][:n]:
            yield collate_pairs([self.pairs[i] for i in idx], pad)

    # -- model
    def build_model(self) -> torch.nn.Module:
        if self.init_rm_path:
            model = RewardModel.from_pretrained(self.init_rm_path, self.dtype)
            model.cfg = self.rm  # the registry being trained now (may add domains)
            return model.train()
        if self.model_path:
            from transformers import AutoModel

            from modeling.loading import resolve_checkpoint

            backbone = AutoModel.from_pretrained(str(resolve_checkpoint(self.model_path)), dtype=getattr(torch, self.dtype))
        else:
            from modeling.tiny import build_tiny_model

            backbone = build_tiny_model(self.tiny, self.tokenizer, seed=self.seed).model
        return RewardModel.from_backbone(backbone, self.tokenizer, self.rm, seed=self.seed)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        scores = model(batch["input_ids"], batch["attention_mask"], batch["reward_index"])
        n = scores.shape[0] // 2
        loss, metrics = compute_rm_loss(scores[:n], scores[n:], self.loss_cfg)
        metrics["tokens"] = float(batch["attention_mask"].sum())
        return loss, metrics

    def save_model(self, model: torch.nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir, self.tokenizer)
