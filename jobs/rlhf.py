"""Multi-round online COOL RLHF: PPO with a critic, every model role a group of Ray actors (spec cool-rlhf.md §7.3-7.4).

    python jobs/rlhf.py policy.path=<sft model_dir> reward.path=<rm model_dir>                 # laptop, local Ray
    ray job submit --working-dir . -- python jobs/rlhf.py policy.path=... reward.path=... run.root=/shared/out \
        rlhf/placement=spread rlhf/scale=paper placement.policy.gpus_per_actor=1 ...               # a cluster

Roles (one `cluster.actor_group.ActorGroup` each, sized and placed by `placement.<role>`): policy (trained, from
SFT), critic (trained, from the RM backbone with a fresh value head), reference (frozen SFT), reward (the conditional
RM, frozen within a round and reloaded after each), rollout (HF engine on CPU, vLLM on GPU; weights pushed after each
policy update). The placement is checked against the cluster before any model loads (`cluster.placement`).

One iteration (`ppo_iteration`, top to bottom): sample B domain-tagged prompts (+ ~B/2 pretraining rows) -> rollout
-> RM score of [domain system prompt] + prompt + response, clip [-5, 5], running normalisation -> reference log-probs,
critic values, policy log-probs -> per-token k1 KL penalty + score on the last token -> GAE (gamma 1, lambda 0.99) ->
critic step (and, after the warm-up, the policy step: clipped surrogate eps 0.2 + 0.5 PTX) -> versioned weight sync ->
metrics. A round is `iterations_per_round` iterations; the policy after the first `early_fraction` of them is the
round's "early" snapshot, the policy at its end the "late" one; `jobs.rlhf_rounds.end_of_round` then mines reward
hacks (fast path), labels SFT/early/late comparisons (slow path), and updates the RM, which the reward role reloads.

Deliberate choices and deviations from the report [R §4.2.3], all configurable:
- Scale: the defaults are sized for the tiny world on 2 CPU cores (B=36 prompts, 56 new tokens, actor LR 5e-5,
  critic LR 5e-4, 2 critic warm-up iterations; `rlhf/scale=tiny` adds 3 rounds x 40 iterations and KL 0.1). The
  report's scale (LR 1e-6 / 5e-6, 50 warm-up iterations, ~500 prompts per iteration) is `rlhf/scale=paper`.
- Across rounds the policy *and* the critic continue (the report leaves open whether PPO restarts each round).
- The PPO ratio uses the policy's own recomputed log-probs as pi_old (temperature-scaled, no top-p truncation);
  the engine's sampling log-probs are only compared with the same quantity under top-p (`mismatch/*`).
- One PPO epoch, one mini-batch per rollout batch (XTuner's policy_learn_time=1).
- Reward of a truncated response is the RM's score of the truncated text (no extra length penalty).

Checkpoints (complete state at iteration boundaries, `jobs/rlhf_state.py`) make reruns of the same command resume;
a dead or hung role actor restarts every role from the last checkpoint up to `max_actor_restarts` times, then the job
fails naming the role and the phase. Every remote wait is bounded (`timeouts.*`).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

import torch  # noqa: E402

from actors.batch import build_lm_batch, build_sequence_batch  # noqa: E402
from actors.critic import CriticConfig  # noqa: E402
from actors.faults import FaultConfig  # noqa: E402
from actors.policy import PolicyConfig  # noqa: E402
from actors.reference import ReferenceConfig  # noqa: E402
from actors.rollout import RolloutConfig, SamplingConfig  # noqa: E402
from algo.advantages import AdvantageConfig, compute_advantages  # noqa: E402
from algo.kl import KLConfig, build_kl_controller  # noqa: E402
from algo.masked import (  # noqa: E402
    compute_aggregation_denominator,
    compute_explained_variance,
    compute_logprob_mismatch,
    compute_masked_mean,
)
from algo.ppo import PPOLossConfig  # noqa: E402
from algo.rewards import compute_token_rewards  # noqa: E402
from algo.stats import RewardNormalizer, RewardNormConfig, paired_gain_se  # noqa: E402
from cluster.placement import RoleResources, check_layout  # noqa: E402
from cluster.runtime import ClusterConfig, init_ray  # noqa: E402
from cluster.timeouts import PhaseTimeout, RoleDied  # noqa: E402
from cluster.weight_sync import WeightSyncConfig  # noqa: E402
from jobs.common import ConfigError, LoggingConfig, Run, RunConfig, progress, run_job  # noqa: E402
from jobs.rlhf_roles import (  # noqa: E402
    ROLES,
    PhaseTimer,
    Roles,
    forward_passes,
    generate,
    push_policy,
    score,
    serve_weights,
    start_local_roles,
    start_roles,
    train,
)
from jobs.rlhf_heldout import domains, evaluate_oracle, print_table  # noqa: E402
from jobs.rlhf_preflight import (  # noqa: E402
    check_inputs,
    check_rm_update_room,
    rm_update_overrides,
    wait_until_roles_fit,
)
from jobs.rlhf_rounds import OnlineConfig, print_tracking, track_hacks  # noqa: E402
from jobs.rlhf_state import Checkpointer, DriverState, PromptStream, PTXStream, iteration_seed  # noqa: E402

__all__ = ["RLHFJobConfig", "main", "start_roles", "start_local_roles", "ppo_iteration", "build_context"]


# ---------------------------------------------------------------------------------------------- config


@dataclass
class RewardRoleConfig:
    path: str = ""  # the conditional RM directory (jobs/reward.py summary: model_dir)
    # Base preference pairs the RM was trained on (the online RM update retrains on base + new pairs).
    # "" = the `train_pairs_path` recorded in the RM job's summary.json next to the RM directory.
    base_pairs_path: str = ""
    batch_size: int = 32  # items per RM forward
    dtype: str = "float32"


def _res(cpus: float = 0.25, colocate: str | None = "policy") -> RoleResources:
    return RoleResources(num_actors=1, cpus_per_actor=cpus, colocate_with=colocate)


@dataclass
class RLHFPlacementConfig:
    """Per-role actors and resources. Default (`rlhf/placement=colocated`): every role shares the policy's bundle,
    a quarter CPU each, so the whole job fits one laptop core pair; `rlhf/placement=spread` gives each role its own
    placement group (and custom node resources pin roles to nodes)."""

    policy: RoleResources = field(default_factory=lambda: _res(colocate=None))
    critic: RoleResources = field(default_factory=_res)
    reference: RoleResources = field(default_factory=_res)
    reward: RoleResources = field(default_factory=_res)
    rollout: RoleResources = field(default_factory=_res)

    def as_dict(self) -> dict[str, RoleResources]:
        return {role: getattr(self, role) for role in ROLES}


@dataclass
class PPOConfig:
    rollout_batch_size: int = 36  # B prompts per iteration, 6 per world domain (report: ~500)
    critic_warmup_iterations: int = 2  # critic-only iterations at the start (report: 50; tiny default, see docstring)
    # Optimizer steps per rollout batch, each over the whole batch (the clip bounds how far later ones move from the
    # sampling policy). 1 = on-policy, one step per batch, as in OpenRLHF's default.
    epochs: int = 1
    kl: KLConfig = field(default_factory=KLConfig)  # beta 0.01, k1, fixed
    reward_norm: RewardNormConfig = field(default_factory=RewardNormConfig)  # clip [-5, 5], running normalisation
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)  # GAE gamma 1, lambda 0.99, no whitening
    loss: PPOLossConfig = field(default_factory=PPOLossConfig)  # eps 0.2, no value clip, ptx 0.5, token-mean

    def __post_init__(self) -> None:
        if self.rollout_batch_size < 1:
            raise ValueError(f"ppo.rollout_batch_size must be >= 1 (got {self.rollout_batch_size})")
        if self.epochs < 1:
            raise ValueError(f"ppo.epochs must be >= 1 (got {self.epochs})")
        if self.critic_warmup_iterations < 0:
            raise ValueError(f"ppo.critic_warmup_iterations must be >= 0 (got {self.critic_warmup_iterations})")


@dataclass
class PTXConfig:
    packed_dir: str = ""  # jobs/data.py's packed_dir; "" = no pretraining loss (a notice is logged)
    ratio: float = 0.5  # pretraining rows per prompt (report: PTX data ~50% of the PPO data)
    max_len: int = 128  # tokens kept per packed row

    def __post_init__(self) -> None:
        if self.ratio < 0 or self.max_len < 2:
            raise ValueError(f"ptx.ratio must be >= 0 and ptx.max_len >= 2 (got {self.ratio}, {self.max_len})")


@dataclass
class PromptConfig:
    domains: list[str] = field(default_factory=list)  # [] = every domain of the world
    pool_per_domain: int = 200  # training prompts per domain (the stream reshuffles them each epoch)

    def __post_init__(self) -> None:
        from data.world import DOMAINS

        bad = [d for d in self.domains if d not in DOMAINS]
        if bad:
            raise ValueError(f"prompts.domains has unknown {bad}; the world has {list(DOMAINS)} ([] = all)")
        if self.pool_per_domain < 1:
            raise ValueError(f"prompts.pool_per_domain must be >= 1 (got {self.pool_per_domain})")


@dataclass
class EvalConfig:
    # Held-out prompts per domain for the oracle score. At 12 (x 4 samples) the evaluation alone moved the gain by
    # +-0.03 (one standard error, `oracle_score_gain_se`), and the SFT baseline of one 12-prompt draw read 0.78
    # where 48 prompts x 8 samples read 0.73; at 48 x 2 the error is ~0.017 (docs/design.md, "Session 6").
    heldout_per_domain: int = 48
    # Samples per held-out prompt at the rollout's temperature/top_p: the headline score is the policy PPO trains
    # (a distribution); the greedy score is reported beside it (docs/design.md, "What the tiny world can show").
    samples_per_prompt: int = 2
    max_new_tokens: int = 0  # 0 = rollout.sampling.max_new_tokens

    def __post_init__(self) -> None:
        if self.heldout_per_domain < 1 or self.samples_per_prompt < 1 or self.max_new_tokens < 0:
            raise ValueError("eval.heldout_per_domain and eval.samples_per_prompt must be >= 1, "
                             "eval.max_new_tokens >= 0")


@dataclass
class PhaseTimeouts:
    """Upper bounds (seconds) on every remote wait; a phase over its bound fails (or restarts) naming role+phase."""

    start_s: float = 600.0
    generate_s: float = 900.0
    score_s: float = 600.0
    forward_s: float = 600.0
    train_s: float = 900.0
    sync_s: float = 600.0
    checkpoint_s: float = 600.0
    rm_update_s: float = 3600.0  # the between-round RM update's training, and its evaluation


@dataclass
class RMUpdateWorkers:
    """The workers of the between-round RM update and its evaluation (`online.rm_update` says what they train): a
    cluster.trainer_group.TrainerGroup in a placement group of its own, started at the first round's end. The roles
    keep their reservations meanwhile, so by default one worker takes the CPUs the roles leave free."""

    num_workers: int = 1
    cpus_per_worker: float = 0.0  # 0 = what the roles leave free on the cluster, at most 1
    gpus_per_worker: float = 0.0
    backend: str = "ddp"  # ddp | deepspeed
    # torch threads per worker; 0 = every core of its node (shared among the group's ranks there): the roles sit idle
    # while the RM trains, whatever Ray's CPU reservations say (on the demo: 60 steps in 11 s against 16 s on one)
    threads: int = 0
    # Keep the workers (processes, imports, process group) between rounds: each later update skips their start-up.
    # false = start them at each round's end and stop them after, e.g. when they hold GPUs the roles could use.
    keep_warm: bool = True

    def __post_init__(self) -> None:
        from trainer.config import BACKENDS

        if self.num_workers < 1 or self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or self.threads < 0:
            raise ValueError("rm_update_workers: num_workers must be >= 1, cpus/gpus_per_worker and threads >= 0")
        if self.backend not in BACKENDS:
            raise ValueError(f"rm_update_workers.backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")


@dataclass
class RLHFJobConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="rlhf"))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)  # path "" = reward.path
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)  # path "" = policy.path
    reward: RewardRoleConfig = field(default_factory=RewardRoleConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(
        # model_path "" = policy.path. 56 new tokens hold the world's longest best answer (50 tokens + end of turn with
        # the demo's tokenizer); at 48, 13 of the 72 two-reason how-to answers were cut (docs/design.md, "Session 7")
        sampling=SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=56)))
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    placement: RLHFPlacementConfig = field(default_factory=RLHFPlacementConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ptx: PTXConfig = field(default_factory=PTXConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    rm_update_workers: RMUpdateWorkers = field(default_factory=RMUpdateWorkers)
    eval: EvalConfig = field(default_factory=EvalConfig)
    timeouts: PhaseTimeouts = field(default_factory=PhaseTimeouts)
    rounds: int = 3
    iterations_per_round: int = 8
    early_fraction: float = 1 / 3  # the "early" snapshot is taken after this share of a round's iterations
    checkpoint_every: int = 1  # iterations between checkpoints (also at every snapshot, round end and stop)
    checkpoint_keep: int = 2
    max_actor_restarts: int = 1  # restarts of all roles from the last checkpoint after an actor dies or hangs
    stop_after_iterations: int = 0  # tests: return (as if killed) once this many iterations are done; 0 = off
    fault: FaultConfig = field(default_factory=FaultConfig)  # tests: make one role's actor die

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.iterations_per_round < 1:
            raise ValueError(f"rounds and iterations_per_round must be >= 1 (got {self.rounds}, {self.iterations_per_round})")
        if not 0 < self.early_fraction < 1:
            raise ValueError(f"early_fraction must be in (0, 1) (got {self.early_fraction}); the report's 'early' is "
                             "an early-stage PPO checkpoint of the round, e.g. 0.33")
        if self.max_actor_restarts < 0 or self.checkpoint_keep < 1 or self.checkpoint_every < 1:
            raise ValueError("max_actor_restarts must be >= 0, checkpoint_keep >= 1 and checkpoint_every >= 1")
        if self.fault.role not in ("", "policy", "critic"):
            raise ValueError(f"fault.role must be '', policy or critic (got {self.fault.role!r})")
        try:  # colocation, bundle and strategy mistakes: now, not after Ray and the first roles have started
            check_layout(self.placement.as_dict())
        except ValueError as e:
            raise ValueError(f"placement: {e}") from None
        small = [r for r, res in self.placement.as_dict().items() if res.num_actors > self.ppo.rollout_batch_size]
        if small:
            raise ValueError(f"placement.{small[0]}.num_actors exceeds ppo.rollout_batch_size="
                             f"{self.ppo.rollout_batch_size}: some ranks would get no rows")
        for role in ("policy", "critic"):
            ranks = getattr(self.placement, role).num_actors
            micro = getattr(self, role).trainer.micro_batch_size
            if self.ppo.rollout_batch_size % (ranks * micro):
                raise ValueError(
                    f"ppo.rollout_batch_size={self.ppo.rollout_batch_size} must be a multiple of "
                    f"placement.{role}.num_actors x {role}.trainer.micro_batch_size = {ranks} x {micro}, so every "
                    "rank takes the same number of micro-batches per step"
                )

    @property
    def total_iterations(self) -> int:
        return self.rounds * self.iterations_per_round

    @property
    def early_iteration(self) -> int:
        """Iteration within a round (1-based) after which the early snapshot is taken."""
        return max(1, round(self.iterations_per_round * self.early_fraction))


# ---------------------------------------------------------------------------------------------- the algorithm


class ChatCodec:
    """Prompts to token ids with the policy's chat template (no system prompt: that is the RM's condition only)."""

    def __init__(self, path: str):
        from modeling.loading import load_tokenizer
        from modeling.tiny import IM_END

        self.tokenizer = load_tokenizer(path)
        self.pad_id = self.tokenizer.pad_token_id
        self.stop_ids = [self.tokenizer.convert_tokens_to_ids(IM_END)] if IM_END in self.tokenizer.get_vocab() else []

    def encode(self, prompt) -> list[int]:
        text = self.tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class Context:
    """Everything the loop touches; `state` is what a checkpoint stores (with the engines' states)."""

    cfg: RLHFJobConfig
    run: Run
    roles: Roles
    state: DriverState
    codec: ChatCodec
    prompts: PromptStream
    ptx: PTXStream | None
    normalizer: RewardNormalizer
    kl_ctl: Any
    ckpt: Checkpointer | None
    base_pairs: str = ""  # the RM's own training pairs (see resolve_base_pairs)
    started: float = field(default_factory=time.time)

    def sampling(self, seed: int, **changes: Any) -> SamplingConfig:
        base = self.cfg.rollout.sampling
        stops = sorted(set(base.stop_token_ids) | set(self.codec.stop_ids))
        return dataclasses.replace(base, seed=seed, stop_token_ids=stops, **changes)


def ppo_iteration(ctx: Context) -> dict[str, float]:
    """One PPO iteration, in the order of the algorithm (spec §7.4 steps 1-7)."""
    cfg, roles, state, to = ctx.cfg, ctx.roles, ctx.state, ctx.cfg.timeouts
    iteration = state.iteration + 1
    timer, started = PhaseTimer(), time.perf_counter()

    # 1. B domain-tagged prompts (+ pretraining rows for PTX), drawn by cursor so a resumed run draws the same.
    prompts = ctx.prompts.batch(state.prompt_cursor, cfg.ppo.rollout_batch_size)
    ptx_rows = ctx.ptx.batch(state.ptx_cursor, round(cfg.ptx.ratio * len(prompts))) if ctx.ptx else []

    # 2. Rollout with the current policy (top_p 0.9, temperature 1, stop on <|im_end|>) + sampling log-probs.
    serve_weights(roles, state, "policy", timeout_s=to.sync_s)
    with timer("generate"):
        rollouts = generate(roles, [ctx.codec.encode(p) for p in prompts],
                            ctx.sampling(iteration_seed(cfg.run.seed, iteration)), to.generate_s)
    batch = build_sequence_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], ctx.codec.pad_id)
    mask = batch["response_mask"]
    texts = [ctx.codec.decode(r.response_ids) for r in rollouts]

    # 3. Conditional reward: [domain system prompt] + prompt + response; clip to [-5, 5], running normalisation.
    with timer("score"):
        raw = torch.tensor(score(roles, [{"domain": p.domain, "messages": p.messages, "response": t}
                                         for p, t in zip(prompts, texts)], to.score_s))
    scores = ctx.normalizer(raw, [p.domain for p in prompts])

    # 4. Reference log-probs, critic values, policy log-probs (pi_old) of the sampled tokens.
    fwd = forward_passes(roles, batch, timer, to.forward_s)

    # 5. Per-token reward r_t = -beta * KL_t (+ score at the last token); GAE advantages and critic returns.
    kl_coef = ctx.kl_ctl.coef
    rewards, kl_metrics = compute_token_rewards(scores, fwd["logprobs"], fwd["ref_logprobs"], mask, kl_coef,
                                                cfg.ppo.kl.estimator)
    advantages, returns = compute_advantages(rewards, fwd["values"], mask, cfg.ppo.advantage)
    ctx.kl_ctl.update(float(kl_metrics["kl/seq_sum_mean"]), len(prompts))

    # 6. Train: the critic every iteration, the policy once the critic warm-up is over. Global denominators make
    #    the loss exact however the batch is split over ranks and micro-batches.
    train_policy = iteration > cfg.ppo.critic_warmup_iterations
    train_batch = {**batch, "old_logprobs": fwd["logprobs"], "advantages": advantages, "returns": returns,
                   "values": fwd["values"],
                   "denominator": compute_aggregation_denominator(mask, cfg.ppo.loss.aggregation)}
    ptx = None
    if ptx_rows and cfg.ppo.loss.ptx_coef > 0:
        ptx = build_lm_batch(ptx_rows, ctx.codec.pad_id)
        ptx["denominator"] = ptx["loss_mask"].to(torch.float64).sum()
    with timer("train"):
        passes = [train(roles, train_batch, ptx, train_policy, to.train_s) for _ in range(cfg.ppo.epochs)]
    # The first pass is on-policy (ratio 1); later passes show how far the clip let the policy move.
    train_metrics = {**passes[0], **{f"{k}_last_epoch": v for k, v in passes[-1].items()
                                     if k.startswith(("policy/clipfrac", "policy/approx_kl")) and len(passes) > 1}}

    # 7. Versioned weight sync policy -> rollout engines (fingerprint-checked).
    if train_policy:
        state.policy_version += 1
        with timer("sync"):
            push_policy(roles, state, to.sync_s)

    state.prompt_cursor += len(prompts)
    state.ptx_cursor += len(ptx_rows)
    # Like-for-like with the engine (top-p processed); a sampled token the trainer puts outside its nucleus (a
    # boundary case of float differences) is counted apart rather than as an infinite difference.
    processed = fwd["processed_logprobs"]
    outside = ~torch.isfinite(processed) & mask.bool()
    mismatch = compute_logprob_mismatch(torch.where(outside, fwd["logprobs"], processed),
                                        torch.tensor(_pad_logprobs(rollouts, mask)), mask, clip_eps=cfg.ppo.loss.clip_eps)
    elapsed = time.perf_counter() - started
    by_domain: dict[str, list[float]] = {}
    for p, r in zip(prompts, raw.tolist()):
        by_domain.setdefault(p.domain, []).append(r)
    return {
        "round": (iteration - 1) // cfg.iterations_per_round + 1,
        "iteration": iteration,
        "reward/raw_mean": float(raw.mean()),
        "reward/normalized_mean": float(scores.mean()),
        **{f"reward/{d}": sum(v) / len(v) for d, v in sorted(by_domain.items())},
        "kl": float(kl_metrics["kl/seq_sum_mean"]),
        "kl/token_mean": float(kl_metrics["kl/token_mean"]),
        "kl/k3": float(kl_metrics["kl/k3_seq_sum_mean"]),
        "kl/coef": kl_coef,
        "entropy": float(compute_masked_mean(fwd["entropy"], mask)),
        "advantages/mean": float(compute_masked_mean(advantages, mask)),
        "critic/explained_var": float(compute_explained_variance(fwd["values"], returns, mask)),
        "response_length/mean": float(mask.sum(dim=1).mean()),
        "response_length/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        "mismatch/mean_abs": float(mismatch["mismatch/abs_diff_mean"]),
        "mismatch/p95_abs": float(mismatch["mismatch/abs_diff_p95"]),
        "mismatch/max_abs": float(mismatch["mismatch/abs_diff_max"]),
        "mismatch/ratio_outside_clip_frac": float(mismatch["mismatch/ratio_outside_clip_frac"]),
        "mismatch/outside_nucleus_frac": float(outside.sum() / mask.sum()),
        "policy/trained": float(train_policy),
        **train_metrics,
        **timer.times,
        "time/iteration": elapsed,
        "tokens_per_second": float(mask.sum()) / elapsed,
        "weight_version": state.weight_version,
    }


