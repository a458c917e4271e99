"""Corpus -> cleaned Parquet -> tokenizer -> packed pretraining sequences, as one Ray Data job.

    python jobs/data.py                                     # the shipped sample (data/sample_corpus)
    python jobs/data.py input.paths=[/abs/raw,s3://bucket/crawl] input.on_error=skip tokenizer.vocab_size=8192
    ray job submit --working-dir . -- python jobs/data.py run.root=/abs/runs input.paths=[/abs/raw]

Stages (InternLM2 report section 3.1; spec cool-rlhf.md 3.1), all Ray Data:
  read (per-file tasks; malformed rows fail or are skipped and counted, with file:line:field)
  -> normalize -> length -> symbols -> repetition -> line_quality      (parallel map_batches)
  -> sort by recency -> exact_dedup + near_dedup (MinHash LSH)          (one stateful actor: global)
  -> safety (domain + word block lists) -> quality score >= threshold  (parallel map_batches)
  -> <run>/clean/*.parquet + <run>/report.json (per stage: input, kept, removed, 3 examples; also a W&B table)
  -> tokenizer: train a byte-level BPE on the clean docs (or load tokenizer.path) -> <run>/tokenizer
  -> tokenize (parallel) + pack into seq_len blocks (one ordered actor) -> <run>/packed/*.parquet

Inputs: files or directories (local or fsspec URLs) of .jsonl/.json (array or lines), .parquet and .txt (one
document per blank-line-separated block; input.txt_docs=file makes each file one document), .gz allowed for
the text formats. Rows need a `text` string; `id`, `url` and `date`/`dump` are optional.
Outputs: clean/*.parquet (id, text, url, date, source, line, quality_score); packed/*.parquet (input_ids and
position_ids, list<int32> of exactly pack.seq_len; position_ids restart at 0 at each document start, for a
varlen trainer); tokenizer/ (HF fast tokenizer with the ChatML chat template); report.json; summary.json.

The annotated corpus (kept docs plus a short stub of each removed one) is materialized once, so the report
and the clean output come from one pass; Ray spills it to disk beyond the object store. Parallelism is per
input file for reading and per batch after it: shard big inputs. On a multi-node cluster run.root must be
storage every node sees (workers write the Parquet files).

Deviations from the report:
  - Format stage: no WARC/HTML extraction (Trafilatura) or language id (pycld2): inputs are already text.
  - Rule thresholds are unpublished; ours are Gopher's or documented choices (data/corpus/config.py).
  - Safety: small illustrative block lists instead of 13M domains / 36,289 words; no toxicity or porn BERT
    classifiers (a model scorer can be plugged in as corpus.quality.scorer).
  - Quality: a transparent heuristic score instead of the ad/fluency BERT classifiers (pluggable).
  - Most-recent-wins uses the `date`/`dump` field as text order; undated docs sort last, so a dated copy wins.
  - Word counts, n-gram rules and 5-gram shingles split on whitespace: they suit space-delimited languages;
    Chinese text would need character n-grams (the report's zh half is not covered).
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# `python jobs/data.py` puts jobs/ on sys.path, and Ray copies the script's directory into every worker's path,
# where this file would shadow the `data` package ("'data' is not a package"). Take it out before Ray starts.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != pathlib.Path(__file__).resolve().parent]
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from cluster.runtime import ClusterConfig, init_ray  # noqa: E402
from cluster.runtime_env import REPO_ROOT  # noqa: E402
from data.corpus import CorpusConfig, GlobalDedup, InputConfig, discover_files, iter_file_blocks  # noqa: E402
from data.corpus.stages import build_report, kept_rows, late_stages, rule_stages, stage_switches  # noqa: E402
from data.corpus.stages import summarize_batch  # noqa: E402
from data.io import DataError, atomic_dir, atomic_write_json  # noqa: E402
from data.pretrain_pack import (  # noqa: E402
    PackConfig,
    SequencePacker,
    TokenizerConfig,
    iter_parquet_texts,
    pack_in_rank_order,
    packed_table,
    parquet_num_rows,
    tokenize_batch,
    tokenizer_json,
)
from jobs.common import LoggingConfig, Run, RunConfig, progress, run_job  # noqa: E402


@dataclass
class DataJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    input: InputConfig = field(default_factory=InputConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)


def resolve_path(path: str) -> str:
    """URLs pass through; a relative path that does not exist under the cwd is taken from the repo root (under
    `ray job submit` the cwd is Ray's unpacked copy of the working dir)."""
    if not path or "://" in path:
        return path
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p.resolve())
    return str(REPO_ROOT / p) if (REPO_ROOT / p).exists() else path


