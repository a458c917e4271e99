"""Finding input files and turning each into validated rows with a file:line location.

Readers run per file inside Ray read tasks (a Datasource in jobs/data.py), so a big input streams through in
blocks of `read_batch_rows`. Every row gets the same columns whatever its format (ROW_COLUMNS): extra input keys are
dropped, so shards with different metadata can be concatenated and written as one Parquet schema.

Row numbers: JSONL = line number; JSON array = element index (1-based, reported as the line); Parquet = row
number (1-based); .txt = the first line of the block (or 1 for a whole-file document).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import PurePosixPath

from data.corpus.config import READ_STAGE, InputConfig
from data.io import DataError

ROW_COLUMNS = ("id", "text", "url", "date", "source", "line", "drop_stage", "drop_reason")

# Longest suffix first, so ".jsonl.gz" is not taken for ".gz".
FORMATS = {
    ".jsonl.gz": "jsonl", ".jsonl": "jsonl", ".json.gz": "json", ".json": "json",
    ".parquet": "parquet", ".txt.gz": "txt", ".txt": "txt",
}


class CorpusDataError(DataError):
    """A DataError that survives pickling, so it reaches the driver intact from a Ray task."""

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.field_name, self.problem))


def detect_format(path: str) -> str | None:
    name = PurePosixPath(path.split("?")[0]).name.lower()
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def discover_files(paths: list[str]) -> list[tuple[str, str]]:
    """(url, format) of every readable file under `paths`, sorted so runs are reproducible."""
    import fsspec

    found: list[tuple[str, str]] = []
    for given in paths:
        fs, root = fsspec.core.url_to_fs(given)
        if not fs.exists(root):
            raise FileNotFoundError(f"input path {given!r} does not exist")
        candidates = sorted(fs.find(root)) if fs.isdir(root) else [root]
        files = [(fs.unstrip_protocol(p) if "://" in given else p) for p in candidates]
        usable = [(f, detect_format(f)) for f in files if detect_format(f)]
        if not usable:
            raise FileNotFoundError(
                f"input path {given!r} holds no readable file; supported: {', '.join(sorted(FORMATS))}"
            )
        found.extend(usable)
    return found


def _text_value(record: dict, cfg: InputConfig, path: str, line: int) -> str:
    if cfg.text_field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise CorpusDataError(
            path, line, cfg.text_field,
            f"is missing (row has keys: {keys}); every row needs it, "
            "or set input.text_field to the key holding the text",
        )
    text = record[cfg.text_field]
    if not isinstance(text, str):
        raise CorpusDataError(path, line, cfg.text_field, f"must be a string, got {type(text).__name__}")
    return text


def _date_value(record: dict, cfg: InputConfig, path: str, line: int) -> str:
    for key in cfg.date_fields:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise CorpusDataError(path, line, key, f"must be a string or an integer, got {type(value).__name__}")
        # Zero-pad integers (dump numbers) so their text order is their numeric order.
        return f"{value:020d}" if isinstance(value, int) else value
    return ""


def make_row(record: dict, cfg: InputConfig, path: str, line: int) -> dict:
    """Validate one input record and map it to ROW_COLUMNS; raises CorpusDataError naming file, line, field."""
    text = _text_value(record, cfg, path, line)
    url = record.get(cfg.url_field)
    if url is not None and not isinstance(url, str):
        raise CorpusDataError(path, line, cfg.url_field, f"must be a string, got {type(url).__name__}")
    doc_id = record.get(cfg.id_field)
    return {
        "id": str(doc_id) if doc_id is not None else f"{PurePosixPath(path).name}:{line}",
        "text": text,
        "url": url or "",
        "date": _date_value(record, cfg, path, line),
        "source": path,
        "line": line,
        "drop_stage": "",
        "drop_reason": "",
    }


def error_row(err: DataError) -> dict:
    """What a skipped malformed row leaves behind: nothing but its location and reason, for the report."""
    return {
        "id": f"{PurePosixPath(err.path).name}:{err.line}", "text": "", "url": "", "date": "", "source": err.path,
        "line": err.line or 0, "drop_stage": READ_STAGE, "drop_reason": str(err),
    }


def _records_jsonl(f, path: str) -> Iterator[tuple[int, dict | DataError]]:
    # Same checks and messages as data.io.read_jsonl, but a bad line is yielded rather than ending the file,
    # so on_error=skip can carry on after it.
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, CorpusDataError(path, lineno, None, f"is not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            yield lineno, CorpusDataError(path, lineno, None, f"must be a JSON object, got {type(record).__name__}")
            continue
        yield lineno, record


def _records_json(f, path: str) -> Iterator[tuple[int, dict | DataError]]:
    head = f.read(1)
    while head and head.isspace():
        head = f.read(1)
    if head != "[":  # not an array: JSON Lines in a .json file
        f.seek(0)
        yield from _records_jsonl(f, path)
        return
    f.seek(0)
    try:
        items = json.load(f)  # a JSON array is parsed whole; use JSONL for inputs that do not fit in memory
    except json.JSONDecodeError as e:
        raise CorpusDataError(path, e.lineno, None, f"is not valid JSON ({e.msg} at column {e.colno})") from None
    for index, record in enumerate(items, start=1):
        if not isinstance(record, dict):
            problem = f"array element must be an object, got {type(record).__name__}"
            yield index, CorpusDataError(path, index, None, problem)
        else:
            yield index, record


def _records_txt(f, path: str, mode: str) -> Iterator[tuple[int, dict | DataError]]:
    if mode == "file":
        yield 1, {"text": f.read()}
        return
    block: list[str] = []
    start = 0
    for lineno, line in enumerate(f, start=1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line.rstrip("\n"))
        elif block:
            yield start, {"text": "\n".join(block)}
            block = []
    if block:
        yield start, {"text": "\n".join(block)}


def _records_parquet(f, path: str, cfg: InputConfig, batch_rows: int) -> Iterator[tuple[int, dict | DataError]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = set(pf.schema_arrow.names)
    if cfg.text_field not in names:
        raise CorpusDataError(
            path, None, cfg.text_field,
            f"column is missing (columns: {', '.join(sorted(names))}); set input.text_field to the text column",
        )
    wanted = [c for c in (cfg.text_field, cfg.id_field, cfg.url_field, *cfg.date_fields) if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys(wanted))):
        for record in batch.to_pylist():
            row += 1
            if record.get(cfg.text_field) is None:
                yield row, CorpusDataError(path, row, cfg.text_field, "is null; every row needs a text string")
            else:
                yield row, record


def iter_file_rows(path: str, fmt: str, cfg: InputConfig) -> Iterator[dict]:
    """Validated rows of one file. A malformed row raises (on_error=fail) or becomes an error_row (skip)."""
    import fsspec

    mode = "rb" if fmt == "parquet" else "rt"
    try:
        with fsspec.open(path, mode, compression="infer", encoding=None if mode == "rb" else "utf-8") as f:
            if fmt == "jsonl":
                records = _records_jsonl(f, path)
            elif fmt == "json":
                records = _records_json(f, path)
            elif fmt == "txt":
                records = _records_txt(f, path, cfg.txt_docs)
            else:
                records = _records_parquet(f, path, cfg, cfg.read_batch_rows)
            for line, record in records:
                try:
                    if isinstance(record, DataError):
                        raise record
                    yield make_row(record, cfg, path, line)
                except DataError as err:
                    if cfg.on_error == "fail":
                        raise
                    yield error_row(err)
    except UnicodeDecodeError as e:
        err = CorpusDataError(path, None, None, f"is not UTF-8 text ({e.reason} at byte {e.start})")
        if cfg.on_error == "fail":
            raise err from None
        yield error_row(err)
    except DataError as err:  # a whole-file problem (unparsable JSON array, no text column): skip the file
        if cfg.on_error == "fail":
            raise
        yield error_row(err)


def iter_file_blocks(path: str, fmt: str, cfg: InputConfig):
    """Rows of one file as Arrow tables of at most read_batch_rows rows (one block each in a Ray read task)."""
    import pyarrow as pa

    schema = pa.schema([(c, pa.int64() if c == "line" else pa.string()) for c in ROW_COLUMNS])
    chunk: dict[str, list] = {c: [] for c in ROW_COLUMNS}
    for row in iter_file_rows(path, fmt, cfg):
        for c in ROW_COLUMNS:
            chunk[c].append(row[c])
        if len(chunk["id"]) >= cfg.read_batch_rows:
            yield pa.Table.from_pydict(chunk, schema=schema)
            chunk = {c: [] for c in ROW_COLUMNS}
    if chunk["id"]:
        yield pa.Table.from_pydict(chunk, schema=schema)