def _pad_logprobs(rollouts: list, mask: torch.Tensor) -> list[list[float]]:
    width = mask.shape[1]
    return [list(r.response_logprobs) + [0.0] * (width - len(r.response_logprobs)) for r in rollouts]


# ---------------------------------------------------------------------------------------------- rounds


def run_rounds(ctx: Context) -> dict:
    """All rounds from wherever the state stands (or up to `stop_after_iterations`); returns the summary."""
    cfg, state, k = ctx.cfg, ctx.state, ctx.cfg.iterations_per_round
    if not state.oracle_sft:
        state.oracle_sft = evaluate_oracle(ctx, "sft")  # the rollout engines still hold the SFT weights
    bar = progress(total=cfg.total_iterations, desc="rlhf iterations", enabled=cfg.logging.progress)
    bar.update(state.iteration)
    while True:
        if cfg.stop_after_iterations and state.iteration >= cfg.stop_after_iterations:
            bar.close()
            return {"completed": False, "stopped_after_iterations": cfg.stop_after_iterations,
                    "iterations": state.iteration, "placement": ctx.roles.where()}
        if len(state.round_results) < state.iteration // k:  # a round ended and its online step is still due
            finish_round(ctx, len(state.round_results) + 1)
            save_checkpoint(ctx)
            continue
        if state.iteration >= cfg.total_iterations:
            break
        if state.round_results and not state.round_results[-1].get("rm_updated", True):
            # a finished run resumed with more rounds: its last round skipped the RM update, which is due now
            finish_round(ctx, len(state.round_results), again=True)
            save_checkpoint(ctx)
        metrics = ppo_iteration(ctx)
        state.iteration += 1
        state.last_metrics = metrics
        ctx.run.logger.log(metrics, step=state.iteration)
        bar.set_postfix(reward=f"{metrics['reward/raw_mean']:.2f}", kl=f"{metrics['kl']:.3f}")
        early = (state.iteration - 1) % k + 1 == cfg.early_iteration
        if early:
            take_snapshot(ctx, f"r{(state.iteration - 1) // k + 1}/early")
        if early or state.iteration % cfg.checkpoint_every == 0 or state.iteration % k == 0 \
                or state.iteration == cfg.stop_after_iterations:
            save_checkpoint(ctx)
        bar.update(1)
    bar.close()
    return finish_run(ctx)


