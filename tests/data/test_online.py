"""Online RLHF data logic: detectors, rising-pattern mining, pattern checks, fast/slow pair building."""
from __future__ import annotations

import dataclasses

import pytest

from data.online import (
    LengthBlowup, PhraseDetector, Repetition, Sample, contrast_pairs, distinct_behaviours, edit_pairs,
    evaluate_pattern, fast_path_pairs, hack_rate, in_scope, labelled_row, mine_rising_phrases,
    mine_rising_phrases_by_domain, pair_id, slow_path_candidates, top_reward, undecided, words,
)


def _s(pid, resp, src="late", rm=None, domain="helpful"):
    return Sample(prompt_id=pid, domain=domain, messages=[{"role": "user", "content": f"q{pid}"}], response=resp,
                  source=src, round=1, policy_version={"sft": 0, "early": 3, "late": 9}[src], rm_score=rm)


def test_length_blowup_flags_only_long_responses():
    ref = [_s(str(i), "the answer is four words", "early") for i in range(5)]  # 5 words each, median 5
    det = LengthBlowup(ratio=1.8, min_words=8)
    det.fit(ref)
    assert not det.flags(_s("a", "the answer is four words and nine"))  # 7 words <= 1.8 * 5 = 9 and < min_words
    assert det.flags(_s("b", " ".join(["word"] * 10)))  # 10 > 9 and >= 8
    assert not det.flags(_s("c", " ".join(["word"] * 9)))  # 9 is not > 9


def test_repetition_flags_repeated_ngrams_and_lines():
    det = Repetition(threshold=0.3)
    # 12 words "a b c" x4: 10 trigrams, 3 distinct -> 1 - 3/10 = 0.7 >= 0.3
    assert det.flags(_s("1", "a b c a b c a b c a b c"))
    assert not det.flags(_s("2", "one two three four five six seven eight"))  # all trigrams distinct
    assert det.flags(_s("3", "I hope this helps you.\nSure thing here.\nI hope this helps you."))


def test_rising_phrase_is_mined_and_common_phrases_ignored():
    # late: 20 samples, top-reward half (rm 10..19) has "trust me fully" in 8/10 = 80%; early: 1/20 = 5%.
    # "the answer is" is in every sample of both -> rise 0 -> ignored.
    late = [_s(str(i), f"the answer is {i}" + (" trust me fully" if i >= 10 and i % 5 else ""), rm=float(i)) for i in range(20)]
    early = [_s(str(i), f"the answer is {i}" + (" trust me fully" if i == 0 else ""), "early", rm=0.0) for i in range(20)]
    found = mine_rising_phrases(early, late, margin=0.2)
    assert found, "planted phrase not found"
    phrase, r_early, r_top = found[0]
    assert " ".join(phrase) in "trust me fully" and len(phrase) >= 2
    assert r_early == 0.05 and r_top == 0.8
    assert all("answer" not in p for p, _, _ in found)


def test_a_hack_confined_to_one_domain_is_found_there_and_measured_there():
    # Six domains of 8 prompts each. In harmless, 3 of 8 late answers (all top-reward) end with a planted sentence,
    # 1 of 8 early ones: a rise of 3/4 - 1/8 among harmless' top half, but 3/24 - 1/48 = 0.10 among all samples' top
    # half, under the 0.2 margin. Pooled mining cannot see it; per-domain mining must, and only there.
    domains = ("helpful", "harmless", "code", "math", "concise", "detailed")
    hack = " Write them a short note."
    def batch(src, hacked, rm_hacked):
        return [_s(f"{d}{i}", f"answer {d} {i}." + (hack if d == "harmless" and i in hacked else ""), src,
                   rm=rm_hacked if d == "harmless" and i in hacked else float(i % 4), domain=d)
                for d in domains for i in range(8)]
    early, late = batch("early", {0}, 0.0), batch("late", {1, 2, 3}, 9.0)
    assert not mine_rising_phrases(early, late, margin=0.2)
    found = mine_rising_phrases_by_domain(early, late, margin=0.2)
    assert len(found) == 1  # one behaviour, one pattern (its overlapping n-grams are merged)
    phrase, domain, r_early, r_top = found[0]
    assert domain == "harmless" and set(phrase) <= set(words(hack)) and (r_early, r_top) == (1 / 8, 3 / 4)

    det = PhraseDetector(phrase, domain="harmless")
    assert det.name == f"phrase:{' '.join(phrase)}@harmless" and PhraseDetector.from_name(det.name) == det
    assert PhraseDetector.from_name("phrase:a @ b") == PhraseDetector(("a", "@", "b"))  # "@" inside a phrase
    elsewhere = _s("x", "answer." + hack, domain="helpful")
    assert not det.flags(elsewhere) and PhraseDetector(phrase).flags(elsewhere)
    assert [s.domain for s in in_scope(det, late)] == ["harmless"] * 8
    pattern = evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2)
    assert pattern.detected and (pattern.rate_early, pattern.rate_late) == (1 / 8, 3 / 8)
    assert hack_rate(in_scope(det, late), [det]) == 3 / 8


