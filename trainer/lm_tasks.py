"""Causal-LM TrainTasks over token rows in Parquet: pretraining (packed corpus) and SFT (packed conversations).

Both read a directory of Parquet files with an `input_ids` list column and, optionally, `labels` (-100 = no
loss) and `seq_lens` (lengths of the samples packed into the row; see data.sft_packing). Each epoch is a seeded
permutation of the rows, dealt round-robin to the ranks and cut to the same number of micro-batches everywhere.
The tasks are small picklable descriptions: the rows are read lazily on each worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from data.io import DataError
from data.sft_packing import collate
from modeling.tiny import TinyModelSpec


def parquet_files(data_dir: str | Path) -> list[Path]:
    d = Path(data_dir)
    files = sorted(d.rglob("*.parquet")) if d.is_dir() else ([d] if d.suffix == ".parquet" and d.exists() else [])
    if not files:
        raise FileNotFoundError(f"{data_dir} holds no .parquet files (expected token rows with an input_ids column)")
    return files


def load_any_tokenizer(path: str):
    """A tokenizer from a model directory or a tokenizer-only directory (the data job's `tokenizer/`)."""
    local = Path(path)
    if "://" in path or (local / "config.json").exists():
        from modeling.loading import load_tokenizer

        return load_tokenizer(path)
    if not (local / "tokenizer_config.json").exists() and not (local / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"tokenizer path {path!r} has no tokenizer files (tokenizer.json / tokenizer_config.json); point "
            "model.tokenizer_path at the data job's <run>/tokenizer or at a model directory"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(local))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class _ListColumn:
    """A list<int> Parquet column as flat numpy values + offsets (row i = values[off[i]:off[i+1]])."""

    def __init__(self, chunked):
        arr = chunked.combine_chunks()
        self.offsets = arr.offsets.to_numpy()
        self.values = arr.values.to_numpy(zero_copy_only=False)

    def row(self, i: int) -> list[int]:
        return self.values[self.offsets[i] : self.offsets[i + 1]].tolist()


@dataclass
class CausalLMTask:
    name: ClassVar[str] = "causal_lm"
    data_dir: str
    tokenizer_path: str
    micro_batch_size: int = 8
    model_path: str = ""  # "" = the tiny model built from `tiny` (random init, seeded)
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    dtype: str = "float32"
    seed: int = 0
    load_in_4bit: bool = False  # QLoRA base weights (bitsandbytes NF4, CUDA only)

    def __post_init__(self) -> None:
        self._cols: dict[str, _ListColumn] | None = None
        self._tokenizer = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cols"], state["_tokenizer"] = None, None  # re-read on the worker, never shipped
        return state

    # -- data
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_any_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _columns(self) -> dict[str, _ListColumn]:
        if self._cols is None:
            import pyarrow.parquet as pq

            files = parquet_files(self.data_dir)
            schema = pq.read_schema(files[0])
            if "input_ids" not in schema.names:
                raise DataError(files[0], None, "input_ids", f"column is missing (columns: {schema.names})")
            names = [c for c in ("input_ids", "labels", "seq_lens") if c in schema.names]
            table = pq.ParquetDataset([str(f) for f in files]).read(columns=names)
            self._cols = {c: _ListColumn(table.column(c)) for c in names}
        return self._cols

    def num_rows(self) -> int:
        return len(self._columns()["input_ids"].offsets) - 1

    def _rank_rows(self, rank: int, world: int, epoch: int) -> np.ndarray:
        # Same permutation on every rank (seeded by seed and epoch), dealt round-robin, equal length per rank.
        n = self.num_rows()
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        return perm[rank::world][: n // world]

    def num_batches(self, rank: int, world_size: int, epoch: int) -> int:
        return (self.num_rows() // world_size) // self.micro_batch_size

    def batches(self, rank: int, world_size: int, epoch: int):
        cols = self._columns()
        rows = self._rank_rows(rank, world_size, epoch)
        pad = self.tokenizer.pad_token_id
        for b in range(self.num_batches(rank, world_size, epoch)):
            idx = rows[b * self.micro_batch_size : (b + 1) * self.micro_batch_size]
            yield collate([{c: col.row(int(i)) for c, col in cols.items()} for i in idx], pad)

    # -- model
    def build_model(self) -> torch.nn.Module:
        return self._build(quantize=self.load_in_4bit)

    def build_export_model(self) -> torch.nn.Module:
        """The full-precision base (for exporting QLoRA / ZeRO-3 training results)."""
        return self._build(quantize=False)

    def _build(self, quantize: bool) -> torch.nn.Module:
        if not self.model_path:
            from modeling.tiny import build_tiny_model

            return build_tiny_model(self.tiny, self.tokenizer, seed=self.seed)
        from modeling.loading import load_causal_lm, resolve_checkpoint

        if not quantize:
            return load_causal_lm(self.model_path, self.dtype)
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForCausalLM.from_pretrained(
            str(resolve_checkpoint(self.model_path)), quantization_config=bnb,
            device_map={"": torch.cuda.current_device()},
        )

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        # HF shifts labels and averages over the tokens with a label; use_cache=False keeps packing detection on.
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
        )
        return out.loss, {"tokens": float(batch["num_tokens"])}

    def save_model(self, model: torch.nn.Module, out_dir: Path) -> None:
        from modeling.tiny import save_pretrained

        save_pretrained(model, self.tokenizer, out_dir)


@dataclass
class PretrainTask(CausalLMTask):
    """Next-token loss on every token of the packed corpus rows."""

    name: ClassVar[str] = "pretrain"


@dataclass
class SFTTask(CausalLMTask):
    """Next-token loss on assistant tokens only (labels from data.sft), rows packed by data.sft_packing."""

    name: ClassVar[str] = "sft"


def chat_sample(model_dir: str, prompt: str, max_new_tokens: int = 32, device: str = "cpu") -> str:
    """Greedy reply of the HF model in `model_dir` to one user message, through its chat template."""
    from modeling.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).to(device).eval()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
