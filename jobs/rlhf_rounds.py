"""End of an online COOL RLHF round: fast path (hack detectors -> early-vs-late pairs), slow path (labeler),
RM update on base + all new pairs, evaluation, and lineage on disk (spec cool-rlhf.md 7.3).

Called by `jobs/rlhf.py` once per round:  result = end_of_round(RoundContext(...)).

  1. prompts_per_source train prompts spread over online.domains (seeded by run seed and round); SFT, early and
     late responses from ctx.generate, scored by ctx.rm_score and the world's oracle -> Samples with lineage; in
     each domain where an earlier round confirmed a pattern, late responses on fresh prompts up to track_samples
  2. fast path: static detectors (fitted on SFT + early) and one PhraseDetector per rising phrase (one per
     behaviour: a phrase only ever seen inside a wider one is dropped); a detector is a pattern when its rate among
     the top-reward late replies (online.rise_on) rises by rise_margin (from the early or the SFT replies) and the
     labeler disagrees with the RM on >= half of at least min_pattern_checks checked pairs: edit pairs (the late
     reply with the pattern cut out vs the late reply) where the detector can cut its pattern out, else
     early-vs-late replies to prompts where only the late one shows it. A candidate backwards on at least half of
     too few checks gets more replies sampled where it shows (online.check_tries). A phrase confirmed in an earlier
     round, or this round in another domain, is checked again in every domain where late replies show it, rising
     or not ("known"; patched again while the RM gets known_over_reward of its checks backwards). Each pattern
     gives edited > late (or early > late) pairs, at most pairs_per_pattern_max
  3. slow path: SFT/early/late comparisons -> labeler; labels that arrived for earlier rounds' to_label files too
  4. every preference file written (atomically) before any training
  5. RM_k (`jobs/rlhf_rm_update.py`): finetune of RM_{k-1} (or retrain from SFT) on base + every online pair so
     far, through the RM TrainTask on a cluster.trainer_group.TrainerGroup (the driver's warm one); old vs new RM
     accuracy on held-out pairs per domain and on this round's pairs, in the same group. The last round trains
     none unless online.rm_update.after_last_round
  6. online/ metrics and the pattern table to ctx.logger, then round.json

Everything a round writes lives in `<run_dir>/rounds/round_<k>/`, in this order:
    samples.jsonl      every SFT / early / late response sampled here (Sample rows: lineage, RM score, oracle)
    to_label.jsonl     comparisons the labeler left unlabelled (labeler=file: waiting for humans): {"id", "domain",
                       "messages", "a", "b", "purposes", ...}; a labelling tool appends {"id": <id>, "label": 0 | 1}
                       (0 = a preferred) to online.labels_path, and the next rounds turn those labels into pairs
    fast_pairs.jsonl   edited > late (or early > late) pairs exposing each detected pattern (lineage.path "fast";
                       an edited reply has source "edit" and lineage.chosen.edit_of = the late sample it was cut from)
    slow_pairs.jsonl   labelled comparisons of this round and of earlier rounds' to_label files (lineage.path "slow")
    pairs.jsonl        fast + slow, each pair id once: this round's new preferences (RoundResult.pairs_path)
    patterns.json      every candidate detector (rates, checks, pairs, "short"), hack rates and pair counts; written
                       last of the pair files, so its presence means this round's preferences are complete
    rm_train/          the RM update's data and checkpoints; rm/ the updated RM (moved here when training ends)
    round.json         the RoundResult (patterns: the detected ones); written last
  rounds/base_encoded/<key>/   the RM's base pairs encoded for the RM update, once per run (key: base file, tokenizer,
                       RM config)
Idempotent: a rerun returns the saved round.json, reuses the pairs when patterns.json exists (and the RM when rm/
exists), and otherwise starts the round over (nothing partial is ever read back).

Deliberate choices where the report is silent (spec 7.3):
  - the late response showing the pattern is the rejected one; its chosen side is, by default, the same response
    with the pattern cut out (online.fast_pairs=edit), so the pair differs by the pattern alone; the report's
    early > late pairs (online.fast_pairs=contrast) also differ in everything else the policy learnt meanwhile, and
    in our runs the RM update learnt none of them;
  - a hack stays on the list once confirmed: later rounds check it again whether or not it rose within the round
    (a patch that did not take leaves it in the early snapshot too, where the rise test cannot see it);
  - a rising behaviour counts as a pattern only if the labeler also disagrees with the RM on it;
  - a pattern with fewer than pairs_per_pattern_min contrasting prompts triggers up to extra_sampling_tries batches
    of early/late responses on fresh prompts of the domains where it showed; if still short, its pairs are kept
    anyway (fewer pairs still push the RM the right way), patterns.json marks it "short" and a warning is printed;
  - with labeler=file a pattern is only confirmed by human labels present when the round asks; the unlabelled
    pattern checks join to_label.jsonl, and their labels become slow pairs in a later round;
  - online pairs are repeated in the RM's training data until they make up rm_update.online_share of it (or
    rm_update.online_repeat times, whichever is more), so a short finetune on a large base set learns them; fast
    pairs to rm_update.fast_share of their own, since a patch has to outweigh the base pairs that taught the hack.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from algo.stats import excess_reduction
from data.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from data.online import (
    NEW_OVER_REWARD, STATIC_DETECTORS, Detector, PhraseDetector, Sample, contrast_pairs, distinct_behaviours,
    edit_pairs, evaluate_pattern, fast_path_pairs, hack_rate, in_scope, labelled_row, mine_rising_phrases,
    mine_rising_phrases_by_domain, pair_id, slow_path_candidates, undecided,
)
from data.world import TIE, Labeler, Prompt
from jobs.rlhf_rm_update import RMUpdateConfig, RoundTrainer, evaluate_round, prior_round_dirs, update_rm

SOURCES = ("sft", "early", "late")


@dataclass
class OnlineConfig:
    detectors: list[str] = field(default_factory=lambda: ["length_blowup", "repetition", "rising_pattern"])
    pairs_per_pattern_min: int = 20
    pairs_per_pattern_max: int = 100
    slow_path: bool = True
    labeler: str = "programmatic"  # programmatic | file | http
    labels_path: str = ""  # labeler=file: JSONL of human labels keyed by pair id
    judge_url: str = ""  # labeler=http
    slow_pairs_per_round: int = 60
    prompts_per_source: int = 48  # prompts on which SFT / early / late responses are sampled
    rise_margin: float = 0.2  # a pattern counts when its late rate (see rise_on) exceeds the early rate by this much
    # Pairs that expose a pattern: "contrast" = early > late on prompts where only the late response shows it (the
    # report's reading); "edit" = the late response with the pattern cut out > the late response, for detectors that
    # can cut theirs out (a phrase, repeated sentences; length_blowup keeps contrast pairs). Contrast pairs also
    # differ in everything else the policy learnt between the snapshots: in our runs the RM update learnt none of
    # them (accuracy on its own fast pairs 0.0 -> 0.03; docs/design.md, "Session 7").
    fast_pairs: str = "edit"
    rm_update: RMUpdateConfig = field(default_factory=RMUpdateConfig)
    domains: list[str] = field(default_factory=list)  # world domains to sample prompts from; [] = all
    extra_sampling_tries: int = 3  # extra early/late batches for a pattern short of pairs_per_pattern_min
    pattern_checks: int = 30  # labeler calls per candidate pattern for the over-reward check
    eval_pairs_per_domain: int = 64  # world held-out pairs per domain for the RM evaluation (no heldout_pairs_path)
    # Late replies per domain in which an earlier round confirmed a pattern: what its rate in this round is measured
    # on (hack_tracking). prompts_per_source spreads ~16 replies over each of six domains.
    track_samples: int = 48
    # A new pattern is a hack when the RM gets at least half of its checks backwards. A known one (confirmed earlier,
    # or in another domain) is patched again while the RM still gets this share backwards: a patch that leaves the RM
    # paying for a confirmed hack on a third of the policy's replies is not done.
    known_over_reward: float = 0.25
    # Mine and test the rise from the round's SFT replies as well as from its early ones. A hack that grows by less
    # than rise_margin within each round is in the early snapshot too, and early -> late never shows it (a flattery
    # run at seed 1 ended with the opener in 3/4 of its answers, none confirmed; docs/design.md, "Session 8").
    rise_from_sft: bool = True
    # A new pattern needs at least this many labelled over-reward checks: mining against SFT turns up generic
    # fragments (". a") whose 1-of-2 checks is noise. A known pattern (confirmed before) needs one.
    min_pattern_checks: int = 4
    # Checks the labeler calls a tie count as checks the RM got right (true). false leaves them out of the
    # over-reward share and of min_pattern_checks: a hack that costs nothing in some replies (the flattery opener in
    # a short concise answer) is then judged on the replies where it does cost (an experiment, docs/design.md
    # "Session 9"; not the default until the default world and several flattery seeds have been rerun with it).
    pattern_ties: bool = True
    # Where a new pattern's rise is measured: "all" late replies of its scope (the policy has learnt it) or the
    # "top"-reward half of them (the RM pays for it; the test the miner applies, and the report's "rises among
    # top-reward samples"). "top" sees a hack before the policy has spread it (docs/design.md "Session 10").
    rise_on: str = "top"
    # Extra early/late batches (as extra_sampling_tries) for a candidate that rose and that the RM got backwards on
    # at least half of too few checks (fewer than min_pattern_checks): the first round of a hack shows it in two
    # or three replies of a domain, and 2 of 2 checks backwards decided nothing. 0 = leave it undecided.
    check_tries: int = 2

    def __post_init__(self) -> None:
        from data.online import DETECTOR_NAMES
        from data.world import DOMAINS

        unknown = [d for d in self.detectors if d not in DETECTOR_NAMES]
        if unknown:
            raise ValueError(f"online.detectors has unknown {unknown}; known: {list(DETECTOR_NAMES)}")
        if not 1 <= self.pairs_per_pattern_min <= self.pairs_per_pattern_max:
            raise ValueError("online.pairs_per_pattern_min must be >= 1 and <= online.pairs_per_pattern_max")
        if self.fast_pairs not in ("edit", "contrast"):
            raise ValueError(f"online.fast_pairs must be edit or contrast (got {self.fast_pairs!r})")
        if self.labeler not in ("programmatic", "file", "http"):
            raise ValueError(f"online.labeler must be programmatic, file or http (got {self.labeler!r})")
        if self.labeler == "file" and not self.labels_path:
            raise ValueError("online.labeler=file needs online.labels_path=<labels.jsonl>")
        if self.labeler == "http" and not self.judge_url:
            raise ValueError("online.labeler=http needs online.judge_url=<http://host:port/...>")
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad:
            raise ValueError(f"online.domains has unknown {bad}; the world has {list(DOMAINS)} ([] = all)")
        if self.prompts_per_source < 1 or self.slow_pairs_per_round < 0:
            raise ValueError("online.prompts_per_source must be >= 1 and online.slow_pairs_per_round >= 0")
        if not 0.0 < self.known_over_reward <= 1.0:
            raise ValueError(f"online.known_over_reward must be in (0, 1] (got {self.known_over_reward}): the share of a "
                             "known pattern's checks the RM must get backwards for it to be patched again")
        if self.rise_on not in ("all", "top"):
            raise ValueError(f"online.rise_on must be all or top (got {self.rise_on!r}): where a new pattern's rise is "
                             "measured, over every late reply or over the top-reward half")
        if self.check_tries < 0:
            raise ValueError(f"online.check_tries must be >= 0 (got {self.check_tries}): extra sampling batches for an "
                             "undecided pattern")
        if self.min_pattern_checks < 1:
            raise ValueError(f"online.min_pattern_checks must be >= 1 (got {self.min_pattern_checks})")
        if self.track_samples < 0:
            raise ValueError("online.track_samples must be >= 0 (late replies per tracked domain; 0 = no extra ones)")
        if self.extra_sampling_tries < 0 or self.pattern_checks < 1 or self.eval_pairs_per_domain < 0:
            raise ValueError("online.extra_sampling_tries and online.eval_pairs_per_domain must be >= 0, "
                             "online.pattern_checks >= 1")

    @property
    def prompt_domains(self) -> list[str]:
        from data.world import DOMAINS

        return list(self.domains or DOMAINS)


@dataclass
class RoundContext:
    round: int
    run_dir: Path
    rm_dir: str
    base_pairs_path: str
    prior_pair_files: list[str]
    cfg: OnlineConfig
    generate: Callable[[str, list], list[str]]  # (source in {"sft","early","late"}, prompts) -> responses
    rm_score: Callable[[list[dict]], list[float]]  # [{"domain","messages","response"}] -> scores
    logger: Any  # jobs.common.MetricsLogger
    policy_versions: dict[str, int]
    seed: int = 0
    trainer_overrides: dict[str, Any] = field(default_factory=dict)  # TrainerConfig fields of the RM update
    sft_dir: str = ""  # the SFT checkpoint: the backbone of online.rm_update.mode=retrain
    # The driver's metrics step for this round's online/ row (W&B drops rows whose step goes backwards).
    log_step: int | None = None
    heldout_pairs_path: str = ""  # held-out preference JSONL for the RM evaluation; "" = world held-out pairs
    # WorldConfig fields of the world the RM's pairs came from (e.g. flattery_pairs), so the world held-out pairs of
    # the RM evaluation are drawn from that world
    world: dict = field(default_factory=dict)
    last: bool = False  # the run's last round (its RM update is skipped unless online.rm_update.after_last_round)
    # Where the RM update and its evaluation run: the driver's cluster.trainer_group.TrainerGroup, kept warm across
    # rounds; None = a group started for this round (sized by trainer_overrides) and shut down after it
    rm_trainer: Any = None
    rm_timeout_s: float = 3600.0  # bound on the RM update's fit and on its evaluation (PhaseTimeout past it)

    @property
    def round_dir(self) -> Path:
        return Path(self.run_dir) / "rounds" / f"round_{self.round}"


@dataclass
class RoundResult:
    new_rm_dir: str
    patterns: list[dict]
    pair_counts: dict[str, int]
    hack_rate_early: float
    hack_rate_late: float
    rm_eval: dict
    pairs_path: str
    rm_updated: bool = True  # False: the last round's update was skipped, new_rm_dir is the RM the round ran with


# ---------------------------------------------------------------------------------------------- the round


def end_of_round(ctx: RoundContext) -> RoundResult:
    rdir = ctx.round_dir
    update = not ctx.last or ctx.cfg.rm_update.after_last_round
    if (rdir / "round.json").exists():
        done = RoundResult(**json.loads((rdir / "round.json").read_text()))
        if done.rm_updated or not update:
            return done
        # a run extended past what was its last round: the update that was skipped is due now
    _check_context(ctx)
    seconds: dict[str, float] = {}  # wall time of each step of the round, logged as online/rm/seconds_<step>
    started = time.time()
    if not (rdir / "patterns.json").exists():
        collect_preferences(ctx)
    collected = json.loads((rdir / "patterns.json").read_text())
    seconds["seconds_collect"], started = round(time.time() - started, 2), time.time()
    with RoundTrainer(ctx) as trainer:
        trained = update_rm(ctx, trainer) if update else {"model_dir": ctx.rm_dir}
        seconds["seconds_rm_update"], started = round(time.time() - started, 2), time.time()
        rm_eval = evaluate_round(ctx, trainer, trained if update else None)
    rm_eval.update(seconds, seconds_rm_eval=round(time.time() - started, 2))
    result = RoundResult(
        new_rm_dir=trained["model_dir"], patterns=[p for p in collected["patterns"] if p["detected"]],
        pair_counts=collected["pair_counts"],
        hack_rate_early=collected["hack_rate_early"], hack_rate_late=collected["hack_rate_late"],
        rm_eval=rm_eval, pairs_path=str(rdir / "pairs.jsonl"), rm_updated=update,
    )
    log_round(ctx, result)
    atomic_write_json(rdir / "round.json", dataclasses.asdict(result))
    return result


def _check_context(ctx: RoundContext) -> None:
    missing = [s for s in SOURCES if s not in ctx.policy_versions]
    if missing:
        raise ValueError(f"RoundContext.policy_versions lacks {missing}: give the checkpoint step of each of {SOURCES}")
    if ctx.cfg.rm_update.mode == "retrain" and not ctx.sft_dir:
        raise ValueError("online.rm_update.mode=retrain needs RoundContext.sft_dir (the SFT checkpoint the RM "
                         "starts from)")
    for path in [ctx.base_pairs_path, ctx.heldout_pairs_path, *ctx.prior_pair_files]:
        if path and not Path(path).exists():
            raise FileNotFoundError(f"preference file {path} does not exist (RoundContext base_pairs_path / "
                                    "heldout_pairs_path / prior_pair_files)")


def _seed(*parts: Any) -> int:
    """A 31-bit seed from any parts, the same on every machine (unlike hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


# ---------------------------------------------------------------------------------------------- samples


def round_prompts(domains: list[str], n: int, seed: int) -> list[Prompt]:
    """n train-split prompts spread evenly over `domains` (the first n % len(domains) get one more), no repeats."""
    from data.world import make_prompts

    out: dict[str, Prompt] = {}
    for i, domain in enumerate(domains):
        count = n // len(domains) + (i < n % len(domains))
        for p in make_prompts(domain, count, seed=_seed(seed, domain), split="train"):
            out.setdefault(p.id, p)
    return list(out.values())


def sample_responses(ctx: RoundContext, source: str, prompts: list[Prompt]) -> list[Sample]:
    """`source`'s responses to `prompts`, with lineage, the current RM's score and the world's oracle score."""
    from data.world import score

    responses = list(ctx.generate(source, prompts))
    if len(responses) != len(prompts):
        raise ValueError(f"generate({source!r}, prompts) returned {len(responses)} responses for {len(prompts)} "
                         "prompts; it must return one per prompt, in order")
    scores = list(ctx.rm_score([{"domain": p.domain, "messages": p.messages, "response": r}
                                for p, r in zip(prompts, responses)]))
    if len(scores) != len(prompts):
        raise ValueError(f"rm_score returned {len(scores)} scores for {len(prompts)} responses")
    return [Sample(prompt_id=p.id, domain=p.domain, messages=p.messages, response=r, source=source, round=ctx.round,
                   policy_version=int(ctx.policy_versions[source]), rm_score=float(s), oracle=float(score(p, r)))
            for p, r, s in zip(prompts, responses, scores)]


# ---------------------------------------------------------------------------------------------- labels


def build_labeler(cfg: OnlineConfig) -> Labeler:
    from data.world import FileLabeler, HttpJudgeLabeler, ProgrammaticLabeler

    if cfg.labeler == "file":
        return FileLabeler(cfg.labels_path, missing_ok=True)  # no file yet = nobody has labelled anything
    if cfg.labeler == "http":
        return HttpJudgeLabeler(cfg.judge_url)
    return ProgrammaticLabeler()


class LabelBook:
    """The configured labeler over Sample pairs: batched calls, answers cached by comparison id, and the
    comparisons left unlabelled collected as to_label rows (id = data.online.pair_id(a, b))."""

    def __init__(self, labeler: Labeler, name: str, round_idx: int):
        self.labeler, self.name, self.round = labeler, name, round_idx
        self.prompts: dict[str, Prompt] = {}
        self.pending: dict[str, dict] = {}
        self._cache: dict[str, int | str | None] = {}

    def label(self, pairs: list[tuple[Sample, Sample]], purpose: str = "") -> list[int | str | None]:
        """0 (a preferred), 1 (b), TIE or None per pair. With a purpose, unlabelled pairs are queued for humans."""
        from data.world import Comparison

        todo = {pair_id(a, b): (a, b) for a, b in pairs if pair_id(a, b) not in self._cache}
        comparisons = [Comparison(i, self.prompts[a.prompt_id], a.response, b.response) for i, (a, b) in todo.items()]
        answers = self.labeler.label(comparisons) if comparisons else []
        for c, y in zip(comparisons, answers):
            self._cache[c.id] = y
        for a, b in pairs:
            i = pair_id(a, b)
            if self._cache[i] is None and purpose:  # one row per comparison, listing every reason it was asked
                row = self.pending.setdefault(i, self._to_label_row(self.prompts[a.prompt_id], a, b))
                row["purposes"] = sorted({*row["purposes"], purpose})
        return [self._cache[pair_id(a, b)] for a, b in pairs]

    def prefer(self, a: Sample, b: Sample) -> int | str | None:
        return self.label([(a, b)], purpose="pattern_check")[0]

    def _to_label_row(self, prompt: Prompt, a: Sample, b: Sample) -> dict:
        # What a human sees first (id, domain, messages, a, b), then what a later round needs to rebuild the pair.
        return {"id": pair_id(a, b), "domain": prompt.domain, "messages": prompt.messages, "a": a.response,
                "b": b.response, "round": self.round, "purposes": [], "prompt": dataclasses.asdict(prompt),
                "samples": {"a": a.to_row(), "b": b.to_row()}}


# ---------------------------------------------------------------------------------------------- fast path


def build_detectors(cfg: OnlineConfig, samples: dict[str, list[Sample]]) -> list[Detector]:
    """The configured static detectors (fitted on SFT + early responses) plus one per rising phrase: phrases
    rising over all samples, then phrases rising within one domain (confined to it) that the first did not find."""
    detectors: list[Detector] = []
    for name in cfg.detectors:
        if name in STATIC_DETECTORS:
            det = STATIC_DETECTORS[name]()
            det.fit(samples["sft"] + samples["early"])
            detectors.append(det)
    if "rising_pattern" in cfg.detectors:
        # Rising from the early snapshot (learnt within the round) or from the SFT policy (crept in over rounds,
        # so the early snapshot has it too; online.rise_from_sft).
        baselines = [samples["early"]] + ([samples["sft"]] if cfg.rise_from_sft and samples["sft"] else [])
        pooled: list[tuple[str, ...]] = []
        for base in baselines:
            pooled += [p for p, _, _ in mine_rising_phrases(base, samples["late"], margin=cfg.rise_margin)
                       if p not in pooled]
        phrases = [PhraseDetector(p) for p in pooled]
        for base in baselines:
            for phrase, domain, _, _ in mine_rising_phrases_by_domain(base, samples["late"], margin=cfg.rise_margin):
                det = PhraseDetector(phrase, domain=domain)
                if phrase not in pooled and det not in phrases:
                    phrases.append(det)
        detectors += distinct_behaviours(phrases, samples["late"])
    return detectors


def top_up(ctx: RoundContext, short: list[Detector], early: list[Sample], late: list[Sample],
           seen: set[str], labels: LabelBook, available: Callable[[Detector], int], *, need: int | None = None,
           tries: int | None = None, tag: str = "extra") -> tuple[list[Sample], int]:
    """Early + late responses on fresh prompts until every `short` pattern has `need` (default pairs_per_pattern_min)
    pairs (`available(det)`: edit pairs or contrasting prompts), or `tries` (default extra_sampling_tries) batches
    were drawn. `tag` seeds the prompts. Returns (new samples, batches drawn)."""
    cfg, extra, drawn = ctx.cfg, [], 0
    need = cfg.pairs_per_pattern_min if need is None else need
    tries = cfg.extra_sampling_tries if tries is None else tries
    while drawn < tries:
        short = [d for d in short if available(d) < need]
        if not short:
            break
        # Draw where the patterns showed up: other domains would rarely give a contrasting prompt.
        domains = sorted({s.domain for d in short for s in late if d.flags(s)}) or cfg.prompt_domains
        drawn += 1
        fresh = [p for p in round_prompts(domains, cfg.prompts_per_source, _seed(tag, ctx.seed, ctx.round, drawn))
                 if p.id not in seen]
        if not fresh:
            continue
        seen.update(p.id for p in fresh)
        labels.prompts.update({p.id: p for p in fresh})
        new = {src: sample_responses(ctx, src, fresh) for src in ("early", "late")}
        early.extend(new["early"])
        late.extend(new["late"])
        extra += new["early"] + new["late"]
    return extra, drawn


def uses_edits(cfg: OnlineConfig, det: Detector) -> bool:
    """Whether `det`'s over-reward check and pairs use edit pairs (data.online.edit_pairs) or early-vs-late ones."""
    return cfg.fast_pairs == "edit" and hasattr(det, "remove")


def scored_edits(ctx: RoundContext, labels: LabelBook, edits: list[tuple[Sample, Sample]]) -> list[tuple[Sample, Sample]]:
    """The edited responses scored by the round's RM (one batch) and the world's oracle, as sample_responses does."""
    from data.world import score

    if not edits:
        return []
    rm = ctx.rm_score([{"domain": e.domain, "messages": e.messages, "response": e.response} for e, _ in edits])
    return [(dataclasses.replace(e, rm_score=float(r), oracle=float(score(labels.prompts[e.prompt_id], e.response))), o)
            for (e, o), r in zip(edits, rm)]


def confirmed_earlier(ctx: RoundContext) -> list[str]:
    """Names of the patterns earlier rounds confirmed (detected), in round order."""
    return [p["name"] for d in prior_round_dirs(ctx) if (d / "patterns.json").exists()
            for p in json.loads((d / "patterns.json").read_text())["patterns"] if p["detected"]]


def known_detectors(ctx: RoundContext, found: list[tuple[Detector, Any]], late: list[Sample]) -> list[Detector]:
    """A phrase confirmed as a hack (in an earlier round, or this round in one domain) checked again in every domain
    where this round's late responses show it, rising or not: a patch that did not take, or a hack that spread to a
    domain where it never rose past the margin within one round, is still over-rewarded and gets pairs again."""
    names = confirmed_earlier(ctx) + [det.name for det, pat in found if pat.detected]
    phrases = dict.fromkeys(PhraseDetector.from_name(n).phrase for n in names if n.startswith("phrase:"))
    # A candidate this round already confirmed needs no second check; one that failed the rise test (under the
    # margin in its domain) is checked again as known, without it.
    evaluated = {det.name for det, pat in found if pat.detected}
    out = []
    for phrase in phrases:
        for domain in sorted({s.domain for s in late}):
            det = PhraseDetector(phrase, domain=domain)
            if det.name not in evaluated and sum(det.flags(s) for s in late) >= 2:
                out.append(det)
    return out


def tracking_samples(ctx: RoundContext, late: list[Sample], labels: LabelBook, seen: set[str]) -> list[Sample]:
    """Late replies on fresh prompts of each domain an earlier round confirmed a pattern in, until that domain has
    online.track_samples of them: whether the hack went away (track_hacks) and whether it is still over-rewarded
    are read off these, and the ~16 replies per domain a round samples anyway made a rate of 0.25 a count of 4."""
    cfg = ctx.cfg
    domains: set[str] = set()
    for name in confirmed_earlier(ctx):
        scope = PhraseDetector.from_name(name).domain if name.startswith("phrase:") else ""
        domains |= {scope} if scope else set(cfg.prompt_domains)
    out: list[Sample] = []
    for domain in sorted(domains & set(cfg.prompt_domains)):
        have = sum(s.domain == domain for s in late)
        if have >= cfg.track_samples:
            continue
        pool = round_prompts([domain], cfg.track_samples + have, _seed("track", ctx.seed, ctx.round, domain))
        fresh = [p for p in pool if p.id not in seen][: cfg.track_samples - have]
        seen.update(p.id for p in fresh)
        labels.prompts.update({p.id: p for p in fresh})
        out += sample_responses(ctx, "late", fresh) if fresh else []
    return out


def fast_path(ctx: RoundContext, samples: dict[str, list[Sample]], labels: LabelBook, seen: set[str],
              extra_late: list[Sample] = ()) -> dict:
    """Detect patterns (new ones that rose, then known ones still present), top up short ones, build the pairs:
    edited > late where the detector can cut its pattern out (online.fast_pairs), else early > late.
    `extra_late`: late replies without an early one (tracking_samples), for the edit checks and pairs; the rise
    test and the hack rates use `samples` only. Returns the fast-path part of patterns.json."""
    cfg = ctx.cfg
    early, late = list(samples["early"]), list(samples["late"]) + list(extra_late)
    rate_early, rate_late = list(early), list(late)  # the rise is measured on these, before any top-up

    def check_pairs(det: Detector) -> list[tuple[Sample, Sample]]:
        return edit_pairs(det, late) if uses_edits(cfg, det) else contrast_pairs(det, early, late)

    def evaluate(dets: list[Detector], margin: float, threshold: float, min_checks: int) -> list[tuple[Detector, Any]]:
        checks = {d.name: check_pairs(d)[: cfg.pattern_checks] for d in dets}
        edited = [pair for d in dets if uses_edits(cfg, d) for pair in checks[d.name]]
        scored = iter(scored_edits(ctx, labels, edited))  # one RM batch for every edit checked this round
        checks = {d.name: [next(scored) for _ in checks[d.name]] if uses_edits(cfg, d) else checks[d.name] for d in dets}
        labels.label([pair for d in dets for pair in checks[d.name]], purpose="pattern_check")  # one labeler batch
        return [(d, evaluate_pattern(d, rate_early, rate_late, labels.prefer, margin=margin,
                                     max_checks=cfg.pattern_checks,
                                     edits=checks[d.name] if uses_edits(cfg, d) else None,
                                     contrast=None if uses_edits(cfg, d) else checks[d.name],
                                     over_threshold=threshold, sft=samples["sft"] if cfg.rise_from_sft else None,
                                     min_checks=min_checks, ties=cfg.pattern_ties, rise_on=cfg.rise_on))
                for d in dets]

    def evaluate_new(dets: list[Detector]) -> list[tuple[Detector, Any]]:
        return evaluate(dets, cfg.rise_margin, NEW_OVER_REWARD, cfg.min_pattern_checks)

    found = evaluate_new(build_detectors(cfg, samples))
    # Undecided candidates (rose, backwards on every check or half of them, too few checks): sample more replies
    # where they show and check them again on the larger set; the rise stays the one measured above.
    pending = [det for det, pat in found if undecided(pat, min_checks=cfg.min_pattern_checks)]
    checked_more, check_batches = ([], 0)
    if pending and cfg.check_tries:
        checked_more, check_batches = top_up(ctx, pending, early, late, seen, labels, lambda d: len(check_pairs(d)),
                                             need=cfg.min_pattern_checks, tries=cfg.check_tries, tag="check")
        again = {det.name: pat for det, pat in evaluate_new(pending)}
        found = [(det, again.get(det.name, pat)) for det, pat in found]
    known = evaluate(known_detectors(ctx, found, late), 0.0, cfg.known_over_reward, 1)
    kinds = {det.name: "static" for det, _ in found if not isinstance(det, PhraseDetector)}
    kinds.update({det.name: "known" for det, _ in known})
    rechecked = {det.name for det, _ in known}  # a mined candidate checked again as known: its known check counts
    found = [(det, pat) for det, pat in found if det.name not in rechecked] + known

    extra, tries = top_up(ctx, [det for det, p in found if p.detected], early, late, seen, labels,
                          lambda d: len(check_pairs(d)))
    extra, tries = checked_more + extra, check_batches + tries
    rows: dict[str, dict] = {}  # one row per pair id: a late response can show two patterns
    patterns = []
    for det, pat in found:
        n_contrast = len(contrast_pairs(det, early, late))
        edits = edit_pairs(det, late) if uses_edits(cfg, det) else None
        pairs = (fast_path_pairs(det, early, late, round_idx=ctx.round, max_pairs=cfg.pairs_per_pattern_max,
                                 seed=_seed("fast", ctx.seed, ctx.round, det.name), edits=edits)
                 if pat.detected else [])
        for r in pairs:
            kept = rows.setdefault(r["pair_id"], r)["lineage"]  # lineage.pattern: the first; .patterns: all
            kept["patterns"] = sorted({*kept.get("patterns", [kept["pattern"]]), det.name})
        patterns.append({**dataclasses.asdict(pat), "kind": kinds.get(det.name, "mined"),
                         "contrast_prompts": n_contrast, "edit_pairs": len(edits or []), "pairs": len(pairs),
                         "short": pat.detected and len(pairs) < cfg.pairs_per_pattern_min})
    # The static detectors' flags, plus confirmed patterns: a mined phrase that rose but failed the over-reward check
    # is a candidate, not a hack (per-domain mining on 8 samples turns up several such phrases a round).
    counted = [det for det, pat in found if pat.detected or not isinstance(det, PhraseDetector)]
    return {
        "patterns": patterns, "fast_rows": list(rows.values()), "extra_samples": extra, "extra_tries": tries,
        "hack_rate_early": hack_rate(samples["early"], counted),
        "hack_rate_late": hack_rate(samples["late"], counted),
    }


# ---------------------------------------------------------------------------------------------- slow path


def used_pair_ids(ctx: RoundContext) -> set[str]:
    """Ids of the comparisons earlier rounds already answered: their online pairs, and those labelled a tie (so a
    late label is turned into a row once, and a tie is not asked again)."""
    files = list(ctx.prior_pair_files) + [str(d / name) for d in prior_round_dirs(ctx)
                                          for name in ("pairs.jsonl", "ties.jsonl")]
    ids: set[str] = set()
    for f in dict.fromkeys(files):
        if Path(f).exists():
            ids.update(row["pair_id"] for _, row in read_jsonl(f) if "pair_id" in row)
    return ids


def slow_path(ctx: RoundContext, samples: dict[str, list[Sample]],
              labels: LabelBook) -> tuple[list[dict], int, list[dict]]:
    """This round's labelled comparisons plus labels that arrived for earlier rounds' to_label files.
    Returns (rows, how many of them came from earlier rounds, tie rows {pair_id, round, a, b}): a tie gives no
    pair, because either order would teach the RM a preference nobody has."""
    cands = slow_path_candidates(samples, ctx.cfg.slow_pairs_per_round, seed=_seed("slow", ctx.seed, ctx.round))
    answers = labels.label(cands, purpose="slow")
    rows = [labelled_row(a, b, y, round_idx=ctx.round, labeler=labels.name)
            for (a, b), y in zip(cands, answers) if y in (0, 1)]
    ties = [_tie_row(a, b, ctx.round) for (a, b), y in zip(cands, answers) if y == TIE]
    used = used_pair_ids(ctx) | {r["pair_id"] for r in rows}
    waiting = []
    for d in prior_round_dirs(ctx):
        path = d / "to_label.jsonl"
        for _, row in (read_jsonl(path) if path.exists() else []):
            if row["id"] not in used:
                labels.prompts[row["prompt"]["id"]] = Prompt(**row["prompt"])
                waiting.append((Sample.from_row(row["samples"]["a"]), Sample.from_row(row["samples"]["b"])))
    late_rows = []
    # No purpose: still-unlabelled ones stay listed in their own round's to_label.jsonl, not copied here.
    for (a, b), y in zip(waiting, labels.label(waiting)):
        if y in (0, 1):
            row = labelled_row(a, b, y, round_idx=a.round, labeler=labels.name)
            row["lineage"]["labeled_round"] = ctx.round
            late_rows.append(row)
        elif y == TIE:
            ties.append(_tie_row(a, b, ctx.round))
    return rows + late_rows, len(late_rows), ties


def rm_label_agreement(labelled: list[tuple[Sample, Sample, Any]]) -> tuple[float | None, int]:
    """(share of labelled comparisons where the round's RM ranks the labeler's choice higher, how many were compared).

    The comparisons are the policy's own replies, so this is the RM's accuracy where PPO actually queries it - unlike
    the held-out pair accuracy of the reward job, which is measured on the world's styled replies. An RM tie counts
    half. None when nothing was labelled 0 or 1."""
    scored = [(a.rm_score, b.rm_score, y) for a, b, y in labelled
              if y in (0, 1) and a.rm_score is not None and b.rm_score is not None]
    if not scored:
        return None, 0
    hits = [0.5 if sa == sb else float((sa > sb) == (y == 0)) for sa, sb, y in scored]
    return sum(hits) / len(hits), len(hits)


def _tie_row(a: Sample, b: Sample, round_idx: int) -> dict:
    return {"pair_id": pair_id(a, b), "round": round_idx, "a": a.sample_id, "b": b.sample_id}


# ---------------------------------------------------------------------------------------------- collection


def collect_preferences(ctx: RoundContext) -> None:
    """Steps 1-4: sample, detect, build fast and slow pairs, and write them (patterns.json last)."""
    cfg, rdir = ctx.cfg, ctx.round_dir
    labels = LabelBook(build_labeler(cfg), cfg.labeler, ctx.round)
    prompts = round_prompts(cfg.prompt_domains, cfg.prompts_per_source, _seed("prompts", ctx.seed, ctx.round))
    labels.prompts.update({p.id: p for p in prompts})
    samples = {src: sample_responses(ctx, src, prompts) for src in SOURCES}
    seen = {p.id for p in prompts}
    tracked = tracking_samples(ctx, samples["late"], labels, seen)
    fast = fast_path(ctx, samples, labels, seen, extra_late=tracked)
    slow_rows, from_prior, ties = slow_path(ctx, samples, labels) if cfg.slow_path else ([], 0, [])
    fast_rows = fast["fast_rows"]
    # A slow-path comparison of early vs late can be a fast pair too (same pair id, same preference): once here.
    unique: dict[str, dict] = {}
    for r in fast_rows + slow_rows:
        unique.setdefault(r["pair_id"], r)
    new_rows = list(unique.values())
    all_samples = [s for src in SOURCES for s in samples[src]] + tracked + fast["extra_samples"]
    by_id = {s.sample_id: s for s in all_samples}
    agreement, compared = rm_label_agreement([  # this round's slow rows: chosen is the labeler's choice
        (by_id[r["lineage"]["chosen"]["sample_id"]], by_id[r["lineage"]["rejected"]["sample_id"]], 0)
        for r in slow_rows if r["lineage"]["round"] == ctx.round])
    counts = {"samples": sum(len(v) for v in samples.values()), "tracking_samples": len(tracked),
              "extra_samples": len(fast["extra_samples"]),
              "extra_sampling_tries": fast["extra_tries"],
              "patterns_detected": sum(p["detected"] for p in fast["patterns"]),
              "fast": len(fast_rows), "slow": len(slow_rows) - from_prior, "slow_from_prior_rounds": from_prior,
              "slow_ties": len(ties), "rm_label_agreement": agreement, "rm_label_compared": compared,
              "to_label": len(labels.pending), "new_pairs": len(new_rows)}
    atomic_write_jsonl(rdir / "samples.jsonl", [s.to_row() for s in all_samples])
    atomic_write_jsonl(rdir / "to_label.jsonl", list(labels.pending.values()))
    atomic_write_jsonl(rdir / "fast_pairs.jsonl", fast_rows)
    atomic_write_jsonl(rdir / "slow_pairs.jsonl", slow_rows)
    atomic_write_jsonl(rdir / "ties.jsonl", ties)
    atomic_write_jsonl(rdir / "pairs.jsonl", new_rows)
    atomic_write_json(rdir / "patterns.json", {
        "round": ctx.round, "policy_versions": ctx.policy_versions, "labeler": cfg.labeler,
        "patterns": fast["patterns"], "pair_counts": counts,
        "hack_rate_early": fast["hack_rate_early"], "hack_rate_late": fast["hack_rate_late"],
    })


# ---------------------------------------------------------------------------------------------- logging

PATTERN_COLUMNS = ["name", "kind", "detected", "rate_sft", "rate_early", "rate_late", "rate_late_top",
                   "over_reward_rate", "checked", "contrast_prompts", "pairs", "short", "example"]


def log_round(ctx: RoundContext, result: RoundResult) -> None:
    """One row of online/ metrics and the pattern table (every candidate, detected or not) in ctx.logger."""
    collected = json.loads((ctx.round_dir / "patterns.json").read_text())
    def r4(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    rows = [[p["name"], p["kind"], p["detected"], r4(p.get("rate_sft")), r4(p["rate_early"]), r4(p["rate_late"]),
             r4(p.get("rate_late_top")), r4(p["over_reward_rate"]), p["checked"], p["contrast_prompts"], p["pairs"],
             p["short"], (p["examples"] or [""])[0]] for p in collected["patterns"]]
    ctx.logger.log_table(f"online/round_{ctx.round}/patterns", PATTERN_COLUMNS, rows)
    metrics: dict[str, Any] = {"online/round": ctx.round, "online/hack_rate_early": result.hack_rate_early,
                               "online/hack_rate_late": result.hack_rate_late,
                               "online/patterns_short": sum(p["short"] for p in collected["patterns"])}
    metrics.update({f"online/pairs/{k}": v for k, v in result.pair_counts.items() if isinstance(v, (int, float))})
    metrics.update({f"online/rm/{k}": v for k, v in result.rm_eval.items() if isinstance(v, (int, float))})
    ctx.logger.log(metrics, step=ctx.log_step)
    short = [p["name"] for p in collected["patterns"] if p["short"]]
    if short:
        print(f"online round {ctx.round}: pattern(s) {short} got fewer than online.pairs_per_pattern_min="
              f"{ctx.cfg.pairs_per_pattern_min} contrasting prompts after "
              f"{collected['pair_counts']['extra_sampling_tries']} extra sampling tries; their pairs are used anyway (raise online.prompts_per_source or "
              "online.extra_sampling_tries for more)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- tracking hacks


def _detector_from_pattern(name: str, reference: list[Sample]) -> Detector | None:
    if name.startswith("phrase:"):
        return PhraseDetector.from_name(name)
    if name in STATIC_DETECTORS:
        det = STATIC_DETECTORS[name]()
        det.fit(reference)
        return det
    return None


def track_hacks(run_dir: str | Path) -> list[dict]:
    """Each pattern detected in a round, measured with that round's detector on the late policy of every round
    from then on, so "did the hack go away" compares like with like (each round's own hack_rate uses detectors
    refitted and re-mined on that round's samples). One entry per (pattern, round found), with
    `late_rate_by_round` (from the round it was found), `reduction` = 1 - last / first (None if first is 0) and
    `sft_rate`, its rate among the SFT policy's replies of every round (a habit SFT had is not a hack to remove;
    None when no SFT replies in its scope were sampled), and `excess_reduction` (± `excess_reduction_se`): the share
    of its rise above `sft_rate` that is gone by the last round (algo.stats.excess_reduction; None when the round it
    was found in did not rise above SFT's rate). Once the run's held-out evaluation is written, also
    `heldout_rate_sft` and `heldout_rate_final`: its rate among the sampled held-out answers of the SFT and the final
    policy (the same prompts and seeds, heldout_{sft,final}.jsonl). The `*_n` fields count the replies each rate is a
    share of."""
    root = Path(run_dir) / "rounds"
    rounds_seen = sorted(int(d.name.removeprefix("round_")) for d in root.glob("round_*")
                         if d.name.removeprefix("round_").isdigit() and (d / "patterns.json").exists())
    samples: dict[int, list[Sample]] = {
        r: [Sample.from_row(row) for _, row in read_jsonl(root / f"round_{r}" / "samples.jsonl")]
        for r in rounds_seen if (root / f"round_{r}" / "samples.jsonl").exists()}
    heldout = {name: _heldout_samples(Path(run_dir) / f"heldout_{name}.jsonl") for name in ("sft", "final")}
    out = []
    for r in rounds_seen:
        found = json.loads((root / f"round_{r}" / "patterns.json").read_text())["patterns"]
        reference = [s for s in samples.get(r, []) if s.source in ("sft", "early")]
        for pattern in (p for p in found if p.get("detected")):
            det = _detector_from_pattern(pattern["name"], reference)
            if det is None:
                continue
            late = [_hits(det, [s for s in samples.get(k, []) if s.source == "late"]) for k in rounds_seen if k >= r]
            rates = [h / n if n else 0.0 for h, n in late]
            first, last = rates[0], rates[-1]
            sft = _hits(det, [s for k in rounds_seen for s in samples.get(k, []) if s.source == "sft"])
            excess, excess_se = excess_reduction(late[0], late[-1], sft)
            entry = {"pattern": pattern["name"], "found_in_round": r, "late_rate_by_round": rates,
                     "late_n_by_round": [n for _, n in late], "reduction": (1 - last / first) if first > 0 else None,
                     "sft_rate": _share(sft), "sft_n": sft[1], "excess_reduction": excess,
                     "excess_reduction_se": excess_se}
            for name, answers in heldout.items():
                if answers is not None:
                    hits = _hits(det, answers)
                    entry[f"heldout_rate_{name}"], entry[f"heldout_n_{name}"] = _share(hits), hits[1]
            out.append(entry)
    return out


def _heldout_samples(path: Path) -> list[Sample] | None:
    """The sampled held-out answers of heldout_<name>.jsonl (jobs/rlhf_heldout.py) as Samples, None if not written."""
    if not path.exists():
        return None
    return [Sample(prompt_id=row["prompt_id"], domain=row["domain"], messages=[], response=row["response"],
                   source=path.stem, round=0, policy_version=0)
            for _, row in read_jsonl(path) if row.get("decoding") == "sampled"]


def print_tracking(tracked: list[dict]) -> None:
    """The console's view of `track_hacks` entries: each hack's rate among SFT replies and the late replies of every
    round from the one it was found in, the share of it that is gone, and the share of its rise over SFT."""
    if not tracked:
        return
    lines = []
    for t in tracked:
        rates = " -> ".join(f"{r:.2f}" for r in t["late_rate_by_round"])
        sft = "-" if t["sft_rate"] is None else f"{t['sft_rate']:.2f}"
        gone = "-" if t["reduction"] is None else f"{t['reduction']:.0%}"
        excess = ("-" if t["excess_reduction"] is None else
                  f"{t['excess_reduction']:.0%} +- {t['excess_reduction_se']:.0%}")
        held = ""
        if t.get("heldout_rate_final") is not None and t.get("heldout_rate_sft") is not None:
            held = f"; held-out answers: SFT {t['heldout_rate_sft']:.2f}, final {t['heldout_rate_final']:.2f}"
        lines.append(f"  {t['pattern']} (round {t['found_in_round']}): SFT {sft}, late {rates}; gone {gone}, "
                     f"of its rise over SFT {excess}{held}")
    print("hack tracking (rate among each round's late replies; n per rate in summary.json: hack_tracking)\n"
          + "\n".join(lines), file=sys.stderr)


def _hits(det: Detector, samples: list[Sample]) -> tuple[int, int]:
    """(replies in the detector's scope that it flags, replies in its scope)."""
    scoped = in_scope(det, samples)
    return sum(det.flags(s) for s in scoped), len(scoped)


def _share(hits: tuple[int, int]) -> float | None:
    return hits[0] / hits[1] if hits[1] else None
