"""Test-only fault injection: make one role's actor process die hard in the middle of a phase.

A real crash (OOM kill, segfault, lost node) gives the driver no exception from inside the worker, only a dead actor;
`os._exit` reproduces exactly that. A marker file makes the fault fire once per run directory, so a job that restarts
its actors from the last checkpoint does not crash again at the same place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class FaultConfig:
    role: str = ""  # "" = no fault; else policy | critic | reference | reward | rollout
    method: str = ""  # the worker method that dies, e.g. compute_values
    at_call: int = 1  # die on this call of `method` in one actor process (1 = the first)
    marker: str = ""  # file created just before dying; while it exists the fault does not fire again

    def __post_init__(self) -> None:
        if self.role and (not self.method or not self.marker):
            raise ValueError("testing.fault needs method and marker when role is set (e.g. method=compute_values)")
        if self.at_call < 1:
            raise ValueError(f"testing.fault.at_call must be >= 1 (got {self.at_call})")


class FaultPoint:
    """Held by a worker; `check(method)` at the top of a worker method."""

    def __init__(self, cfg: FaultConfig | None, role: str):
        self.cfg = cfg if cfg is not None and cfg.role == role else None
        self.calls = 0

    def check(self, method: str) -> None:
        if self.cfg is None or method != self.cfg.method:
            return
        self.calls += 1
        marker = Path(self.cfg.marker)
        if self.calls == self.cfg.at_call and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{self.cfg.role}.{method} died on call {self.calls} (pid {os.getpid()})\n")
            os._exit(1)
