"""The OpenAI-compatible Ray Serve app: `build_app(cfg) -> Application`, and `run_app(cfg) -> base URL`.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream=true` server-sent events ending in
`data: [DONE]`), GET /v1/models, GET /v1/models/{name}, GET /health (process alive) and GET /ready (model loaded:
503 until then).

Use from a Serve config file:
    applications:
      - name: coolray-llm
        import_path: serve.app:build_app
        args: {model_path: /abs/outputs/sft/model, engine: hf, hf: {quantization: int8_dynamic}}
The engine is injected (`engine_factory`), so tests run this real app with any engine.
"""
# No `from __future__ import annotations` here: FastAPI must see real classes (Request) on the ingress methods.
import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import openai_protocol as oai
from serve.config import ServeConfig
from serve.engines.base import Engine, SamplingOptions
from serve.metrics import ServeMetrics

logger = logging.getLogger("ray.serve")

EngineFactory = Callable[[ServeConfig], Engine]


def _hf_engine(cfg: ServeConfig) -> Engine:
    from serve.engines.hf import HFEngine

    return HFEngine(cfg.model_path, cfg.hf)


def _vllm_engine(cfg: ServeConfig) -> Engine:
    from serve.engines.vllm_engine import VLLMEngine

    return VLLMEngine(cfg.model_path, cfg.vllm)


ENGINE_FACTORIES: dict[str, EngineFactory] = {"hf": _hf_engine, "vllm": _vllm_engine}


def make_engine(cfg: ServeConfig) -> Engine:
    return ENGINE_FACTORIES[cfg.engine](cfg)


api = FastAPI(title="coolray OpenAI-compatible server")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes / wrong methods answer in OpenAI's error shape too.
    return JSONResponse(oai.error_body(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}"),
                        status_code=exc.status_code)


