"""Bounded waits on Ray results that say which role, which phase and which ranks are at fault.

A distributed RLHF step is a sequence of phases (generate, score, reference log-probs, train, weight sync). The
classic failure is a silent hang: one rank never answers and `ray.get` blocks forever. Every wait in coolray goes
through `get(...)` here instead, which

- gives up after `timeout_s` with `PhaseTimeout` naming the role, the phase, and the ranks that did not answer
  (with their actor ids and nodes when the caller passes `describe`), and
- turns a dead actor into `RoleDied` naming the role, the phase and the rank as soon as its result arrives, even
  while other ranks are still running (it does not wait for the slowest rank first).

An exception raised *inside* a worker method is re-raised unchanged, with a note naming role/phase/rank.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any


class PhaseTimeout(TimeoutError):
    """Some ranks of a role did not answer within the phase's time budget."""

    def __init__(self, role: str, phase: str, timeout_s: float, missing: list[int], answered: list[int], details: str = ""):
        self.role, self.phase, self.timeout_s = role, phase, timeout_s
        self.missing, self.answered = missing, answered
        super().__init__(
            f"{role}: phase '{phase}' timed out after {timeout_s:g} s; rank(s) {missing} did not answer "
            f"(answered: {answered or 'none'}).{details} If the phase is legitimately slow, raise its timeout in the "
            "config; otherwise look at those actors (`ray list actors`, `py-spy dump --pid <pid>` on their node)."
        )


class RoleDied(RuntimeError):
    """An actor of a role died (crash, OOM kill, node loss, ray.kill) while a phase was waiting on it."""

    def __init__(self, role: str, phase: str, rank: int, cause: BaseException, details: str = ""):
        self.role, self.phase, self.rank, self.cause = role, phase, rank, cause
        super().__init__(f"{role}: rank {rank} died during phase '{phase}'.{details} Cause: {_summary(cause)}")


def _summary(cause: BaseException) -> str:
    """Ray's death message in one line: what happened (first line) and why (last line: the error or the reason)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).splitlines() if ln.strip()]
    if not lines:
        return type(cause).__name__
    head = lines[0].split(",")[0]
    return head if len(lines) == 1 else f"{head} ... {lines[-1]}"


def _fetch(ref: Any, role: str, phase: str, rank: int, describe: Callable[[int], str] | None) -> Any:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(ref)
    except RayActorError as e:  # includes ActorDiedError and ActorUnavailableError
        details = f" ({describe(rank)})" if describe else ""
        raise RoleDied(role, phase, rank, e, details) from e
    except RayTaskError as e:
        # The worker raised: keep the worker's own exception type and message, add where it happened.
        cause = e.as_instanceof_cause()
        cause.add_note(f"raised by {role} rank {rank} during phase '{phase}'")
        raise cause from None


def get(
    refs: Sequence[Any],
    *,
    role: str,
    phase: str,
    timeout_s: float,
    ranks: Sequence[int] | None = None,
    describe: Callable[[int], str] | None = None,
) -> list[Any]:
    """`ray.get(refs)` bounded by `timeout_s`, results in the order of `refs`.

    `ranks[i]` is the rank that owns `refs[i]` (default: i); `describe(rank)` may return a short text such as
    "actor 3f2a.. on node 9c1e.." that is added to error messages.
    """
    import ray

    if timeout_s <= 0:
        raise ValueError(f"timeout_s for phase '{phase}' of {role} must be > 0 (got {timeout_s})")
    refs = list(refs)
    ranks = list(range(len(refs))) if ranks is None else list(ranks)
    if len(ranks) != len(refs):
        raise ValueError(f"got {len(refs)} refs but {len(ranks)} ranks for phase '{phase}' of {role}")
    rank_of = {ref: rank for ref, rank in zip(refs, ranks)}
    results: dict[Any, Any] = {}
    pending = list(refs)
    deadline = time.monotonic() + timeout_s
    while pending:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        else:
            ready = []
        if not ready:
            missing = sorted(rank_of[r] for r in pending)
            answered = sorted(rank_of[r] for r in results)
            details = "".join(f" rank {m}: {describe(m)}." for m in missing) if describe else ""
            raise PhaseTimeout(role, phase, timeout_s, missing, answered, details)
        for ref in ready:
            results[ref] = _fetch(ref, role, phase, rank_of[ref], describe)
    return [results[r] for r in refs]


def get_one(ref: Any, *, role: str, phase: str, timeout_s: float, rank: int = 0) -> Any:
    """`get` for a single ref."""
    return get([ref], role=role, phase=phase, timeout_s=timeout_s, ranks=[rank])[0]
