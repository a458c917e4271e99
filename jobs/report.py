"""The eval run report: a Markdown table with one column per checkpoint, and PNG plots (needle heatmaps,
per-domain bars, RLHF training curves read back from an RLHF run's metrics.jsonl). Used by jobs/eval.py.

`results` below is jobs/eval.py's per-checkpoint dict: name -> {"engine", "path", "perplexity",
"domain_scores", "win_rate", "needle"}, where a suite that did not run (or does not apply) is None.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The RLHF job's per-iteration keys (jobs/rlhf.py); any that are absent are simply not plotted.
RLHF_CURVES = (("reward/raw_mean", "reward (raw mean)"), ("kl", "KL to reference"),
               ("response_length/mean", "response length (tokens)"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- table


def summary_rows(results: dict[str, dict], baseline: str | None) -> tuple[list[str], list[list[Any]]]:
    """Rows of (metric, value per checkpoint): the side-by-side table, shared by Markdown and W&B."""
    names = list(results)
    rows: list[list[Any]] = [["engine"] + [results[n]["engine"] for n in names]]

    def add(label: str, get) -> None:
        values = [get(results[n]) for n in names]
        if any(v is not None for v in values):
            rows.append([label] + values)

    add("perplexity (lower is better)", lambda r: (r["perplexity"] or {}).get("value"))
    domains = sorted({d for r in results.values() for d in (r["domain_scores"] or {})})
    for d in domains:
        add(f"score: {d}", lambda r, d=d: (r["domain_scores"] or {}).get(d))
    if domains:
        add("score: mean over domains",
            lambda r: sum(r["domain_scores"].values()) / len(r["domain_scores"]) if r["domain_scores"] else None)
    for judge in ("rm", "annotator"):
        if any((r["win_rate"] or {}).get(judge) is not None for r in results.values()):
            add(f"win rate vs {baseline} ({judge})",
                lambda r, j=judge: "baseline" if r.get("is_baseline") else (r["win_rate"] or {}).get(j))
    add("needle: mean (0-100)", lambda r: (r["needle"] or {}).get("mean"))
    add("needle: exact match", lambda r: (r["needle"] or {}).get("exact_match"))
    lengths = sorted({int(n) for r in results.values() for n in ((r["needle"] or {}).get("by_length") or {})})
    for n in lengths:
        add(f"needle: {n} tokens", lambda r, n=n: ((r["needle"] or {}).get("by_length") or {}).get(str(n)))
    return ["metric"] + names, rows


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def markdown_report(results: dict[str, dict], baseline: str | None, plots: dict[str, str],
                    rlhf_rounds: list[dict] | None = None, notes: Sequence[str] = ()) -> str:
    columns, rows = summary_rows(results, baseline)
    parts = ["# Evaluation report", "", markdown_table(columns, rows), ""]
    parts += [f"- `{n}`: {r['path']}" for n, r in results.items()]
    parts += [f"- {note}" for note in notes]
    if rlhf_rounds:
        keys = [k for k, _ in RLHF_CURVES if any(k in r for r in rlhf_rounds)]
        parts += ["", "## RLHF run: per-round means", "",
                  markdown_table(["round", "iterations"] + keys,
                                 [[r["round"], r["iterations"]] + [r.get(k) for k in keys] for r in rlhf_rounds])]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{key}]({Path(p).name})" for key, p in plots.items()]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- plots


def needle_heatmap(needle: dict, title: str, path: str | Path) -> Path:
    """Depth (rows, 0 % = start of the haystack) by context length (columns), CDME score 0..100 per cell."""
    plt = _plt()
    grid, depths, lengths = needle["grid"], needle["depths"], needle["lengths"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.55 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title}: needle score (mean {needle['mean']:.1f})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def domain_bars(scores: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Per-domain oracle score, one bar per checkpoint within each domain group."""
    plt = _plt()
    names = list(scores)
    domains = sorted({d for s in scores.values() for d in s})
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(domains), 3.5))
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(domains))]
        ax.bar(xs, [scores[name].get(d, 0.0) for d in domains], width=width, label=name)
    ax.set_xticks(range(len(domains)), domains, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("oracle score")
    ax.legend(fontsize=8)
    ax.set_title("held-out score per domain")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl (blank or truncated trailing lines of a still-running job are skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def rlhf_rows(rows: list[dict]) -> list[dict]:
    """Per-iteration rows: those with at least one curve key and a numeric value for it."""
    return [r for r in rows if any(isinstance(r.get(k), (int, float)) for k, _ in RLHF_CURVES)]


def rlhf_round_means(rows: list[dict]) -> list[dict]:
    """Mean of each curve key per `round` (rows without a round count as round 0)."""
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("round", 0), []).append(r)
    out = []
    for rnd, rs in groups.items():
        entry: dict[str, Any] = {"round": rnd, "iterations": len(rs)}
        for key, _ in RLHF_CURVES:
            vals = [float(r[key]) for r in rs if isinstance(r.get(key), (int, float))]
            if vals:
                entry[key] = sum(vals) / len(vals)
        out.append(entry)
    return out


def rlhf_curves(rows: list[dict], path: str | Path) -> Path | None:
    """Reward / KL / length per iteration, with dashed lines where a new round starts; None when nothing to plot."""
    keys = [(k, label) for k, label in RLHF_CURVES if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    plt = _plt()
    xs = [r["step"] if isinstance(r.get("step"), (int, float)) else i for i, r in enumerate(rows)]
    starts = [xs[i] for i in range(1, len(rows)) if rows[i].get("round") != rows[i - 1].get("round")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], keys):
        pts = [(x, float(r[key])) for x, r in zip(xs, rows) if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        for s in starts:
            ax.axvline(s, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel(label, fontsize=8)
    axes[-1, 0].set_xlabel("iteration" + (" (dashed: new round)" if starts else ""))
    fig.suptitle("RLHF training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
