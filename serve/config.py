"""`ServeConfig`: everything `build_app` needs, one dataclass per engine below it."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.engines.hf import HFEngineConfig
from serve.engines.vllm_engine import VLLMEngineConfig

ENGINES = ("hf", "vllm")


@dataclass
class ServeConfig:
    model_path: str = ""  # HF checkpoint dir or fsspec URL; the serve job fills it from model.path / earlier runs
    served_model_name: str = ""  # the `model` clients send and /v1/models shows; "" = the checkpoint dir name
    engine: str = "hf"  # hf (transformers on CPU, int8) | vllm (AsyncLLM: GPUs, or vLLM's CPU build)
    hf: HFEngineConfig = field(default_factory=HFEngineConfig)
    vllm: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)

    # HTTP (cluster-wide in Serve: used by run_app / the serve job, not by build_app)
    host: str = "127.0.0.1"  # 0.0.0.0 exposes the server to the network: set api_key then
    port: int = 8000
    app_name: str = "coolray-llm"
    route_prefix: str = "/"

    # Security and limits
    api_key: str = ""  # bearer token clients must send; "" and api_key_env "" = no auth
    api_key_env: str = ""  # name of an environment variable holding the token (keeps it out of config files)
    max_prompt_tokens: int = 2048  # longer prompts get a 400
    max_new_tokens: int = 512  # a larger max_tokens gets a 400; also the chat default when max_tokens is absent
    max_ongoing_requests: int = 32  # per replica, in generation at once (the HF engine batches up to hf.max_batch_size)
    max_queued_requests: int = 64  # waiting in Serve's router beyond that; more get 429 + Retry-After

    # Resources, per replica
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # vLLM on GPU: 1 per replica, or tensor_parallel_size GPUs through placement bundles
    ready_timeout_s: float = 600.0  # run_app waits this long for /ready (model load, vLLM warm-up)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"serve.engine must be one of {', '.join(ENGINES)} (got {self.engine!r})")
        if not 0 < self.port < 65536:
            raise ValueError(f"serve.port must be in 1..65535 (got {self.port})")
        if self.api_key and self.api_key_env:
            raise ValueError("set only one of serve.api_key and serve.api_key_env")
        for name in ("max_prompt_tokens", "max_new_tokens", "max_ongoing_requests", "num_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve.{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_queued_requests < 0:
            raise ValueError(f"serve.max_queued_requests must be >= 0 (got {self.max_queued_requests})")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix must start with '/' (got {self.route_prefix!r})")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_path.rstrip("/")).name or "model"

    def resolve_api_key(self) -> str:
        """The token to require, read from the environment when api_key_env names a variable."""
        if not self.api_key_env:
            return self.api_key
        token = os.environ.get(self.api_key_env, "")
        if not token:
            raise ValueError(f"serve.api_key_env names ${self.api_key_env}, which is not set or empty; export it "
                             "or clear serve.api_key_env to serve without authentication")
        return token

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServeConfig":
        """Build from plain (nested) dicts, e.g. the `args:` of a Serve config file; unknown keys are errors."""
        return _from_dict(cls, data, "serve")


def _from_dict(cls: type, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping (got {type(data).__name__})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key '{where}.{unknown[0]}'; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        kwargs[key] = _from_dict(hint, value, f"{where}.{key}") if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)
