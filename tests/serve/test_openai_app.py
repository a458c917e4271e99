"""The real OpenAI-compatible Serve app on CPU, driven by the official `openai` client and raw HTTP.

One module-scoped Serve instance holds two apps, deployed together so their model loads overlap:
  - "/"     the tiny float model, with an API key and small limits (most tests),
  - "/int8" a checkpoint written by modeling.quantize.save_quantized (int8 recipe applied at load), no key.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time

import pytest
import requests

KEY = "test-key-123"
MODEL = "tiny-chat"
LIMIT_NEW = 64
LIMIT_PROMPT = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_dir, tmp_path_factory):
    from ray import serve

    from modeling.quantize import save_quantized
    from serve.app import build_app, http_address, wait_ready
    from serve.config import ServeConfig
    from serve.engines.hf import HFEngineConfig

    int8_dir = save_quantized(tiny_dir, tmp_path_factory.mktemp("q") / "tiny-int8", "int8_dynamic")
    port = _free_port()
    main = ServeConfig(model_path=str(tiny_dir), served_model_name=MODEL, port=port, api_key=KEY,
                       max_new_tokens=LIMIT_NEW, max_prompt_tokens=LIMIT_PROMPT, max_ongoing_requests=16,
                       max_queued_requests=48, hf=HFEngineConfig(quantization="none", max_batch_size=16),
                       app_name="main")
    int8 = ServeConfig(model_path=str(int8_dir), port=port, app_name="int8", route_prefix="/int8")
    broken = ServeConfig(model_path=str(int8_dir.parent / "no-such-model"), port=port, app_name="broken",
                         route_prefix="/broken")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for cfg in (main, int8, broken):
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    urls = {"main": http_address(main), "int8": http_address(int8), "broken": http_address(broken)}
    for name in ("main", "int8"):
        wait_ready(urls[name], timeout_s=300)
    yield {**urls, "int8_dir": int8_dir, "tiny_dir": tiny_dir}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=served["main"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_dir):
    """The same checkpoint in this process: the reference the server's greedy answers must equal."""
    from modeling.loading import load_causal_lm, load_tokenizer

    return load_tokenizer(str(tiny_dir)), load_causal_lm(str(tiny_dir)).eval()


def _greedy(model, tok, ids: list[int], n: int) -> tuple[list[int], str]:
    """Reference decoding: greedy, stopping after <|im_end|>/eos like the server does."""
    import torch

    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=sorted(stops),
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
    return out[:cut], tok.decode(out[:cut], skip_special_tokens=True)


def _post(url: str, path: str, body, key: str | None = KEY, raw: bool = False) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw:
        return requests.post(url + path, data=body, headers={**headers, "Content-Type": "application/json"},
                             timeout=60)
    return requests.post(url + path, json=body, headers=headers, timeout=60)


# ------------------------------------------------------------------------------------------------ behaviour


def test_probes_and_models_list(served, client):
    assert requests.get(served["main"] + "/health", timeout=10).json() == {"status": "ok"}
    ready = requests.get(served["main"] + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["model"] == MODEL
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    # The int8 app did not set served_model_name: clients use the checkpoint directory name.
    other = requests.get(served["int8"] + "/v1/models", timeout=10).json()
    assert [m["id"] for m in other["data"]] == [served["int8_dir"].name]


def test_chat_greedy_equals_local_model_with_chat_template(client, local):
    tok, model = local
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    want_ids, want_text = _greedy(model, tok, ids, 24)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want_text
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want_ids)
    assert r.usage.total_tokens == len(ids) + len(want_ids)
    assert r.choices[0].finish_reason == ("length" if len(want_ids) == 24 else "stop")