def take_snapshot(ctx: Context, name: str) -> str:
    """Export the live policy as an HF directory (the round's early/late policy for the online paths)."""
    out = str(ctx.run.dir / "snapshots" / name.replace("/", "_"))
    ctx.roles.policy.get(ctx.roles.policy.call("export_hf", out), phase=f"export {name}",
                         timeout_s=ctx.cfg.timeouts.checkpoint_s)
    ctx.state.snapshots[name] = out
    ctx.state.snapshot_versions[name] = ctx.state.policy_version
    return out


def finish_round(ctx: Context, round_index: int, again: bool = False) -> None:
    """Online step of a round (fast + slow path, RM update) and the reward role's reload with the new RM.
    `again`: the round's result is in the state already (its RM update was skipped as the last round's); it is
    replaced by the one with the update."""
    from jobs.rlhf_rounds import RoundContext, end_of_round

    cfg, state, roles = ctx.cfg, ctx.state, ctx.roles
    if again:
        state.round_results.pop()
    late = f"r{round_index}/late"
    take_snapshot(ctx, late)
    early = f"r{round_index}/early" if f"r{round_index}/early" in state.snapshots else late

    def generate_texts(source: str, prompts: list) -> list[str]:
        name = {"sft": "sft", "early": early, "late": "policy"}[source]
        serve_weights(roles, state, name, state.snapshots.get(name, ""), cfg.timeouts.sync_s)
        seed = iteration_seed(cfg.run.seed, 10_000 + 3 * round_index + ("sft", "early", "late").index(source))
        rollouts = generate(roles, [ctx.codec.encode(p) for p in prompts], ctx.sampling(seed), cfg.timeouts.generate_s)
        return [ctx.codec.decode(r.response_ids) for r in rollouts]

    rm_trainer = rm_update_group(ctx)
    result = end_of_round(RoundContext(
        round=round_index, run_dir=ctx.run.dir, rm_dir=state.rm_dir, base_pairs_path=ctx.base_pairs,
        prior_pair_files=[r["pairs_path"] for r in state.round_results if r.get("pairs_path")], cfg=cfg.online,
        generate=generate_texts, rm_score=lambda items: score(roles, items, cfg.timeouts.score_s),
        logger=ctx.run.logger, seed=cfg.run.seed, sft_dir=cfg.policy.path, log_step=state.iteration,
        trainer_overrides=roles.rm_trainer_overrides, rm_trainer=rm_trainer, rm_timeout_s=cfg.timeouts.rm_update_s,
        policy_versions={"sft": 0, "early": state.snapshot_versions[early], "late": state.policy_version},
        world=rm_world(cfg), last=round_index == cfg.rounds,
    ))
    if not cfg.rm_update_workers.keep_warm:
        roles.shutdown_rm_trainer()
    state.round_results.append(dataclasses.asdict(result))
    if result.new_rm_dir and result.new_rm_dir != state.rm_dir:
        reload_reward(ctx, result.new_rm_dir)
    log_round(ctx, round_index, result)


