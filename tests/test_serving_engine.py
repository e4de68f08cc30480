"""The engine in its own process (serving/engine.py): the same answers as the engine in the HTTP
process, a 503 for the requests in flight when it dies, /health unhealthy until it is back, a
restarted engine that answers as before, a clear error when it cannot load.

    python -m pytest tests/test_serving_engine.py -q
"""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serving import Server, model_dir  # noqa: F401  (fixture)

from dlm.decoding.config import DecodeConfig
from dlm.errors import DLMError

DEFAULTS = DecodeConfig(unmask="threshold", threshold=0.5)
REQUESTS = [
    ("/v1/completions", {"prompt": "the cat", "max_tokens": 8, "temperature": 0}),
    ("/v1/completions", {"prompt": ["a dog", "yes"], "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2}),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}),
    ("/v1/completions", {"prompt": "the", "max_tokens": 0, "echo": True, "logprobs": 1}),
    ("/v1/completions", {"prompt": "n:", "max_tokens": 6, "temperature": 1.0, "seed": 2,
                         "guided_regex": "[0-9]{2}(yes|no)"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
                              "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "guided_json": {"type": "array", "minItems": 100}}),
]


def _strip(body: dict) -> dict:
    body = {k: v for k, v in body.items() if k not in ("id", "created")}
    for ch in body.get("choices", []):
        ch.pop("stats", None)
    return body


def _answers(server) -> list:
    out = []
    for path, body in REQUESTS:
        r = httpx.post(server.url + path, json=body, timeout=60)
        out.append((r.status_code, _strip(r.json())))
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "the cat", "max_tokens": 12, "temperature": 1.0, "seed": 9, "stream": True}) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    out.append([line if line == "[DONE]" else _strip(json.loads(line)) for line in lines])
    return out


def _same(a, b, tol=1e-4) -> bool:
    """Equal answers, logprobs to `tol` (sharded sums add in another order)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b))
    return a == b


def test_engine_process_answers_as_the_engine_in_the_server_process(model_dir):  # noqa: F811
    answers = {}
    for mode in ("process", "thread"):
        s = Server(model_dir, defaults=DEFAULTS, engine=mode)
        try:
            health = httpx.get(s.url + "/health").json()
            assert health["status"] == "ok" and health["engine"] == mode
            engine = s.app.state.engine
            assert (getattr(engine, "pid", None) not in (None, os.getpid())) == (mode == "process")
            answers[mode] = _answers(s)
        finally:
            s.stop()
    assert [a[0] for a in answers["process"][:-1]] == [200] * 6 + [400]
    assert len(answers["process"][-1]) > 2 and answers["process"][-1][-1] == "[DONE]"
    assert answers["process"] == answers["thread"]


@pytest.fixture(scope="module")
def one_engine_answers(model_dir):  # noqa: F811
    """_answers of a server with one engine process (what the parallel engines must match)."""
    one = Server(model_dir, defaults=DEFAULTS)
    try:
        return _answers(one)
    finally:
        one.stop()


@pytest.mark.slow
def test_a_tensor_parallel_engine_answers_as_one_process_and_restarts_when_a_rank_dies(
        model_dir, one_engine_answers):  # noqa: F811
    """--tensor-parallel 2 (gloo ranks on this CPU): the same answers as the one-process engine
    for every kind of request (logprobs scoring and constraints included); a rank killed fails
    the requests in flight with a 503 and the engine comes back on both ranks."""
    want = one_engine_answers
    s = Server(model_dir, defaults=DEFAULTS, tensor_parallel=2)
    try:
        engine = s.app.state.engine
        assert len(engine.followers) == 1
        got = _answers(s)
        assert _same(got, want), [i for i, (x, y) in enumerate(zip(got, want)) if not _same(x, y)]
        follower = engine.followers[0]
        long = {"prompt": "the", "max_tokens": 120, "ignore_eos": True}
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(httpx.post, s.url + "/v1/completions", json=long, timeout=60)
            deadline = time.time() + 30
            while engine.stats()["running"] < 1 and time.time() < deadline:
                time.sleep(0.01)
            os.kill(follower.pid, signal.SIGKILL)
            r = fut.result()
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        deadline = time.time() + 120
        while httpx.get(s.url + "/health").status_code != 200:
            assert time.time() < deadline, "the engine did not come back"
            time.sleep(0.1)
        assert engine.followers[0].pid != follower.pid and engine.restarts == 1
        assert _same(_answers(s), want)
    finally:
        s.stop()
    with pytest.raises(DLMError, match="divisible by 4"):
        Server(model_dir, tensor_parallel=4)


def test_a_dead_engine_fails_its_requests_with_503_and_comes_back(model_dir):  # noqa: F811
    s = Server(model_dir, defaults=DecodeConfig(unmask="confidence"))  # one token per step: long requests
    try:
        engine = s.app.state.engine
        body = {"prompt": "the cat", "max_tokens": 8, "temperature": 1.0, "seed": 4}
        before = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        pid = engine.pid
        gate, relaunch = threading.Event(), engine._relaunch  # hold the restart until /health is checked
        engine._relaunch = lambda: (gate.wait(60), relaunch())
        long = {"prompt": "the", "max_tokens": 120, "ignore_eos": True}
        with ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(httpx.post, s.url + "/v1/completions", json=long, timeout=60) for _ in range(2)]
            deadline = time.time() + 30
            while engine.stats()["running"] < 2 and time.time() < deadline:
                time.sleep(0.01)
            assert engine.stats()["running"] == 2
            os.kill(pid, signal.SIGKILL)
            for f in futs:
                r = f.result()
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert err["code"] == "engine_unavailable" and "retry" in err["message"]
        h = httpx.get(s.url + "/health")  # no engine until the gate opens
        assert h.status_code == 503 and h.json()["status"] == "unhealthy", h.text
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"]
        gate.set()
        deadline = time.time() + 120
        while httpx.get(s.url + "/health").status_code != 200:
            assert time.time() < deadline, "the engine did not come back"
            time.sleep(0.1)
        assert engine.pid != pid and engine.restarts == 1
        after = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert after == before
    finally:
        s.stop()
    assert not engine.proc.is_alive()  # stopped with the server


def test_an_engine_that_cannot_load_is_a_clear_error(model_dir, tmp_path):  # noqa: F811
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(model_dir, d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DLMError, match="could not load weights"):
        Server(d)


@pytest.mark.slow
def test_data_parallel_replicas_share_the_load_and_answer_as_one(model_dir, one_engine_answers):  # noqa: F811
    """--data-parallel 2: two engine processes behind one front end. Each answers as the single
    engine would; concurrent requests go to both; one replica killed fails only its own
    requests (503), the front end stays healthy on the other and the replica comes back."""
    want = one_engine_answers
    s = Server(model_dir, defaults=DEFAULTS, data_parallel=2)
    try:
        engine = s.app.state.engine
        a, b = engine.replicas
        assert a.pid != b.pid
        assert _same(_answers(s), want)
        long = {"prompt": "the", "max_tokens": 60, "ignore_eos": True}
        with ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(httpx.post, s.url + "/v1/completions", json=long, timeout=60) for _ in range(4)]
            deadline = time.time() + 30
            while (a.stats()["running"] < 2 or b.stats()["running"] < 2) and time.time() < deadline:
                time.sleep(0.01)
            assert a.stats()["running"] == 2 and b.stats()["running"] == 2  # two each
            os.kill(a.pid, signal.SIGKILL)
            codes = sorted(f.result().status_code for f in futs)
        assert codes == [200, 200, 503, 503]
        assert httpx.get(s.url + "/health").status_code == 200  # the other replica serves on
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
        deadline = time.time() + 120
        while not a.healthy:
            assert time.time() < deadline, "the replica did not come back"
            time.sleep(0.1)
        assert engine.restarts == 1 and _same(_answers(s), want)
    finally:
        s.stop()
