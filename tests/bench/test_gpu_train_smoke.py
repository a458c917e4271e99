"""bench/gpu_train.py is what the first session lent a GPU runs. Its CPU smoke command, as its docstring prints
it, must keep working here, or that session spends its device time on a stale command line."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

from cluster.runtime_env import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_train.py"


def test_the_documented_cpu_smoke_command_runs_and_the_backends_agree():
    doc = SCRIPT.read_text().split('"""')[1]
    (line,) = [line for line in doc.splitlines() if line.strip().startswith("python bench/gpu_train.py")
               and line.rstrip().endswith("# smoke")]
    args = shlex.split(line.split("#")[0])[2:]
    # Two of the three backends and one timed step keep it short; the sizes are the documented ones.
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--backends", "ddp,zero3", "--steps", "2"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = dict(re.findall(r"^\s+(\w+)\s.*loss (\S+ -> \S+)$", proc.stdout, flags=re.M))
    assert set(losses) == {"ddp", "zero3"}, proc.stdout
    assert losses["ddp"] == losses["zero3"]  # ZeRO-3's sharded step is the same math as DDP's, to 3 decimals
