"""The eval report pieces (jobs/report.py): the side-by-side Markdown table and the PNG plots."""
from __future__ import annotations

import json

import pytest

from jobs import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _needle(grid, lengths=(100, 200), depths=(0.0, 100.0)):
    flat = [v for row in grid for v in row]
    return {"lengths": list(lengths), "depths": list(depths), "grid": grid, "mean": sum(flat) / len(flat),
            "by_length": {str(n): sum(row[j] for row in grid) / len(grid) for j, n in enumerate(lengths)},
            "by_depth": {f"{d:g}": sum(row) / len(row) for d, row in zip(depths, grid)}}


def _results():
    return {
        "sft": {"engine": "hf", "path": "/m/sft", "perplexity": {"value": 12.5}, "is_baseline": True,
                "domain_scores": {"math": 0.25, "code": 0.5}, "win_rate": None,
                "needle": _needle([[50, 0], [100, 10]])},
        "rlhf": {"engine": "hf", "path": "/m/rlhf", "perplexity": {"value": 14.0},
                 "domain_scores": {"math": 0.75, "code": 0.5},
                 "win_rate": {"baseline": "sft", "rm": 0.8, "annotator": 0.6},
                 "needle": _needle([[100, 100], [100, 60]])},
        "upper": {"engine": "reference", "path": "/m/sft", "perplexity": None,
                  "domain_scores": {"math": 1.0, "code": 1.0},
                  "win_rate": {"baseline": "sft", "rm": None, "annotator": 1.0}, "needle": None},
    }


def _table(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_markdown_has_one_column_per_checkpoint_and_the_values():
    md = report.markdown_report(_results(), "sft", {"needle/sft": "/run/needle_sft.png"})
    rows = _table(md)
    assert rows[0] == ["metric", "sft", "rlhf", "upper"]
    assert all(len(r) == 4 for r in rows)
    by_metric = {r[0]: r[1:] for r in rows[2:]}
    assert by_metric["perplexity (lower is better)"] == ["12.500", "14.000", "n/a"]
    assert by_metric["score: math"] == ["0.250", "0.750", "1.000"]
    assert by_metric["score: mean over domains"] == ["0.375", "0.625", "1.000"]  # (0.25+0.5)/2, (0.75+0.5)/2
    assert by_metric["win rate vs sft (rm)"] == ["baseline", "0.800", "n/a"]
    assert by_metric["win rate vs sft (annotator)"] == ["baseline", "0.600", "1.000"]
    assert by_metric["needle: 200 tokens"] == ["5.000", "80.000", "n/a"]  # (0+10)/2, (100+60)/2
    assert "![needle/sft](needle_sft.png)" in md


def test_judge_rows_are_left_out_when_no_checkpoint_was_judged():
    results = _results()
    for r in results.values():
        r["win_rate"] = None
    metrics = [r[0] for r in _table(report.markdown_report(results, None, {}))]
    assert not any(m.startswith("win rate") for m in metrics)


def test_needle_heatmap_and_domain_bars_are_pngs(tmp_path):
    heat = report.needle_heatmap(_needle([[100, 0], [50, 25]]), "sft", tmp_path / "needle.png")
    bars = report.domain_bars({n: r["domain_scores"] for n, r in _results().items()}, tmp_path / "bars.png")
    for path in (heat, bars):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000


def _write_metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "kl"')  # a half-written last line


def test_rlhf_curves_per_round(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [
        {"step": None, "config/loaded": 1},  # not an iteration row
        {"step": 0, "round": 0, "reward/raw_mean": 0.1, "kl": 0.0, "response_length/mean": 10},
        {"step": 1, "round": 0, "reward/raw_mean": 0.3, "kl": 0.02, "response_length/mean": 12},
        {"step": 2, "round": 1, "reward/raw_mean": 0.5, "kl": 0.04, "response_length/mean": 20},
    ])
    rows = report.rlhf_rows(report.read_metrics(metrics))
    assert [r["step"] for r in rows] == [0, 1, 2]
    means = report.rlhf_round_means(rows)
    # round 0: reward (0.1+0.3)/2 = 0.2, kl 0.01, length 11; round 1: its single row.
    assert means[0] == {"round": 0, "iterations": 2, "reward/raw_mean": pytest.approx(0.2), "kl": pytest.approx(0.01),
                        "response_length/mean": 11.0}
    assert means[1]["reward/raw_mean"] == 0.5
    png = report.rlhf_curves(rows, tmp_path / "curves.png")
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_rlhf_curves_degrade_when_keys_are_missing(tmp_path):
    only_kl = [{"step": i, "kl": 0.1 * i} for i in range(3)]
    assert report.rlhf_curves(only_kl, tmp_path / "kl.png").read_bytes().startswith(PNG_MAGIC)
    assert report.rlhf_round_means(only_kl) == [{"round": 0, "iterations": 3, "kl": pytest.approx(0.1)}]
    assert report.rlhf_curves([{"step": 0, "loss": 1.0}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
