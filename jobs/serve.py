"""Serve a checkpoint behind an OpenAI-compatible API (Ray Serve) in the foreground, until Ctrl-C.

    make serve MODEL=outputs/demo/quantize/model     # == python jobs/serve.py model.path=...
    python jobs/serve.py                             # the newest checkpoint any earlier run wrote under run.root
    python jobs/serve.py serve.engine=vllm serve.num_gpus=1 serve.vllm.kv_cache_dtype=fp8   # GPU box
    python jobs/serve.py smoke=true                  # start, send one chat request, print the reply, stop

Prints `serving: <base url>` (the OpenAI `base_url`, ending in /v1) once the model is loaded, then serves until
SIGINT/SIGTERM (or `duration_s`), shuts Serve down and writes summary.json (`url`, `model_dir`,
`requests_served`, ...). It binds 127.0.0.1 unless `serve.host` says otherwise; set `serve.api_key_env` (the
name of an environment variable holding a token) before exposing it.

For a long-lived deployment on a cluster, deploy `serve.app:build_app` with a Serve config file instead (see
serve/app.py): this job owns its Serve instance and shuts it down on exit.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cluster.runtime_env import apply_process_defaults  # noqa: E402

apply_process_defaults()

from cluster.runtime import ClusterConfig, init_ray  # noqa: E402
from jobs.common import LoggingConfig, Run, RunConfig, run_job  # noqa: E402
from modeling.config import ModelConfig  # noqa: E402
from serve.config import ServeConfig  # noqa: E402


@dataclass
class ServeJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # model.path "" = newest model_dir under run.root
    serve: ServeConfig = field(default_factory=ServeConfig)
    smoke: bool = False  # send one chat request once ready, print the reply, shut down (used by `make demo`)
    smoke_prompt: str = "What is 2 + 3?"
    smoke_max_tokens: int = 32
    duration_s: float = 0.0  # > 0: serve this many seconds, then shut down; 0 = until Ctrl-C

    def __post_init__(self) -> None:
        if self.duration_s < 0:
            raise ValueError(f"duration_s must be >= 0 (got {self.duration_s}); 0 serves until Ctrl-C")
        if self.smoke_max_tokens < 1:
            raise ValueError(f"smoke_max_tokens must be >= 1 (got {self.smoke_max_tokens})")
        if self.model.path and self.serve.model_path and self.model.path != self.serve.model_path:
            raise ValueError(f"model.path ({self.model.path}) and serve.model_path ({self.serve.model_path}) "
                             "disagree; set only model.path")


def newest_model_dir(root: str | Path, exclude_jobs: tuple[str, ...] = ()) -> Path:
    """The newest existing `model_dir` named by any summary.json under `root` (recursively)."""
    found: list[tuple[float, Path]] = []
    for summary in Path(root).rglob("summary.json"):
        try:
            data = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a summary being written or a foreign file: not a candidate
        model_dir = data.get("model_dir") if isinstance(data, dict) else None
        if not model_dir or data.get("job") in exclude_jobs or not (Path(model_dir) / "config.json").exists():
            continue
        found.append((summary.stat().st_mtime, Path(model_dir)))
    if not found:
        raise FileNotFoundError(
            f"no checkpoint to use: no summary.json under {Path(root).resolve()} names an existing model_dir. "
            "Run `make demo` first, or pass one: `make serve MODEL=/path/to/hf_dir` (model.path=...)."
        )
    return max(found, key=lambda t: t[0])[1]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); pass a free port: serve.port=NNNN") from None


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def smoke_request(base_url: str, cfg: ServeJobConfig, api_key: str) -> dict:
    """One chat request through HTTP, as any OpenAI client would send it."""
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": cfg.serve.model_name, "messages": [{"role": "user", "content": cfg.smoke_prompt}],
            "max_tokens": cfg.smoke_max_tokens, "temperature": 0}
    r = requests.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"smoke request failed: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


class _StopSignals:
    """SIGINT/SIGTERM set an event instead of raising KeyboardInterrupt: an interrupt that lands inside Ray or Serve
    code (a remote call, a logger) can be swallowed there and leave the job serving forever, while the event is
    seen by `wait` whenever it arrived. A second signal raises KeyboardInterrupt, so a load that hangs can still be
    interrupted. Restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; a caller off it stops the job by `duration_s`
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def wait(self, duration_s: float) -> str:
        """Block until a signal (or the duration); returns why serving stopped."""
        return "signal" if self.stop.wait(duration_s or None) else "duration"


def main(cfg: ServeJobConfig, run: Run) -> dict:
    model_dir = cfg.model.path or cfg.serve.model_path or str(newest_model_dir(cfg.run.root))
    scfg = dataclasses.replace(cfg.serve, model_path=model_dir)
    api_key = scfg.resolve_api_key()  # fail before starting anything when the env var is missing
    init_ray(cfg.cluster)
    from ray import serve

    if not _serve_running():
        _check_port_free(scfg.host, scfg.port)
    started = time.time()
    summary: dict = {"model_dir": model_dir, "model": scfg.model_name, "engine": scfg.engine}
    with _StopSignals() as signals:
        try:
            summary.update(_serve(cfg, scfg, run, api_key, signals, started))
        finally:
            print("serve: shutting down", file=sys.stderr, flush=True)
            serve.shutdown()
    summary["served_seconds"] = round(time.time() - started, 2)
    return summary


def _serve(cfg: ServeJobConfig, scfg, run: Run, api_key: str, signals: _StopSignals, started: float) -> dict:
    """Start the app, announce it, then the smoke request or wait for a stop; the app's request counts."""
    from ray import serve

    from serve.app import run_app

    base = run_app(scfg)
    url = f"{base}/v1"
    print(f"serving: {url}", flush=True)
    summary: dict = {"url": url, "load_seconds": round(time.time() - started, 2)}
    run.logger.log({"serve/load_seconds": summary["load_seconds"]})
    if cfg.smoke:
        answer = smoke_request(base, cfg, api_key)
        reply = answer["choices"][0]["message"]["content"]
        print(f"smoke: {cfg.smoke_prompt!r} -> {reply!r}", file=sys.stderr, flush=True)
        summary.update(smoke_prompt=cfg.smoke_prompt, smoke_reply=reply, smoke_usage=answer["usage"],
                       stopped_by="smoke")
    else:
        summary["stopped_by"] = signals.wait(cfg.duration_s)
    stats = serve.get_app_handle(scfg.app_name).stats.remote().result(timeout_s=30)
    summary.update(requests_served=stats.get("requests", 0), status_counts={
        k.removeprefix("status_"): v for k, v in stats.items() if k.startswith("status_")},
        completion_tokens=stats.get("completion_tokens", 0))
    run.logger.log({"serve/requests": summary["requests_served"],
                    "serve/completion_tokens": summary["completion_tokens"]})
    return summary


if __name__ == "__main__":
    run_job("serve", ServeJobConfig, main)