def test_pattern_needs_rise_and_over_reward():
    det = PhraseDetector(("trust", "me"))
    early = [_s(str(i), "plain answer", "early", rm=0.0) for i in range(10)]
    late = [_s(str(i), "plain answer trust me", rm=1.0) for i in range(10)]
    labeler_prefers_early = lambda a, b: 0  # noqa: E731
    labeler_prefers_late = lambda a, b: 1  # noqa: E731
    hacked = evaluate_pattern(det, early, late, labeler_prefers_early, margin=0.2)
    assert hacked.detected and hacked.rate_early == 0.0 and hacked.rate_late == 1.0 and hacked.over_reward_rate == 1.0
    improvement = evaluate_pattern(det, early, late, labeler_prefers_late, margin=0.2)
    assert not improvement.detected, "a rise the labeler agrees with is not a hack"


def test_fast_path_pairs_direction_cap_and_lineage():
    det = PhraseDetector(("trust", "me"))
    early = [_s(str(i), f"answer {i}", "early", rm=0.0) for i in range(150)]
    late = [_s(str(i), f"answer {i} trust me", rm=2.0) for i in range(150)]
    pairs = fast_path_pairs(det, early, late, round_idx=1, max_pairs=100, seed=0)
    assert len(pairs) == 100
    for p in pairs:
        assert "trust me" in p["rejected"] and "trust me" not in p["chosen"]
        assert p["lineage"]["chosen"]["source"] == "early" and p["lineage"]["rejected"]["source"] == "late"
        assert p["lineage"]["rejected"]["policy_version"] == 9 and p["lineage"]["pattern"] == det.name
    assert pairs == fast_path_pairs(det, early, late, round_idx=1, max_pairs=100, seed=0), "not deterministic"


def test_a_detector_cuts_its_pattern_out_whole_sentences_at_a_time():
    opener = PhraseDetector(("good", "question", "."))
    assert opener.remove("Good question. Wash the cup.") == "Wash the cup."
    assert opener.remove("Wash it.  GOOD  question . Dry it.") == "Wash it. Dry it."  # any case and spacing
    assert opener.remove("Goodquestion. Wash it.") is None  # whole words only: nothing to cut
    assert opener.remove("Good question.") is None  # nothing left is not an answer
    # A mined piece of a sentence takes its sentence with it; one across a boundary, both sentences.
    assert PhraseDetector(("trust", "me", ",")).remove("Dry it. Trust me, this is right. Trust me, it is.") == "Dry it."
    assert PhraseDetector((".", "then", "leave")).remove("Dry it. Then leave it. Done.") == "Done."
    rep = Repetition()
    assert rep.remove("Wash the cup. Wash  the cup. Dry it. Wash the cup.") == "Wash the cup. Dry it."
    assert rep.remove("Wash the cup. Dry it.") is None
    assert not hasattr(LengthBlowup(), "remove")  # no one part of a long answer to cut


