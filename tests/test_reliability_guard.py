"""Auth and input limits through real Ray Serve (loopback).

App ``rel-guard``: API keys on (``HALFFULL_API_KEYS=k-one,k-two`` in the environment of the process that builds
the app; only digests reach the ingress), a 4 KiB body limit, a 1 s request timeout, ``max_output_tokens``
256; one simulated replica at real speed (a decode step is ~7 ms, so 256 tokens take ~1.8 s). Auth off is
checked on ``rel-open`` (defaults).
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from tests.serve_support import replica_actors, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

M = "llama3-8b"
KEYS = ("k-one", "k-two")
GOOD = {"authorization": f"Bearer {KEYS[1]}"}
SMALL = {"model": M, "prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def guard(ray_cluster):
    old = os.environ.get("HALFFULL_API_KEYS")
    os.environ["HALFFULL_API_KEYS"] = ",".join(KEYS)
    try:
        url = ray_cluster.deploy("rel-guard", {"num_replicas": 1, "speedup": 1.0, "max_body_bytes": 4096,
                                               "request_timeout_s": 1.0, "max_output_tokens": 256})
    finally:
        if old is None:
            os.environ.pop("HALFFULL_API_KEYS")
        else:
            os.environ["HALFFULL_API_KEYS"] = old
    with httpx.Client(base_url=url, timeout=20) as client:
        yield client
    ray_cluster.delete("rel-guard")


@pytest.fixture(scope="module")
def open_app(ray_cluster):
    url = ray_cluster.deploy("rel-open", {"num_replicas": 1, "speedup": 50.0})
    with httpx.Client(base_url=url, timeout=20) as client:
        yield client
    ray_cluster.delete("rel-open")


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


# ---- auth ----------------------------------------------------------------------------------------------
ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/completions", SMALL),
          ("POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}]}),
          ("GET", "/metrics", None), ("GET", "/v1/unknown", None), ("GET", "/v1/completions", None),
          ("GET", "/docs", None), ("GET", "/openapi.json", None)]
BAD_HEADERS = [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEYS[0]}"},
               {"authorization": KEYS[0]}, {"authorization": "Bearer"}, {"x-api-key": KEYS[0]}]


@pytest.mark.parametrize("method, path, body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_but_health_needs_a_key(guard, method, path, body):
    for headers in BAD_HEADERS:
        response = guard.request(method, path, json=body, headers=headers)
        error = assert_error(response, 401, "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer" and "API key" in error["message"]


def test_a_valid_key_opens_every_route(guard):
    for key in KEYS:
        for scheme in ("Bearer", "bearer"):
            response = guard.get("/v1/models", headers={"authorization": f"{scheme} {key}"})
            assert response.status_code == 200 and response.json()["data"][0]["id"] == M
    response = guard.post("/v1/completions", json=SMALL, headers=GOOD)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    assert guard.get("/v1/unknown", headers=GOOD).status_code == 404  # with a key: the ordinary 404


def test_health_is_open(guard):
    response = guard.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_auth_is_off_by_default(open_app):
    assert open_app.get("/v1/models").status_code == 200
    assert open_app.post("/v1/completions", json=SMALL).status_code == 200


# ---- input limits ----------------------------------------------------------------------------------------
def test_body_over_the_limit_is_413(guard):
    body = json.dumps({"model": M, "prompt": "x" * 5000, "max_tokens": 2}).encode()
    start = time.monotonic()
    assert_error(guard.post("/v1/completions", content=body, headers={**GOOD, "content-type": "application/json"}),
                 413, "request_too_large")

    def chunked():  # no Content-Length: refused while reading
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    assert_error(guard.post("/v1/completions", content=chunked(), headers=GOOD), 413, "request_too_large")
    assert time.monotonic() - start < 5
    ok = json.dumps({"model": M, "prompt": "x" * 3000, "max_tokens": 2}).encode()  # under the limit
    assert guard.post("/v1/completions", content=ok, headers={**GOOD, "content-type": "application/json"}).status_code == 200


def test_max_tokens_above_the_cap_is_400(guard):
    error = assert_error(guard.post("/v1/completions", json={**SMALL, "max_tokens": 257}, headers=GOOD), 400,
                         "invalid_value")
    assert error["param"] == "max_tokens" and "at most 256" in error["message"]


def replica_occupancy(app: str) -> dict:
    import ray

    actor = next(iter(replica_actors(app).values()))
    return ray.get(actor.record_routing_stats.remote(), timeout=10)


def test_a_request_past_the_timeout_is_504_and_aborted(guard):
    before = replica_occupancy("rel-guard")["num_aborted"]
    start = time.monotonic()
    response = guard.post("/v1/completions", json={"model": M, "prompt": "slow", "max_tokens": 256,
                                                   "ignore_eos": True}, headers=GOOD)
    elapsed = time.monotonic() - start
    assert_error(response, 504, "timeout")
    assert 0.9 <= elapsed < 5.0
    after = wait_until(lambda: (o := replica_occupancy("rel-guard"))["num_running"] == 0 and o, 10,
                       message="the timed-out request to leave the engine")
    assert after["num_aborted"] == before + 1 and after["num_free_blocks"] == after["num_total_blocks"]


def test_a_stream_past_the_timeout_ends_with_an_error_event(guard):
    body = {"model": M, "prompt": "slow stream", "max_tokens": 256, "ignore_eos": True, "stream": True}
    start = time.monotonic()
    with guard.stream("POST", "/v1/completions", json=body, headers=GOOD) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert time.monotonic() - start < 5.0
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "timeout"
    assert len(events) > 10  # tokens flowed before the deadline
    wait_until(lambda: replica_occupancy("rel-guard")["num_running"] == 0, 10, message="the engine to drop it")