@serve.deployment
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, cfg: ServeConfig, engine_factory: EngineFactory, api_key: str):
        self.cfg, self.api_key = cfg, api_key
        self.model_name = cfg.model_name
        self.created = int(time.time())
        self.metrics = ServeMetrics()
        self.engine = engine_factory(cfg)
        self._load_error: str | None = None
        self._ready = threading.Event()
        # Load off the constructor so /health answers at once and /ready tells loading apart from failure. A failed
        # load keeps the replica up (no check_health): restarting would fail again and hide the error.
        threading.Thread(target=self._load, name="engine-load", daemon=True).start()

    def _load(self) -> None:
        try:
            self.engine.load()
            self._ready.set()
        except BaseException as e:  # noqa: BLE001: reported through /ready and every request
            logger.exception("model failed to load")
            self._load_error = f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------------------------------------ probes

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> JSONResponse:
        try:
            self._require_ready()
        except oai.OpenAIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return JSONResponse({"status": "ready", "model": self.model_name})

    def stats(self) -> dict:
        """In-process request/token totals plus the engine's own figures (read through a deployment handle)."""
        engine_stats = self.engine.stats() if hasattr(self.engine, "stats") else {}
        return {**self.metrics.snapshot(), **{f"engine_{k}": v for k, v in engine_stats.items()}}

    # ------------------------------------------------------------------------------------------ OpenAI routes

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        return self._model_route(request, None)

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> JSONResponse:
        """OpenAI's "retrieve model" (`client.models.retrieve(name)`): the served model's card, or 404."""
        return self._model_route(request, model_id)

    def _model_route(self, request: Request, model_id: str | None) -> JSONResponse:
        """The list (model_id None) or one model's card, behind the same key check and metrics."""
        started = time.perf_counter()
        try:
            self._authorize(request)
            args = (self.model_name, self.created, self.engine.max_model_len)
            if model_id is None:
                body = oai.models_list(*args)
            else:
                self._check_model(model_id)
                body = oai.model_card(*args)
            status = 200
        except oai.OpenAIError as e:
            body, status = e.body(), e.status
        self.metrics.record("models", status, time.perf_counter() - started)
        return JSONResponse(body, status_code=status)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, "completions")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, endpoint: str):
        started = time.perf_counter()
        try:
            self._authorize(request)
            req = await self._parse(request, endpoint)
            self._check_model(req.model)
            self._require_ready()
            prompt_ids = self._prompt_ids(req, endpoint)
            options = self._sampling(req, endpoint, len(prompt_ids))
        except oai.OpenAIError as e:
            self.metrics.record(endpoint, e.status, time.perf_counter() - started)
            return JSONResponse(e.body(), status_code=e.status)
        rid = oai.new_id("chatcmpl" if endpoint == "chat" else "cmpl")
        if req.stream:
            events = self._sse(endpoint, rid, prompt_ids, options, req.include_usage, started)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            text, finish, produced, gen_s = await self._collect(prompt_ids, options)
        except Exception as e:  # noqa: BLE001: an engine failure is a 500 in OpenAI's shape, logged here
            logger.exception("generation failed")
            self.metrics.record(endpoint, 500, time.perf_counter() - started)
            return JSONResponse(oai.error_body(500, f"generation failed: {e}", type="server_error"), status_code=500)
        build = oai.chat_response if endpoint == "chat" else oai.completion_response
        self.metrics.record(endpoint, 200, time.perf_counter() - started, len(prompt_ids), produced, gen_s)
        return JSONResponse(build(rid, self.model_name, text, finish, len(prompt_ids), produced))

    async def _collect(self, prompt_ids: list[int], options: SamplingOptions) -> tuple[str, str, int, float]:
        t0 = time.perf_counter()
        parts, finish, produced = [], "length", 0
        async for chunk in self.engine.stream(prompt_ids, options):
            parts.append(chunk.text)
            produced = chunk.completion_tokens
            finish = chunk.finish_reason or finish
        return "".join(parts), finish, produced, time.perf_counter() - t0

    async def _sse(self, endpoint: str, rid: str, prompt_ids: list[int], options: SamplingOptions,
                   include_usage: bool, started: float) -> AsyncIterator[str]:
        chat = endpoint == "chat"
        produced, status, t0 = 0, 200, time.perf_counter()
        try:
            if chat:  # OpenAI's first chat chunk announces the role
                yield oai.sse(oai.chat_chunk(rid, self.model_name, {"role": "assistant", "content": ""}, None))
            async for chunk in self.engine.stream(prompt_ids, options):
                produced = chunk.completion_tokens
                if chunk.text:
                    yield oai.sse(oai.chat_chunk(rid, self.model_name, {"content": chunk.text}, None) if chat
                                  else oai.completion_chunk(rid, self.model_name, chunk.text, None))
                if chunk.finish_reason:
                    yield oai.sse(oai.chat_chunk(rid, self.model_name, {}, chunk.finish_reason) if chat
                                  else oai.completion_chunk(rid, self.model_name, "", chunk.finish_reason))
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield oai.sse(oai.usage_chunk(rid, self.model_name, obj, len(prompt_ids), produced))
        except asyncio.CancelledError:  # client went away; the engine stops the row
            status = 499
            raise
        except Exception as e:  # noqa: BLE001: headers are sent, so the error travels as an event
            logger.exception("generation failed mid-stream")
            status = 500
            yield oai.sse(oai.error_body(500, f"generation failed: {e}", type="server_error"))
        finally:
            self.metrics.record(endpoint, status, time.perf_counter() - started, len(prompt_ids), produced,
                                time.perf_counter() - t0)
        yield oai.sse("[DONE]")

    # ------------------------------------------------------------------------------------------ request checks

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise oai.OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  type="authentication_error", code="invalid_api_key")

    async def _parse(self, request: Request, endpoint: str):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise oai.OpenAIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise oai.OpenAIError(400, "request body must be a JSON object", code="invalid_json")
        model = oai.ChatCompletionRequest if endpoint == "chat" else oai.CompletionRequest
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise oai.from_validation_error(e) from None
        problem = req.unsupported()
        if problem:
            raise problem
        return req

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise oai.OpenAIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                                  param="model", code="model_not_found")

    def _require_ready(self) -> None:
        if self._load_error:
            raise oai.OpenAIError(503, f"model failed to load: {self._load_error}", type="server_error",
                                  code="model_load_failed")
        if not self._ready.is_set():
            raise oai.OpenAIError(503, "model is still loading; retry shortly", type="server_error",
                                  code="model_loading")

    def _prompt_ids(self, req, endpoint: str) -> list[int]:
        tok = self.engine.tokenizer
        if endpoint == "chat":
            messages = [{"role": m.template_role, "content": m.text} for m in req.messages]
            # The template already writes every special token it needs, so encode without adding more.
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids, param = tok(text, add_special_tokens=False)["input_ids"], "messages"
        elif isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
            ids, param = list(req.prompt), "prompt"
            if max(ids) >= len(tok) or min(ids) < 0:
                raise oai.OpenAIError(400, f"prompt token ids must be in [0, {len(tok)})", param="prompt",
                                      code="invalid_value")
        else:
            text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            ids, param = tok(text)["input_ids"], "prompt"
        if not ids:
            raise oai.OpenAIError(400, "the prompt is empty after tokenization", param=param, code="invalid_value")
        if len(ids) > self.cfg.max_prompt_tokens:
            raise oai.OpenAIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                       f"{self.cfg.max_prompt_tokens} (serve.max_prompt_tokens)", param=param,
                                  code="context_length_exceeded")
        return ids

    def _sampling(self, req, endpoint: str, prompt_len: int) -> SamplingOptions:
        room = self.engine.max_model_len - prompt_len
        asked = req.token_limit if endpoint == "chat" else req.max_tokens
        param = "max_completion_tokens" if endpoint == "chat" and req.max_completion_tokens else "max_tokens"
        if asked is not None and asked > self.cfg.max_new_tokens:
            raise oai.OpenAIError(400, f"{param}={asked} exceeds this server's limit of {self.cfg.max_new_tokens} "
                                       "(serve.max_new_tokens)", param=param, code="invalid_value")
        if asked is None and room < 1:  # no max_tokens to blame: the prompt alone fills the context
            prompt_param = "messages" if endpoint == "chat" else "prompt"
            raise oai.OpenAIError(400, f"the prompt has {prompt_len} tokens, which leaves no room for an answer in "
                                       f"the model's context of {self.engine.max_model_len} tokens; shorten the "
                                       f"{prompt_param}", param=prompt_param, code="context_length_exceeded")
        if asked is None:  # OpenAI's defaults: 16 for completions, "as much as fits" for chat
            asked = 16 if endpoint == "completions" else self.cfg.max_new_tokens
            asked = max(1, min(asked, room))
        if asked > room:
            raise oai.OpenAIError(400, f"prompt ({prompt_len} tokens) + {param} ({asked}) exceeds the model's "
                                       f"context of {self.engine.max_model_len} tokens", param=param,
                                  code="context_length_exceeded")
        return SamplingOptions(max_tokens=asked, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                               stop=req.stop_list)

    async def __del__(self):
        await self.engine.shutdown()