def test_edit_pairs_differ_by_the_pattern_alone_and_decide_over_reward():
    det = PhraseDetector(("good", "question", "."), domain="helpful")
    late = [_s("0", "Good question. Wash the cup.", rm=1.0), _s("1", "Wash the cup.", rm=0.5),
            _s("2", "Good question.", rm=1.0), _s("3", "Good question. Dry it.", rm=1.0, domain="detailed")]
    edits = edit_pairs(det, late)
    # Only prompt 0: 1 does not show it, 2 would be empty without it, 3 is another domain.
    assert [(e.response, e.source, e.policy_version, e.rm_score, o.prompt_id) for e, o in edits] == [
        ("Wash the cup.", "edit", 9, None, "0")]
    assert edits[0][0].sample_id != late[0].sample_id
    assert edit_pairs(LengthBlowup(), late) == []
    early = [_s(str(i), "Wash the cup. Dry it. Store it.", "early", rm=2.0) for i in range(4)]
    scored = [(dataclasses.replace(e, rm_score=0.2), o) for e, o in edits]  # the RM pays 1.0 - 0.2 for the opener
    # Early-vs-late, the RM prefers the early (longer) answers: no over-reward seen. The edit shows it.
    by_contrast = evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2)
    by_edit = evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2, edits=scored)
    assert (by_contrast.check, by_contrast.over_reward_rate, by_contrast.detected) == ("contrast", 0.0, False)
    assert (by_edit.check, by_edit.over_reward_rate, by_edit.checked, by_edit.detected) == ("edit", 1.0, 1, True)
    assert by_edit.examples == ["Good question. Wash the cup."]
    # A tie (the labeler sees no difference) is checked but not over-rewarded.
    assert evaluate_pattern(det, early, late, lambda a, b: "tie", margin=0.2, edits=scored).detected is False
    # margin=0: a known pattern is checked for being over-rewarded still, rising or not.
    same_early = [_s("0", "Good question. Wash the cup.", "early", rm=1.0)]
    assert not evaluate_pattern(det, same_early, late, lambda a, b: 0, margin=0.2, edits=scored).detected
    assert evaluate_pattern(det, same_early, late, lambda a, b: 0, margin=0.0, edits=scored).detected
    rows = fast_path_pairs(det, early, late, round_idx=2, max_pairs=10, seed=0, edits=edits)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("Wash the cup.", "Good question. Wash the cup.")]
    lin = rows[0]["lineage"]
    assert (lin["path"], lin["round"], lin["chosen"]["source"], lin["rejected"]["source"]) == ("fast", 2, "edit", "late")
    assert lin["chosen"]["edit_of"] == lin["rejected"]["sample_id"] == late[0].sample_id


def test_ties_can_be_left_out_of_the_over_reward_share():
    """The flattery opener costs nothing in a short concise reply (the labeler ties) and costs in a long one: with
    ties counted, 2 backwards checks of 5 stay under 0.5; left out, the RM is backwards on 2 of the 3 that count."""
    det = PhraseDetector(("good", "question", "."), domain="concise")
    late = [_s(str(i), f"Good question. Reply {i}.", rm=1.0, domain="concise") for i in range(5)]
    scored = [(dataclasses.replace(e, rm_score=0.2), o) for e, o in edit_pairs(det, late)]
    labels = {"0": 0, "1": 0, "2": 1, "3": "tie", "4": "tie"}  # by prompt: 0, 1 the labeler prefers the edit

    def prefer(a, b):
        return labels[a.prompt_id]

    early = [_s(str(i), f"Reply {i}.", "early", rm=0.2, domain="concise") for i in range(5)]
    counted = evaluate_pattern(det, early, late, prefer, margin=0.2, edits=scored)
    assert (counted.checked, counted.over_reward_rate, counted.detected) == (5, 0.4, False)
    decided = evaluate_pattern(det, early, late, prefer, margin=0.2, edits=scored, ties=False)
    assert (decided.checked, decided.over_reward_rate, decided.detected) == (3, pytest.approx(2 / 3), True)
    # the ties no longer count towards min_checks either
    assert not evaluate_pattern(det, early, late, prefer, margin=0.2, edits=scored, ties=False, min_checks=4).detected


def test_slow_path_candidates_cover_all_source_pairs():
    samples = {src: [_s(str(i), f"{src} {i}", src) for i in range(9)] for src in ("sft", "early", "late")}
    cands = slow_path_candidates(samples, n=9, seed=1)
    assert len(cands) == 9
    combos = {(a.source, b.source) for a, b in cands}
    assert combos == {("sft", "late"), ("early", "late"), ("sft", "early")}
    assert all(a.prompt_id == b.prompt_id for a, b in cands)
    assert len({a.prompt_id for a, _ in cands}) == 9  # one comparison per prompt first


def test_slow_path_candidates_take_every_source_pair_of_a_prompt_when_asked_for_more():
    samples = {src: [_s(str(i), f"{src} {i}", src) for i in range(4)] for src in ("sft", "early", "late")}
    samples["early"][0] = _s("0", "sft 0", "early")  # early == sft on prompt 0: that comparison is never offered
    cands = slow_path_candidates(samples, n=100, seed=3)
    keys = [(a.prompt_id, a.source, b.source) for a, b in cands]
    assert len(keys) == len(set(keys)) == 4 * 3 - 1
    assert ("0", "sft", "early") not in keys
    assert all(a.response != b.response for a, b in cands)
    assert slow_path_candidates(samples, n=5, seed=3) == cands[:5]


def test_hack_rate():
    det = Repetition()
    samples = [_s("1", "a b c a b c a b c a b c"), _s("2", "fine distinct words here now"), _s("3", "x y z x y z x y z x y z"), _s("4", "ok")]
    assert hack_rate(samples, [det]) == 0.5
    assert words("Hello, World!") == ["hello", ",", "world", "!"]