@contextlib.contextmanager
def data_context(progress_bars: bool):
    """Ordered execution (the global dedup keeps the first doc of a cluster it sees, and the packer's output
    follows its input), restored afterwards because other jobs may share this process."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = ctx.enable_progress_bars and progress_bars
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


# ---------------------------------------------------------------------------------------------- corpus stages


def corpus_files_datasource(files: list[tuple[str, str]], cfg: InputConfig):
    """One Ray read task per input file, yielding validated rows in blocks (data.corpus.read)."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class CorpusFiles(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def task(path: str, fmt: str) -> ReadTask:
                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(path,))
                return ReadTask(lambda: iter_file_blocks(path, fmt, cfg), meta, per_task_row_limit=per_task_row_limit)

            return [task(path, fmt) for path, fmt in files]

    return CorpusFiles()


def corpus_dataset(files: list[tuple[str, str]], input_cfg: InputConfig, cfg: CorpusConfig):
    """The annotated corpus as a lazy Ray Dataset: every input row, removed ones marked with drop_stage."""
    import ray

    # One read task per file, emitting blocks of input.read_batch_rows rows (no re-splitting into tiny blocks);
    # the rule stages then run as parallel tasks over those blocks, so even one big file spreads out.
    ds = ray.data.read_datasource(corpus_files_datasource(files, input_cfg), override_num_blocks=len(files))
    ds = ds.map_batches(rule_stages, batch_size=cfg.batch_size, batch_format="numpy", fn_kwargs={"cfg": cfg})
    if cfg.dedup.exact.enabled or cfg.dedup.near.enabled:
        if cfg.dedup.keep == "most_recent":
            ds = ds.sort(["date", "id"], descending=[True, False])
        # The index lives in this one actor: if Ray restarts it, later docs are checked against an empty index.
        ds = ds.map_batches(
            GlobalDedup, fn_constructor_kwargs={"cfg": cfg.dedup}, concurrency=1, batch_format="numpy",
            batch_size=cfg.batch_size * 4, num_cpus=cfg.dedup.actor_num_cpus,
        )
    return ds.map_batches(late_stages, batch_size=cfg.batch_size, batch_format="numpy", fn_kwargs={"cfg": cfg})


def materialize_or_explain(ds):
    """Run the pipeline; a malformed row raised inside a Ray task comes back as a plain DataError."""
    try:
        return ds.materialize()
    except DataError as e:  # Ray's RayTaskError(CorpusDataError) is also a DataError
        raise DataError(e.path, e.line, e.field_name, e.problem) from None


def corpus_report(annotated, cfg: CorpusConfig) -> dict:
    parts = annotated.map_batches(summarize_batch, batch_format="numpy", fn_kwargs={"max_examples": cfg.max_examples})
    return build_report([row["part"] for row in parts.take_all()], cfg.max_examples, stage_switches(cfg))


def write_parquet_dir(ds, out_dir: Path, rows_per_file: int) -> Path:
    # min_rows_per_file merges small blocks, so a small run writes one file instead of one per block.
    with atomic_dir(out_dir) as tmp:
        ds.write_parquet(str(tmp), min_rows_per_file=rows_per_file)
    return out_dir


