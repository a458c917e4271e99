"""Throughput of the corpus stages (read -> rules -> MinHash -> sort -> global dedup -> safety -> quality) with
Ray at 1 CPU and at 2 CPUs, each in a fresh process with its own `ray.init(num_cpus=k)`, pinned (with its Ray
processes) to k cores where the OS allows.

    python bench/data_pipeline.py                 # sample x 8 with perturbations, 16 shards
    python bench/data_pipeline.py --copies 20 --shards 32

The corpus is the shipped raw sample replicated; every replica after the first has ~30% of its words swapped
(seeded by the replica), so replicas are new documents for the dedup stages rather than exact copies. Each run
first processes one shard to start the workers and import datasketch, then times the whole corpus (the
`materialize()` of the annotated dataset). Not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from cluster.runtime_env import REPO_ROOT  # noqa: E402

SAMPLE = REPO_ROOT / "data" / "sample_corpus"


def _perturb(text: str, rng: random.Random, vocab: list[str]) -> str:
    return "\n".join(
        " ".join(rng.choice(vocab) if rng.random() < 0.3 else w for w in line.split(" ")) for line in text.split("\n")
    )


def build_corpus(out_dir: Path, copies: int, shards: int) -> int:
    """Sample rows x copies as JSONL shards; returns the number of documents."""
    from data.corpus import InputConfig, discover_files, iter_file_rows

    base = [r for f, fmt in discover_files([str(SAMPLE)]) for r in iter_file_rows(f, fmt, InputConfig())]
    vocab = sorted({w for r in base for w in r["text"].split() if w.isalpha()})
    docs = []
    for copy in range(copies):
        rng = random.Random(copy)
        for r in base:
            text = r["text"] if copy == 0 else _perturb(r["text"], rng, vocab)
            docs.append({"id": f"{copy}-{r['id']}", "text": text, "url": r["url"], "date": r["date"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines = (json.dumps(d) + "\n" for d in docs[s::shards])
        (out_dir / f"part-{s:04d}.jsonl").write_text("".join(lines))
    return len(docs)


def pin_to_cores(k: int) -> list[int] | None:
    """Confine this process, and so the Ray instance it starts (raylet, GCS, workers inherit the mask), to k cores.
    Without it "1 CPU" is one core for the stages plus the machine's other cores for Ray's own processes and the
    driver, while "2 CPUs" on a 2-core box shares both with them: the ratio then understates the scaling."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < k:
        return None
    os.sched_setaffinity(0, cores[:k])
    return cores[:k]


def measure(corpus_dir: str, num_cpus: int) -> dict:
    """One Ray instance with `num_cpus` CPUs, pinned to as many cores: warm-up on one shard, then the timed run."""
    pinned = pin_to_cores(num_cpus)
    os.environ["COOLRAY_PROGRESS"] = "0"
    from cluster.runtime import ClusterConfig, init_ray
    from data.corpus import CorpusConfig, InputConfig, discover_files
    from jobs.data import corpus_dataset, corpus_report, data_context

    init_ray(ClusterConfig(num_cpus=num_cpus, object_store_memory_mb=512))
    cfg, input_cfg = CorpusConfig(), InputConfig()
    files = discover_files([corpus_dir])
    with data_context(progress_bars=False):
        corpus_dataset(files[:1], input_cfg, cfg).materialize()
        started = time.perf_counter()
        annotated = corpus_dataset(files, input_cfg, cfg).materialize()
        seconds = time.perf_counter() - started
        report = corpus_report(annotated, cfg)
    return {"num_cpus": num_cpus, "docs": report["docs_in"], "docs_out": report["docs_out"], "seconds": seconds,
            "docs_per_second": report["docs_in"] / seconds, "pinned_cores": pinned}


def cpu_profile(corpus_dir: str, max_docs: int = 3000) -> dict:
    """CPU seconds per doc of each stage group, single process, no Ray (time.process_time: load-independent).
    The global dedup is the serial part; Amdahl's bound for k CPUs is 1 / (s + (1 - s) / k), s its share."""
    from data.corpus import CorpusConfig, GlobalDedup, InputConfig, discover_files, iter_file_rows
    from data.corpus.read import ROW_COLUMNS
    from data.corpus.stages import late_stages, rule_stages

    cfg, input_cfg = CorpusConfig(), InputConfig()
    rows = []
    for path, fmt in discover_files([corpus_dir]):
        rows.extend(iter_file_rows(path, fmt, input_cfg))
        if len(rows) >= max_docs:
            break
    batch = {c: [r[c] for r in rows[:max_docs]] for c in ROW_COLUMNS}
    rule_stages({k: v[:1] for k, v in batch.items()}, cfg)  # imports and permutations outside the timing
    timings = {}
    for name, fn in (("rules", lambda b: rule_stages(b, cfg)), ("dedup", GlobalDedup(cfg.dedup)),
                     ("late", lambda b: late_stages(b, cfg))):
        started = time.process_time()
        batch = fn(batch)
        timings[name] = (time.process_time() - started) / len(rows[:max_docs])
    serial = timings["dedup"] / sum(timings.values())
    return {"ms_per_doc": {k: round(v * 1e3, 3) for k, v in timings.items()}, "serial_share": serial,
            "amdahl_2cpu": 1 / (serial + (1 - serial) / 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # child mode: one Ray with this many CPUs
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.corpus, args.measure)), flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="coolray-bench-") as tmp:
        n = build_corpus(Path(tmp), args.copies, args.shards)
        print(f"corpus: {n} docs in {args.shards} JSONL shards ({args.copies} x sample); host cores: {os.cpu_count()}")
        results = {}
        for k in args.cpus:
            out = subprocess.run([sys.executable, __file__, "--measure", str(k), "--corpus", tmp],
                                 capture_output=True, text=True, check=True)
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            results[k] = json.loads(line.removeprefix("RESULT "))
            r = results[k]
            pinned = f"pinned to cores {r['pinned_cores']}" if r["pinned_cores"] else "not pinned"
            print(f"num_cpus={k}: {r['docs']} docs in {r['seconds']:.1f} s = {r['docs_per_second']:.0f} docs/s "
                  f"({r['docs_out']} kept; {pinned})")
        prof = cpu_profile(tmp)
        print(f"CPU ms/doc by stage group (1 process, no Ray): {prof['ms_per_doc']}; serial (global dedup) share "
              f"{prof['serial_share']:.1%} -> Amdahl bound for 2 CPUs {prof['amdahl_2cpu']:.2f}x")
        if 1 in results and 2 in results:
            ratio = results[2]["docs_per_second"] / results[1]["docs_per_second"]
            print(f"speed-up 2 CPUs vs 1 CPU: {ratio:.2f}x (goal >= 1.8x)")
        print(f"load average during the run: {os.getloadavg()}")


if __name__ == "__main__":
    main()
