"""HTTP load on the OpenAI Serve app: throughput and p50/p99 latency at 1, 8, 32 clients, and batched vs
one-at-a-time generation at 16 clients. The load comes from a separate process (this file with --client).

    python bench/serve_load.py                        # tiny model built in a temp dir
    python bench/serve_load.py --model outputs/demo/sft/model --hidden 0
    python bench/serve_load.py --hidden 512           # a larger random-init shape (speed only)

Not a test: numbers depend on the machine and its load (printed with the results).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()


# ------------------------------------------------------------------------------------------------ load client


def client(url: str, concurrency: int, duration_s: float, max_tokens: int) -> dict:
    """Closed loop: each of `concurrency` threads sends its next request as soon as the last one answers."""
    import requests

    deadline = time.monotonic() + duration_s
    lock = threading.Lock()
    latencies, tokens, errors = [], [0], [0]

    def loop(i: int) -> None:
        session = requests.Session()
        n = 0
        while time.monotonic() < deadline:
            body = {"prompt": f"def function_{i}_{n}(x):", "max_tokens": max_tokens, "temperature": 0}
            start = time.perf_counter()
            r = session.post(f"{url}/v1/completions", json=body, timeout=300)
            took = time.perf_counter() - start
            with lock:
                if r.status_code == 200:
                    latencies.append(took)
                    tokens[0] += r.json()["usage"]["completion_tokens"]
                else:
                    errors[0] += 1
            n += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors[0], "wall_s": wall,
            "req_per_s": len(lat) / wall, "tokens_per_s": tokens[0] / wall, "p50_s": pct(0.50), "p99_s": pct(0.99),
            "mean_s": statistics.fmean(lat) if lat else float("nan")}


def run_client_process(url: str, concurrency: int, duration_s: float, max_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--client", url, "--concurrency", str(concurrency), "--duration",
           str(duration_s), "--max-tokens", str(max_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ server side


def build_model(out: Path, hidden: int) -> Path:
    from data.samples import tokenizer_training_texts
    from modeling.tiny import TinyModelSpec, build_tiny_model, save_pretrained, train_tokenizer

    tok = train_tokenizer(tokenizer_training_texts(), vocab_size=1024)
    heads = max(4, hidden // 64)
    spec = TinyModelSpec(hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 31) // 32 * 32,
                         num_attention_heads=heads, num_key_value_heads=heads // 2,
                         num_hidden_layers=2 if hidden <= 128 else 4)
    save_pretrained(build_tiny_model(spec, tok), tok, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(model: str, port: int, max_batch_size: int, quantization: str, batch_wait_s: float) -> str:
    from serve.app import run_app
    from serve.config import ServeConfig
    from serve.engines.hf import HFEngineConfig

    cfg = ServeConfig(model_path=model, port=port, max_ongoing_requests=64, max_queued_requests=256,
                      num_cpus=1, hf=HFEngineConfig(quantization=quantization, max_batch_size=max_batch_size,
                                                     batch_wait_timeout_s=batch_wait_s))
    return run_app(cfg)


def engine_only(model: str, max_batch_size: int, clients: int, max_tokens: int) -> float:
    """Tokens/s of `clients` concurrent requests sent straight to the HF engine inside a Serve replica (no HTTP,
    no proxy): what batching buys the engine itself, apart from the per-request cost of the HTTP path."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4)
    class EngineBench:
        def __init__(self, path: str, batch: int):
            from serve.engines.hf import HFEngine, HFEngineConfig

            self.engine = HFEngine(path, HFEngineConfig(quantization="none", max_batch_size=batch))
            self.engine.load()

        async def run(self, n: int, new_tokens: int) -> float:
            import asyncio

            from serve.engines.base import SamplingOptions

            prompts = [self.engine.tokenizer(f"def function_{i}(x):")["input_ids"] for i in range(n)]

            async def one(ids):
                last = None
                async for last in self.engine.stream(ids, SamplingOptions(max_tokens=new_tokens, temperature=0)):
                    pass
                return last.completion_tokens

            await one(prompts[0])  # warm-up
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*[one(p) for p in prompts]))
            return tokens / (time.perf_counter() - start)

    handle = serve.run(EngineBench.bind(model, max_batch_size), name="engine-bench", route_prefix=None)
    rate = handle.run.remote(clients, max_tokens).result(timeout_s=600)
    serve.delete("engine-bench")
    return rate


def fmt(r: dict) -> str:
    return (f"{r['concurrency']:>7} {r['requests']:>8} {r['errors']:>6} {r['req_per_s']:>8.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['p50_s'] * 1000:>8.0f} {r['p99_s'] * 1000:>8.0f}")


HEADER = f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>8} {'tokens/s':>9} {'p50 ms':>8} {'p99 ms':>8}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client", default="", help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help="HF checkpoint to serve (default: build a random tiny one)")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size of the built model")
    ap.add_argument("--quantization", default="none", help="serve.hf.quantization for the run")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-wait", type=float, default=0.01,
                    help="serve.hf.batch_wait_timeout_s: how long a batch's first request waits for company")
    ap.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs (the replica takes 1)")
    args = ap.parse_args()
    if args.client:
        print(json.dumps(client(args.client, args.concurrency, args.duration, args.max_tokens)))
        return

    from ray import serve

    from cluster.runtime import ClusterConfig, init_ray

    init_ray(ClusterConfig(num_cpus=args.num_cpus))
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_model(Path(tmp) / f"h{args.hidden}", args.hidden))
        port = free_port()
        print(f"model {model} quantization={args.quantization} max_tokens={args.max_tokens} batch_wait={args.batch_wait}s "
              f"duration={args.duration}s load avg {os.getloadavg()[0]:.1f}", flush=True)
        url = deploy(model, port, 16, args.quantization, args.batch_wait)
        print(f"\n== batched engine (max_batch_size=16): closed-loop clients\n{HEADER}", flush=True)
        scaling = {}
        for c in (1, 8, 32):
            scaling[c] = run_client_process(url, c, args.duration, args.max_tokens)
            print(fmt(scaling[c]), flush=True)
        batched16 = run_client_process(url, 16, args.duration, args.max_tokens)
        url = deploy(model, port, 1, args.quantization, args.batch_wait)  # same app name: Serve replaces the deployment
        single16 = run_client_process(url, 16, args.duration, args.max_tokens)
        print(f"\n== 16 clients: batched vs one request at a time\n{'engine':>14} {HEADER}")
        print(f"{'batch<=16':>14} {fmt(batched16)}\n{'batch=1':>14} {fmt(single16)}")
        print(f"\nthroughput ratio batched/one-at-a-time: {batched16['tokens_per_s'] / single16['tokens_per_s']:.2f}x"
              f"   (32 vs 1 client: {scaling[32]['tokens_per_s'] / scaling[1]['tokens_per_s']:.2f}x)")
        serve.delete("coolray-llm")
        eng16, eng1 = (engine_only(model, b, 16, args.max_tokens) for b in (16, 1))
        print(f"\n== engine only (16 concurrent requests inside the replica, no HTTP)\n"
              f"batch<=16 {eng16:>8.0f} tokens/s   batch=1 {eng1:>8.0f} tokens/s   ratio {eng16 / eng1:.2f}x "
              f"(load avg now {os.getloadavg()[0]:.1f})")
        serve.shutdown()


if __name__ == "__main__":
    main()
