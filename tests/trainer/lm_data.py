"""Small training inputs for the trainer and job tests: a packed pretraining corpus made with the tiny tokenizer."""
from __future__ import annotations

from pathlib import Path


def make_packed_corpus(tokenizer_dir: Path, out_dir: Path, seq_len: int = 32, rows: int = 64) -> Path:
    """Fixed-length `input_ids` rows of concatenated stdlib docstrings (EOS between documents), as jobs/data.py
    writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from data.samples import stdlib_docstrings

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stream: list[int] = []
    for doc in stdlib_docstrings():
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= seq_len * rows:
            break
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table({"input_ids": [stream[i * seq_len : (i + 1) * seq_len] for i in range(rows)]})
    pq.write_table(table, out_dir / "part-00000.parquet")
    return out_dir