def rm_update_group(ctx: Context) -> Any:
    """The round's RM-update workers: the warm group, started on first use (rm_update_workers.keep_warm) and sized
    then by rm_update_overrides; roles.rm_trainer_overrides keeps the TrainerConfig fields it was sized with."""
    from cluster.trainer_group import TrainerGroup
    from trainer.config import TrainerConfig

    roles = ctx.roles
    if roles.rm_trainer is None:
        overrides = rm_update_overrides(ctx.cfg.rm_update_workers)
        roles.rm_trainer = TrainerGroup.for_config(TrainerConfig(**overrides), name="rm_update",
                                                   threads=ctx.cfg.rm_update_workers.threads,
                                                   start_timeout_s=ctx.cfg.timeouts.start_s)
        roles.rm_trainer_overrides = overrides
    return roles.rm_trainer


def reload_reward(ctx: Context, rm_dir: str) -> None:
    """Every reward rank loads the new RM in place (no new processes); a restarted role starts from state.rm_dir."""
    group = ctx.roles.reward
    group.get(group.call("load", rm_dir), phase="reload reward model", timeout_s=ctx.cfg.timeouts.start_s)
    ctx.state.rm_dir = rm_dir


def log_round(ctx: Context, round_index: int, result) -> None:
    """`end_of_round` logs the online/ metrics and the pattern table itself; the console gets the gist."""
    names = [p.get("name", "?") for p in result.patterns if p.get("detected", True)]
    rm = (f"new RM {result.new_rm_dir}" if result.rm_updated else
          "no RM update after the last round (online.rm_update.after_last_round=true trains one)")
    print(f"round {round_index}: hack pattern(s) {names}, pairs {result.pair_counts}, hack rate early "
          f"{result.hack_rate_early:.3f} -> late {result.hack_rate_late:.3f}, {rm}", file=sys.stderr)


