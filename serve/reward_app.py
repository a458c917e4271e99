"""The conditional RM behind HTTP: `build_reward_app(cfg) -> Application` (Ray Serve).

    POST /v1/reward   {"items": [{"domain": "math", "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                                  "response": "2 + 3 = 5."}]}
                  ->  {"scores": [3.91], "model": "reward"}
    GET  /health      {"status": "ok", "model": ..., "domains": [...], "conditional": true}

Errors are 4xx in the chat server's (OpenAI's) shape, {"error": {"message", "type", "param", "code"}}: 400 for
bad JSON, a missing/ill-typed field (`param` names it as items[i].field), an item longer than the RM's context,
or an unknown domain (`type` unknown_domain; the known ones are listed), 413 for more than `max_items` items,
404/405 for an unknown route or method.
Remote-RM use in RLHF and the eval job: any HTTP client. From a Serve config file:
    applications:
      - name: coolray-reward
        import_path: serve.reward_app:build_reward_app
        args: {model_path: /abs/outputs/reward/model, num_cpus: 1}
"""
# No `from __future__ import annotations`: FastAPI must see real classes (Request) on the ingress methods.
import asyncio
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException


@dataclass
class RewardServeConfig:
    model_path: str = ""  # a saved RM directory (jobs/reward.py summary: model_dir)
    model_name: str = ""  # reported in replies; "" = the directory name
    batch_size: int = 32  # items per forward pass inside one request
    max_items: int = 256  # a request with more items gets 413
    # Resources, per replica (applied with .options; nothing is hard-coded on the class)
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # > 0 runs the model on CUDA
    max_ongoing_requests: int = 16
    app_name: str = "coolray-reward"
    route_prefix: str = "/"

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_items", "num_replicas", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"reward serve {name} must be >= 1 (got {getattr(self, name)})")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("reward serve num_cpus and num_gpus must be >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RewardServeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown reward serve keys {unknown}; valid: {sorted(known)}")
        return cls(**d)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model_path.rstrip("/")).name


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, **extra: Any):
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code, **extra}}


api = FastAPI(title="coolray conditional reward model")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # An unknown route or a wrong method answers in the same error shape as everything else.
    return JSONResponse(RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").body,
                        status_code=exc.status_code)


@serve.deployment
@serve.ingress(api)
class RewardServer:
    def __init__(self, cfg: RewardServeConfig):
        from actors.reward import RewardWorker

        self.cfg = cfg
        self.worker = RewardWorker(cfg.model_path, cfg.batch_size, device="cuda" if cfg.num_gpus > 0 else "cpu",
                                   refuse_too_long=True)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.cfg.name, "domains": self.worker.domains,
                "conditional": self.worker.conditional}

    @api.post("/v1/reward")
    async def reward(self, request: Request) -> JSONResponse:
        try:
            items = self._items(await request.body())
            scores = await asyncio.to_thread(self._score, items)
        except RequestError as e:
            return JSONResponse(e.body, status_code=e.status)
        return JSONResponse({"scores": scores, "model": self.cfg.name})

    def _items(self, raw: bytes) -> list:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise RequestError(400, 'body must be {"items": [{"domain", "messages", "response"}, ...]}', param="items")
        if not body["items"]:
            raise RequestError(400, "items is empty", param="items")
        if len(body["items"]) > self.cfg.max_items:
            raise RequestError(413, f"{len(body['items'])} items exceed the limit of {self.cfg.max_items} per request; "
                                    "split the request", param="items", code="too_many_items")
        return body["items"]

    def _score(self, items: list) -> list[float]:
        from actors.reward import ItemError
        from modeling.reward import UnknownDomainError

        try:
            return self.worker.score(items)
        except ItemError as e:
            raise RequestError(400, str(e), param=e.location, code="invalid_value") from None
        except UnknownDomainError as e:
            raise RequestError(400, str(e), kind="unknown_domain",
                               param=f"items[{e.index}].domain", domain=e.domain,
                               known_domains=e.known) from None


def build_reward_app(cfg: RewardServeConfig | dict[str, Any]):
    """The Serve application for `cfg` (a RewardServeConfig, or the dict of a Serve config file's `args:`)."""
    if isinstance(cfg, dict):
        cfg = RewardServeConfig.from_dict(cfg)
    if not cfg.model_path:
        raise ValueError("reward serve model_path is empty: give the saved RM directory (jobs/reward.py model_dir)")
    return RewardServer.options(
        name="RewardServer",
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
    ).bind(cfg)
