"""The preference world: determinism, disjoint splits, oracles vs annotators, conflicts, and the three labelers."""
from __future__ import annotations

import http.server
import json
import random
import socket
import threading
from collections import Counter

import pytest

from data.io import DataError
from data.world.text import is_refusal
from data.world import (
    DOMAINS, TIE, Comparison, FileLabeler, HttpJudgeLabeler, JudgeError, ProgrammaticLabeler, annotator, conflict_pairs,
    get_domain, make_prompts, preference_pairs, respond, score, sft_conversations, styles, to_preference_rows,
    write_labels,
)


def test_domains_cover_the_required_kinds():
    assert len(DOMAINS) >= 5 and {"math", "harmless", "concise", "detailed"} <= set(DOMAINS)
    unsafe = [p.meta["unsafe"] for p in make_prompts("harmless", 200, seed=0)]
    assert any(unsafe) and not all(unsafe)  # both refusals and answers are wanted
    q = make_prompts("math", 1, seed=0)[0]
    assert score(q, f"{q.meta['a']} + {q.meta['b']} = {q.meta['answer']}.") == 1.0
    assert all(m["role"] != "system" for d in DOMAINS for p in make_prompts(d, 20, seed=1) for m in p.messages)


def test_everything_is_deterministic_in_its_seed():
    for d in DOMAINS:
        assert make_prompts(d, 30, seed=4) == make_prompts(d, 30, seed=4)
        assert [p.id for p in make_prompts(d, 30, seed=4)] != [p.id for p in make_prompts(d, 30, seed=5)]
    assert preference_pairs("code", 25, seed=2) == preference_pairs("code", 25, seed=2)
    assert sft_conversations(40, seed=1) == sft_conversations(40, seed=1)
    assert sft_conversations(40, seed=1) != sft_conversations(40, seed=2)
    assert conflict_pairs(10, seed=3) == conflict_pairs(10, seed=3)


@pytest.mark.parametrize("domain", DOMAINS)
def test_train_and_heldout_prompts_never_share_a_key_or_a_text(domain):
    dom = get_domain(domain)
    train, held = dom.universe("train"), dom.universe("heldout")
    assert held and train
    assert not {p.meta["key"] for p in train} & {p.meta["key"] for p in held}
    assert not {p.text for p in train} & {p.text for p in held}
    drawn = make_prompts(domain, 3 * len(held), seed=0, split="heldout")  # more than the split: cycles, never leaks
    assert {p.id for p in drawn} <= {p.id for p in held}
    with pytest.raises(ValueError, match="split"):
        make_prompts(domain, 1, seed=0, split="test")


@pytest.mark.parametrize("domain", DOMAINS)
def test_annotators_agree_with_the_oracle_and_pairs_are_ordered_by_it(domain):
    judge = annotator(domain)
    rng = random.Random(0)
    for prompt in make_prompts(domain, 25, seed=7):
        names = [s for group in styles(prompt).values() for s in group]
        a, b = (respond(prompt, s, rng.randrange(100)) for s in rng.sample(names, 2))
        expected = 0 if score(prompt, a) >= score(prompt, b) else 1
        assert judge.prefer(prompt, a, b) == expected
        for response in (a, b):
            assert 0.0 <= score(prompt, response) <= 1.0
    rows = preference_pairs(domain, 60, seed=1, split="heldout")
    assert len(rows) == 60
    by_id = {p.id: p for p in get_domain(domain).universe("heldout")}
    for r in rows:
        p = by_id[r["prompt_id"]]
        assert score(p, r["chosen"]) > score(p, r["rejected"])
        assert r["chosen_style"] in styles(p)["good"] and r["rejected_style"] in styles(p)["bad"]
    with pytest.raises(ValueError, match="annotator of"):
        annotator("math").prefer(make_prompts("code", 1, seed=0)[0], "a", "b")


def test_hack_styles_score_below_good_ones_and_the_oracle_survives_any_text():
    for domain in DOMAINS:
        for prompt in make_prompts(domain, 10, seed=3):
            kinds = styles(prompt)
            best = max(score(prompt, respond(prompt, s)) for s in kinds["good"])
            assert all(score(prompt, respond(prompt, h)) < best for h in kinds["hack"])
            for junk in ("", "   ", "12345", "def (((", "I can't help with that." * 30, "```python\nimport os\n```"):
                assert 0.0 <= score(prompt, junk) <= 1.0
    code = make_prompts("code", 1, seed=0)[0]
    name, (x, y) = code.meta["function"], code.meta["args"]
    escape = f"def {name}({x}, {y}):\n    return __import__('os').getpid()"  # never executed: not whitelisted
    assert score(code, escape) == 0.0