def test_completion_stream_matches_non_stream(client):
    kw = dict(model=MODEL, prompt="def add(a, b):", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_stream_is_openai_sse_ending_with_done(served, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0,
            "stream": True}
    with requests.post(served["main"] + "/v1/chat/completions", json=body, stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = client.chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=12, temperature=0)
    assert text == whole.choices[0].message.content


def test_seed_fixes_sampled_text_and_tiny_top_p_is_greedy(client):
    kw = dict(model=MODEL, prompt="The quick brown", max_tokens=16, temperature=1.0)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b
    assert a != c  # 16 tokens sampled at T=1 from a ~1k vocabulary: equal texts by chance are ~impossible
    # Nucleus sampling keeps the smallest set of tokens whose mass reaches top_p: for top_p -> 0 that is the
    # argmax alone, so sampling at any temperature must reproduce greedy decoding.
    greedy = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=16, temperature=0)
    nucleus = client.completions.create(top_p=1e-9, seed=3, **kw)
    assert nucleus.choices[0].text == greedy.choices[0].text


def test_stop_strings_cut_the_text_before_the_stop(client):
    kw = dict(model=MODEL, prompt="import os\nimport", max_tokens=40, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    # A stop string from the second half of the greedy text: two printable ASCII characters, no spaces.
    starts = [i for i in range(len(full) // 2, len(full) - 1)
              if full[i:i + 2].isascii() and full[i:i + 2].isprintable() and " " not in full[i:i + 2]]
    assert starts, f"greedy text has no usable stop string: {full!r}"
    stop = full[starts[0]: starts[0] + 2]
    want = full[: full.find(stop)]  # OpenAI returns the text up to, not including, the first stop match
    got = client.completions.create(stop=[stop, "\u2603never"], **kw)
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_max_tokens_bounds_the_completion(client):
    r = client.completions.create(model=MODEL, prompt="x = ", max_tokens=5, temperature=1.0, seed=1)
    assert r.usage.completion_tokens <= 5
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 5


def test_quantized_checkpoint_answers_like_local_int8(served, tiny_dir):
    from ray import serve

    from modeling.loading import load_tokenizer
    from modeling.quantize import load_quantized

    tok, model = load_tokenizer(str(served["int8_dir"])), load_quantized(served["int8_dir"])
    messages = [{"role": "user", "content": "Name a prime number."}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    _, want = _greedy(model, tok, ids, 16)
    r = requests.post(served["int8"] + "/v1/chat/completions", timeout=60,
                      json={"messages": messages, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
    info = serve.get_app_handle("int8").stats.remote().result(timeout_s=30)
    assert info["engine_quantization"] == "int8_dynamic"


def test_a_model_that_fails_to_load_is_reported_not_hidden(served):
    from serve.app import wait_ready

    # The replica stays up (/health) and says why it is not ready, in OpenAI's error shape.
    with pytest.raises(RuntimeError, match="no-such-model.*not a directory"):
        wait_ready(served["broken"], timeout_s=120)
    assert requests.get(served["broken"] + "/health", timeout=10).status_code == 200
    ready = requests.get(served["broken"] + "/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "model_load_failed"
    r = requests.post(served["broken"] + "/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 503 and "no-such-model" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------------ security, errors


def test_missing_or_wrong_key_is_401_with_openai_error(served):
    import openai

    for key in (None, "wrong"):
        r = _post(served["main"], "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=key)
        assert r.status_code == 401
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=served["main"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


LONG_PROMPT = "word " * (LIMIT_PROMPT * 2)  # > LIMIT_PROMPT tokens whatever the merges (>= 1 token per word)

BAD_REQUESTS = [
    # (id, path, body (dict, or raw text when str), expected status, expected param)
    ("malformed-json", "/v1/completions", '{"prompt": "hi",', 400, None),
    ("body-not-object", "/v1/completions", "[1, 2]", 400, None),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("prompt-wrong-type", "/v1/completions", {"prompt": 3}, 400, "prompt"),
    ("temperature-not-number", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("temperature-too-high", "/v1/completions", {"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("top-p-zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("max-tokens-zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-over-limit", "/v1/completions", {"prompt": "hi", "max_tokens": LIMIT_NEW + 1}, 400, "max_tokens"),
    ("too-many-stops", "/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("token-id-out-of-vocab", "/v1/completions", {"prompt": [1, 10 ** 9]}, 400, "prompt"),
    ("n-greater-than-one", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("unknown-model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("prompt-too-long", "/v1/completions", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("messages-missing", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("messages-empty", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("messages-not-list", "/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role"),
    ("chat-too-long", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "messages"),
    ("tools-unsupported", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    # A seed torch cannot take used to fail generate() for the whole batch: a 500 for every request batched with it.
    ("seed-beyond-64-bits", "/v1/completions", {"prompt": "hi", "seed": 2 ** 70}, 400, "seed"),
    ("seed-below-int64", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "seed": -(2 ** 63) - 1}, 400, "seed"),
    # Fields that would change the answer, which the server does not implement: refused, not silently dropped.
    ("logit-bias", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": -100}}, 400, "logit_bias"),
    ("presence-penalty", "/v1/completions", {"prompt": "hi", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("frequency-penalty", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("penalty-out-of-range", "/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("json-response-format", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("best-of", "/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("top-logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
]


def test_no_op_values_of_refused_fields_are_accepted(served):
    # Some clients send every field at its default; those values change nothing, so they must not be refused.
    defaults = {"max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "n": 1}
    r = _post(served["main"], "/v1/completions", {"prompt": "hi", "best_of": 1, **defaults})
    assert r.status_code == 200, r.text
    r = _post(served["main"], "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "response_format": {"type": "text"}, **defaults})
    assert r.status_code == 200, r.text


def test_developer_role_is_the_system_role(client):
    # OpenAI's newer clients send the system prompt as role "developer"; the chat template only knows "system".
    ask = [{"role": "user", "content": "What is 2 + 3?"}]
    as_system = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."}]
                                               + ask, max_tokens=12, temperature=0)
    as_developer = client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": "Be brief."}]
                                                  + ask, max_tokens=12, temperature=0)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens


def test_retrieve_model_by_name(served, client):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    r = requests.get(served["main"] + "/v1/models/gpt-9", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = requests.get(served["main"] + f"/v1/models/{MODEL}", timeout=10)  # no key: the same 401 as the list
    assert r.status_code == 401


@pytest.mark.parametrize("path, body, status, param", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_openai_error_body(served, path, body, status, param):
    r = _post(served["main"], path, body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]


def test_unknown_route_is_404_in_openai_shape(served):
    r = requests.get(served["main"] + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# ------------------------------------------------------------------------------------------------ load


def test_concurrent_requests_are_batched_and_equal_solo_answers(served, client):
    prompts = [f"def f{i}(x):" for i in range(6)]
    solo = [client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
            for p in prompts]
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(
            lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0), prompts))
    # Left padding + attention mask: a row's greedy text must not depend on its batch mates.
    assert [r.choices[0].text for r in together] == solo
    from ray import serve

    stats = serve.get_app_handle("main").stats.remote().result(timeout_s=30)
    assert stats["engine_largest_batch"] >= 2


def test_32_clients_for_8_seconds_without_errors(served):
    deadline = time.monotonic() + 8

    def client_loop(i: int) -> tuple[int, list[str]]:
        session, ok, errors = requests.Session(), 0, []
        while time.monotonic() < deadline:
            body = {"prompt": f"client {i} says", "max_tokens": 6, "temperature": 0.7, "stream": i % 2 == 1}
            try:
                r = session.post(served["main"] + "/v1/completions", json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"})
            except requests.RequestException as e:
                errors.append(repr(e))
                continue
            if r.status_code == 200 and (not body["stream"] or r.text.rstrip().endswith("data: [DONE]")):
                ok += 1
            else:
                errors.append(f"{r.status_code}: {r.text[:300]}")
        return ok, errors

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client_loop, range(32)))
    assert [e for _, errs in results for e in errs] == []
    assert all(ok >= 1 for ok, _ in results)  # every client got answers, none was starved


def test_overload_is_429_with_retry_after(served):
    # 16 in generation + 48 queued fit; 150 at once overflow Serve's queue, which answers 429 + Retry-After.
    # (The 32-client test stays clear of 429s because 32 <= max_queued_requests, whatever the assignment lag.)
    body = {"prompt": "overload", "max_tokens": 32, "temperature": 0}

    def send(_):
        r = _post(served["main"], "/v1/completions", body)
        return r.status_code, r.headers.get("retry-after")

    with cf.ThreadPoolExecutor(150) as pool:
        results = list(pool.map(send, range(150)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429}
    assert codes.count(429) >= 1 and codes.count(200) >= 16  # at least the requests in generation
    assert all(h == "1" for c, h in results if c == 429)


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_counters_move_and_are_exported(served, client, ray_cluster):
    from ray import serve

    handle = serve.get_app_handle("main")
    before = handle.stats.remote().result(timeout_s=30)
    client.completions.create(model=MODEL, prompt="count me", max_tokens=4, temperature=0)
    after = handle.stats.remote().result(timeout_s=30)
    assert after["requests"] == before["requests"] + 1
    assert after["status_200"] == before["status_200"] + 1
    assert after["completion_tokens"] > before["completion_tokens"]
    assert after.get("status_401", 0) >= 1 and after.get("status_400", 0) >= 1  # earlier tests' errors counted

    # Ray's metrics agent exports the same counters to Prometheus (it flushes every few seconds).
    port = ray_cluster.nodes()[0]["MetricsExportPort"]
    deadline, text = time.monotonic() + 45, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "ray_coolray_serve_generated_tokens_total" in text and 'status="401"' in text:
            break
        time.sleep(2)
    assert "ray_coolray_serve_requests_total" in text and 'endpoint="completions"' in text
    assert "ray_coolray_serve_generated_tokens_total" in text
    assert "ray_coolray_serve_request_latency_seconds_bucket" in text


# ------------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize("endpoint, param", [("chat", "messages"), ("completions", "prompt")])
def test_a_prompt_that_fills_the_context_is_blamed_not_an_unsent_max_tokens(endpoint, param):
    # Without max_tokens the error used to read "prompt (N tokens) + max_tokens (1) exceeds ..." with
    # param max_tokens: a field the client never sent.
    from types import SimpleNamespace

    from serve import openai_protocol as oai
    from serve.app import OpenAIServer

    server = SimpleNamespace(engine=SimpleNamespace(max_model_len=100), cfg=SimpleNamespace(max_new_tokens=50))
    req = (oai.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]) if endpoint == "chat"
           else oai.CompletionRequest(prompt="hi"))
    with pytest.raises(oai.OpenAIError) as err:
        OpenAIServer.func_or_class._sampling(server, req, endpoint, 120)
    assert err.value.status == 400 and err.value.param == param and err.value.code == "context_length_exceeded"
    assert "120 tokens" in err.value.message and "max_tokens" not in err.value.message
    # With an explicit max_tokens that does not fit, that field is still the one named.
    req.max_tokens = 10
    with pytest.raises(oai.OpenAIError) as err:
        OpenAIServer.func_or_class._sampling(server, req, endpoint, 95)
    assert err.value.param == "max_tokens"


def _run_engine_batch(engine, jobs) -> list[tuple[str, int, str | None]]:
    """Drive HFEngine._generate (what one @serve.batch call runs) without Serve: (text, tokens, finish) per job."""
    from serve.engines.base import Chunk

    steps: list = []
    engine._generate(jobs, steps.append)
    out, closed = [["", 0, None] for _ in jobs], [False] * len(jobs)
    for step in steps[:-1]:  # the last item is the end-of-steps marker
        assert len(step) == len(jobs)  # serve.batch needs one entry per caller in every step
        for i, item in enumerate(step):
            if closed[i] or item is None:
                continue
            if item is StopIteration:
                closed[i] = True
            else:
                assert isinstance(item, Chunk)
                out[i] = [out[i][0] + item.text, item.completion_tokens, item.finish_reason]
    assert all(closed)
    return [tuple(o) for o in out]


def test_a_short_prompt_batched_with_a_long_one_gets_all_its_tokens(tiny_dir):
    # Left-padded together, every row is as long as the longest prompt: a short request batched with a prompt that
    # nearly fills the context used to stop after (context - longest prompt) tokens with finish_reason "length".
    from serve.engines.base import SamplingOptions
    from serve.engines.hf import HFEngine, HFEngineConfig, _Job

    engine = HFEngine(str(tiny_dir), HFEngineConfig(quantization="none"))
    engine.load()
    ctx = engine.max_model_len
    short_ids = engine.tokenizer("def f(x):")["input_ids"]
    greedy = SamplingOptions(max_tokens=40, temperature=0)
    solo = _run_engine_batch(engine, [_Job(short_ids, greedy)])[0]
    long_job = _Job([short_ids[0]] * (ctx - 8), SamplingOptions(max_tokens=8, temperature=0))
    together = _run_engine_batch(engine, [long_job, _Job(short_ids, greedy), _Job(short_ids, greedy)])
    assert together[1] == together[2] == solo
    assert together[0][1] <= 8
    # Grouping itself: everything that fits stays one batch, in arrival order.
    from serve.engines.hf import fitting_groups

    jobs = [_Job([1] * n, SamplingOptions(max_tokens=m)) for n, m in [(10, 5), (3, 20), (ctx - 4, 4), (5, 8)]]
    assert fitting_groups(jobs, ctx) == [[0, 1, 3], [2]]
    assert fitting_groups(jobs[:2] + jobs[3:], ctx) == [[0, 1, 2]]


def test_text_assembler_holds_back_possible_stop_prefixes():
    from serve.engines.base import TextAssembler

    class CharTok:  # one character per token id: decode is exact and easy to reason about
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    t = TextAssembler(CharTok(), stop=("END",))
    out = [t.add(ord(c), False, 100) for c in "abcEN"]
    # With a 3-character stop string, the last 2 characters may be its start and are held back:
    # after "a" -> "" , "ab" -> "", "abc" -> "a", "abcE" -> "b", "abcEN" -> "c".
    assert out == ["", "", "a", "b", "c"]
    assert t.add(ord("D"), False, 100) == "" and t.finish_reason == "stop"  # "abcEND": cut before END
    t2 = TextAssembler(CharTok(), stop=("END",))
    # "xyENQ" never completes "END": releases lag 2 characters behind, and finish() flushes the rest.
    assert [t2.add(ord(c), False, 100) for c in "xyENQ"] == ["", "", "x", "y", "E"]
    assert t2.finish("length") == "NQ" and t2.finish_reason == "length"


def test_text_assembler_length_and_stop_token():
    from serve.engines.base import TextAssembler

    class CharTok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))

    t = TextAssembler(CharTok())
    assert t.add(ord("h"), False, 2) == "h" and t.finish_reason is None
    assert t.add(ord("i"), False, 2) == "i" and t.finish_reason == "length"
    s = TextAssembler(CharTok())
    assert s.add(ord("o"), False, 5) == "o"
    assert s.add(0, True, 5) == "" and s.finish_reason == "stop"  # the stop token itself is not text


def test_serve_config_from_a_serve_config_file_args_dict():
    from serve.config import ServeConfig

    # What `import_path: serve.app:build_app` + `args: {...}` in a Serve config file hands build_app.
    cfg = ServeConfig.from_dict({"model_path": "/m/sft-final/", "hf": {"max_batch_size": 4}, "port": 9000})
    assert cfg.hf.max_batch_size == 4 and cfg.hf.quantization == "int8_dynamic" and cfg.port == 9000
    assert cfg.model_name == "sft-final"  # the checkpoint dir name, trailing slash or not
    with pytest.raises(ValueError, match=r"unknown key 'serve\.hf\.max_batchsize'.*max_batch_size"):
        ServeConfig.from_dict({"hf": {"max_batchsize": 4}})
    with pytest.raises(ValueError, match="serve.engine must be one of hf, vllm"):
        ServeConfig(engine="tgi")
    with pytest.raises(ValueError, match="only one of serve.api_key and serve.api_key_env"):
        ServeConfig(api_key="a", api_key_env="B")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ServeConfig.from_dict({"vllm": {"kv_cache_dtype": "int4"}})
