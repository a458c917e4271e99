"""End of an online RLHF round: hack detection -> fast pairs, human labels -> slow pairs, RM update, idempotence."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from algo.stats import excess_reduction
import jobs.rlhf_rm_update as rm_update
import jobs.rlhf_rounds as rounds
from data.online import words
from data.world import get_domain, respond, write_labels
from jobs.rlhf_rounds import OnlineConfig, RMUpdateConfig, RoundContext, end_of_round

FILLER = "Trust me, this is correct."
EARLY_STYLE = {"math": "answer", "helpful": "detailed"}  # honest, oracle-best answers


def _hacky(prompt_id: str) -> bool:
    """3 of 4 late responses carry the hack (a stable choice per prompt)."""
    return int(hashlib.sha256(prompt_id.encode()).hexdigest(), 16) % 4 != 0


def fake_generate(source: str, prompts: list) -> list[str]:
    """SFT: the world's SFT style; early: honest best answers; late: the same plus a repeated filler sentence,
    which the oracle penalises (repeated + irrelevant sentences) but a naive RM rewards."""
    out = []
    for p in prompts:
        if source == "sft":
            out.append(respond(p, get_domain(p.domain).sft_style))
            continue
        text = respond(p, EARLY_STYLE[p.domain])
        out.append(f"{text} {FILLER} {FILLER}" if source == "late" and _hacky(p.id) else text)
    return out


def phrase_loving_rm(items: list[dict]) -> list[float]:
    return [0.01 * len(i["response"].split()) + (1.0 if "trust me" in i["response"].lower() else 0.0) for i in items]


class RecordingLogger:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.tables: dict[str, tuple[list, list]] = {}

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.rows.append(metrics)

    def log_table(self, key: str, columns: list, rows: list) -> None:
        self.tables[key] = (columns, rows)


def make_ctx(run_dir: Path, round_idx: int = 1, rm_score=phrase_loving_rm, **cfg) -> RoundContext:
    online = OnlineConfig(**{"domains": ["math", "helpful"], "prompts_per_source": 24, "slow_pairs_per_round": 12, **cfg})
    return RoundContext(
        round=round_idx, run_dir=run_dir, rm_dir="", base_pairs_path="", prior_pair_files=[], cfg=online,
        generate=fake_generate, rm_score=rm_score, logger=RecordingLogger(),
        policy_versions={"sft": 0, "early": 2 * round_idx, "late": 8 * round_idx},
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def crash_at_rm_update(monkeypatch) -> None:
    def crash(ctx, trainer):
        raise RuntimeError("simulated crash before the RM update")

    monkeypatch.setattr(rounds, "update_rm", crash)


def test_file_labels_partial_only_labelled_pairs_used_rest_queued_and_picked_up_later(tmp_path, monkeypatch):
    crash_at_rm_update(monkeypatch)
    labels = tmp_path / "labels.jsonl"
    file_cfg = {"labeler": "file", "labels_path": str(labels)}

    # Nobody has labelled yet: every comparison (slow candidates and pattern checks) waits in to_label.jsonl.
    # Comparison ids are deterministic, so a dry run shows which ids this round will ask about.
    with pytest.raises(RuntimeError, match="simulated crash"):
        end_of_round(make_ctx(tmp_path / "dry", **file_cfg))
    dry = tmp_path / "dry" / "rounds" / "round_1"
    asked = rows(dry / "to_label.jsonl")
    # No pattern can be confirmed without labels, so no fast pairs: the evidence waits for humans.
    assert rows(dry / "fast_pairs.jsonl") == [] and rows(dry / "slow_pairs.jsonl") == []
    slow_asked = [r for r in asked if "slow" in r["purposes"]]
    # 12 slow candidates minus those whose two responses are identical (non-hacky late == early)
    assert 8 <= len(slow_asked) <= 12 and any("pattern_check" in r["purposes"] for r in asked)

    # A human labels 5 of the 12 slow comparisons before the real round starts (label = prefer `b` for 2 of them).
    given = {r["id"]: (1 if i < 2 else 0) for i, r in enumerate(slow_asked[:5])}
    write_labels(labels, list(given), list(given.values()))
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        end_of_round(make_ctx(run, **file_cfg))
    r1 = run / "rounds" / "round_1"
    slow = rows(r1 / "slow_pairs.jsonl")
    assert sorted(r["pair_id"] for r in slow) == sorted(given)  # only labelled pairs are used
    by_id = {r["id"]: r for r in slow_asked}
    for row in slow:
        ask = by_id[row["pair_id"]]
        want = (ask["a"], ask["b"]) if given[row["pair_id"]] == 0 else (ask["b"], ask["a"])
        assert (row["chosen"], row["rejected"]) == want
        assert row["lineage"]["labeler"] == "file" and row["lineage"]["path"] == "slow"
    queued = rows(r1 / "to_label.jsonl")
    assert {r["id"] for r in queued if "slow" in r["purposes"]} == {r["id"] for r in slow_asked[5:]}
    assert not (r1 / "round.json").exists(), "the round must not look finished after a crash"
    collected = json.loads((r1 / "patterns.json").read_text())
    assert collected["pair_counts"]["to_label"] == len(queued)
    # Over-reward checks can only use the human labels given (early-vs-late slow candidates double as checks).
    assert all(p["checked"] <= len(given) for p in collected["patterns"])

    # Labels for 3 more of round 1's comparisons arrive during round 2: round 2 uses them (once).
    late = slow_asked[5:8]
    write_labels(labels, [r["id"] for r in late], [0, 0, 0])
    with pytest.raises(RuntimeError):
        end_of_round(make_ctx(run, round_idx=2, **file_cfg))
    r2_slow = rows(run / "rounds" / "round_2" / "slow_pairs.jsonl")
    from_r1 = [r for r in r2_slow if r["lineage"]["round"] == 1]
    assert sorted(r["pair_id"] for r in from_r1) == sorted(r["id"] for r in late)
    assert all(r["lineage"]["labeled_round"] == 2 and r["chosen"] == by_id[r["pair_id"]]["a"] for r in from_r1)
    with pytest.raises(RuntimeError):
        end_of_round(make_ctx(run, round_idx=3, **file_cfg))
    r3_slow = rows(run / "rounds" / "round_3" / "slow_pairs.jsonl")
    assert not [r for r in r3_slow if r["lineage"]["round"] == 1], "a late label must become a pair only once"


def test_short_pattern_gets_fresh_prompts_or_keeps_its_few_pairs_flagged_short(tmp_path):
    def mined(run_dir: Path, tries: int) -> tuple[dict, dict]:
        ctx = make_ctx(run_dir, prompts_per_source=16, extra_sampling_tries=tries, check_tries=0, slow_path=False)
        rounds.collect_preferences(ctx)
        collected = json.loads((ctx.round_dir / "patterns.json").read_text())
        return next(p for p in collected["patterns"] if p["kind"] == "mined"), collected["pair_counts"]

    # 16 prompts, 3 in 4 hacky: about 12 contrasting prompts, short of pairs_per_pattern_min=20.
    alone, counts = mined(tmp_path / "no_tries", tries=0)
    assert alone["detected"] and alone["short"] and 0 < alone["pairs"] == alone["contrast_prompts"] < 20
    assert counts["extra_samples"] == 0 and counts["fast"] >= alone["pairs"]
    # With fresh prompts allowed, early + late responses are drawn until the pattern has 20.
    topped, counts = mined(tmp_path / "tries", tries=3)
    assert topped["detected"] and not topped["short"] and 20 <= topped["pairs"] <= 100
    assert 1 <= counts["extra_sampling_tries"] <= 3 and counts["extra_samples"] > 0
    samples = rows(tmp_path / "tries" / "rounds" / "round_1" / "samples.jsonl")
    assert len(samples) == counts["samples"] + counts["extra_samples"]
    assert {s["source"] for s in samples[counts["samples"]:]} == {"early", "late"}  # no SFT responses needed


def test_contrast_mode_builds_the_reports_early_over_late_pairs(tmp_path):
    ctx = make_ctx(tmp_path, fast_pairs="contrast", slow_path=False)
    rounds.collect_preferences(ctx)
    fast = rows(ctx.round_dir / "fast_pairs.jsonl")
    patterns = json.loads((ctx.round_dir / "patterns.json").read_text())["patterns"]
    assert fast and all(p["check"] == "contrast" for p in patterns)
    for r in fast:
        assert FILLER in r["rejected"] and FILLER not in r["chosen"]
        assert (r["lineage"]["chosen"]["source"], r["lineage"]["chosen"]["policy_version"]) == ("early", 2)


def test_a_known_hack_is_patched_again_while_the_rm_still_pays_for_it(tmp_path):
    """Round 1 finds the filler in math (it rose there). In round 2 the early snapshot has it too (no rise from early
    to late) and it has spread to helpful: both are checked as the known pattern, by edits, and patched."""
    run = tmp_path / "run"
    ctx1 = make_ctx(run, slow_path=False, domains=["math"])
    rounds.collect_preferences(ctx1)
    found = [p["name"] for p in json.loads((ctx1.round_dir / "patterns.json").read_text())["patterns"]
             if p["detected"] and p["name"].startswith("phrase:")]
    assert found and all(set(n.removeprefix("phrase:").partition("@")[0].split()) <= set(words(FILLER)) for n in found)

    def everyone_hacks(source: str, prompts: list) -> list[str]:
        return [text if source == "sft" else f"{respond(p, EARLY_STYLE[p.domain])} {FILLER} {FILLER}"
                for p, text in zip(prompts, fake_generate(source, prompts))]

    assert json.loads((ctx1.round_dir / "patterns.json").read_text())["pair_counts"]["tracking_samples"] == 0

    ctx2 = dataclasses.replace(make_ctx(run, round_idx=2, slow_path=False, track_samples=40), generate=everyone_hacks)
    rounds.collect_preferences(ctx2)
    collected = json.loads((ctx2.round_dir / "patterns.json").read_text())
    patterns = collected["patterns"]
    # Each domain the round-1 hack may live in gets late replies on fresh prompts up to track_samples (12 a domain
    # were sampled anyway), and track_hacks measures the round's rate on all of them.
    late = [r for r in rows(ctx2.round_dir / "samples.jsonl") if r["source"] == "late"]
    assert {d: sum(r["domain"] == d for r in late) >= 40 for d in ("math", "helpful")} == {"math": True, "helpful": True}
    assert collected["pair_counts"]["tracking_samples"] >= 2 * (40 - 12)
    assert len({r["prompt_id"] for r in late}) == len(late)  # fresh prompts, never one sampled twice
    known = [p for p in patterns if p["kind"] == "known"]
    assert {p["name"].rpartition("@")[2] for p in known} == {"math", "helpful"}
    for p in known:
        assert p["detected"] and p["check"] == "edit" and p["rate_early"] == p["rate_late"] == 1.0
        assert p["over_reward_rate"] == 1.0 and 20 <= p["pairs"] <= 100
    # Nothing rose between the snapshots; from the SFT replies, which never show it, the miner finds it again
    # (online.rise_from_sft). Without that, the known-pattern check above is all that sees it.
    mined = [p for p in patterns if p["kind"] == "mined" and p["detected"]]
    assert mined and all(p["rate_early"] == p["rate_late"] == 1.0 and p["rate_sft"] == 0.0 for p in mined)
    fast = rows(ctx2.round_dir / "fast_pairs.jsonl")
    assert {r["domain"] for r in fast} == {"math", "helpful"}
    # Every pair cuts the filler out (the phrase patterns) or its repeat (repetition, which rose from SFT too).
    assert all(r["chosen"].count(FILLER) < r["rejected"].count(FILLER) and r["lineage"]["chosen"]["source"] == "edit"
               for r in fast)


def test_ties_give_no_pairs_and_empty_replies_still_train_the_rm(tmp_path, monkeypatch):
    """The programmatic labeler calls equal oracle scores a tie (SFT's equation vs early's "The answer is 7." are
    both right): no pair, recorded in ties.jsonl. A late policy that stops at once (empty reply) loses to SFT, and
    that row must reach the RM update rather than fail its parser."""
    crash_at_rm_update(monkeypatch)

    def stops_early(source: str, prompts: list) -> list[str]:
        return ["" if source == "late" else text for text in fake_generate(source, prompts)]

    ctx = make_ctx(tmp_path, slow_pairs_per_round=24)
    ctx = dataclasses.replace(ctx, generate=stops_early)
    with pytest.raises(RuntimeError, match="simulated crash"):
        end_of_round(ctx)
    r1 = tmp_path / "rounds" / "round_1"
    slow, ties = rows(r1 / "slow_pairs.jsonl"), rows(r1 / "ties.jsonl")
    counts = json.loads((r1 / "patterns.json").read_text())["pair_counts"]
    assert ties and counts["slow_ties"] == len(ties) and counts["slow"] == len(slow)
    assert {t["pair_id"] for t in ties}.isdisjoint(r["pair_id"] for r in slow)
    # The phrase-loving RM scores an empty reply 0 and every non-empty one above it: it agrees with every label.
    assert counts["rm_label_agreement"] == 1.0 and counts["rm_label_compared"] == len(slow)
    emptied = [r for r in slow if r["rejected"] == ""]
    assert emptied and all(r["chosen"] for r in slow)  # every late reply is empty and loses
    pairs, stats = rm_update.training_pairs(ctx)
    assert stats["online"] == len(slow) and any(p.rejected == "" for p in pairs)


def test_the_rm_update_encodes_its_pairs_as_before_with_the_base_pairs_encoded_once(tmp_path, tiny_dir, monkeypatch):
    import trainer.rm_task as rm_task
    from data.io import atomic_write_jsonl
    from data.world import preference_pairs
    from modeling.reward import RewardEncoder, RewardModelConfig
    from trainer.lm_tasks import load_any_tokenizer

    crash_at_rm_update(monkeypatch)
    base = atomic_write_jsonl(tmp_path / "base.jsonl", [r for d in ("math", "helpful") for r in preference_pairs(d, 40, seed=5)])
    ctx = dataclasses.replace(make_ctx(tmp_path / "run", slow_pairs_per_round=24), base_pairs_path=str(base))
    with pytest.raises(RuntimeError, match="simulated crash"):
        end_of_round(ctx)  # round 1's slow and fast pairs are on disk
    pairs, counts = rm_update.training_pairs(ctx)
    assert counts["fast"] > 0 and counts["online"] > counts["fast"] and counts["online_repeat"] > 1
    encoder = RewardEncoder(load_any_tokenizer(str(tiny_dir)), RewardModelConfig(max_length=96))
    expected, expected_stats = rm_task.encode_pairs(pairs, encoder)  # every copy encoded: what the update trained on
    assert expected_stats.too_long > 0  # the 96-token limit drops some, copies included

    encoded_sizes: list[int] = []
    real = rm_task.encode_pairs
    monkeypatch.setattr(rm_task, "encode_pairs", lambda p, e: encoded_sizes.append(len(p)) or real(p, e))
    for attempt in range(2):
        got, stats, _ = rm_update.encode_training(ctx, encoder, str(tiny_dir))
        assert got == expected and stats == expected_stats, attempt  # same pairs, same order, same drop counts
    # first call: the 80 base pairs, then each online pair once; second call: the base pairs from the cache
    assert encoded_sizes == [80, counts["online"] - counts["fast"], counts["fast"],
                             counts["online"] - counts["fast"], counts["fast"]]
    assert len(list((tmp_path / "run" / "rounds" / "base_encoded").iterdir())) == 1
    # another RM config (its domain prompts change every base sequence) is another cache entry
    other = RewardEncoder(load_any_tokenizer(str(tiny_dir)), RewardModelConfig(max_length=96, domains={
        **RewardModelConfig().domains, "math": "Grade the arithmetic."}))
    got, _, _ = rm_update.encode_training(ctx, other, str(tiny_dir))
    assert got == real(pairs, other)[0] and len(list((tmp_path / "run" / "rounds" / "base_encoded").iterdir())) == 2


def test_online_pairs_are_repeated_to_their_share_of_the_rm_update():
    # 89 slow pairs beside 8,000 base pairs at share 0.2: 0.2 / 0.8 * 8000 / 89 = 22.47 -> 22 copies each, so
    # 1,958 of 9,958 training pairs (19.7 %) are online pairs rather than 89 of 8,089 (1.1 %).
    assert RMUpdateConfig(online_share=0.2).repeats(8000, 89) == 22
    assert RMUpdateConfig(online_share=0.5).repeats(100, 50) == 2
    assert RMUpdateConfig(online_share=0.2, online_repeat=30).repeats(8000, 89) == 30  # the larger count wins
    assert RMUpdateConfig(online_share=0.0, online_repeat=3).repeats(8000, 89) == 3
    assert RMUpdateConfig(online_share=0.2).repeats(8000, 0) == 1
    assert RMUpdateConfig(online_share=0.2).repeats(10, 500) == 1  # already more than the share: never below 1
    # Fast pairs get their own share: 8000 base = 60 % of 13,333; slow 20 % = 2,667 / 89 = 30; fast 2,667 / 60 = 44.
    assert RMUpdateConfig(online_share=0.2, fast_share=0.2).repeats_by_path(8000, 89, 60) == (30, 44)
    assert RMUpdateConfig(online_share=0.2, fast_share=0.2).repeats_by_path(8000, 89, 0) == (22, 22)  # as before
    assert RMUpdateConfig(online_share=0.2, fast_share=0.0).repeats_by_path(8000, 29, 60) == (22, 22)  # one pool
    assert RMUpdateConfig(online_share=0.0, fast_share=0.2).repeats_by_path(8000, 89, 60) == (1, 33)
    with pytest.raises(ValueError, match="fast_share"):
        RMUpdateConfig(online_share=0.5, fast_share=0.5)
    with pytest.raises(ValueError, match="online_share must be in"):
        RMUpdateConfig(online_share=1.0)


def test_rm_label_agreement_counts_rm_ties_half_and_skips_unlabelled():
    def sample(score: float) -> rounds.Sample:
        return rounds.Sample("p", "math", [], f"r{score}", "late", 1, 0, rm_score=score)

    labelled = [(sample(1.0), sample(0.0), 0),   # RM agrees with "a"
                (sample(1.0), sample(0.0), 1),   # RM disagrees
                (sample(2.0), sample(2.0), 0),   # RM tie: half
                (sample(3.0), sample(0.0), None), (sample(3.0), sample(0.0), "tie")]  # not compared
    assert rounds.rm_label_agreement(labelled) == (1.5 / 3, 3)
    assert rounds.rm_label_agreement(labelled[3:]) == (None, 0)


def test_track_hacks_remeasures_a_round_1_pattern_with_its_own_detector_in_later_rounds(tmp_path, monkeypatch):
    """Round 1's late policy pads every reply with the filler; round 2's pads 2 of 4, round 3's 1 of 4, the SFT
    policy's own habit. The pattern mined in round 1 is re-measured on every round's late samples: 1 -> ~0.5 ->
    ~0.25. Three quarters of it is gone, and all of its rise over what SFT already did."""
    crash_at_rm_update(monkeypatch)
    share = {1: 4, 2: 2, 3: 1}  # of every 4 prompts, how many late replies carry the filler

    def generate_for(round_idx: int):
        def gen(source: str, prompts: list) -> list[str]:
            out = []
            for p, text in zip(prompts, fake_generate("early" if source == "late" else source, prompts)):
                hacky = int(hashlib.sha256(p.id.encode()).hexdigest(), 16) % 4 < share[round_idx]
                habit = int(hashlib.sha256(p.id.encode()).hexdigest(), 16) % 4 < 1
                padded = (source == "late" and hacky) or (source == "sft" and habit)
                out.append(f"{text} {FILLER} {FILLER}" if padded else text)
            return out
        return gen

    for r in (1, 2, 3):
        ctx = dataclasses.replace(make_ctx(tmp_path, round_idx=r, slow_path=False), generate=generate_for(r))
        with pytest.raises(RuntimeError, match="simulated crash"):
            end_of_round(ctx)
    assert all("heldout_rate_final" not in t for t in rounds.track_hacks(tmp_path))  # no held-out answers yet
    # The run's held-out answers (jobs/rlhf_heldout.py): SFT pads 1 of its 4 sampled answers, the final policy 2 of 4;
    # greedy answers are not what the headline samples, so the padded greedy one does not count.
    def answer(i: int, padded: bool, decoding: str = "sampled") -> dict:
        return {"prompt_id": f"h{i}", "domain": "math", "prompt": "?", "decoding": decoding, "oracle": 0.5,
                "truncated": False, "response": f"The answer is {i}." + (f" {FILLER}" if padded else "")}
    for name, padded in (("sft", [True, False, False, False]), ("final", [True, True, False, False])):
        rows = [answer(i, pad) for i, pad in enumerate(padded)] + [answer(9, True, "greedy")]
        (tmp_path / f"heldout_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tracked = rounds.track_hacks(tmp_path)
    mined = [t for t in tracked if t["found_in_round"] == 1 and t["pattern"].startswith("phrase:")]
    assert mined, f"round 1's filler was not detected: {tracked}"
    t = mined[0]
    assert "@" not in t["pattern"]  # mined over every domain, so the math answers are in its scope
    assert (t["heldout_rate_sft"], t["heldout_n_sft"], t["heldout_rate_final"], t["heldout_n_final"]) == (0.25, 4, 0.5, 4)
    rates, sft = t["late_rate_by_round"], t["sft_rate"]
    assert len(rates) == 3 and rates[0] == 1.0 and rates[0] > rates[1] > rates[2] > 0.0
    assert all(n > 0 for n in t["late_n_by_round"]) and t["sft_n"] > 0
    # Raw, about three quarters of the pattern is gone; the quarter left is SFT's own habit, so all of what PPO
    # added is gone: the excess reduction reads ~1 where the raw one reads ~0.75.
    assert t["reduction"] == pytest.approx(1 - rates[2]) and 0.7 < t["reduction"] < 0.8
    assert 0.2 < sft < 0.3 and t["excess_reduction"] == pytest.approx(1.0, abs=0.05)
    hits = [(round(r * n), n) for r, n in zip(rates, t["late_n_by_round"])]
    expected = excess_reduction(hits[0], hits[2], (round(sft * t["sft_n"]), t["sft_n"]))
    assert (t["excess_reduction"], t["excess_reduction_se"]) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def planted_rm(tiny_dir, tmp_path_factory) -> tuple[str, str]:
    """(RM dir, base pairs file): a tiny RM trained in-process on world base pairs plus pairs that prefer an
    honest answer *with* the filler, so it over-rewards the filler the way a real RM over-rewards a hack.
    Session-scoped and listed before `ray_cluster` so that it trains before Ray's workers start up."""
    from data.io import atomic_write_jsonl
    from data.preferences import read_preferences
    from data.world import make_prompts, preference_pairs
    from modeling.reward import RewardEncoder, RewardModelConfig
    from trainer.config import TrainerConfig
    from trainer.lm_tasks import load_any_tokenizer
    from trainer.loop import train
    from trainer.rm_task import RewardTask, encode_pairs, write_encoded

    root = tmp_path_factory.mktemp("planted")
    base = atomic_write_jsonl(root / "base.jsonl", [r for d in ("math", "helpful") for r in preference_pairs(d, 32, seed=5)])
    planted = atomic_write_jsonl(root / "planted.jsonl", [
        {"domain": p.domain, "messages": p.messages, "rejected": respond(p, EARLY_STYLE[p.domain]),
         "chosen": f"{respond(p, EARLY_STYLE[p.domain])} {FILLER} {FILLER}"}
        for d in ("math", "helpful") for p in make_prompts(d, 32, seed=123)])
    rm_cfg = RewardModelConfig()
    encoded, _ = encode_pairs(read_preferences(base) + read_preferences(planted),
                              RewardEncoder(load_any_tokenizer(str(tiny_dir)), rm_cfg))
    task = RewardTask(data_path=str(write_encoded(encoded, root / "data")), tokenizer_path=str(tiny_dir),
                      model_path=str(tiny_dir), rm=rm_cfg, max_tokens_per_batch=1024)
    result = train(task, TrainerConfig(num_workers=1, lr=1e-3, max_steps=20, checkpoint_every=0), root / "rm0")
    return result.model_dir, str(base)


