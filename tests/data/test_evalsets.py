"""Eval-set construction and scoring (data/evalsets.py): values derived by hand in the comments."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from data import evalsets as ev
from data.io import DataError


# ---------------------------------------------------------------------------------------------- Levenshtein / CDME


@pytest.mark.parametrize("a, b, distance", [
    ("kitten", "sitting", 3),  # k->s, e->i, insert g
    ("flaw", "lawn", 2),  # delete f, insert n
    ("", "abc", 3),  # three insertions
    ("abc", "abc", 0),
    ("ab", "ba", 2),  # no transpositions in Levenshtein: two substitutions
])
def test_levenshtein_hand_examples(a, b, distance):
    assert ev.levenshtein(a, b) == distance
    assert ev.levenshtein(b, a) == distance


def test_cdme_score_hand_examples():
    # 100 * (1 - 3/7): Lev(kitten, sitting) = 3, the longer string has 7 characters.
    assert ev.cdme_score("kitten", "sitting") == pytest.approx(100 * (1 - 3 / 7))
    # Whitespace is stripped from both sides before comparing, so spacing never costs.
    assert ev.cdme_score(" The pass key is\n12345 . ", "The pass key is 12345.") == 100.0
    # "Thepasskeyis12345." has 3+4+3+2+5+1 = 18 characters; one wrong digit = one substitution: 100 * (1 - 1/18).
    assert ev.cdme_score("The pass key is 12346.", "The pass key is 12345.") == pytest.approx(100 * 17 / 18)
    # An empty answer against a non-empty reference: Lev = |ref| = max length, score 0. Two empties: 100.
    assert ev.cdme_score("", "The pass key is 1.") == 0.0
    assert ev.cdme_score("   ", "") == 100.0


def test_exact_match_ignores_case_space_and_surrounding_punctuation():
    assert ev.exact_match("  The Answer is 7. ", "the answer is 7") == 1.0
    assert ev.exact_match("7", "17") == 0.0


# ---------------------------------------------------------------------------------------------- perplexity


def test_perplexity_is_token_weighted():
    # Two documents: NLL 2.0 over 1 token and 4.0 over 3 tokens. Token-weighted: exp((2 + 4) / (1 + 3)) =
    # exp(1.5) = 4.4817; a per-document mean would give exp((2/1 + 4/3) / 2) = exp(1.667) = 5.29 instead.
    assert ev.perplexity([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(1.5))
    with pytest.raises(ValueError, match="zero tokens"):
        ev.perplexity([0.0], [0])


def test_read_texts_and_heldout_slice(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n')
    (tmp_path / "b.txt").write_text("four\nstill four\n\nfive\n")  # blank-line separated documents
    texts = ev.read_texts(tmp_path)
    assert texts == ["one", "two", "three", "four\nstill four", "five"]  # sorted files, rows in order
    # ceil(5 * 0.5) = 3 documents from the end; max_docs caps it.
    assert ev.heldout_slice(texts, 0.5, 10) == ["three", "four\nstill four", "five"]
    assert ev.heldout_slice(texts, 0.5, 1) == ["three"]
    assert ev.heldout_slice(texts, 0.01, 10) == ["five"]  # at least one document


def test_read_texts_names_file_line_and_field(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError) as e:
        ev.read_texts(bad)
    assert f"{bad}:2" in str(e.value) and "'text'" in str(e.value) and "text_field" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.read_texts(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- domains and win rates


@dataclass(frozen=True)
class FakePrompt:
    id: str
    domain: str
    meta: dict = field(default_factory=dict)


def test_domain_scores_average_the_given_oracle_per_domain():
    prompts = [FakePrompt("a", "math", {"answer": "3"}), FakePrompt("b", "math", {"answer": "5"}),
               FakePrompt("c", "chat", {"answer": "hi"})]

    def scorer(p, r):
        return float(r == p.meta["answer"])

    # math: one right of two = 0.5; chat: one right of one = 1.0.
    assert ev.domain_scores(prompts, ["3", "4", "hi"], scorer) == {"math": 0.5, "chat": 1.0}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ev.domain_scores(prompts[:1], ["3"], lambda p, r: 2.0)


def test_reward_wins_count_ties_half():
    # 1 vs 1 tie -> 0.5; 2 < 3 -> 0; 3 > 2 -> 1; mean 0.5.
    wins = ev.reward_wins([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert wins == [0.5, 0.0, 1.0]
    assert ev.mean(wins) == 0.5


def test_judged_wins_swap_order_and_count_split_verdicts_half():
    p = FakePrompt("x", "chat")
    calls = []

    def prefer_longer(prompt, a, b):
        calls.append((a, b))
        return 0 if len(a) >= len(b) else 1

    # Longer candidate wins in both orders -> 1; shorter loses in both -> 0.
    assert ev.judged_wins([p, p], ["aaa", "a"], ["a", "aaa"], prefer_longer) == [1.0, 0.0]
    # Identical responses are a tie without asking the judge.
    calls.clear()
    assert ev.judged_wins([p], ["same"], ["same"], prefer_longer) == [0.5]
    assert calls == []
    # A judge that always prefers the first shown: wins one order, loses the other -> a tie.
    assert ev.judged_wins([p], ["a"], ["b"], lambda *_: 0) == [0.5]


# ---------------------------------------------------------------------------------------------- needle


def test_needle_lengths_and_depths():
    # limit 992 in 4 steps: 992*1//4, 992*2//4, 992*3//4, 992.
    assert ev.needle_lengths(992, 4) == [248, 496, 744, 992]
    assert ev.needle_depths(5) == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert ev.needle_depths(1) == [50.0]


def _char_tokenizer():
    """One token per character, plus a 7-token chat template: lengths are easy to reason about."""
    def encode(s):
        return [ord(c) for c in s]

    def decode(ids):
        return "".join(chr(i) for i in ids)

    def count_prompt(messages):
        return 7 + sum(len(m["content"]) for m in messages)

    return encode, decode, count_prompt


FILLER = ["Alpha beta gamma delta. Epsilon zeta eta theta.", "Iota kappa lambda mu. Nu xi omicron pi."]


@pytest.mark.parametrize("depth", [0.0, 50.0, 100.0])
def test_needle_case_fits_the_length_and_sits_at_its_depth(depth):
    encode, decode, count = _char_tokenizer()
    case = ev.build_needle_cases(FILLER, [600], [depth], 1, seed=3, encode=encode, decode=decode,
                                 count_prompt=count)[0]
    content = case.messages[0]["content"]
    assert case.reference in content and case.reference.startswith("The pass key is ")
    # Never longer than asked, and no more than a couple of tokens shorter (joins may drop a space).
    assert 596 <= case.n_tokens == count(case.messages) <= 600
    haystack = content[len(ev.NEEDLE_INTRO):content.index(ev.NEEDLE_QUESTION)]
    where = 100.0 * haystack.index(case.reference) / (len(haystack) - len(case.reference))
    # The needle moves back to the previous sentence end (sentences here are < 30 chars = 5 % of the haystack).
    assert depth - 6.0 <= where <= depth + 0.5


def test_needle_cases_reject_lengths_without_room_for_filler():
    encode, decode, count = _char_tokenizer()
    with pytest.raises(ValueError, match="needle.lengths above"):
        ev.build_needle_cases(FILLER, [100], [0.0], 1, 0, encode, decode, count)


def test_needle_passkeys_are_seeded():
    assert ev.passkey_needle(0, 100, 50.0, 0) == ev.passkey_needle(0, 100, 50.0, 0)
    assert ev.passkey_needle(0, 100, 50.0, 0) != ev.passkey_needle(1, 100, 50.0, 0)


def test_aggregate_needle_grid():
    cases = [ev.NeedleCase(f"c{i}", n, d, [], "", n) for i, (n, d) in
             enumerate([(100, 0.0), (100, 0.0), (100, 100.0), (200, 0.0), (200, 100.0)])]
    # (0 %, 100 tok): repeats 100 and 50 -> 75; (100 %, 100) -> 0; (0 %, 200) -> 100; (100 %, 200) -> 40.
    agg = ev.aggregate_needle(cases, [100.0, 50.0, 0.0, 100.0, 40.0])
    assert agg["lengths"] == [100, 200] and agg["depths"] == [0.0, 100.0]
    assert agg["grid"] == [[75.0, 100.0], [0.0, 40.0]]
    assert agg["by_length"] == {"100": 50.0, "200": 70.0}  # (100+50+0)/3, (100+40)/2
    assert agg["by_depth"] == {"0": pytest.approx(250 / 3), "100": 20.0}  # (100+50+100)/3, (0+40)/2
    assert agg["mean"] == pytest.approx(290 / 5)
