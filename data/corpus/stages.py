"""The stages applied to column batches, and the per-stage report.

Documents are not filtered out as they go: a removed document keeps its row with `drop_stage` (the stage
that removed it) and `drop_reason`, and its text is cut to `example_chars`. Every later stage skips rows that
are already dropped. So one pass at the end gives both the cleaned corpus (drop_stage == "") and exact
per-stage counts with examples, with no side channel between Ray workers.
"""
from __future__ import annotations

import json

import numpy as np

from data.corpus.config import READ_STAGE, STAGES, CorpusConfig
from data.corpus.dedup import exact_hash, minhash_signature, signature_to_bytes
from data.corpus.filters import (
    length_reason,
    line_quality_reason,
    normalize_text,
    repetition_reason,
    symbols_reason,
)
from data.corpus.quality import score_texts
from data.corpus.safety import safety_reason

CLEAN_COLUMNS = ["id", "text", "url", "date", "source", "line", "quality_score"]


def _columns(batch: dict) -> dict[str, list]:
    return {k: list(v) for k, v in batch.items()}


def _to_arrays(cols: dict[str, list]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in cols.items():
        if k in ("line",):
            out[k] = np.asarray(v, dtype=np.int64)
        elif k == "quality_score":
            out[k] = np.asarray(v, dtype=np.float64)
        else:
            out[k] = np.array(v, dtype=object)
    return out


def _drop(cols: dict[str, list], i: int, stage: str, reason: str, example_chars: int) -> None:
    cols["drop_stage"][i] = stage
    cols["drop_reason"][i] = reason
    cols["text"][i] = str(cols["text"][i])[:example_chars]


def rule_stages(batch: dict, cfg: CorpusConfig) -> dict[str, np.ndarray]:
    """normalize -> length -> symbols -> repetition -> line_quality, then the dedup keys of the survivors
    (`doc_hash`, MinHash `signature` bytes) so the single global dedup actor only does look-ups."""
    cols = _columns(batch)
    rules = (
        ("length", cfg.length.enabled, lambda t: length_reason(t, cfg.length)),
        ("symbols", cfg.symbols.enabled, lambda t: symbols_reason(t, cfg.symbols)),
        ("repetition", cfg.repetition.enabled, lambda t: repetition_reason(t, cfg.repetition)),
        ("line_quality", cfg.line_quality.enabled, lambda t: line_quality_reason(t, cfg.line_quality)),
    )
    n = len(cols["id"])
    hashes, signatures = [""] * n, [b""] * n
    for i in range(n):
        if cols["drop_stage"][i]:
            continue
        text = normalize_text(str(cols["text"][i]), cfg.normalize)
        cols["text"][i] = text
        if not text:
            _drop(cols, i, "normalize", "empty after normalization", cfg.example_chars)
            continue
        for stage, enabled, check in rules:
            reason = check(text) if enabled else None
            if reason:
                _drop(cols, i, stage, reason, cfg.example_chars)
                break
        else:
            hashes[i] = exact_hash(text)
            if cfg.dedup.near.enabled:
                signatures[i] = signature_to_bytes(minhash_signature(text, cfg.dedup.near))
    cols["doc_hash"], cols["signature"] = hashes, signatures
    return _to_arrays(cols)


def late_stages(batch: dict, cfg: CorpusConfig) -> dict[str, np.ndarray]:
    """safety -> quality on the rows that survived dedup; adds `quality_score` (-1 where not scored) and cuts
    the text of rows the dedup actor removed."""
    cols = _columns(batch)
    cols.pop("doc_hash", None)
    cols.pop("signature", None)
    n = len(cols["id"])
    for i in range(n):
        if cols["drop_stage"][i] in ("exact_dedup", "near_dedup"):
            cols["text"][i] = str(cols["text"][i])[: cfg.example_chars]
        elif not cols["drop_stage"][i] and cfg.safety.enabled:
            reason = safety_reason(str(cols["text"][i]), str(cols["url"][i]), cfg.safety)
            if reason:
                _drop(cols, i, "safety", reason, cfg.example_chars)
    scores = [-1.0] * n
    alive = [i for i in range(n) if not cols["drop_stage"][i]]
    if alive and cfg.quality.enabled:
        for i, score in zip(alive, score_texts([str(cols["text"][i]) for i in alive], cfg.quality)):
            scores[i] = score
            if score < cfg.quality.threshold:
                reason = f"quality score {score:.2f} < threshold {cfg.quality.threshold}"
                _drop(cols, i, "quality", reason, cfg.example_chars)
    cols["quality_score"] = scores
    return _to_arrays(cols)


def kept_rows(batch: dict) -> dict[str, np.ndarray]:
    """The cleaned corpus: rows no stage removed, in CLEAN_COLUMNS."""
    keep = np.array([not s for s in batch["drop_stage"]], dtype=bool)
    return {c: np.asarray(batch[c])[keep] for c in CLEAN_COLUMNS}


# ---------------------------------------------------------------------------------------------- report


def summarize_batch(batch: dict, max_examples: int) -> dict[str, list]:
    """One row per batch: {"part": JSON of {rows, removed: {stage: n}, examples: {stage: [...]}}}."""
    removed: dict[str, int] = {}
    examples: dict[str, list[dict]] = {}
    for i, stage in enumerate(batch["drop_stage"]):
        if not stage:
            continue
        removed[stage] = removed.get(stage, 0) + 1
        bucket = examples.setdefault(stage, [])
        if len(bucket) < max_examples:
            bucket.append({
                "id": str(batch["id"][i]), "reason": str(batch["drop_reason"][i]), "text": str(batch["text"][i]),
            })
    part = {"rows": len(batch["drop_stage"]), "removed": removed, "examples": examples}
    return {"part": [json.dumps(part)]}


def build_report(parts: list[str], max_examples: int, enabled: dict[str, bool] | None = None) -> dict:
    """Merge batch summaries into: docs_in, malformed_rows, docs_out, stages[{stage, input, kept, removed,
    examples}] in pipeline order. A stage's input is what the stages before it kept."""
    rows = 0
    removed = {s: 0 for s in (READ_STAGE, *STAGES)}
    examples: dict[str, list[dict]] = {s: [] for s in removed}
    for raw in parts:
        part = json.loads(raw)
        rows += part["rows"]
        for stage, n in part["removed"].items():
            removed[stage] += n
        for stage, items in part["examples"].items():
            examples[stage].extend(items[: max_examples - len(examples[stage])])
    docs_in = rows - removed[READ_STAGE]
    remaining = docs_in
    stages = []
    for stage in STAGES:
        n = removed[stage]
        stages.append({
            "stage": stage, "enabled": True if enabled is None else enabled[stage], "input": remaining,
            "kept": remaining - n, "removed": n, "examples": examples[stage],
        })
        remaining -= n
    return {
        "docs_in": docs_in,
        "malformed_rows": removed[READ_STAGE],
        "malformed_examples": examples[READ_STAGE],
        "docs_out": remaining,
        "stages": stages,
    }


def stage_switches(cfg: CorpusConfig) -> dict[str, bool]:
    return {
        "normalize": True, "length": cfg.length.enabled, "symbols": cfg.symbols.enabled,
        "repetition": cfg.repetition.enabled, "line_quality": cfg.line_quality.enabled,
        "exact_dedup": cfg.dedup.exact.enabled, "near_dedup": cfg.dedup.near.enabled,
        "safety": cfg.safety.enabled, "quality": cfg.quality.enabled,
    }
