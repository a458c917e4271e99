"""Which model a job starts from."""
from __future__ import annotations

from dataclasses import dataclass, field

from modeling.tiny import TinyModelSpec


@dataclass
class ModelConfig:
    # A local HF checkpoint directory or an fsspec URL the user gives. "" = build the tiny default from `tiny`
    # (random init) with the tokenizer at `tokenizer_path`.
    path: str = ""
    tokenizer_path: str = ""  # "" = same as `path`
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (training keeps fp32 master weights on CPU)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16 (got {self.dtype!r})")
        # An empty path and tokenizer_path are allowed here (a job may fill them from a previous stage's summary);
        # where a model is loaded, an empty path means the embedded tiny model.

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer_path or self.path
