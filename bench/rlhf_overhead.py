"""How much of a PPO iteration is Ray overhead: the same workers and the same driver code, run (a) as objects in one
process and (b) as Ray actors (placement groups, object store, bounded waits, weight sync through the object store).

    python bench/rlhf_overhead.py                                   # tiny SFT model + tiny RM built on the fly
    python bench/rlhf_overhead.py --iterations 6 policy.path=/abs/sft reward.path=/abs/rm ppo.rollout_batch_size=32

Both modes run the identical iteration sequence (same prompts, seeds and weights) after one untimed warm-up
iteration. In-process, torch uses one thread, as each fractional-CPU actor does under Ray.

The headline is wall time: overhead = (ray - in-process) / ray, the share of a Ray iteration that distribution
costs (goal <= 10%). Measure on an otherwise idle machine: under foreign load the OS gives five actor processes five
CPU shares and one process one, which flatters Ray. Also printed: CPU seconds (this process, plus every role
actor's process under Ray; Raylet/GCS daemons not counted), which adds what distribution burns in the background
(serialisation, object store, each actor's polling threads) even when it costs no latency.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()


def build_tiny(out: pathlib.Path) -> tuple[str, str]:
    from data.samples import tokenizer_training_texts
    from modeling.reward import RewardModel, RewardModelConfig
    from modeling.tiny import TinyModelSpec, build_tiny_model, save_pretrained, train_tokenizer

    tok = train_tokenizer(tokenizer_training_texts(), vocab_size=1024)
    save_pretrained(build_tiny_model(TinyModelSpec(), tok), tok, out / "sft")
    rm, rm_tok = RewardModel.from_causal_lm(str(out / "sft"), RewardModelConfig(), seed=1)
    rm.save_pretrained(out / "rm", rm_tok)
    return str(out / "sft"), str(out / "rm")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of this process (children excluded) and of `pids`."""
    import os

    import psutil

    total = 0.0
    for pid in [os.getpid(), *pids]:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def actor_pids(roles) -> list[int]:
    import os

    import ray

    refs = [actor.__ray_call__.remote(lambda self: os.getpid()) for g in roles.groups.values() for actor in g.actors]
    return ray.get(refs, timeout=60)


def time_iterations(cfg, roles, run, iterations: int, pids: list[int]) -> tuple[float, float, list[float], dict]:
    from jobs import rlhf
    from jobs.rlhf_state import DriverState

    ctx = rlhf.build_context(cfg, run, roles, DriverState(rm_dir=cfg.reward.path), None)
    rlhf.ppo_iteration(ctx)  # warm-up: first-call costs (imports, allocator, object store) are not overhead
    ctx.state.iteration += 1
    times, phases = [], {}
    cpu_start = cpu_seconds(pids)
    for _ in range(iterations):
        start = time.perf_counter()
        metrics = rlhf.ppo_iteration(ctx)
        times.append(time.perf_counter() - start)
        ctx.state.iteration += 1
        for key, value in metrics.items():
            if key.startswith("time/") and key != "time/iteration":
                phases[key] = phases.get(key, 0.0) + value / iterations
    return sum(times), cpu_seconds(pids) - cpu_start, times, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/rlhf.yaml")
    args = parser.parse_args()

    import torch

    from cluster.runtime import init_ray
    from jobs import rlhf
    from jobs.common import LoggingConfig, MetricsLogger, Run, load_config

    work = pathlib.Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    overrides = list(args.overrides)
    if not any(o.startswith("policy.path=") for o in overrides):
        sft, rm = build_tiny(work)
        overrides += [f"policy.path={sft}", f"reward.path={rm}"]
    cfg = load_config("rlhf", rlhf.RLHFJobConfig, overrides + ["logging.wandb=disabled"])
    run = Run("rlhf-bench", work, MetricsLogger(work, "rlhf-bench", LoggingConfig(wandb="disabled"), {}))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    local_roles = rlhf.start_local_roles(cfg, cfg.reward.path)
    local_total, local_cpu, local_times, local_phases = time_iterations(cfg, local_roles, run, args.iterations, [])
    local_roles.shutdown()
    torch.set_num_threads(threads)

    init_ray(cfg.cluster)
    ray_roles = rlhf.start_roles(cfg, cfg.reward.path)
    try:
        ray_total, ray_cpu, ray_times, ray_phases = time_iterations(cfg, ray_roles, run, args.iterations,
                                                                    actor_pids(ray_roles))
    finally:
        ray_roles.shutdown()

    overhead, cpu_overhead = (ray_total - local_total) / ray_total, (ray_cpu - local_cpu) / ray_cpu
    print(f"iterations timed: {args.iterations} (B={cfg.ppo.rollout_batch_size} prompts, "
          f"{cfg.rollout.sampling.max_new_tokens} new tokens)")
    print(f"in one process : {local_total:8.3f} s  ({local_total / args.iterations:.3f} s/iteration)  "
          f"{[round(t, 3) for t in local_times]}")
    print(f"as Ray actors  : {ray_total:8.3f} s  ({ray_total / args.iterations:.3f} s/iteration)  "
          f"{[round(t, 3) for t in ray_times]}")
    print(f"CPU seconds    : {local_cpu:8.3f} in one process, {ray_cpu:8.3f} as Ray actors (driver + actors)")
    print(f"ray overhead   : {100 * overhead:+.1f}% of a Ray iteration's wall time (goal <= 10%); "
          f"extra CPU time {100 * cpu_overhead:+.1f}%")
    print("mean seconds per phase (in one process the forward phases run one after another, under Ray together):")
    for key in sorted(set(local_phases) | set(ray_phases)):
        print(f"  {key:<22} {local_phases.get(key, 0.0):8.3f} {ray_phases.get(key, 0.0):8.3f}")


if __name__ == "__main__":
    main()