def build_app(cfg: ServeConfig | dict[str, Any], engine_factory: EngineFactory | None = None):
    """The Serve application for `cfg` (a ServeConfig, or the dict a Serve config file's `args:` holds)."""
    if isinstance(cfg, dict):
        cfg = ServeConfig.from_dict(cfg)
    if not cfg.model_path:
        raise ValueError("serve.model_path is empty: give the HF checkpoint directory to serve")
    options: dict[str, Any] = dict(
        name="OpenAIServer",
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        # Overload answers 429 + Retry-After (OpenAI clients back off on 429), not Serve's default 503.
        backpressure_config={"status_code": 429, "retry_after_s": 1},
        health_check_period_s=10,
    )
    tp = cfg.vllm.tensor_parallel_size
    if cfg.engine == "vllm" and tp > 1:
        # The replica holds no GPU itself; vLLM's Ray executor starts one worker per GPU bundle of this group.
        options["ray_actor_options"] = {"num_cpus": cfg.num_cpus, "num_gpus": 0}
        options["placement_group_bundles"] = [{"CPU": cfg.num_cpus}] + [{"GPU": 1}] * tp
        options["placement_group_strategy"] = "STRICT_PACK"
    return OpenAIServer.options(**options).bind(cfg, engine_factory or make_engine, cfg.resolve_api_key())


def http_address(cfg: ServeConfig) -> str:
    """The base URL of the running Serve HTTP proxy (its options are cluster-wide: the first start decides)."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    if (http.host, http.port) != (cfg.host, cfg.port):
        logger.warning("Serve was already running on %s:%s; serving there instead of %s:%s", http.host, http.port,
                       cfg.host, cfg.port)
    return f"http://{host}:{http.port}{cfg.route_prefix.rstrip('/')}"


def wait_ready(base_url: str, timeout_s: float) -> None:
    """Poll GET /ready until 200; fail fast with the replica's message when the model failed to load."""
    import requests

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{base_url}/ready", timeout=5)
            if r.status_code == 200:
                return
            last = r.text[:500]
            if r.status_code == 503 and '"model_load_failed"' in r.text:
                raise RuntimeError(f"the model failed to load in the Serve replica: {r.json()['error']['message']}")
        except requests.RequestException as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/ready did not answer 200 within {timeout_s:.0f}s (last: {last}); "
                       "raise serve.ready_timeout_s for big models")


def run_app(cfg: ServeConfig, engine_factory: EngineFactory | None = None) -> str:
    """Start Serve's HTTP proxy (if not running), deploy the app, wait until the model is loaded; returns the base
    URL (`<base>/v1` is the OpenAI base_url). Ray must already be initialised."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, engine_factory), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    base = http_address(cfg)
    wait_ready(base, cfg.ready_timeout_s)
    return base
