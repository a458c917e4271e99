"""Preference data: three input formats read into one pair type, and batches built by a token budget.

Formats (one JSON object per line; `fmt="auto"` picks per row):
  coolray        {"prompt": str | "messages": [...], "chosen": str | [assistant msgs], "rejected": ..., "domain": str}
  hh             Anthropic-HH: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "<same dialogue, other reply>"}
  ultrafeedback  UltraFeedback-binarized: {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant]}
Every pair becomes (conversation without system prompt, chosen reply, rejected reply, domain). A row that
cannot be read raises data.io.DataError naming file, line and field (`on_error="skip"` counts and skips it).

Batching [spec §7.1]: the report fills each RM batch up to a token count (16,384) rather than a pair count, so
long and short pairs cost the same padding budget. We pad instead of packing (no varlen attention on CPU), so
the budget bounds the *padded* size, 2 * pairs * longest sequence, and pairs are length-grouped to keep the
padding small. Chosen and rejected of a pair always share a batch (rows i and n + i).
"""
from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from data.io import DataError, RowErrors

FORMATS = ("auto", "coolray", "hh", "ultrafeedback")
ROLES = ("system", "user", "assistant", "environment")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass(frozen=True)
class PreferencePair:
    id: str
    domain: str
    messages: list[dict]  # the conversation before the final reply (user/assistant turns, optional system)
    chosen: str
    rejected: str


class _RowError(Exception):
    def __init__(self, field_name: str, problem: str):
        self.field_name, self.problem = field_name, problem