def test_round_detects_planted_hack_patches_rm_and_is_idempotent(planted_rm, ray_cluster, tmp_path, monkeypatch):
    import dataclasses

    from actors.reward import RewardWorker
    from cluster.trainer_group import TrainerGroup

    rm_dir, base = planted_rm
    ctx = make_ctx(tmp_path / "run", rm_score=RewardWorker(rm_dir).score,
                   rm_update=RMUpdateConfig(max_steps=15, lr=1e-3, max_tokens_per_batch=1024), eval_pairs_per_domain=8)
    ctx = dataclasses.replace(ctx, rm_dir=rm_dir, base_pairs_path=base, trainer_overrides={"num_workers": 1})
    rdir = ctx.round_dir

    # 1. The RM update crashes: the round's preferences are on disk already, and the round is not marked done.
    def no_training(*args, **kwargs):
        raise RuntimeError("no training allowed here")

    with monkeypatch.context() as m:
        m.setattr(TrainerGroup, "fit", no_training)
        with pytest.raises(RuntimeError, match="no training allowed"):
            end_of_round(ctx)
    assert not (rdir / "round.json").exists() and not (rdir / "rm").exists()
    fast = rows(rdir / "fast_pairs.jsonl")
    patterns = json.loads((rdir / "patterns.json").read_text())["patterns"]

    # The planted filler is found as a rising phrase, confirmed by the labeler, and exposed by 20-100 pairs
    # (24 prompts give ~18 contrasting ones: the round sampled fresh prompts to reach 20).
    phrase = [p for p in patterns if p["kind"] == "mined" and p["detected"]]
    assert len(phrase) == 1 and set(phrase[0]["name"].removeprefix("phrase:").split()) <= set("trust me , this is correct .".split())
    assert phrase[0]["rate_early"] == 0.0 and phrase[0]["rate_late"] > 0.6 and phrase[0]["over_reward_rate"] == 1.0
    assert all(20 <= p["pairs"] <= 100 for p in patterns if p["detected"])
    mined = [r for r in fast if phrase[0]["name"] in r["lineage"]["patterns"]]
    assert len(mined) == phrase[0]["pairs"]
    for r in mined:  # the late reply against itself with the filler cut out (online.fast_pairs=edit)
        assert FILLER in r["rejected"] and r["chosen"] == r["rejected"].replace(f" {FILLER}", "")
        lin = r["lineage"]
        assert (lin["path"], lin["round"]) == ("fast", 1)
        assert (lin["chosen"]["source"], lin["chosen"]["policy_version"]) == ("edit", 8)
        assert (lin["rejected"]["source"], lin["rejected"]["policy_version"]) == ("late", 8)
        assert lin["chosen"]["edit_of"] == lin["rejected"]["sample_id"]

    # 2. Rerun: the saved pairs are reused (sampling again would fail) and the RM is trained.
    def no_sampling(source, prompts):
        raise AssertionError("the rerun must reuse the saved pairs, not sample again")

    ctx = dataclasses.replace(ctx, generate=no_sampling)
    result = end_of_round(ctx)
    ev = result.rm_eval
    assert result.new_rm_dir == str(rdir / "rm") and (rdir / "rm" / "reward_config.json").exists()
    # The planted RM prefers the filler on every fast pair; after the update it prefers the honest answer.
    assert ev["fast_pairs_acc_before"] <= 0.1 and ev["fast_pairs_acc_after"] >= 0.9
    assert ev["fast_pairs"] == len(fast) and ev["train_base_pairs"] == 64 and ev["train_steps"] == 15
    assert set(k for k in ev if k.startswith("heldout_acc_after/")) == {"heldout_acc_after/math", "heldout_acc_after/helpful"}
    assert result.hack_rate_late > result.hack_rate_early and result.pair_counts["fast"] == len(fast)
    assert [p["name"] for p in result.patterns] == [p["name"] for p in patterns if p["detected"]]
    logged = {k: v for row in ctx.logger.rows for k, v in row.items()}
    assert logged["online/rm/fast_pairs_acc_after"] == ev["fast_pairs_acc_after"]
    assert logged["online/pairs/fast"] == len(fast) and "online/hack_rate_late" in logged
    # where the round's time went (the rerun collected nothing: its preferences were on disk)
    assert ev["seconds_rm_update"] > 0 and ev["seconds_rm_eval"] > 0 and ev["seconds_collect"] < ev["seconds_rm_update"]
    assert logged["online/rm/seconds_rm_update"] == ev["seconds_rm_update"]
    columns, table = ctx.logger.tables["online/round_1/patterns"]
    assert len(table) == len(patterns) and columns[0] == "name"

    # 3. A finished round is returned as saved, with no sampling and no training.
    with monkeypatch.context() as m:
        m.setattr(TrainerGroup, "fit", no_training)
        assert end_of_round(ctx) == result