def resolve_base_pairs(cfg: RLHFJobConfig, run_dir: Path) -> str:
    """The preference pairs the RM was trained on (the online RM update trains on them plus the new pairs).

    `reward.base_pairs_path` when given; else read off the reward job's run directory (the parent of its model_dir,
    holding its resolved config.yaml): its single `data.train_paths` file, or `data.world_dir`'s train pairs, or -
    when it generated the world in-job - the same world pairs regenerated into `<run_dir>/base_pairs.jsonl`."""
    import yaml

    if cfg.reward.base_pairs_path:
        return cfg.reward.base_pairs_path
    rm_run = Path(cfg.reward.path).parent
    config = rm_run / "config.yaml"
    how = "pass reward.base_pairs_path=<pairs.jsonl> (the pairs the RM was trained on)"
    if not config.exists():
        raise ConfigError(f"cannot tell which pairs the RM at {cfg.reward.path} was trained on: {config} (the "
                          f"reward job's resolved config) does not exist; {how}")
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    if data.get("train_paths"):
        paths = [Path(p) for p in data["train_paths"]]
        if len(paths) == 1 and paths[0].is_file():
            return str(paths[0])
        raise ConfigError(f"the RM was trained on {data['train_paths']} (several files or a directory); {how}")
    from data.world import files as world_files

    if data.get("world_dir"):
        return str(Path(data["world_dir"]) / world_files.TRAIN_PAIRS)
    from data.io import atomic_write_jsonl
    from data.world.config import WorldConfig

    out = run_dir / "base_pairs.jsonl"
    if not out.exists():  # deterministic in the world config, so regenerating gives the RM's exact pairs
        atomic_write_jsonl(out, world_files.train_pairs(WorldConfig(**(data.get("world") or {}))))
    return str(out)