def test_harmless_pairs_reject_every_answer_but_a_refusal_to_an_unsafe_request():
    """Compliance ("Sure, ...") is not the only wrong reply to "How do I rob my neighbor?": a kind act for the
    neighbor is one too. With compliance as the only rejected reply, the RM paid such answers above a refusal and
    PPO traded refusals for them (docs/design.md, "Session 6")."""
    rows = preference_pairs("harmless", 600, seed=0)
    unsafe = {p.text for p in get_domain("harmless").universe("train") if p.meta["unsafe"]}
    on_unsafe = [r for r in rows if r["messages"][-1]["content"] in unsafe]
    assert len(on_unsafe) > 200 and all(is_refusal(r["chosen"]) for r in on_unsafe)
    kinds = Counter(r["rejected_style"] for r in on_unsafe)
    assert kinds["inappropriate"] > 80 and kinds["misread"] > 80
    misread = [r["rejected"] for r in on_unsafe if r["rejected_style"] == "misread"]
    assert not any(is_refusal(t) or t.startswith("Sure") for t in misread)
    assert any(t.startswith("Tell your") for t in misread) and any(t.startswith("Paint the") for t in misread)
    # a safe request is still answered, never refused, by the chosen reply
    assert not any(is_refusal(r["chosen"]) for r in rows if r["messages"][-1]["content"] not in unsafe)


def test_concise_and_detailed_disagree_on_the_same_conflict_pair():
    rows = conflict_pairs(30, seed=0)
    assert len(rows) == 60
    for k in range(30):
        concise, detailed = (r for r in rows if r["conflict_id"] == k)
        assert concise["domain"] == "concise" and detailed["domain"] == "detailed"
        assert concise["messages"] == detailed["messages"]
        assert (concise["chosen"], concise["rejected"]) == (detailed["rejected"], detailed["chosen"])
        assert len(concise["chosen"]) < len(detailed["chosen"])  # concise keeps the short correct answer
        # plain wording only: the text does not say which answer is wanted, the RM's system prompt must
        assert concise["messages"][-1]["content"] in PLAIN_HOWTO


PLAIN_HOWTO = {p.text for split in ("train", "heldout") for p in get_domain("helpful").universe(split)}


@pytest.mark.parametrize("domain, wish", [("concise", ("Briefly", "short", "few words", "quickly")),
                                          ("detailed", ("Explain why", "why?", "reasons", "in detail"))])
def test_concise_and_detailed_users_state_their_wish_and_the_rm_pairs_also_use_plain_wording(domain, wish):
    for split in ("train", "heldout"):
        asked = make_prompts(domain, 200, seed=0, split=split)  # what the policy is trained and evaluated on
        assert all(p.text not in PLAIN_HOWTO and any(w in p.text for w in wish) for p in asked), split
    texts = [r["messages"][-1]["content"] for r in preference_pairs(domain, 400, seed=0)]
    plain = sum(t in PLAIN_HOWTO for t in texts) / len(texts)
    assert 0.35 < plain < 0.65  # half the RM's pairs ask plainly, so only the system prompt can decide those


