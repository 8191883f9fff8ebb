"""The OpenAI-compatible stand-in server (tests/helpers/llm_server.py) that the DSPy tests use."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from helpers.llm_server import LLMServer, chat_reply, words


def post(server: Any, body: dict[str, Any], timeout: float = 10) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        f"{server.api_base}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def chat(text: str) -> dict[str, Any]:
    return {"model": "stand-in", "messages": [{"role": "user", "content": text}]}


def test_answers_with_usage_counted_from_the_request():
    with LLMServer(answer=lambda request: "four words of reply") as server:
        status, _, body = post(server, chat("one two three"))
        assert status == 200
        assert body["choices"][0]["message"]["content"] == "four words of reply"
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        counts = server.counts()
    assert counts["requests"] == counts["answered"] == 1
    assert (counts["prompt_tokens"], counts["completion_tokens"]) == (3, 4)
    assert server.requests == [chat("one two three")]


def test_default_answer_fills_the_fields_chat_adapter_asks_for():
    prompt = (
        "[[ ## question ## ]]\nWhy?\n\nRespond with the corresponding output fields, starting "
        "with the field `[[ ## reasoning ## ]]`, then `[[ ## answer ## ]]`, and then ending "
        "with the marker for `[[ ## completed ## ]]`."
    )
    with LLMServer() as server:
        _, _, body = post(server, chat(prompt))
    content = body["choices"][0]["message"]["content"]
    assert content == chat_reply(
        {"reasoning": "Let me think step by step.", "answer": "answer-of:Why?"}
    )
    assert words(content) == body["usage"]["completion_tokens"]


def test_token_bucket_answers_429_with_retry_after():
    with LLMServer(rate=0.5, burst=2) as server:
        statuses = [post(server, chat("hi"))[:2] for _ in range(3)]
        counts = server.counts()
    assert [s for s, _ in statuses] == [200, 200, 429]
    headers = {k.lower(): v for k, v in statuses[2][1].items()}
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert counts["rate_limited"] == 1 and counts["answered"] == 2


def test_latency_is_fixed_or_a_seeded_lognormal():
    servers = [LLMServer(latency=0.25), LLMServer(latency=0.1, sigma=0.5, seed=7)]
    servers.append(LLMServer(latency=0.1, sigma=0.5, seed=7))
    try:
        fixed, one, same = servers
        assert [fixed._delay() for _ in range(3)] == [0.25] * 3
        draws = [one._delay() for _ in range(5)]
        assert draws == [same._delay() for _ in range(5)] and len(set(draws)) == 5
    finally:
        for server in servers:
            server.stop()


def test_a_keyed_latency_is_the_requests_own_whatever_the_order():
    servers = [LLMServer(latency=0.1, sigma=0.5, seed=7, keyed=True) for _ in range(2)]
    servers.append(LLMServer(latency=0.1, sigma=0.5, seed=8, keyed=True))
    try:
        one, other, reseeded = servers
        requests = [chat(f"question {i}") for i in range(6)]
        draws = [one._delay(request) for request in requests]
        assert len(set(draws)) == 6  # each request its own latency...
        assert [other._delay(r) for r in reversed(requests)] == draws[::-1]  # ...in any order
        assert [one._delay(r) for r in requests] == draws  # and every time it is sent
        assert [reseeded._delay(r) for r in requests] != draws
    finally:
        for server in servers:
            server.stop()


def test_latency_delays_the_answer():
    with LLMServer(latency=0.3) as server:
        started = time.monotonic()
        post(server, chat("hi"))
        assert time.monotonic() - started >= 0.3


def test_hanging_requests_wait_until_stop_and_stop_is_bounded():
    server = LLMServer(hang=lambda request: "hang" in json.dumps(request)).start()
    outcome: list[int] = []
    client = threading.Thread(target=lambda: outcome.append(post(server, chat("hang"), 30)[0]))
    client.start()
    assert post(server, chat("fine"))[0] == 200
    deadline = time.monotonic() + 10
    while server.counts()["hanging"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.counts()["hanging"] == 1 and not outcome
    started = time.monotonic()
    server.stop()
    client.join(10)
    assert not client.is_alive() and time.monotonic() - started < 10
    assert outcome == [503]


def test_runs_in_another_process_with_stats_over_http():
    with LLMServer.in_process() as remote:
        assert post(remote, chat("a b"))[0] == 200
        assert remote.counts()["prompt_tokens"] == 2


@pytest.mark.dspy
def test_dspy_lm_works_against_it_from_worker_processes(no_leaked_workers):
    dspy = pytest.importorskip("dspy")
    import procval.dspy

    with LLMServer() as server:
        lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False)
        devset = [dspy.Example(question=f"q{i}").with_inputs("question") for i in range(6)]
        result = procval.evaluate(
            dspy.ChainOfThought("question -> answer"),
            devset,
            lambda example, prediction: prediction.answer == f"answer-of:{example.question}",
            config=procval.dspy.snapshot(lm=lm),
            workers=2,
        )
        counts = server.counts()
    assert result.score == 1.0, result.summary()
    assert counts["answered"] == 6