def rm_world(cfg: RLHFJobConfig) -> dict:
    """The world settings (WorldConfig fields, e.g. world.flattery_pairs) the RM's pairs were drawn with, read off
    the reward job's run directory: its in-job `data.world`, or the world job's config beside `data.world_dir`.
    {} when there is no such record (the RM was trained on files, or its run directory is elsewhere)."""
    import yaml

    def section(path: Path, *keys: str) -> dict:
        node = yaml.safe_load(path.read_text()) if path.is_file() else None
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    data = section(Path(cfg.reward.path).parent / "config.yaml", "data")
    if data.get("train_paths"):
        return {}
    if data.get("world_dir"):
        return section(Path(data["world_dir"]) / "config.yaml", "world")
    return data.get("world") or {}


def save_checkpoint(ctx: Context) -> Path | None:
    if ctx.ckpt is None:
        return None
    state, roles, timeout = ctx.state, ctx.roles, ctx.cfg.timeouts.checkpoint_s
    state.reward_stats = ctx.normalizer.state_dict()
    state.kl_ctl = ctx.kl_ctl.state_dict()
    state.seconds += time.time() - ctx.started
    ctx.started = time.time()

    def write_models(directory: Path) -> None:
        refs = {role: getattr(roles, role).call("save", str(directory / role)) for role in ("policy", "critic")}
        for role, r in refs.items():
            getattr(roles, role).get(r, phase="checkpoint", timeout_s=timeout)

    return ctx.ckpt.save(state, write_models)


