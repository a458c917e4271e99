"""Held-out oracle evaluation of the RLHF policy: the job's headline numbers (`oracle_score_{sft,final}`).

The policy as PPO trains it (the rollout's temperature and top_p, same seeds before and after) and its greedy
answers, on the world's held-out prompts of every trained domain, scored by the world's oracle; every answer is
written to `heldout_<name>.jsonl` in the run directory.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from actors.rollout import SamplingConfig
from jobs.rlhf_roles import generate, serve_weights
from jobs.rlhf_state import iteration_seed

if TYPE_CHECKING:
    from jobs.rlhf import ChatCodec, Context, RLHFJobConfig


def evaluate_oracle(ctx: Context, name: str) -> dict:
    """Mean oracle score (`data.world.score`, in [0, 1]) on held-out prompts of every domain, of the policy as PPO
    trains it (`eval.samples_per_prompt` samples each at the rollout's temperature/top_p, same seeds before and
    after) and of its greedy answers. {"mean", "by_domain", "greedy": {"mean", "by_domain"}}.

    Every answer, with its prompt and score, goes to `heldout_<name>.jsonl` in the run directory (`decoding`:
    sampled | greedy), so a number that moved can be read as the replies that moved it."""
    from data.io import atomic_write_jsonl
    from data.world import make_prompts

    cfg = ctx.cfg
    serve_weights(ctx.roles, ctx.state, "policy", timeout_s=cfg.timeouts.sync_s)
    prompts = [p for d in domains(cfg) for p in make_prompts(d, cfg.eval.heldout_per_domain, cfg.run.seed, "heldout")]
    tokens = cfg.eval.max_new_tokens or cfg.rollout.sampling.max_new_tokens
    greedy = ctx.sampling(0, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=tokens)
    sampled = ctx.sampling(iteration_seed(cfg.run.seed, 10**6), max_new_tokens=tokens)  # never a PPO iteration's
    rows: list[dict] = []
    k = cfg.eval.samples_per_prompt
    sampled_scores = _oracle_scores(ctx, prompts * k, sampled, "sampled", rows)
    out = _means(sampled_scores)
    out["truncated_frac"] = sum(r["truncated"] for r in rows) / max(len(rows), 1)
    need = reference_answer_tokens(ctx.codec, prompts)
    out["reference_tokens_max"] = max(need, default=0)
    cut = sum(n > tokens for n in need)
    if cut:
        print(f"warning: the best answer to {cut} of {len(prompts)} held-out prompts needs more than {tokens} new tokens "
              f"(up to {max(need)} with the end of turn), so rollouts cut it short and neither PPO nor this score can "
              f"reach it; raise rollout.sampling.max_new_tokens to at least {max(need)}", file=sys.stderr)
    # per held-out prompt, the mean of its samples (domain d's scores are k passes over its prompts)
    out["per_prompt"] = {d: [sum(v[i::len(v) // k]) / k for i in range(len(v) // k)] for d, v in sampled_scores.items()}
    out["greedy"] = _means(_oracle_scores(ctx, prompts, greedy, "greedy", rows))
    atomic_write_jsonl(ctx.run.dir / f"heldout_{name}.jsonl", rows)
    return out


def _oracle_scores(ctx: Context, prompts: list, sampling: SamplingConfig, decoding: str,
                   rows: list[dict]) -> dict[str, list[float]]:
    """Each answer's oracle score by domain, in prompt order; one row per answer is appended to `rows`."""
    from data.world import score as oracle

    rollouts = generate(ctx.roles, [ctx.codec.encode(p) for p in prompts], sampling, ctx.cfg.timeouts.generate_s)
    by_domain: dict[str, list[float]] = {}
    for p, r in zip(prompts, rollouts):
        text = ctx.codec.decode(r.response_ids)
        score = oracle(p, text)
        by_domain.setdefault(p.domain, []).append(score)
        rows.append({"prompt_id": p.id, "domain": p.domain, "prompt": p.text, "decoding": decoding, "response": text,
                     "oracle": score, "truncated": r.finish_reason == "length"})
    return by_domain


def reference_answer_tokens(codec: ChatCodec, prompts: list) -> list[int]:
    """Per prompt, the tokens (end of turn included) of the world's best answer by its oracle: what the rollout
    budget must hold for a policy to be able to give it. 48 new tokens cut the two-reason how-to answers of 13 of
    the 72 verb/object pairs with the demo's tokenizer (they run to 50 + 1; docs/design.md, "Session 7")."""
    from data.world import respond, score, styles

    out = []
    for p in prompts:
        best = max((respond(p, s) for s in styles(p)["good"]), key=lambda text: score(p, text))
        out.append(len(codec.tokenizer(best, add_special_tokens=False)["input_ids"]) + 1)
    return out


def _means(by_domain: dict[str, list[float]]) -> dict:
    """{"mean": the mean over domains of each domain's mean, "by_domain": those means}."""
    means = {d: sum(v) / len(v) for d, v in by_domain.items()}
    return {"mean": sum(means.values()) / len(means), "by_domain": means}


def print_table(sft: dict, final: dict) -> None:
    lines = [f"{'domain':<10} {'SFT':>7} {'final':>7} {'delta':>7}   greedy: {'SFT':>7} {'final':>7} {'delta':>7}"]
    rows = [(d, sft["by_domain"][d], final["by_domain"].get(d, float("nan")), sft["greedy"]["by_domain"][d],
             final["greedy"]["by_domain"].get(d, float("nan"))) for d in sft["by_domain"]]
    rows.append(("ALL", sft["mean"], final["mean"], sft["greedy"]["mean"], final["greedy"]["mean"]))
    lines += [f"{d:<10} {a:7.3f} {b:7.3f} {b - a:+7.3f}           {c:7.3f} {e:7.3f} {e - c:+7.3f}"
              for d, a, b, c, e in rows]
    print("held-out oracle score (sampled as in rollouts; greedy beside it), before -> after RLHF\n"
          + "\n".join(lines), file=sys.stderr)


def domains(cfg: RLHFJobConfig) -> list[str]:
    """The world domains PPO prompts (and the held-out evaluation) come from: prompts.domains, [] = all."""
    from data.world import DOMAINS

    return list(cfg.prompts.domains or DOMAINS)
