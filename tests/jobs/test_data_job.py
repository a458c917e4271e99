"""jobs/data.py end to end on the shipped sample and on small malformed inputs, in-process on the session Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.runtime_env import REPO_ROOT
from data.io import DataError
from data.samples import synthetic_articles
from jobs.common import execute, load_config
from jobs.data import DataJobConfig, main, resolve_path

SAMPLE = REPO_ROOT / "data" / "sample_corpus"


def _run(tmp_path: Path, *overrides: str) -> dict:
    cfg = load_config("data", DataJobConfig, [f"run.root={tmp_path}", "logging.wandb=disabled", *overrides])
    return json.loads(execute("data", cfg, main).read_text())


def _sample_rows() -> list[dict]:
    """The raw sample, counted independently of the pipeline: JSONL lines, Parquet rows, blank-line blocks."""
    rows = [json.loads(line) for p in sorted(SAMPLE.glob("*.jsonl")) for line in p.read_text().splitlines()]
    rows += pq.read_table(SAMPLE / "part-0003.parquet").to_pylist()
    blocks = [b for b in (SAMPLE / "part-0004.txt").read_text().split("\n\n") if b.strip()]
    return rows + [{"text": b, "kind": "txt"} for b in blocks]


def _read_dir(directory: str) -> list[dict]:
    files = sorted(Path(directory).glob("*.parquet"))
    assert files, f"no parquet files in {directory}"
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def test_relative_input_paths_fall_back_to_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as under `ray job submit`, where the cwd is Ray's copy of the working dir
    assert resolve_path("data/sample_corpus") == str(SAMPLE)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample_corpus").mkdir()  # a path that exists under the cwd wins
    assert resolve_path("data/sample_corpus") == str(tmp_path / "data" / "sample_corpus")
    assert resolve_path("s3://bucket/raw") == "s3://bucket/raw"


def test_data_job_on_the_shipped_sample(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default input path must resolve from anywhere
    s = _run(tmp_path)
    raw = _sample_rows()

    # counts: every raw row is a document in; every stage removed something; outputs add up
    assert s["docs_in"] == len(raw) and s["malformed_rows"] == 0
    assert all(n >= 1 for n in s["removed_by_stage"].values()), s["removed_by_stage"]
    assert list(s["removed_by_stage"]) == [
        "normalize", "length", "symbols", "repetition", "line_quality", "exact_dedup", "near_dedup", "safety",
        "quality",
    ]
    assert s["docs_out"] == s["docs_in"] - sum(s["removed_by_stage"].values())
    assert s["docs_per_second"] > 0

    report = json.loads(Path(s["report"]).read_text())
    previous_kept = s["docs_in"]
    for stage in report["stages"]:
        assert stage["input"] == previous_kept and stage["kept"] == stage["input"] - stage["removed"]
        assert 1 <= len(stage["examples"]) <= 3 and all(e["reason"] for e in stage["examples"])
        previous_kept = stage["kept"]

    clean = _read_dir(s["clean_dir"])
    assert len(clean) == s["docs_out"] and len(list(Path(s["clean_dir"]).glob("*.parquet"))) == 1
    kept_ids = {r["id"] for r in clean}
    assert all(r["text"].strip() == r["text"] and r["text"] for r in clean)
    assert all(0.6 <= r["quality_score"] <= 1.0 for r in clean)

    # planted junk never survives; planted copies carry a later date, so the copy is kept and the original goes
    planted = {r["id"]: r["kind"] for r in raw if "id" in r}
    junk = {"empty", "too_short", "symbol_junk", "spam", "boilerplate", "blocked_domain", "blocked_words", "word_salad"}
    assert not [i for i in kept_ids if planted.get(i) in junk]
    pairs = [line.split("\t") for line in (SAMPLE / "planted_duplicates.tsv").read_text().splitlines()]
    assert len(pairs) == 110
    assert all(copy in kept_ids and original not in kept_ids for copy, original in pairs)

    # tokenizer: trained here, HF format, round-trips clean text, renders the ChatML template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s["tokenizer_dir"])
    assert len(tok) == s["vocab_size"] == 2048
    text = clean[0]["text"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    # packed: exactly seq_len per row, only the corpus' final tail (< seq_len tokens) dropped
    packed = _read_dir(s["packed_dir"])
    assert len(packed) == s["num_sequences"] > 0 and s["seq_len"] == 256
    assert s["num_tokens"] == s["num_sequences"] * 256
    assert all(len(r["input_ids"]) == 256 and len(r["position_ids"]) == 256 for r in packed)
    # the packed rows are exactly the clean docs in order, each followed by EOS, cut every 256 tokens; only the
    # corpus' final tail (< 256 tokens) is dropped
    docs_ids = tok([r["text"] for r in clean], add_special_tokens=False)["input_ids"]
    stream = [t for ids in docs_ids for t in ids + [tok.eos_token_id]]
    assert s["num_sequences"] == len(stream) // 256
    assert [t for r in packed for t in r["input_ids"]] == stream[: s["num_sequences"] * 256]
    assert packed[0]["position_ids"][: len(docs_ids[0])] == list(range(min(256, len(docs_ids[0]))))
    assert (Path(s["run_dir"]) / "metrics.jsonl").read_text().count("data/docs_in") == 1


def _small_corpus(tmp_path: Path, bad_lines: dict[int, str]) -> Path:
    """30 synthetic articles as JSONL, with some lines replaced by malformed ones (1-based line numbers)."""
    lines = [json.dumps({"id": f"a{i}", "text": t}) for i, t in enumerate(synthetic_articles(30, seed=7))]
    for number, bad in bad_lines.items():
        lines[number - 1] = bad
    path = tmp_path / "in" / "shard.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_fails_naming_file_and_line(ray_cluster, tmp_path):
    path = _small_corpus(tmp_path, {3: '{"text": "unterminated'})
    with pytest.raises(DataError, match=f"^{path}:3: is not valid JSON"):
        _run(tmp_path, f"input.paths=[{path.parent}]")
    assert not (tmp_path / "data" / "summary.json").exists()


def test_on_error_skip_counts_malformed_rows(ray_cluster, tmp_path):
    path = _small_corpus(tmp_path, {3: '{"text": "unterminated', 5: '{"body": "no text field"}'})
    s = _run(tmp_path, f"input.paths=[{path}]", "input.on_error=skip", "tokenizer.vocab_size=400", "pack.seq_len=64")
    assert s["malformed_rows"] == 2 and s["docs_in"] == 28
    report = json.loads(Path(s["report"]).read_text())
    reasons = [e["reason"] for e in report["malformed_examples"]]
    assert reasons[0].startswith(f"{path}:3: is not valid JSON")
    assert reasons[1] == f"{path}:5: field 'text' is missing (row has keys: body); every row needs it, " \
                         "or set input.text_field to the key holding the text"
    assert s["docs_out"] > 0 and s["num_sequences"] > 0
    assert all(len(r["input_ids"]) == 64 for r in _read_dir(s["packed_dir"]))


def test_corpus_order_comes_from_the_documents_not_from_ray(ray_cluster):
    """The packer's order is computed from each document's keys, so Ray delivering blocks in another order (as it
    once did in a demo) cannot change the packed rows: newest first when dedup keeps the most recent doc, else
    file then line."""
    import ray

    from data.corpus import CorpusConfig
    from jobs.data import document_ranks

    rows = [{"id": "b", "date": "2024-01-02", "source": "/in/1.jsonl", "line": 1},
            {"id": "a", "date": "2024-01-02", "source": "/in/0.jsonl", "line": 7},
            {"id": "c", "date": "2024-03-01", "source": "/in/0.jsonl", "line": 2},
            {"id": "d", "date": "2023-12-31", "source": "/in/1.jsonl", "line": 0}]
    shuffled = ray.data.from_items([rows[i] for i in (3, 0, 2, 1)])
    files = [("/in/0.jsonl", "jsonl"), ("/in/1.jsonl", "jsonl")]
    ranks, total = document_ranks(shuffled, files, CorpusConfig())
    assert total == 4 and sorted(ranks, key=ranks.get) == [
        ("/in/0.jsonl", 2), ("/in/0.jsonl", 7), ("/in/1.jsonl", 1), ("/in/1.jsonl", 0)]  # c, then a before b, d
    first = load_config("data", DataJobConfig, ["corpus.dedup.keep=first"]).corpus
    ranks, _ = document_ranks(shuffled, files, first)
    assert sorted(ranks, key=ranks.get) == [("/in/0.jsonl", 2), ("/in/0.jsonl", 7), ("/in/1.jsonl", 0),
                                            ("/in/1.jsonl", 1)]
