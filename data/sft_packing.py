"""Sequence packing for SFT without attention or loss crossing sample boundaries.

Samples are packed whole (never split) into rows of at most `max_length` tokens, after a seeded shuffle
(XTuner's shuffle_before_pack). Each row keeps the lengths of its samples; `collate` turns them into
`position_ids` that restart at 0 for every sample.

Why position_ids and not a hand-made 4D mask: transformers 5.19 (`masking_utils.find_packed_sequence_indices`,
used by Llama's `create_causal_mask`) detects the restarts when `attention_mask` is None and builds the
block-diagonal causal mask itself for the sdpa/eager/flex kernels, and flash-attention-2 turns the same
position_ids into varlen `cu_seqlens`. One input therefore works for every attention kernel, whereas a 4D mask
is rejected by flash attention. (It is skipped when a KV cache is passed, so training calls use use_cache=False.)
The first token of every sample gets label -100: it would otherwise be predicted from the previous sample.
Right padding forms a block of its own (positions from 0, labels -100) and so never touches a real sample.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from data.sft import IGNORE, EncodedSample


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    seq_lens: list[int]  # lengths of the samples in this row, in order


def pack_samples(samples: list[EncodedSample], max_length: int, seed: int = 0, shuffle: bool = True) -> list[PackedRow]:
    """Greedy sequential packing of whole samples (each already <= max_length) into rows of <= max_length."""
    order = list(range(len(samples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    rows: list[PackedRow] = []
    cur = PackedRow([], [], [])
    for i in order:
        s = samples[i]
        if len(s.input_ids) > max_length:
            raise ValueError(f"sample {i} has {len(s.input_ids)} tokens > max_length={max_length}; encode truncates first")
        if cur.seq_lens and len(cur.input_ids) + len(s.input_ids) > max_length:
            rows.append(cur)
            cur = PackedRow([], [], [])
        cur.input_ids += s.input_ids
        cur.labels += [IGNORE] + s.labels[1:]
        cur.seq_lens.append(len(s.input_ids))
    if cur.seq_lens:
        rows.append(cur)
    return rows


def one_per_row(samples: list[EncodedSample]) -> list[PackedRow]:
    """No packing: one sample per row (padded at collate time)."""
    return [PackedRow(list(s.input_ids), [IGNORE] + list(s.labels[1:]), [len(s.input_ids)]) for s in samples]


def position_ids_for(seq_lens: list[int], total: int) -> list[int]:
    """0..len-1 for each sample, then 0..pad-1 for the right padding (its own block)."""
    pos = [p for n in seq_lens for p in range(n)]
    return pos + list(range(total - len(pos)))


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows {input_ids, labels?, seq_lens?} -> right-padded tensors [B, T] with per-sample position_ids.

    Rows without labels train on every token; rows without seq_lens are one sample each."""
    width = max(len(r["input_ids"]) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        n = len(r["input_ids"])
        lab = list(r["labels"]) if r.get("labels") is not None else list(r["input_ids"])
        lens = list(r["seq_lens"]) if r.get("seq_lens") is not None else [n]
        ids.append(list(r["input_ids"]) + [pad_id] * (width - n))
        labels.append(lab + [IGNORE] * (width - n))
        pos.append(position_ids_for(lens, width))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
        "num_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows)),
    }


def write_rows(rows: list[PackedRow], out_dir: str | Path, rows_per_file: int = 50_000) -> Path:
    """Parquet (input_ids, labels, seq_lens list columns), written atomically as a directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        for k in range(0, max(len(rows), 1), rows_per_file):
            part = rows[k : k + rows_per_file]
            table = pa.table(
                {
                    "input_ids": pa.array([r.input_ids for r in part], type=pa.list_(pa.int32())),
                    "labels": pa.array([r.labels for r in part], type=pa.list_(pa.int32())),
                    "seq_lens": pa.array([r.seq_lens for r in part], type=pa.list_(pa.int32())),
                }
            )
            pq.write_table(table, tmp / f"part-{k // rows_per_file:05d}.parquet")
    return Path(out_dir)