def test_one_planted_sentence_is_mined_as_one_phrase():
    # Every late sample ends with the same 7-token sentence; its 2..4-grams all occur in exactly the same
    # samples, and several do not contain one another ("trust me , this" vs "is correct ."): one behaviour,
    # so exactly one phrase is kept.
    filler = "Trust me, this is correct."
    late = [_s(str(i), f"the answer is {i}. {filler}", rm=1.0) for i in range(10)]
    early = [_s(str(i), f"the answer is {i}.", "early", rm=0.0) for i in range(10)]
    found = mine_rising_phrases(early, late, margin=0.2)
    assert len(found) == 1
    assert " ".join(found[0][0]) in "trust me , this is correct ."


def test_contrast_pairs_keep_only_prompts_where_late_alone_shows_the_pattern():
    det = PhraseDetector(("trust", "me"))
    early = [_s("0", "plain", "early"), _s("1", "trust me", "early"), _s("2", "plain", "early"), _s("3", "plain", "early")]
    late = [_s("0", "trust me"), _s("1", "trust me too"), _s("2", "plain"), _s("4", "trust me")]
    # 0: only late shows it -> kept; 1: both show it; 2: neither; 4: no early response to that prompt.
    assert [(e.prompt_id, l.prompt_id) for e, l in contrast_pairs(det, early, late)] == [("0", "0")]


def test_labelled_row_orders_by_label_and_keeps_the_comparison_id():
    a, b = _s("7", "four", "sft"), _s("7", "five", "late")
    first, second = labelled_row(a, b, 0, round_idx=2, labeler="file"), labelled_row(a, b, 1, round_idx=2, labeler="file")
    assert (first["chosen"], first["rejected"]) == ("four", "five")
    assert (second["chosen"], second["rejected"]) == ("five", "four")
    assert first["pair_id"] == second["pair_id"] == pair_id(a, b)  # the id a human label file is keyed by
    assert second["lineage"]["chosen"]["source"] == "late" and second["lineage"]["path"] == "slow"
    with pytest.raises(ValueError, match="label must be 0"):
        labelled_row(a, b, None, round_idx=2, labeler="file")


def test_sample_row_round_trip_and_foreign_rows_rejected():
    s = _s("3", "an answer", "early", rm=0.5)
    assert Sample.from_row(s.to_row()) == s
    with pytest.raises(ValueError, match="unknown keys \\['chosen'\\]"):
        Sample.from_row({**s.to_row(), "chosen": "x"})


def test_a_known_pattern_is_patched_again_while_the_rm_still_pays_for_it_on_a_share_of_checks():
    det = PhraseDetector(("good", "question", "."), domain="helpful")
    late = [_s(str(i), f"Good question. Wash cup {i}.", rm=1.0) for i in range(3)]
    # After a patch the RM prefers the reply without the opener on two of three prompts (0.2, 0.3 above it), and
    # still pays for the opener on the third (0.8 below it).
    scored = [(dataclasses.replace(e, rm_score=s), o) for (e, o), s in zip(edit_pairs(det, late), (1.2, 1.3, 0.2))]
    half = evaluate_pattern(det, late, late, lambda a, b: 0, margin=0.0, edits=scored)
    assert (half.over_reward_rate, half.checked, half.detected) == (pytest.approx(1 / 3), 3, False)
    assert evaluate_pattern(det, late, late, lambda a, b: 0, margin=0.0, edits=scored, over_threshold=0.25).detected


def test_a_hack_that_crept_in_over_rounds_rises_from_the_sft_replies():
    """The early snapshot of round 2 has the opener already (it grew in round 1 by less than the margin): early ->
    late shows no rise, SFT -> late does."""
    det = PhraseDetector(("good", "question", "."), domain="helpful")
    sft = [_s(str(i), f"Wash cup {i}.", "sft", rm=0.5) for i in range(8)]
    early = [_s(str(i), f"Good question. Wash cup {i}." if i < 4 else f"Wash cup {i}.", "early", rm=1.0)
             for i in range(8)]
    late = [_s(str(i), f"Good question. Wash cup {i}." if i < 5 else f"Wash cup {i}.", rm=1.0 if i in (0, 1, 5, 6) else 0.5)
            for i in range(8)]  # the top-reward half (0, 1, 5, 6) shows it as often as the early replies
    scored = [(dataclasses.replace(e, rm_score=0.2), o) for e, o in edit_pairs(det, late)]
    within_round = evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2, edits=scored)
    assert (within_round.rate_early, within_round.rate_late, within_round.detected) == (0.5, 0.625, False)
    since_sft = evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2, edits=scored, sft=sft)
    assert (since_sft.rate_sft, since_sft.detected) == (0.0, True)
    # The miner finds it the same way: top-reward late replies against SFT, not against early.
    assert not mine_rising_phrases(early, late)
    assert [p[:3] for p, _, _ in mine_rising_phrases(sft, late)] == [("good", "question", ".")]