def test_the_rm_evaluation_draws_held_out_pairs_from_the_rms_own_world(tmp_path):
    """An RM trained on the flattery world is evaluated on that world's held-out pairs, found from the reward job's
    run directory (data.world_dir -> the world job's config) as the base pairs are."""
    import yaml

    from data.world.howto import OPENER
    from jobs.rlhf import RLHFJobConfig, rm_world

    world_dir, rm_run = tmp_path / "world", tmp_path / "reward"
    world_dir.mkdir()
    (rm_run / "model").mkdir(parents=True)
    (world_dir / "config.yaml").write_text(yaml.safe_dump({"world": {"seed": 0, "flattery_pairs": 0.5}}))
    (rm_run / "config.yaml").write_text(yaml.safe_dump({"data": {"world_dir": str(world_dir)}}))
    cfg = RLHFJobConfig()
    cfg.reward.path = str(rm_run / "model")
    assert rm_world(cfg)["flattery_pairs"] == 0.5
    (rm_run / "config.yaml").write_text(yaml.safe_dump({"data": {"train_paths": ["pairs.jsonl"]}}))
    assert rm_world(cfg) == {}

    def chosen_openers(world: dict) -> int:
        ctx = dataclasses.replace(make_ctx(tmp_path), world=world)
        return sum(p.chosen.startswith(OPENER) for p in rm_update.heldout_pairs(ctx, ["helpful", "detailed"]))

    assert chosen_openers({}) == 0 and chosen_openers({"flattery_pairs": 0.5, "seed": 7}) > 20


