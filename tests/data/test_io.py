"""data/io.py: atomic writes that leave nothing behind after a kill, and JSONL errors at the right column."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from data.io import DataError, atomic_dir, atomic_write_text, read_jsonl


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_temp_files_are_removed_by_the_next_write_and_live_ones_are_kept(tmp_path):
    # A SIGKILL mid-write skips every cleanup: the temp dir (or file) stays beside the target. The next atomic
    # write of the same target removes those of dead processes of this host, and never one still being written.
    host = socket.gethostname()
    dead = tmp_path / f".rm_data.{host}.{_dead_pid()}.abc123.tmp"
    dead.mkdir()
    (dead / "pairs.parquet").write_bytes(b"x" * 1000)
    dead_file = tmp_path / f".summary.json.{host}.{_dead_pid()}.q1w2e3.tmp"
    dead_file.write_text("{half")
    live = tmp_path / f".rm_data.{host}.{os.getpid()}.zzz999.tmp"  # this process: a write in flight
    live.mkdir()
    elsewhere = tmp_path / ".rm_data.another-host.1.xyz000.tmp"  # another host's pid cannot be checked from here
    elsewhere.mkdir()

    with atomic_dir(tmp_path / "rm_data") as out:
        (out / "pairs.parquet").write_text("new")
    atomic_write_text(tmp_path / "summary.json", "{}")

    assert not dead.exists() and not dead_file.exists()
    assert live.exists() and elsewhere.exists()
    assert (tmp_path / "rm_data" / "pairs.parquet").read_text() == "new"
    assert (tmp_path / "summary.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, elsewhere.name, "rm_data", "summary.json"])


def test_a_truncated_json_line_is_reported_at_its_own_column(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "a", "label": 0}\n{"id": "b", "label": \n')
    with pytest.raises(DataError, match=r"labels.jsonl:2: is not valid JSON \(Expecting value at column 22\)"):
        list(read_jsonl(path))