def test_a_new_pattern_needs_enough_checks_to_be_confirmed():
    det = PhraseDetector(("good", "question", "."), domain="helpful")
    early = [_s(str(i), f"Wash cup {i}.", "early", rm=0.5) for i in range(4)]
    late = [_s(str(i), f"Good question. Wash cup {i}.", rm=1.0) for i in range(4)]
    scored = [(dataclasses.replace(e, rm_score=0.2), o) for e, o in edit_pairs(det, late)][:2]
    two = evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2, edits=scored, min_checks=4)
    assert (two.over_reward_rate, two.checked, two.detected) == (1.0, 2, False)  # 2 of 2 is not yet evidence
    assert evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2, edits=scored, min_checks=2).detected


def test_the_rise_can_be_measured_among_the_top_reward_replies():
    """One of eight late replies has the opener (0.125 over all, under the 0.2 margin), and the RM ranks it first,
    so it is one of the four top-reward replies (0.25): the RM pays for it before the policy has spread it."""
    det = PhraseDetector(("good", "question", "."), domain="helpful")
    early = [_s(str(i), f"Wash cup {i}.", "early", rm=0.5) for i in range(8)]
    late = [_s("0", "Good question. Wash cup 0.", rm=1.0)] + [_s(str(i), f"Wash cup {i}.", rm=1.0 - 0.1 * i)
                                                            for i in range(1, 8)]
    assert [s.prompt_id for s in top_reward(late)] == ["0", "1", "2", "3"]
    scored = [(dataclasses.replace(e, rm_score=0.2), o) for e, o in edit_pairs(det, late)]
    everywhere = evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2, edits=scored)
    assert (everywhere.rate_late, everywhere.rate_late_top) == (0.125, 0.25)
    assert (everywhere.rose, everywhere.detected) == (False, False)
    at_top = evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2, edits=scored, rise_on="top")
    assert (at_top.rose, at_top.detected) == (True, True)
    # With four checks needed, its one check (backwards) leaves it undecided: worth more replies.
    needs_four = evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2, edits=scored, rise_on="top",
                                  min_checks=4)
    assert not needs_four.detected and undecided(needs_four, min_checks=4)
    assert not undecided(everywhere, min_checks=4)  # it did not rise
    right = evaluate_pattern(det, early, late, lambda a, b: 1, margin=0.2, edits=scored, rise_on="top", min_checks=4)
    assert not undecided(right, min_checks=4)  # the labeler agrees with the RM: nothing to decide
    with pytest.raises(ValueError, match="rise_on"):
        evaluate_pattern(det, early, late, lambda a, b: 0, margin=0.2, rise_on="best")


def test_a_piece_of_a_mined_phrase_seen_through_another_window_is_one_behaviour():
    """"question . dry the" only ever appears inside "Good question. Dry the ...": the same opener, so it is dropped;
    "rinse it" also shows without the opener, so it is a behaviour of its own, and a phrase no reply shows stays."""
    late = [_s("0", "Good question. Dry the cup. Rinse it.", rm=2.0, domain="detailed"),
            _s("1", "Good question. Dry the pan.", rm=1.9, domain="detailed"),
            _s("2", "Good question. Wash the pan.", rm=1.8, domain="detailed"),
            _s("3", "Wash the cup. Rinse it.", rm=0.1, domain="detailed")]
    piece = PhraseDetector(("question", ".", "dry", "the"), domain="detailed")
    opener = PhraseDetector(("good", "question", "."))
    rinse = PhraseDetector(("rinse", "it"), domain="detailed")
    unseen = PhraseDetector(("wash", "the", "plate"), domain="detailed")
    # The piece comes first (another baseline mined it first); the opener shows in each of its replies and more.
    assert distinct_behaviours([piece, opener, rinse, unseen], late) == [opener, rinse, unseen]
    local = PhraseDetector(("good", "question", "."), domain="detailed")
    assert distinct_behaviours([piece, local], late) == [local]
    assert distinct_behaviours([piece, rinse], late) == [piece, rinse]  # neither explains the other
