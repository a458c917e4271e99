"""The RM over HTTP: a real Ray Serve app on a free port, queried with `requests`."""
from __future__ import annotations

import socket

import pytest
import requests

from data.world import make_prompts, respond


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, tmp_path_factory):
    from modeling.reward import RewardModel, RewardModelConfig

    model, tok = RewardModel.from_causal_lm(str(tiny_dir), RewardModelConfig(), seed=2)
    return str(model.save_pretrained(tmp_path_factory.mktemp("rm") / "served-rm", tok))


@pytest.fixture(scope="module")
def url(ray_cluster, rm_dir):
    from ray import serve
    from ray.serve.context import _get_global_client

    from serve.reward_app import build_reward_app

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    app = build_reward_app({"model_path": rm_dir, "max_items": 4, "num_cpus": 0.5, "app_name": "rm-test"})
    serve.run(app, name="rm-test", route_prefix="/rm", blocking=False)
    port = _get_global_client().http_config.port  # Serve's HTTP options are cluster-wide: use the live one
    base = f"http://127.0.0.1:{port}/rm"
    import time

    deadline = time.time() + 180
    while True:
        try:
            if requests.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"the reward app did not answer {base}/health within 180 s")
        time.sleep(0.5)
    yield base
    serve.delete("rm-test")
    serve.shutdown()


def _items(n: int) -> list[dict]:
    return [{"domain": "math", "messages": p.messages, "response": respond(p, "equation")}
            for p in make_prompts("math", n, seed=1)]


def test_scores_match_the_worker_and_health_lists_domains(url, rm_dir):
    from actors.reward import RewardWorker

    health = requests.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and "math" in health["domains"] and health["conditional"] is True
    items = _items(3)
    reply = requests.post(f"{url}/v1/reward", json={"items": items}, timeout=60)
    assert reply.status_code == 200
    body = reply.json()
    assert body["model"] == "served-rm"
    assert body["scores"] == pytest.approx(RewardWorker(rm_dir).score(items), abs=1e-5)


@pytest.mark.parametrize("payload,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"items": "x"}', 400, '{"items": ['),
    (b'{"items": []}', 400, "items is empty"),
    (b'{"items": [{"domain": "math", "messages": [{"role": "user", "content": "q"}]}]}', 400, "items[0].response"),
    (b'{"items": [{"domain": "math", "messages": [], "response": "r"}]}', 400, "items[0].messages"),
])
def test_malformed_requests_get_a_400_naming_the_problem(url, payload, status, needle):
    reply = requests.post(f"{url}/v1/reward", data=payload, headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == status
    assert needle in reply.json()["error"]["message"]


@pytest.mark.parametrize("item,param,needle", [
    (5, "items[0]", "items[0] must be an object"),
    ({"domain": "math", "messages": [{"role": "wizard", "content": "q"}], "response": "r"}, "items[0].messages[0]",
     "one of ['system', 'user', 'assistant', 'environment']"),
    ({"domain": "math", "messages": [{"role": "user", "content": "add " * 1200}], "response": "r"}, "items[0]",
     "longer than the RM's context of 1024"),
])
def test_bad_items_are_400s_in_the_openai_error_shape_with_the_item_located(url, item, param, needle):
    reply = requests.post(f"{url}/v1/reward", json={"items": [item]}, timeout=60)
    err = reply.json()["error"]
    assert reply.status_code == 400 and {"message", "type", "param", "code"} <= set(err)
    assert err["param"] == param and needle in err["message"], err


def test_a_callers_system_message_is_scored_after_the_domain_condition(url, rm_dir):
    # Preference pairs may carry a system message of their own, so the RM scores one (after its condition).
    item = {**_items(1)[0]}
    item["messages"] = [{"role": "system", "content": "Answer in one line."}] + item["messages"]
    reply = requests.post(f"{url}/v1/reward", json={"items": [item, _items(1)[0]]}, timeout=60)
    with_system, without = reply.json()["scores"]
    assert reply.status_code == 200 and with_system != pytest.approx(without, abs=1e-6)


def test_wrong_method_and_unknown_route_answer_in_the_error_shape(url):
    for reply, status in ((requests.get(f"{url}/v1/reward", timeout=30), 405),
                          (requests.post(f"{url}/v1/nothing", json={}, timeout=30), 404)):
        assert reply.status_code == status
        assert {"message", "type", "param", "code"} <= set(reply.json()["error"])


def test_unknown_domain_lists_the_known_ones_and_too_many_items_is_413(url):
    bad = [{**_items(1)[0], "domain": "cooking"}]
    reply = requests.post(f"{url}/v1/reward", json={"items": bad}, timeout=30)
    err = reply.json()["error"]
    assert reply.status_code == 400 and err["type"] == "unknown_domain" and err["domain"] == "cooking"
    assert err["param"] == "items[0].domain"
    assert {"helpful", "harmless", "code", "math", "concise", "detailed"} <= set(err["known_domains"])
    reply = requests.post(f"{url}/v1/reward", json={"items": _items(5)}, timeout=30)
    assert reply.status_code == 413 and "limit of 4" in reply.json()["error"]["message"]
