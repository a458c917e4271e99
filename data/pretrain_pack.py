"""Tokenize cleaned documents and pack them into fixed-length pretraining sequences.

InternLM2 pretrains on packed text: documents are concatenated, each followed by EOS, and the stream is cut
into blocks of exactly `seq_len` tokens; a document longer than a block continues in the next one (spec 4:
"docs > 4096 are cut and the remainder is also used"). Each block also gets `position_ids` that restart at
0 at every document start and at the block start, so a varlen (FlashAttention cu_seqlens) trainer can keep
attention inside documents: the boundaries are exactly the positions where position_ids == 0. A trainer
that ignores them simply attends across documents, as plain packing does.

Output rows (Parquet): input_ids list<int32>[seq_len], position_ids list<int32>[seq_len].
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np


@dataclass
class TokenizerConfig:
    # "" = train a byte-level BPE (modeling.tiny.train_tokenizer, ChatML template) on the cleaned documents;
    # else a local directory or fsspec URL of a Hugging Face tokenizer (or model) to use as is.
    path: str = ""
    vocab_size: int = 2048
    max_train_docs: int = 200_000  # BPE training reads at most this many cleaned docs

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(
                f"tokenizer.vocab_size must be >= 300 (got {self.vocab_size}): a byte-level BPE needs 256 byte "
                "tokens plus the special tokens before it can learn any merge"
            )
        if self.max_train_docs < 1:
            raise ValueError(f"tokenizer.max_train_docs must be >= 1 (got {self.max_train_docs})")


@dataclass
class PackConfig:
    seq_len: int = 256
    tokenize_batch_docs: int = 256  # docs per tokenization call (parallel Ray tasks)
    rows_per_file: int = 100_000  # packed Parquet: at least this many sequences per file (the last one fewer)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"pack.seq_len must be >= 2 (got {self.seq_len})")
        if self.tokenize_batch_docs < 1 or self.rows_per_file < 1:
            raise ValueError("pack.tokenize_batch_docs and pack.rows_per_file must be >= 1")


# ---------------------------------------------------------------------------------------------- tokenize


@lru_cache(maxsize=2)
def tokenizer_from_json(spec: str):
    """A `tokenizers.Tokenizer` from the text of a tokenizer.json, built once per process. Ray workers get the
    JSON itself, not a path: they need neither the driver's disk nor a transformers import (seconds each)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(spec)


def tokenizer_json(tokenizer_dir: str | Path) -> str:
    """The tokenizer.json of a saved HF fast tokenizer."""
    file = Path(tokenizer_dir) / "tokenizer.json"
    if not file.exists():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json; save the tokenizer with a fast (Rust) backend")
    return file.read_text(encoding="utf-8")


