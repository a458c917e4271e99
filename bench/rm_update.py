"""The online loop's between-round RM update, two rounds of it: Ray Train's `fit` (a controller and fresh worker
processes per update) vs a warm `TrainerGroup` (started once, kept), same task, data, steps and threads.

    python bench/rm_update.py                          # a tiny RM on world pairs built here (no inputs needed)
    python bench/rm_update.py --rm outputs/demo/reward/model --pairs outputs/demo/world/pairs_train.jsonl --steps 60

Each side trains the same RM update twice, as a 3-round run does (the last round trains none), each time into a
fresh directory; the warm side's first update pays for starting the group. Both sides run one worker with one torch
thread, so the difference is the launcher; a third row gives the warm group every core (`rm_update_workers.threads`
0, the RLHF default, since the roles are idle while the RM trains). The final losses must agree between the two
launchers (the same loop on the same data); the script fails otherwise.
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


def tiny_inputs(root: pathlib.Path) -> tuple[str, str]:
    """(RM dir, pairs JSONL): a tiny RM on a tiny backbone, and world pairs of two domains."""
    from data.io import atomic_write_jsonl
    from data.samples import tokenizer_training_texts
    from data.world import preference_pairs
    from modeling.reward import RewardModel, RewardModelConfig
    from modeling.tiny import TinyModelSpec, build_tiny_model, save_pretrained, train_tokenizer

    tok = train_tokenizer(tokenizer_training_texts(), vocab_size=1024)
    backbone = save_pretrained(build_tiny_model(TinyModelSpec(), tok), tok, root / "backbone")
    model, tok = RewardModel.from_causal_lm(str(backbone), RewardModelConfig(), seed=0)
    rm_dir = model.save_pretrained(root / "rm", tok)
    pairs = atomic_write_jsonl(root / "pairs.jsonl",
                               [r for d in ("math", "helpful") for r in preference_pairs(d, 600, seed=1)])
    return str(rm_dir), str(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rm", default="", help="an RM directory (default: a tiny one built here)")
    p.add_argument("--pairs", default="", help="its training pairs, JSONL (default: world pairs built here)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--updates", type=int, default=2)
    args = p.parse_args()

    from cluster.runtime import ClusterConfig, init_ray
    from cluster.train import fit
    from cluster.trainer_group import TrainerGroup
    from data.preferences import read_preferences
    from jobs.rlhf_rm_update import registry_of
    from modeling.reward import RewardEncoder
    from trainer.config import TrainerConfig
    from trainer.lm_tasks import load_any_tokenizer
    from trainer.rm_task import RewardTask, encode_pairs, write_encoded

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_rm_update_"))
    if bool(args.rm) != bool(args.pairs):
        raise SystemExit("give --rm and --pairs together (an RM and the pairs it was trained on), or neither")
    # absolute: the workers do not run in this directory
    rm_dir, pairs_path = (str(pathlib.Path(args.rm).resolve()), str(pathlib.Path(args.pairs).resolve())) \
        if args.rm else tiny_inputs(root)
    rm_cfg = registry_of(rm_dir)
    encoded, _ = encode_pairs(read_preferences(pairs_path), RewardEncoder(load_any_tokenizer(rm_dir), rm_cfg))
    task = RewardTask(data_path=str(write_encoded(encoded, root / "data")), tokenizer_path=rm_dir, init_rm_path=rm_dir,
                      rm=rm_cfg, max_tokens_per_batch=4096, seed=0)
    cfg = TrainerConfig(num_workers=1, cpus_per_worker=1, lr=5e-4, max_steps=args.steps, weight_decay=0.01,
                        checkpoint_every=0, seed=0)
    init_ray(ClusterConfig())

    def ray_train() -> tuple[list[float], float]:
        times, loss = [], 0.0
        for k in range(args.updates):
            start = time.perf_counter()
            loss = fit(task, cfg, root / f"ray_train_{k}", show_progress=False).final_loss
            times.append(time.perf_counter() - start)
        return times, loss

    def warm(threads: int, name: str) -> tuple[list[float], float]:
        times, loss = [], 0.0
        start = time.perf_counter()
        group = TrainerGroup.for_config(cfg, name="rm_update", threads=threads)
        try:
            for k in range(args.updates):
                loss = group.fit(task, cfg, root / f"{name}_{k}", timeout_s=3600, show_progress=False).final_loss
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
        finally:
            group.shutdown()
        return times, loss

    rows = {"Ray Train fit per update": ray_train(), "warm TrainerGroup, 1 thread": warm(1, "warm1"),
            "warm TrainerGroup, every core": warm(0, "warm_all")}
    base_total = sum(rows["Ray Train fit per update"][0])
    print(f"{len(encoded)} pairs, {args.steps} steps per update, {args.updates} updates; seconds per update "
          "(the warm group's first includes its start)")
    for name, (times, loss) in rows.items():
        per = " ".join(f"{t:6.1f}" for t in times)
        print(f"  {name:32s}{per}   total {sum(times):6.1f}   x{sum(times) / base_total:.2f}   final loss {loss:.5f}")
    ray_loss, warm_loss = rows["Ray Train fit per update"][1], rows["warm TrainerGroup, 1 thread"][1]
    if abs(ray_loss - warm_loss) > 1e-6 * max(1.0, abs(ray_loss)):
        raise SystemExit(f"the two launchers trained different models: final loss {ray_loss} vs {warm_loss}")


if __name__ == "__main__":
    main()