def test_a_candidate_under_the_margin_is_checked_again_once_its_phrase_is_confirmed_elsewhere(tmp_path):
    """Confirmed in math this round; in helpful the same phrase was mined but rose under the margin. The helpful one
    is checked again as known (no margin); the confirmed one is not checked twice."""
    from data.online import Pattern, PhraseDetector, Sample

    phrase = tuple(words(FILLER))
    found = [(PhraseDetector(phrase, domain="math"), Pattern("m", 0.0, 0.75, 1.0, 4, [], True, "edit")),
             (PhraseDetector(phrase, domain="helpful"), Pattern("h", 0.1, 0.25, 1.0, 3, [], False, "edit"))]
    late = [Sample(str(i), d, [], f"Ok. {FILLER}", "late", 1, 8) for i, d in enumerate(["math", "helpful"] * 2)]
    known = rounds.known_detectors(make_ctx(tmp_path / "run"), found, late)
    assert [det.name for det in known] == [f"phrase:{' '.join(phrase)}@helpful"]


def test_an_undecided_candidate_gets_more_replies_until_its_checks_decide_it(tmp_path):
    """Four prompts show the filler in about three late replies: three checks, all backwards, short of the six this
    run asks for. With online.check_tries the round samples more replies where it shows and confirms it; the rise
    is still measured on the round's own replies."""
    def mined(run_dir: Path, tries: int) -> tuple[dict, dict]:
        ctx = make_ctx(run_dir, prompts_per_source=4, check_tries=tries, extra_sampling_tries=0, min_pattern_checks=6,
                       slow_path=False)
        rounds.collect_preferences(ctx)
        collected = json.loads((ctx.round_dir / "patterns.json").read_text())
        return next(p for p in collected["patterns"] if p["kind"] == "mined"), collected["pair_counts"]

    alone, counts = mined(tmp_path / "no_tries", tries=0)
    assert not alone["detected"] and 1 <= alone["checked"] < 6 and alone["over_reward_rate"] == 1.0
    assert counts["extra_samples"] == 0 and counts["fast"] == 0
    more, counts = mined(tmp_path / "tries", tries=2)
    assert more["detected"] and more["checked"] >= 6 and more["pairs"] > 0 and counts["fast"] >= more["pairs"]
    assert counts["extra_samples"] > 0 and 1 <= counts["extra_sampling_tries"] <= 2
    assert (more["rate_early"], more["rate_late"]) == (alone["rate_early"], alone["rate_late"])
    saved = rows(tmp_path / "tries" / "rounds" / "round_1" / "samples.jsonl")
    assert len(saved) == 3 * 4 + counts["extra_samples"]  # the extra replies are kept with their lineage