def tokenize_texts(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each text with no special tokens (the packer adds EOS between documents). `tokenizer` is a
    `tokenizers.Tokenizer` or a transformers tokenizer; both give the same ids for the same tokenizer.json."""
    if hasattr(tokenizer, "encode_batch_fast"):
        return [e.ids for e in tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def ids_table(docs: Sequence[Sequence[int]]):
    import pyarrow as pa

    return pa.table({"ids": pa.array(docs, type=pa.list_(pa.int32()))})


def tokenize_batch(batch, tokenizer_spec: str, keep: Sequence[str] = ()):
    """Ray Data UDF: {"text", *keep} -> {"ids": list<int32>, *keep}; tokenizer_spec is the text of a
    tokenizer.json, `keep` names columns passed through (a document's keys, so the packer can restore its order)."""
    texts = batch["text"]
    texts = texts.to_pylist() if hasattr(texts, "to_pylist") else [str(t) for t in texts]
    table = ids_table(tokenize_texts(texts, tokenizer_from_json(tokenizer_spec)))
    for name in keep:
        table = table.append_column(name, batch[name])
    return table


# ---------------------------------------------------------------------------------------------- pack


def block_position_ids(starts: np.ndarray) -> np.ndarray:
    """starts: bool[n, L], True at the first token of a document. Position of token i = i - (index of the latest
    start at or before i), where index 0 of every block counts as a start."""
    n, length = starts.shape
    idx = np.broadcast_to(np.arange(length), (n, length))
    marks = np.where(starts, idx, 0)  # column 0 is always 0, i.e. a start
    return (idx - np.maximum.accumulate(marks, axis=1)).astype(np.int32)


def _join_with_eos(values: np.ndarray, offsets: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids of docs given as (values, offsets) -> (ids with EOS after each doc, doc-start flags)."""
    seg_len = np.diff(offsets) + 1  # every doc plus its EOS
    ends = np.cumsum(seg_len)
    ids = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    is_token = np.ones(len(ids), dtype=bool)
    is_token[ends - 1] = False
    ids[is_token] = values
    ids[ends - 1] = eos_id
    starts = np.zeros(len(ids), dtype=bool)
    starts[ends - seg_len] = True
    return ids, starts


class SequencePacker:
    """Concatenate docs (each + EOS) and cut blocks of exactly seq_len; the tail waits for the next batch.

    Fed in document order by one consumer (`pack_in_rank_order`), so only the final tail of the whole corpus
    (< seq_len tokens) is dropped. Tokens packed so far: `tokens_in`; emitted: `blocks * seq_len`.
    """

    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len, self.eos_id = seq_len, eos_id
        self._ids = np.zeros(0, dtype=np.int32)
        self._starts = np.zeros(0, dtype=bool)
        self.tokens_in = 0
        self.blocks = 0

    def add_flat(self, values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add docs given as flat values + offsets; returns (input_ids, position_ids), both int32[n, seq_len]."""
        values, offsets = np.asarray(values, dtype=np.int32), np.asarray(offsets, dtype=np.int64)
        ids, starts = _join_with_eos(values, offsets, self.eos_id)
        self.tokens_in += len(ids)
        ids = np.concatenate([self._ids, ids])
        starts = np.concatenate([self._starts, starts])
        n = len(ids) // self.seq_len
        cut = n * self.seq_len
        self._ids, self._starts = ids[cut:], starts[cut:]
        self.blocks += n
        blocks = ids[:cut].reshape(n, self.seq_len)
        return blocks, block_position_ids(starts[:cut].reshape(n, self.seq_len))

    def add(self, docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Add docs given as token lists or int arrays (arrays are not copied token by token)."""
        arrays = [np.asarray(d, dtype=np.int32) for d in docs]
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        return self.add_flat(values, offsets)


def pack_in_rank_order(batches: Iterable, total: int,
                       packer: SequencePacker) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pack documents 0..total-1 in rank order, whatever order their batches arrive in.

    batches: pyarrow tables {"rank": int64, "ids": list<int32>}, in any order and any split (Ray Data does not
    promise order, and once delivered a small block before the ones it followed). A document waits in a buffer
    until every lower rank has been packed, so the packed rows depend only on the documents and their ranks.
    Yields (input_ids, position_ids) arrays as `SequencePacker.add_flat` does."""
    pending: dict[int, np.ndarray] = {}
    next_rank = 0
    for batch in batches:
        col = batch.column("ids").combine_chunks()
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy()
        for i, rank in enumerate(batch.column("rank").to_numpy()):
            if rank in pending or not 0 <= rank < total or rank < next_rank:
                raise ValueError(f"document rank {rank} is out of range or repeated (expected ranks 0..{total - 1}, "
                                 "each once)")
            pending[int(rank)] = values[offsets[i] : offsets[i + 1]]
        run = []
        while next_rank in pending:
            run.append(pending.pop(next_rank))
            next_rank += 1
        if run:
            yield packer.add(run)
    if next_rank != total:
        raise ValueError(f"packing stopped at document {next_rank} of {total}: {len(pending)} documents arrived "
                         "without the ones before them")


def packed_table(blocks: np.ndarray, positions: np.ndarray):
    import pyarrow as pa

    n, length = blocks.shape
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))

    def as_list(a: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1).astype(np.int32)))

    return pa.table({"input_ids": as_list(blocks), "position_ids": as_list(positions)})


# ---------------------------------------------------------------------------------------------- reading back


def iter_parquet_texts(directory: str | Path, limit: int | None = None, column: str = "text") -> Iterator[str]:
    """Texts of the Parquet files under `directory`, in file order, at most `limit`."""
    import pyarrow.parquet as pq

    count = 0
    for path in sorted(Path(directory).glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if limit is not None and count >= limit:
                    return
                count += 1
                yield text


def parquet_num_rows(directory: str | Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in Path(directory).glob("*.parquet"))
