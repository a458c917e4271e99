"""Preference formats (coolray, Anthropic-HH, UltraFeedback), malformed rows, and token-budget batching."""
from __future__ import annotations

import json
import random

import pytest

from data.io import DataError, RowErrors
from data.preferences import padded_tokens, read_preferences, token_budget_batches

HH_CHOSEN = "\n\nHuman: Hi, how do I clean a cup?\n\nAssistant: With what?\n\nHuman: Soap.\n\nAssistant: Wash it with soap."
HH_REJECTED = "\n\nHuman: Hi, how do I clean a cup?\n\nAssistant: With what?\n\nHuman: Soap.\n\nAssistant: No idea."


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_three_formats_give_the_same_kind_of_pair(tmp_path):
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5.", "domain": "math"},
        {"messages": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}], "domain": "helpful", "id": "greet"},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"prompt": "Name a color.", "chosen": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Seven."}],
         "score_chosen": 8.0, "score_rejected": 2.0},
    ]
    pairs = read_preferences(_write(tmp_path, rows), default_domain="helpful")
    math, greet, hh, uf = pairs
    assert (math.domain, math.messages, math.chosen, math.rejected) == (
        "math", [{"role": "user", "content": "What is 2 + 2?"}], "4.", "5.")
    assert greet.id == "greet" and greet.chosen == "Hello!" and greet.rejected == "Go away."
    assert hh.domain == "helpful" and hh.id == "pairs.jsonl:3"  # no domain in HH rows: the file's default
    assert [m["role"] for m in hh.messages] == ["user", "assistant", "user"]
    assert hh.messages[0]["content"] == "Hi, how do I clean a cup?" and hh.messages[2]["content"] == "Soap."
    assert (hh.chosen, hh.rejected) == ("Wash it with soap.", "No idea.")
    assert uf.messages == [{"role": "user", "content": "Name a color."}] and (uf.chosen, uf.rejected) == ("Blue.", "Seven.")
    # an explicit format must agree with the rows
    assert read_preferences(_write(tmp_path, [rows[2]], "hh.jsonl"), fmt="hh", default_domain="harmless")[0].domain == "harmless"


@pytest.mark.parametrize("row,fmt,field,problem", [
    ({"chosen": "a", "rejected": "b", "domain": "math"}, "coolray", "prompt", "is missing"),
    ({"prompt": "q", "chosen": "a", "domain": "math"}, "coolray", "rejected", "is missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "coolray", "domain", "is missing"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b", "domain": "m"}, "coolray", "chosen",
     "must end with an assistant message"),
    ({"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b", "domain": "m"}, "coolray",
     "messages[0]", "role"),
    ({"chosen": "Human: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi"}, "hh", "chosen", "must start with"),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("Soap.", "Water."), "domain": "h"}, "hh", "rejected", "differs"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}], "domain": "h"},
     "ultrafeedback", "rejected", "differs"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, row, fmt, field, problem):
    good = {"coolray": {"prompt": "q", "chosen": "a", "rejected": "b", "domain": "math"},
            "hh": {"chosen": HH_CHOSEN, "rejected": HH_REJECTED, "domain": "h"},
            "ultrafeedback": {"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
                              "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}],
                              "domain": "h"}}[fmt]
    path = _write(tmp_path, [good, row])
    with pytest.raises(DataError) as err:
        read_preferences(path, fmt=fmt)
    assert (err.value.line, err.value.field_name) == (2, field)
    assert problem in str(err.value) and str(path) in str(err.value)


def test_on_error_skip_counts_bad_lines_and_keeps_reading(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b", "domain": "math"}
    path = _write(tmp_path, [good, "{not json", [1, 2], {"prompt": "q", "chosen": "a", "domain": "math"}, good])
    errors = RowErrors("skip")
    assert len(read_preferences(path, errors=errors)) == 2
    assert errors.skipped == 3 and ":2:" in errors.examples[0] and "not valid JSON" in errors.examples[0]
    with pytest.raises(DataError, match=":2:"):
        read_preferences(path)  # the default policy fails on the first bad line


# ---------------------------------------------------------------------------------------------- batching


def _lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(20, 300), rng.randint(20, 300)) for _ in range(n)]


def test_token_budget_batches_cover_every_pair_once_within_budget():
    lengths = _lengths(1000)
    batches = token_budget_batches(lengths, max_tokens=4096, seed=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))  # each pair (chosen + rejected together) exactly once
    assert all(padded_tokens([lengths[i] for i in b]) <= 4096 for b in batches)
    sizes = {len(b) for b in batches}
    assert len(sizes) > 3  # pairs per batch follow their lengths, not a fixed count
    # length grouping: little padding compared with the same batch sizes over shuffled pairs
    real = sum(c + r for c, r in lengths)
    padded = sum(padded_tokens([lengths[i] for i in b]) for b in batches)
    assert real / padded > 0.75


def test_token_budget_batches_are_deterministic_per_seed_and_reject_oversized_pairs():
    lengths = _lengths(300, seed=1)
    assert token_budget_batches(lengths, 2048, seed=3) == token_budget_batches(lengths, 2048, seed=3)
    assert token_budget_batches(lengths, 2048, seed=3) != token_budget_batches(lengths, 2048, seed=4)
    short = [(10, 12)] * 100
    # equal pairs of 2 x 12 padded tokens: 2048 // 24 = 85 pairs fit, the other 15 make a second batch
    assert sorted(len(b) for b in token_budget_batches(short, 2048, seed=0)) == [15, 85]
    with pytest.raises(ValueError, match="max_tokens_per_batch=256"):
        token_budget_batches([(10, 10), (200, 30)], 256, seed=0)