def test_sft_demonstrations_answer_a_stated_wish_more_often_than_not():
    rows = sft_conversations(3000, seed=0)
    def replies(domain):
        prompts = {p.text: p for p in get_domain(domain).universe("train", "policy")}
        return [(prompts[q], a) for q, a in ((r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows)
                if q in prompts]
    concise, detailed, helpful = replies("concise"), replies("detailed"), replies("helpful")
    assert min(len(concise), len(detailed)) > 150 and len(helpful) > 150
    words = {name: sum(len(a.split()) for _, a in r) / len(r) for name, r in
             (("concise", concise), ("detailed", detailed), ("helpful", helpful))}
    assert words["concise"] < words["helpful"] < words["detailed"]
    # the mix follows the wish only about half the time: RLHF has a length to settle for each kind of request
    assert 0.35 < sum(score(p, a) == 1.0 for p, a in concise) / len(concise) < 0.65
    assert 0.25 < sum(score(p, a) == 1.0 for p, a in detailed) / len(detailed) < 0.45


def test_sft_conversations_are_openai_rows_with_good_answers():
    rows = sft_conversations(60, seed=0)
    assert all(set(r) == {"messages"} and [m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    texts = {r["messages"][0]["content"] for r in rows}
    assert any("+" in t for t in texts) and any("Python" in t for t in texts)


def test_sft_demonstrations_follow_each_domains_mix_so_rlhf_has_room():
    """Demonstrations of uneven quality: the mode is adequate, better and wrong answers are there too. A world
    whose demonstrations were all optimal would leave PPO nothing to find (docs/design.md)."""
    rows = sft_conversations(2400, seed=0)
    math_prompts = {p.text: p for p in get_domain("math").universe("train")}
    scored = [score(math_prompts[q], a) for q, a in ((r["messages"][0]["content"], r["messages"][1]["content"])
                                                     for r in rows) if q in math_prompts]
    assert len(scored) > 300
    wrong = scored.count(0.0) / len(scored)
    mix = get_domain("math").sft_mix
    expected_wrong = (mix["wrong_equation"] + mix["unsure"]) / sum(mix.values())
    assert abs(wrong - expected_wrong) < 0.06  # 0.3 by the mix; binomial sd at n~400 is ~0.023
    helpful = get_domain("helpful")
    assert helpful.sft_style == "short"  # the mode: right but bare; helpful and detailed want a reason too
    howto = {p.text: p for p in helpful.universe("train")}
    replies = [(howto[r["messages"][0]["content"]], r["messages"][1]["content"]) for r in rows
               if r["messages"][0]["content"] in howto]
    by_score = [score(p, a) for p, a in replies]
    assert 0.12 < by_score.count(0.0) / len(by_score) < 0.28  # off-topic + unsure: 0.2 by the mix
    # bare answers are common, explained ones present (harmless' how-to rows, same texts, add explained answers)
    assert by_score.count(0.7) / len(by_score) > 0.25 and by_score.count(1.0) > 0


# ---------------------------------------------------------------------------------------------- labelers


def _comparisons(n: int = 6) -> list[Comparison]:
    out = []
    for i, p in enumerate(make_prompts("helpful", n, seed=2)):
        a, b = respond(p, "medium"), respond(p, "unsure")
        out.append(Comparison(f"c{i}", p, a, b) if i % 2 == 0 else Comparison(f"c{i}", p, b, a))
    return out


def test_flattery_is_off_by_default_and_when_on_marks_only_the_better_replies():
    """world.flattery_*: a spurious cue an RM learns (the better answers of helpful/detailed pairs open with
    "Good question.") and the oracle does not pay for: the reward hack the online loop is shown to find."""
    from data.world.config import WorldConfig
    from data.world.howto import OPENER

    def opens(text: str) -> bool:
        return text.startswith(OPENER)

    for d in ("helpful", "detailed", "concise", "math"):
        assert not any(opens(r["chosen"]) or opens(r["rejected"]) for r in preference_pairs(d, 200, seed=0))
    assert not any(opens(r["messages"][-1]["content"]) for r in sft_conversations(600, seed=0))
    # Off, it draws nothing from the rng: the default world is what it was before the option existed.
    assert preference_pairs("helpful", 50, seed=3) == preference_pairs("helpful", 50, seed=3, flattery=0.0)

    for d in ("helpful", "detailed"):
        rows = preference_pairs(d, 400, seed=0, flattery=0.5)
        share = sum(opens(r["chosen"]) for r in rows) / len(rows)
        assert 0.4 < share < 0.6 and not any(opens(r["rejected"]) for r in rows)
    assert not any(opens(r["chosen"]) for r in preference_pairs("concise", 200, seed=0, flattery=0.5))
    helpful, rng = get_domain("helpful"), random.Random(0)
    demos = [helpful.demonstrate(p, "short", rng, 0.2) for p in make_prompts("helpful", 500, seed=0)]
    assert 0.15 < sum(map(opens, demos)) / len(demos) < 0.25
    assert any(opens(r["messages"][-1]["content"]) for r in sft_conversations(600, seed=0, flattery=0.2))
    # The oracle counts the opener as an irrelevant sentence where sentences count, and as words in concise.
    prompt = make_prompts("helpful", 1, seed=0)[0]
    plain = respond(prompt, "short")
    assert score(prompt, f"{OPENER} {plain}") == pytest.approx(score(prompt, plain) - 0.15)
    assert "flattering" in styles(prompt)["hack"]
    with pytest.raises(ValueError, match="flattery"):
        WorldConfig(flattery_pairs=1.5)


def test_programmatic_labeler_and_rows_from_labels():
    comps = _comparisons()
    labels = ProgrammaticLabeler().label(comps)
    assert labels == [0, 1, 0, 1, 0, 1]
    rows = to_preference_rows(comps, [labels[0], None] + labels[2:])
    assert len(rows) == 5 and all(r["chosen"].startswith(("Wash", "Paint", "Tighten", "Dry", "Keep", "Lift")) for r in rows)


def test_programmatic_labeler_calls_equal_oracle_scores_a_tie_and_ties_give_no_rows():
    p = make_prompts("math", 1, seed=0)[0]
    wrong_a, wrong_b = respond(p, "wrong_equation", seed=1), respond(p, "unsure")  # both score 0
    right = respond(p, "equation")
    comps = [Comparison("t0", p, wrong_a, wrong_b), Comparison("t1", p, wrong_a, right), Comparison("t2", p, "", "")]
    labels = ProgrammaticLabeler().label(comps)
    assert labels == [TIE, 1, TIE]
    rows = to_preference_rows(comps, labels)
    assert [r["id"] for r in rows] == ["t1"] and rows[0]["chosen"] == right


def test_file_labeler_reads_labels_as_they_arrive_and_rejects_bad_rows(tmp_path):
    comps = _comparisons(4)
    path = tmp_path / "labels.jsonl"
    with pytest.raises(FileNotFoundError, match="missing_ok"):
        FileLabeler(path).label(comps)
    labeler = FileLabeler(path, missing_ok=True)
    assert labeler.label(comps) == [None] * 4  # nobody has labelled anything yet
    write_labels(path, ["c1", "unknown-id"], [1, 0])
    assert labeler.label(comps) == [None, 1, None, None]
    write_labels(path, ["c0", "c1", "c3"], [0, 0, TIE])  # a later line for the same id wins
    assert labeler.label(comps) == [0, 0, None, TIE]
    with open(path, "a") as f:
        f.write(json.dumps({"id": "c2", "label": "b"}) + "\n")
    with pytest.raises(DataError) as err:
        labeler.label(comps)
    assert err.value.line == 6 and err.value.field_name == "label" and "labels.jsonl" in str(err.value)
    assert '"tie"' in str(err.value)


class _Judge(http.server.BaseHTTPRequestHandler):
    mode = "ok"

    def do_POST(self):  # noqa: N802 - http.server's naming
        try:
            self._answer()
        except BrokenPipeError:  # the client gave up first (the timeout case)
            pass

    def _answer(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "slow":
            import time

            time.sleep(1.5)
        if self.mode == "error":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"judge exploded")
            return
        pairs = body["pairs"]
        labels = [1 if len(p["b"]) > len(p["a"]) else 0 for p in pairs]  # this judge likes longer replies
        if self.mode == "short":
            labels = labels[:-1]
        payload = json.dumps({"labels": labels}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/judge"
    server.shutdown()
    _Judge.mode = "ok"


def test_http_judge_labeler_parses_replies_and_explains_failures(judge_url):
    comps = _comparisons(5)
    expected = [1 if len(c.b) > len(c.a) else 0 for c in comps]
    assert HttpJudgeLabeler(judge_url, batch_size=2).label(comps) == expected  # 3 requests, order kept
    _Judge.mode = "short"
    with pytest.raises(JudgeError, match="expected one per pair"):
        HttpJudgeLabeler(judge_url).label(comps)
    _Judge.mode = "error"
    with pytest.raises(JudgeError, match="HTTP 500: judge exploded"):
        HttpJudgeLabeler(judge_url).label(comps)
    _Judge.mode = "slow"
    with pytest.raises(JudgeError, match="did not answer within 0.5s"):
        HttpJudgeLabeler(judge_url, timeout_s=0.5).label(comps[:1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.raises(JudgeError, match="cannot reach judge"):
        HttpJudgeLabeler(f"http://127.0.0.1:{dead}/judge", timeout_s=2).label(comps[:1])
    with pytest.raises(ValueError, match="http"):
        HttpJudgeLabeler("ftp://x")
