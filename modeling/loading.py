"""Loading any HF causal LM and tokenizer from a local path or a user-given fsspec URL (never a hub download)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def resolve_checkpoint(path: str, cache_dir: str | None = None) -> Path:
    """Return a local directory for `path`. Local dirs pass through; other fsspec URLs (s3://, gs://, http(s)://
    of a directory listing, file://) are copied once into a cache keyed by the URL."""
    if "://" not in path or path.startswith("file://"):
        local = Path(path.removeprefix("file://")).expanduser()
        if not local.is_dir():
            raise FileNotFoundError(
                f"model path {path!r} is not a directory. Give a local HF checkpoint directory (with config.json) "
                "or an fsspec URL; coolray never downloads from the Hugging Face hub."
            )
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"{local} has no config.json: it is not a Hugging Face model directory")
        return local
    import fsspec

    cache = Path(cache_dir or os.environ.get("COOLRAY_CACHE", Path.home() / ".cache" / "coolray"))
    dest = cache / hashlib.sha1(path.encode()).hexdigest()[:16]
    if not (dest / "config.json").exists():
        fs, root = fsspec.core.url_to_fs(path)
        dest.mkdir(parents=True, exist_ok=True)
        fs.get(root.rstrip("/") + "/", str(dest), recursive=True)
    return dest


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_checkpoint(path)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(resolve_checkpoint(path)), dtype=getattr(torch, dtype))
