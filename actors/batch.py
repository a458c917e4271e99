"""The token batch every RLHF role works on, and how it is split over ranks and micro-batches.

A rollout batch holds B (prompt, response) pairs laid out as one rectangle `[B, P + T]`:

    [pad pad p p p p | r r r r pad pad]      prompt left-padded to P, response right-padded to T
                   ^ position P - 1 predicts the first response token

so response token t of every row sits at column P + t, and the logits / hidden state that predict it (or value the
state before it) sit at column P - 1 + t. `response_mask` `[B, T]` marks real response tokens. Position ids count
real tokens only, so left padding does not shift RoPE (the rollout engine pads the same way).

Batches are plain dicts of tensors (cheap to ship through Ray's object store): tensors whose first dimension is B are
split by rows; anything else (e.g. the global loss denominators) is copied to every part.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

Batch = dict[str, torch.Tensor]


def build_sequence_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """`input_ids`, `attention_mask`, `position_ids` `[B, P + T]` and `response_mask` `[B, T]` (float)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many responses as prompts, and at least one (got {len(prompts)}, {len(responses)})")
    if any(not p for p in prompts) or any(not r for r in responses):
        raise ValueError("every prompt and every response needs at least one token")
    width_p, width_t = max(len(p) for p in prompts), max(len(r) for r in responses)
    ids = torch.full((len(prompts), width_p + width_t), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response_mask = torch.zeros((len(prompts), width_t), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p, dtype=torch.long)
        ids[i, width_p : width_p + len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, width_p - len(p) : width_p + len(r)] = 1
        response_mask[i, : len(r)] = 1.0
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": positions, "response_mask": response_mask}


def build_lm_batch(sequences: list[list[int]], pad_id: int) -> Batch:
    """A right-padded language-modelling batch (PTX): `input_ids`, `attention_mask` `[B, L]`, `loss_mask` `[B, L-1]`
    (1 where token l + 1 is real and is predicted from its prefix)."""
    if not sequences or any(len(s) < 2 for s in sequences):
        raise ValueError("an LM batch needs at least one sequence, each of at least 2 tokens")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": attention[:, 1:].float()}


def response_width(batch: Batch) -> tuple[int, int]:
    """(P, T): prompt and response widths of a sequence batch."""
    width_t = batch["response_mask"].shape[1]
    return batch["input_ids"].shape[1] - width_t, width_t


def num_rows(batch: Batch) -> int:
    return batch["input_ids"].shape[0]


def _is_row_tensor(value, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


def slice_rows(batch: Batch, start: int, stop: int) -> Batch:
    rows = num_rows(batch)
    return {k: (v[start:stop] if _is_row_tensor(v, rows) else v) for k, v in batch.items()}


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    """`parts` contiguous row ranges of near-equal size (the first ones get the remainder); for DP shards."""
    rows = num_rows(batch)
    if parts < 1 or parts > rows:
        raise ValueError(f"cannot split {rows} rows into {parts} parts; use at most one part per row")
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [slice_rows(batch, bounds[i], bounds[i + 1]) for i in range(parts)]


def micro_batches(batch: Batch, size: int) -> Iterator[Batch]:
    """Consecutive row chunks of at most `size` rows."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1 (got {size})")
    rows = num_rows(batch)
    for start in range(0, rows, size):
        yield slice_rows(batch, start, min(start + size, rows))


def chunk_rows(batch: Batch | None, parts: int) -> list[Batch | None]:
    """`parts` chunks of `batch` (some may be None when it has fewer rows): pairs PTX chunks with policy micro-batches."""
    if batch is None or num_rows(batch) == 0:
        return [None] * parts
    rows = num_rows(batch)
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [slice_rows(batch, bounds[i], bounds[i + 1]) if bounds[i + 1] > bounds[i] else None for i in range(parts)]


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Re-assemble per-rank `[b_i, T]` results into `[B, T]` (all parts share T: shards keep the batch's widths)."""
    return torch.cat(parts, dim=0)


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def causal_lm_response_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Logits `[B, T, V]` aligned so that `[:, t]` predicts response token t (see the module docstring)."""
    width_p, width_t = response_width(batch)
    # logits_to_keep = T + 1 keeps columns P - 1 .. P + T - 1; the last one predicts past the batch and is dropped.
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        use_cache=False, logits_to_keep=width_t + 1,
    )
    return out.logits[:, :width_t]


def response_tokens(batch: Batch) -> torch.Tensor:
    """The response token ids `[B, T]` (padding included; mask with `response_mask`)."""
    width_p, _ = response_width(batch)
    return batch["input_ids"][:, width_p:]