def finish_run(ctx: Context) -> dict:
    cfg, state = ctx.cfg, ctx.state
    final = evaluate_oracle(ctx, "final")
    model_dir = str(ctx.run.dir / "model")
    ctx.roles.policy.get(ctx.roles.policy.call("export_hf", model_dir), phase="export final",
                         timeout_s=cfg.timeouts.checkpoint_s)
    sft = state.oracle_sft
    print_table(sft, final)
    gain_se = paired_gain_se(sft["per_prompt"], final["per_prompt"]) if "per_prompt" in sft else None
    if gain_se is not None:
        print(f"gain {final['mean'] - sft['mean']:+.3f}; the held-out evaluation alone varies it by +-{gain_se:.3f} "
              "(one standard error)", file=sys.stderr)
    tracked = track_hacks(ctx.run.dir)
    from_round_1 = [t for t in tracked if t["found_in_round"] == 1 and len(t["late_rate_by_round"]) > 1]

    def halved(key: str) -> bool | None:
        return all(t[key] is not None and t[key] >= 0.5 for t in from_round_1) if from_round_1 else None

    print_tracking(from_round_1)
    return {
        "oracle_score_sft": sft["mean"],
        "oracle_score_final": final["mean"],
        "oracle_score_gain": final["mean"] - sft["mean"],
        # the held-out evaluation's own noise in that gain (paired by prompt); None for a run begun before it existed
        "oracle_score_gain_se": gain_se,
        "oracle_score_by_domain_sft": sft["by_domain"],
        "oracle_score_by_domain_final": final["by_domain"],
        "oracle_score_greedy_sft": sft["greedy"]["mean"],
        "oracle_score_greedy_final": final["greedy"]["mean"],
        "oracle_score_greedy_by_domain_sft": sft["greedy"]["by_domain"],
        "oracle_score_greedy_by_domain_final": final["greedy"]["by_domain"],
        "heldout_samples": {name: str(ctx.run.dir / f"heldout_{name}.jsonl") for name in ("sft", "final")},
        # share of sampled held-out answers the token budget cut off, and the longest best answer (it must fit)
        "heldout_truncated_frac_sft": sft.get("truncated_frac"),
        "heldout_truncated_frac_final": final["truncated_frac"],
        "reference_answer_tokens_max": final["reference_tokens_max"],
        "kl_final": state.last_metrics.get("kl"),  # the penalty's estimator (k1 by default): noisy around 0
        "kl_final_k3": state.last_metrics.get("kl/k3"),  # never negative; what "KL stays bounded" reads
        "mismatch_p95_final": state.last_metrics.get("mismatch/p95_abs"),
        "reward_raw_final": state.last_metrics.get("reward/raw_mean"),
        "hack_rate_by_round": [r["hack_rate_late"] for r in state.round_results],
        "hack_rate_early_by_round": [r["hack_rate_early"] for r in state.round_results],
        "patterns_by_round": [[p.get("name", "") for p in r["patterns"] if p.get("detected", True)]
                              for r in state.round_results],
        # Each detected pattern re-measured with its own detector in every later round (rlhf_rounds.track_hacks);
        # the target: a hack found in round 1 at most half as frequent in the last round. The same over the rise
        # above the SFT policy's own rate of the pattern (a habit SFT had, which the KL penalty keeps, is not what
        # PPO added): at most half of that rise left.
        "hack_tracking": tracked,
        "round1_hacks_halved": halved("reduction"),
        "round1_hack_excess_halved": halved("excess_reduction"),
        "pair_counts_by_round": [r["pair_counts"] for r in state.round_results],
        # How often the RM PPO optimised against agreed with the labeler on the policy's own replies, per round.
        "rm_label_agreement_by_round": [r["pair_counts"].get("rm_label_agreement") for r in state.round_results],
        "rm_dirs": [r["new_rm_dir"] for r in state.round_results],
        # False for a round that trained no RM (the last one, unless online.rm_update.after_last_round)
        "rm_updated_by_round": [r.get("rm_updated", True) for r in state.round_results],
        "rounds": len(state.round_results),
        "iterations": state.iteration,
        "seconds_all_attempts": round(state.seconds + time.time() - ctx.started, 2),
        "weight_version": state.weight_version,
        "placement": ctx.roles.where(),
        "model_dir": model_dir,
        "completed": True,
    }


