"""Bounded soak test and schema-based fuzzing of the server.

* 2,000 requests from 32 concurrent clients, mixed options (plain, chat, streaming, n=2,
  structured output, decoding options) and some bad requests: no 5xx, every request gets
  exactly one complete response, ids are unique, memory stays flat.
* schemathesis generates requests from the server's own OpenAPI document: no 5xx.

    python -m pytest tests/test_serving_soak.py -q
"""

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from test_serving import Server, model_dir  # noqa: F401  (fixture)

from dlm.decode import DecodeConfig

pytestmark = pytest.mark.slow


def _request(rng: random.Random, i: int):
    """(path, body, expected status, expected choices, streaming)."""
    kind = rng.choice(["plain", "plain", "chat", "stream", "n2", "regex", "choice", "options", "bad", "bad2"])
    base = {"prompt": rng.choice(["the cat", "yes", "a dog sat", "hello world"]), "max_tokens": rng.randint(2, 8),
            "temperature": rng.choice([0.0, 1.0]), "seed": i}
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                                        "seed": i}, 200, 1, False
    if kind == "stream":
        return "/v1/completions", {**base, "stream": True}, 200, 1, True
    if kind == "n2":
        return "/v1/completions", {**base, "n": 2}, 200, 2, False
    if kind == "regex":
        return "/v1/completions", {**base, "max_tokens": 6, "guided_regex": "[0-9]{2}"}, 200, 1, False
    if kind == "choice":
        return "/v1/completions", {**base, "structured_outputs": {"choice": ["yes", "no"]}}, 200, 1, False
    if kind == "options":
        return "/v1/completions", {**base, "max_tokens": 8, "block_length": 4, "cache": "dual",
                                   "unmask": "confidence"}, 200, 1, False
    if kind == "bad":
        return "/v1/completions", {**base, "model": "nope"}, 400, 0, False
    if kind == "bad2":
        return "/v1/completions", {**base, "max_tokens": -3}, 400, 0, False
    return "/v1/completions", base, 200, 1, False


def test_soak_2000_requests_32_clients(model_dir):  # noqa: F811
    s = Server(model_dir, max_queue=512, defaults=DecodeConfig(unmask="threshold", threshold=0.5))
    proc = psutil.Process()
    rss = []
    lock = threading.Lock()
    try:
        rng = random.Random(0)
        plan = [_request(rng, i) for i in range(2000)]
        ids: list[str] = []
        problems: list[str] = []

        def one(k):
            path, body, status, n_choices, stream = plan[k]
            with httpx.Client(base_url=s.url, timeout=120) as c:
                if stream:
                    with c.stream("POST", path, json=body) as r:
                        lines = [line for line in r.iter_lines() if line]
                    ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                    rid = json.loads(lines[0][6:])["id"] if ok else None
                    got = r.status_code
                else:
                    r = c.post(path, json=body)
                    got = r.status_code
                    data = r.json()
                    ok = got == status and (("choices" in data and len(data["choices"]) == n_choices)
                                            if status == 200 else "error" in data)
                    rid = data.get("id")
            with lock:
                if got >= 500 or not ok:
                    problems.append(f"{k}: {path} {body} -> {got}")
                if rid is not None:
                    ids.append(rid)
                if k % 250 == 0:
                    rss.append(proc.memory_info().rss)

        with ThreadPoolExecutor(32) as ex:
            list(ex.map(one, range(len(plan))))
        expected = sum(1 for p in plan if p[2] == 200)
        assert not problems, problems[:5]
        assert len(ids) == expected and len(set(ids)) == expected  # none lost, none duplicated
        # memory flat: after the warm-up quarter, growth under 64 MiB
        assert max(rss[2:]) - rss[2] < 64 * 2**20, [r // 2**20 for r in rss]
        assert s.app.state.scheduler.running == 0 and s.app.state.scheduler.queue_depth == 0
    finally:
        s.stop()


def test_schemathesis_fuzz_finds_no_server_errors(model_dir):  # noqa: F811
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    s = Server(model_dir, max_tokens_limit=32, defaults=DecodeConfig(unmask="threshold", threshold=0.5))
    try:
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        failures, calls, statuses = [], [0], set()
        for op in schema.get_all_operations():
            op = op.ok()

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            @given(case=op.as_strategy())
            def run(case):
                response = case.call(timeout=60)
                calls[0] += 1
                statuses.add(response.status_code)
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except Exception as e:  # collect, report all
                    failures.append(f"{op.label}: {type(e).__name__}: {str(e)[:300]}")
            run()
        assert not failures, failures[:5]
        assert calls[0] >= 100 and 200 in statuses and 400 in statuses, (calls, statuses)
    finally:
        s.stop()