def log_report(run: Run, report: dict) -> None:
    rows = [
        [s["stage"], s["input"], s["kept"], s["removed"], s["examples"][0]["reason"] if s["examples"] else ""]
        for s in report["stages"]
    ]
    run.logger.log_table("data/stage_report", ["stage", "input", "kept", "removed", "example_reason"], rows)
    metrics = {f"data/removed/{s['stage']}": s["removed"] for s in report["stages"]}
    run.logger.log({"data/docs_in": report["docs_in"], "data/docs_out": report["docs_out"],
                    "data/malformed_rows": report["malformed_rows"], **metrics}, step=0)


def with_blocklists_resolved(cfg: CorpusConfig) -> CorpusConfig:
    safety = dataclasses.replace(
        cfg.safety, domain_blocklist=resolve_path(cfg.safety.domain_blocklist),
        word_blocklist=resolve_path(cfg.safety.word_blocklist),
    )
    return dataclasses.replace(cfg, safety=safety)


# ---------------------------------------------------------------------------------------------- tokenizer + pack


def prepare_tokenizer(cfg: TokenizerConfig, clean_dir: Path, docs_out: int, out_dir: Path, show: bool):
    """Train a BPE on the clean docs (tokenizer.path empty) or copy the given one; either way the tokenizer the
    packed data was made with is saved next to it, in HF format."""
    from transformers import AutoTokenizer

    from modeling.tiny import train_tokenizer

    with atomic_dir(out_dir) as tmp:
        if not cfg.path:
            total = min(docs_out, cfg.max_train_docs)
            texts = progress(iter_parquet_texts(clean_dir, cfg.max_train_docs), total=total, desc="tokenizer docs",
                             enabled=show)
            tok = train_tokenizer(texts, cfg.vocab_size)
        else:
            source = resolve_path(cfg.path)
            if "://" in source and not source.startswith("file://"):
                import fsspec

                fs, root = fsspec.core.url_to_fs(source)
                fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
                source = str(tmp)
            tok = AutoTokenizer.from_pretrained(source.removeprefix("file://"))
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {cfg.path!r} has no eos token; packing joins documents with EOS")
        tok.save_pretrained(str(tmp))
    return AutoTokenizer.from_pretrained(str(out_dir))


def document_ranks(clean, files: list[tuple[str, str]], cfg: CorpusConfig) -> tuple[dict[tuple[str, int], int], int]:
    """(source, line) -> the document's place in the corpus order, and the number of documents.

    The order is the pipeline's own, computed from the documents rather than from the order Ray delivered them
    in: newest first (date, then id) when dedup keeps the most recent doc, which sorted them; else input order
    (file, then line). Only these small key columns come to the driver."""
    keys = clean.select_columns(["id", "date", "source", "line"]).to_pandas()
    if (cfg.dedup.exact.enabled or cfg.dedup.near.enabled) and cfg.dedup.keep == "most_recent":
        keys = keys.sort_values(["date", "id"], ascending=[False, True], kind="stable")
    else:
        file_index = {path: i for i, (path, _) in enumerate(files)}
        keys = keys.assign(file=keys["source"].map(file_index)).sort_values(["file", "line"], kind="stable")
    pairs = list(zip(keys["source"].tolist(), keys["line"].tolist()))
    ranks = {pair: rank for rank, pair in enumerate(pairs)}
    if len(ranks) != len(pairs):
        raise ValueError("two cleaned documents share a (source, line); the packer cannot order them")
    return ranks, len(pairs)