def _check_messages(value, field_name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _RowError(field_name, "must be a non-empty list of {\"role\", \"content\"} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise _RowError(f"{field_name}[{i}]", f"must be {{\"role\": one of {ROLES}, \"content\": str}}, got {m!r:.120}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply(value, field_name: str, allow_empty: bool = False) -> tuple[list[dict], str]:
    """A reply given as a string or as messages ending with the assistant turn -> (extra turns, reply text)."""
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise _RowError(field_name, "is empty")
        return [], value
    msgs = _check_messages(value, field_name)
    if msgs[-1]["role"] != "assistant":
        raise _RowError(field_name, f"must end with an assistant message, ends with {msgs[-1]['role']!r}")
    return msgs[:-1], msgs[-1]["content"]


def _domain(row: dict, default: str) -> str:
    domain = row.get("domain", default) or default
    if not isinstance(domain, str) or not domain:
        raise _RowError("domain", "is missing: add a \"domain\" field to the row or set a default domain for the file")
    return domain


def _parse_coolray(row: dict, default_domain: str, allow_empty: bool) -> tuple[str, list[dict], str, str]:
    if "messages" in row:
        conversation = _check_messages(row["messages"], "messages")
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        conversation = [{"role": "user", "content": row["prompt"]}]
    else:
        raise _RowError("prompt", "is missing: give \"prompt\" (a string) or \"messages\" (a list)")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _RowError(key, "is missing")
    extra_c, chosen = _reply(row["chosen"], "chosen", allow_empty)
    extra_r, rejected = _reply(row["rejected"], "rejected", allow_empty)
    if extra_c != extra_r:
        raise _RowError("rejected", "its earlier turns differ from those of chosen; both must continue the same conversation")
    return _domain(row, default_domain), conversation + extra_c, chosen, rejected


def _hh_turns(text, field_name: str) -> list[dict]:
    if not isinstance(text, str):
        raise _RowError(field_name, "must be an HH transcript string")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise _RowError(field_name, "must start with \"\\n\\nHuman: \" (Anthropic-HH transcript)")
    roles, contents = parts[1::2], parts[2::2]
    if not roles or roles[-1] != "Assistant":
        raise _RowError(field_name, "must end with an \"\\n\\nAssistant: \" turn")
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in zip(roles, contents)]


def _parse_hh(row: dict, default_domain: str, allow_empty: bool) -> tuple[str, list[dict], str, str]:
    chosen, rejected = _hh_turns(row.get("chosen"), "chosen"), _hh_turns(row.get("rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise _RowError("rejected", "its dialogue before the last Assistant turn differs from chosen's")
    if not any(m["role"] == "user" for m in chosen[:-1]):
        raise _RowError("chosen", "has no Human turn before the final Assistant reply")
    return _domain(row, default_domain), chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _parse_ultrafeedback(row: dict, default_domain: str, allow_empty: bool) -> tuple[str, list[dict], str, str]:
    chosen, rejected = _check_messages(row.get("chosen"), "chosen"), _check_messages(row.get("rejected"), "rejected")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise _RowError(key, "must be the conversation followed by the assistant reply (at least 2 messages)")
    if chosen[:-1] != rejected[:-1]:
        raise _RowError("rejected", "its conversation differs from chosen's")
    return _domain(row, default_domain), chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


_PARSERS = {"coolray": _parse_coolray, "hh": _parse_hh, "ultrafeedback": _parse_ultrafeedback}


def detect_format(row: dict) -> str:
    chosen = row.get("chosen")
    if isinstance(chosen, str) and chosen.lstrip("\n").startswith("Human:"):
        return "hh"
    if isinstance(chosen, list) and any(isinstance(m, dict) and m.get("role") == "user" for m in chosen):
        return "ultrafeedback"
    return "coolray"


def parse_row(row: dict, fmt: str, path: str | os.PathLike, lineno: int, default_domain: str = "",
              allow_empty_replies: bool = False) -> PreferencePair:
    """One JSON row -> PreferencePair; DataError(path, lineno, field, problem) when it does not fit `fmt`.

    `allow_empty_replies`: accept an empty chosen/rejected string (online RLHF pairs, where an empty reply is
    something the policy really produced and the RM must learn to rank); user files keep rejecting it."""
    if fmt not in FORMATS:
        raise ValueError(f"preference format must be one of {FORMATS}, got {fmt!r}")
    kind = detect_format(row) if fmt == "auto" else fmt
    try:
        domain, conversation, chosen, rejected = _PARSERS[kind](row, default_domain, allow_empty_replies)
    except _RowError as e:
        raise DataError(path, lineno, e.field_name, f"{e.problem} ({kind} format)") from None
    pair_id = row.get("id") if isinstance(row.get("id"), str) else f"{os.path.basename(str(path))}:{lineno}"
    return PreferencePair(pair_id, domain, conversation, chosen, rejected)


def iter_preferences(path: str | os.PathLike, fmt: str = "auto", default_domain: str = "",
                     errors: RowErrors | None = None) -> Iterator[PreferencePair]:
    """Pairs of a JSONL file, line by line; bad lines (including non-JSON ones) go to `errors` (fail or skip)."""
    import fsspec

    errors = errors or RowErrors("fail")
    with fsspec.open(str(path), "rt") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise DataError(path, lineno, None, f"must be a JSON object, got {type(row).__name__}")
                yield parse_row(row, fmt, path, lineno, default_domain)
            except json.JSONDecodeError as e:
                errors.handle(DataError(path, lineno, None, f"is not valid JSON ({e.msg} at column {e.colno})"))
            except DataError as e:
                errors.handle(e)


def read_preferences(path: str | os.PathLike, fmt: str = "auto", default_domain: str = "",
                     errors: RowErrors | None = None) -> list[PreferencePair]:
    """All pairs of a JSONL file (local or fsspec URL)."""
    return list(iter_preferences(path, fmt, default_domain, errors))


def pair_from_row(row: dict) -> PreferencePair:
    """A coolray row already in memory (e.g. from data.world) -> PreferencePair."""
    return parse_row(row, "coolray", "<memory>", 0)


# ---------------------------------------------------------------------------------------------- batching


def padded_tokens(lengths: Sequence[tuple[int, int]]) -> int:
    """Tokens a batch of pairs occupies once padded: 2 rows per pair, each as long as the longest sequence."""
    return 2 * len(lengths) * max(max(c, r) for c, r in lengths) if lengths else 0


def token_budget_batches(lengths: Sequence[tuple[int, int]], max_tokens: int, seed: int,
                         shuffle: bool = True, group_window: int = 50) -> list[list[int]]:
    """Group pair indices into batches whose padded size (`padded_tokens`) is at most `max_tokens`.

    `lengths[i]` = (chosen tokens, rejected tokens) of pair i. Pairs are shuffled (seeded), then sorted by
    length inside windows of `group_window` batches' worth of pairs, so a batch holds similar lengths and
    wastes little padding while the data order stays random at larger scale. Batch order is shuffled too.
    Every index appears exactly once. A single pair longer than half the budget is an error (filter first).
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens_per_batch must be >= 2, got {max_tokens}")
    longest = [max(c, r) for c, r in lengths]
    too_long = [i for i, n in enumerate(longest) if 2 * n > max_tokens]
    if too_long:
        raise ValueError(f"{len(too_long)} pairs need more than max_tokens_per_batch={max_tokens} on their own "
                         f"(longest sequence {max(longest)} tokens); raise the budget or lower max_length")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    mean_pairs = max(1, max_tokens // (2 * max(1, sum(longest) // max(1, len(longest)))))
    window = max(1, group_window * mean_pairs)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        current: list[int] = []
        width = 0
        for i in sorted(order[start : start + window], key=lambda j: longest[j]):
            new_width = max(width, longest[i])
            if current and 2 * (len(current) + 1) * new_width > max_tokens:
                batches.append(current)
                current, new_width = [], longest[i]
            current.append(i)
            width = new_width
        if current:
            batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches
