"""Shippable text for bootstrapping: Python standard-library docstrings (PSF licence) on this machine."""
from __future__ import annotations

import importlib
import inspect

_MODULES = [
    "json", "os", "pathlib", "collections", "functools", "itertools", "re", "string", "textwrap", "datetime",
    "random", "statistics", "math", "heapq", "bisect", "dataclasses", "typing", "argparse", "logging", "csv",
    "shutil", "tempfile", "unittest", "difflib", "enum", "fractions", "decimal", "calendar", "zipfile", "gzip",
]


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Docstrings of stdlib modules and their public members, deduplicated, in a stable order."""
    seen: set[str] = set()
    out: list[str] = []
    for name in _MODULES:
        mod = importlib.import_module(name)
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)) else None
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return out


def tokenizer_training_texts() -> list[str]:
    """Enough varied text to train a small BPE, plus ChatML-shaped lines so chat markup tokenizes compactly."""
    chat = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
    ] * 20
    return stdlib_docstrings() + chat