def pack_corpus(clean, ranks: dict[tuple[str, int], int], total: int, tokenizer_dir: Path, eos_id: int,
                cfg: PackConfig, out_dir: Path) -> Path:
    """Tokenize in parallel Ray tasks, then pack in this process in corpus order (`pack_in_rank_order`: the rows
    do not depend on which task finished first) and write `rows_per_file` rows per Parquet file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenized = clean.select_columns(["text", "source", "line"]).map_batches(
        tokenize_batch, batch_size=cfg.tokenize_batch_docs, batch_format="pyarrow",
        fn_kwargs={"tokenizer_spec": tokenizer_json(tokenizer_dir), "keep": ["source", "line"]},
    )

    def ranked():
        for batch in tokenized.iter_batches(batch_format="pyarrow", batch_size=None):
            keys = zip(batch.column("source").to_pylist(), batch.column("line").to_pylist())
            yield pa.table({"rank": pa.array([ranks[k] for k in keys], pa.int64()), "ids": batch.column("ids")})

    with atomic_dir(out_dir) as tmp:
        tables, rows, parts = [], 0, 0
        for blocks, positions in pack_in_rank_order(ranked(), total, SequencePacker(cfg.seq_len, eos_id)):
            tables.append(packed_table(blocks, positions))
            rows += len(blocks)
            if rows >= cfg.rows_per_file:
                pq.write_table(pa.concat_tables(tables), tmp / f"part-{parts:05d}.parquet")
                tables, rows, parts = [], 0, parts + 1
        if tables or parts == 0:  # the rest; a corpus shorter than one row still gets its (empty) file
            empty = np.zeros((0, cfg.seq_len), np.int32)
            pq.write_table(pa.concat_tables(tables or [packed_table(empty, empty)]), tmp / f"part-{parts:05d}.parquet")
    return out_dir


# ---------------------------------------------------------------------------------------------- main


def main(cfg: DataJobConfig, run: Run) -> dict:
    init_ray(cfg.cluster)
    corpus_cfg = with_blocklists_resolved(cfg.corpus)
    with data_context(cfg.logging.progress):
        started = time.time()
        files = discover_files([resolve_path(p) for p in cfg.input.paths])
        annotated = materialize_or_explain(corpus_dataset(files, cfg.input, corpus_cfg))
        report = corpus_report(annotated, corpus_cfg)
        if report["docs_out"] == 0:
            raise ValueError("every document was removed; see the stage counts in the report: "
                             + ", ".join(f"{s['stage']}={s['removed']}" for s in report["stages"]))
        clean = annotated.map_batches(kept_rows, batch_format="numpy").materialize()
        clean_dir = write_parquet_dir(clean, run.dir / "clean", corpus_cfg.rows_per_file)
        corpus_seconds = time.time() - started
        report["files"] = [p for p, _ in files]
        atomic_write_json(run.dir / "report.json", report)
        log_report(run, report)

        started = time.time()
        tokenizer_dir = run.dir / "tokenizer"
        tok = prepare_tokenizer(cfg.tokenizer, clean_dir, report["docs_out"], tokenizer_dir, cfg.logging.progress)
        tokenizer_seconds = time.time() - started
        ranks, total = document_ranks(clean, files, corpus_cfg)
        packed_dir = pack_corpus(clean, ranks, total, tokenizer_dir, tok.eos_token_id, cfg.pack, run.dir / "packed")
        pack_seconds = time.time() - started - tokenizer_seconds
    num_sequences = parquet_num_rows(packed_dir)
    docs_per_second = report["docs_in"] / max(corpus_seconds, 1e-9)
    seconds = {"corpus_seconds": corpus_seconds, "tokenizer_seconds": tokenizer_seconds, "pack_seconds": pack_seconds}
    run.logger.log({"data/docs_per_second": docs_per_second, **{f"data/{k}": v for k, v in seconds.items()},
                    "pack/num_sequences": num_sequences, "tokenizer/vocab_size": len(tok)}, step=1)
    return {
        "docs_in": report["docs_in"],
        "docs_out": report["docs_out"],
        "malformed_rows": report["malformed_rows"],
        "removed_by_stage": {s["stage"]: s["removed"] for s in report["stages"]},
        "clean_dir": str(clean_dir),
        "report": str(run.dir / "report.json"),
        "tokenizer_dir": str(tokenizer_dir),
        "vocab_size": len(tok),
        "packed_dir": str(packed_dir),
        "num_sequences": num_sequences,
        "num_tokens": num_sequences * cfg.pack.seq_len,
        "seq_len": cfg.pack.seq_len,
        "docs_per_second": round(docs_per_second, 2),
        **{k: round(v, 2) for k, v in seconds.items()},
    }


if __name__ == "__main__":
    run_job("data", DataJobConfig, main)
