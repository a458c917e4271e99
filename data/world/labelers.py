"""Who labels a comparison: the world's annotators, a file of human labels, or a remote judge over HTTP.

All three answer `label(comparisons) -> list[0 | 1 | "tie" | None]` (0 = `a` preferred, 1 = `b`, TIE = labelled,
neither is better, None = not labelled yet), so the online RLHF loop can swap a programmatic annotator for slow
human labels without other changes. A tie is an answer, not a pending label: it gives no preference pair and is
never asked again.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from data.io import DataError, read_jsonl
from data.world.core import Prompt
from data.world.registry import score


TIE = "tie"
Label = int | str | None  # 0, 1, TIE or None
_ANSWERS = (0, 1, TIE)


def _is_answer(y) -> bool:
    return y in _ANSWERS and not isinstance(y, bool)


@dataclass(frozen=True)
class Comparison:
    """Two responses to one prompt, waiting for a preference. `id` keys human labels in files."""

    id: str
    prompt: Prompt
    a: str
    b: str


@runtime_checkable
class Labeler(Protocol):
    def label(self, comparisons: Sequence[Comparison]) -> list[Label]:
        """One label per comparison: 0 (a preferred), 1 (b preferred), TIE, or None (no label yet)."""


def to_preference_rows(comparisons: Sequence[Comparison], labels: Sequence[int | None]) -> list[dict]:
    """coolray preference rows for the comparisons labelled 0 or 1; ties and unlabelled ones are left out."""
    if len(comparisons) != len(labels):
        raise ValueError(f"{len(comparisons)} comparisons but {len(labels)} labels")
    rows = []
    for c, y in zip(comparisons, labels):
        if y not in (0, 1):
            continue
        chosen, rejected = (c.a, c.b) if y == 0 else (c.b, c.a)
        rows.append({"id": c.id, "domain": c.prompt.domain, "prompt_id": c.prompt.id,
                     "messages": c.prompt.messages, "chosen": chosen, "rejected": rejected})
    return rows


class ProgrammaticLabeler:
    """The world's annotators (the oracle of each prompt's domain). Always answers: TIE when the oracle scores
    both responses the same (two wrong answers, say), since either order would teach the RM noise."""

    def label(self, comparisons: Sequence[Comparison]) -> list[Label]:
        out: list[Label] = []
        for c in comparisons:
            a, b = score(c.prompt, c.a), score(c.prompt, c.b)  # once each: the code oracle runs the code
            out.append(TIE if a == b else 0 if a > b else 1)
        return out


class FileLabeler:
    """Human labels from a JSONL file, one `{"id": "<comparison id>", "label": 0 | 1 | "tie"}` per line.

    The file is re-read on every call, so labels appended while a run goes on are picked up by the next
    round, like slow human annotation. Ids not (yet) in the file give None; a later line for the same id wins.
    A missing file is an error unless `missing_ok` (labelling has not started yet).
    """

    def __init__(self, path: str | os.PathLike, missing_ok: bool = False):
        self.path, self.missing_ok = Path(path), missing_ok

    def _read(self) -> dict[str, Label]:
        if not self.path.exists():
            if self.missing_ok:
                return {}
            raise FileNotFoundError(f"label file {self.path} does not exist (pass missing_ok=True before labelling starts)")
        labels: dict[str, Label] = {}
        for lineno, row in read_jsonl(self.path):
            if not isinstance(row.get("id"), str) or not row["id"]:
                raise DataError(self.path, lineno, "id", "must be the comparison id (a non-empty string)")
            if not _is_answer(row.get("label")):
                raise DataError(self.path, lineno, "label",
                                f'must be 0 (a preferred), 1 (b preferred) or "tie", got {row.get("label")!r}')
            labels[row["id"]] = row["label"]
        return labels

    def label(self, comparisons: Sequence[Comparison]) -> list[Label]:
        labels = self._read()
        return [labels.get(c.id) for c in comparisons]


class JudgeError(RuntimeError):
    """The HTTP judge could not be reached or answered something other than the documented reply."""


class HttpJudgeLabeler:
    """Asks a judge service over HTTP.

    Request (POST `url`, JSON): {"pairs": [{"id", "domain", "messages", "a", "b"}, ...]}, at most `batch_size`
    pairs per request. Reply (200, JSON): {"labels": [0 | 1 | "tie" | null, ...]}, one per pair in the same order
    (0 = a preferred, "tie" = neither, null = the judge abstains: asked again later). Anything else raises JudgeError naming the URL and problem.
    """

    def __init__(self, url: str, timeout_s: float = 30.0, batch_size: int = 32, headers: dict | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or batch_size < 1:
            raise ValueError("timeout_s must be > 0 and batch_size >= 1")
        self.url, self.timeout_s, self.batch_size, self.headers = url, timeout_s, batch_size, dict(headers or {})

    def label(self, comparisons: Sequence[Comparison]) -> list[Label]:
        out: list[Label] = []
        for start in range(0, len(comparisons), self.batch_size):
            out.extend(self._ask(comparisons[start : start + self.batch_size]))
        return out

    def _ask(self, batch: Sequence[Comparison]) -> list[Label]:
        import requests

        body = {"pairs": [{"id": c.id, "domain": c.prompt.domain, "messages": c.prompt.messages, "a": c.a, "b": c.b}
                          for c in batch]}
        try:
            reply = requests.post(self.url, json=body, timeout=self.timeout_s, headers=self.headers)
        except requests.Timeout:
            raise JudgeError(f"judge {self.url} did not answer within {self.timeout_s:g}s "
                             f"({len(batch)} pairs); raise timeout_s or lower batch_size") from None
        except requests.RequestException as e:
            raise JudgeError(f"cannot reach judge {self.url}: {e}") from None
        if reply.status_code != 200:
            raise JudgeError(f"judge {self.url} answered HTTP {reply.status_code}: {reply.text[:300]}")
        try:
            labels = reply.json()["labels"]
        except (ValueError, KeyError, TypeError):
            raise JudgeError(f'judge {self.url} reply must be JSON {{"labels": [...]}}, got: {reply.text[:300]}') from None
        if not isinstance(labels, list) or len(labels) != len(batch):
            raise JudgeError(f"judge {self.url} returned {len(labels) if isinstance(labels, list) else labels!r} "
                             f"labels for {len(batch)} pairs; expected one per pair, in order")
        bad = [y for y in labels if y is not None and not _is_answer(y)]
        if bad:
            raise JudgeError(f'judge {self.url} labels must be 0, 1, "tie" or null, got {bad[:3]}')
        return list(labels)


def write_labels(path: str | os.PathLike, ids: Sequence[str], labels: Sequence[Label]) -> None:
    """Append labels in FileLabeler's format (what a labelling tool would write)."""
    with open(path, "a") as f:
        for i, y in zip(ids, labels):
            f.write(json.dumps({"id": i, "label": y if y == TIE else int(y)}) + "\n")