# ---------------------------------------------------------------------------------------------- entry point


class RoleFailure(RuntimeError):
    """A role died or hung and could not be recovered; names the role and the phase."""


def build_context(cfg: RLHFJobConfig, run: Run, roles: Roles, state: DriverState, ckpt: Checkpointer | None,
                  base_pairs: str = "") -> Context:
    normalizer, kl_ctl = RewardNormalizer(cfg.ppo.reward_norm), build_kl_controller(cfg.ppo.kl)
    if state.reward_stats:
        normalizer.load_state_dict(state.reward_stats)
    if state.kl_ctl:
        kl_ctl.load_state_dict(state.kl_ctl)
    ptx = PTXStream(cfg.ptx.packed_dir, cfg.ptx.max_len, cfg.run.seed) if cfg.ptx.packed_dir else None
    return Context(cfg, run, roles, state, ChatCodec(cfg.policy.path),
                   PromptStream(domains(cfg), cfg.prompts.pool_per_domain, cfg.run.seed), ptx, normalizer, kl_ctl, ckpt,
                   base_pairs)


def attempt(cfg: RLHFJobConfig, run: Run, ckpt: Checkpointer, base_pairs: str) -> dict:
    """Start every role, restore the newest checkpoint (if any) into them, and run to the end (or the stop)."""
    latest = ckpt.latest()
    state = ckpt.load_state(latest) if latest else DriverState(rm_dir=cfg.reward.path)
    roles = start_roles(cfg, state.rm_dir)
    try:
        if latest:
            for role in ("policy", "critic"):
                group = getattr(roles, role)
                group.get(group.call("load", str(latest / role)), phase="restore checkpoint",
                          timeout_s=cfg.timeouts.checkpoint_s)
            print(f"resumed from {latest} (iteration {state.iteration}, round results {len(state.round_results)})",
                  file=sys.stderr)
        roles.holds = "policy" if state.policy_version == 0 else "stale"
        return run_rounds(build_context(cfg, run, roles, state, ckpt, base_pairs))
    finally:
        roles.shutdown()


def main(cfg: RLHFJobConfig, run: Run) -> dict:
    check_inputs(cfg)
    base_pairs = resolve_base_pairs(cfg, run.dir)  # needed after round 1: fail now rather than then
    init_ray(cfg.cluster)
    check_rm_update_room(cfg)
    ckpt = Checkpointer(run.dir / "checkpoints", cfg.checkpoint_keep)
    if not cfg.run.resume:
        ckpt.clear()
    if not cfg.ptx.packed_dir:
        print("notice: ptx.packed_dir is empty, so PPO runs without the pretraining (PTX) loss", file=sys.stderr)
    restarts = 0
    while True:
        try:
            summary = attempt(cfg, run, ckpt, base_pairs)
        except (RoleDied, PhaseTimeout) as e:
            run.logger.log({"fault/restarts": restarts, "fault/role": e.role, "fault/phase": e.phase})
            if restarts >= cfg.max_actor_restarts:
                raise RoleFailure(
                    f"role '{e.role}' failed during phase '{e.phase}' and max_actor_restarts={cfg.max_actor_restarts} "
                    f"restart(s) are used up: {e}"
                ) from e
            restarts += 1
            print(f"{e}\nrestarting every role from the last checkpoint ({restarts}/{cfg.max_actor_restarts})",
                  file=sys.stderr)
            wait_until_roles_fit(cfg, timeout_s=min(cfg.timeouts.start_s, 120.0))
            continue
        return {**summary, "restarts": restarts}


if __name__ == "__main__":
    run_job("rlhf", RLHFJobConfig, main)
