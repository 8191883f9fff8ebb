"""A local OpenAI-compatible stand-in server for offline tests and benchmarks.

::

    with LLMServer(latency=0.01) as server:          # 127.0.0.1, a free port, a thread
        lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False)
        ...                                           # from this process or worker processes
        server.counts()                               # requests, 429s, tokens (a dict)

``POST /v1/chat/completions`` answers every request with a chat completion whose content is
``answer(request)``: by default the fields DSPy's ``ChatAdapter`` asks for
(``[[ ## name ## ]]`` sections, each filled by ``fields(name, request)``), or a JSON object of
them when the request asks for ``response_format`` (``JSONAdapter``). Each response carries
``usage``, deterministic from the request: ``prompt_tokens`` is the number of
whitespace-separated words of the messages' contents, ``completion_tokens`` that of the reply.

Options: a latency (fixed, or lognormal around it with a seed: drawn in the order requests
arrive, or, ``keyed``, from the request's own messages, so that a request waits the same time
whichever client sends it and whenever: a benchmark's tools then meet the same latencies), a
token bucket (``rate`` requests per second, ``burst`` at once) above which requests get ``429``
with ``Retry-After`` (and ``retry-after-ms``), and ``hang(request)`` for requests that must
never be answered (they wait until the server stops, which releases them). ``GET /stats``
returns the counters as JSON, so a server run in another process (``python -m
helpers.llm_server``, or :meth:`LLMServer.in_process`) can be read too. Stopping is bounded:
``stop()`` returns within a few seconds whatever the clients do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.request import urlopen

__all__ = ["LLMServer", "chat_reply", "default_fields", "llm_server", "words"]

Request = dict[str, Any]
_FIELD = re.compile(r"\[\[ ## (\w+) ## \]\]")
_STOP_TIMEOUT = 5.0


def words(text: str) -> int:
    """The token count the server reports for ``text``: its whitespace-separated words."""
    return len(text.split())


def _content(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def requested_fields(request: Request) -> list[str]:
    """The output fields the last message asks for, in order, without ``completed``.

    ChatAdapter ends its last user message with "Respond with the corresponding output fields,
    starting with the field `[[ ## a ## ]]`, then `[[ ## b ## ]]`, and then ending with the
    marker for `[[ ## completed ## ]]`"; the fields are read from that sentence.
    """
    messages = request.get("messages") or []
    last = _content(messages[-1]) if messages else ""
    tail = last.rsplit("Respond with", 1)[-1] if "Respond with" in last else ""
    names = [n for n in _FIELD.findall(tail) if n != "completed"]
    if not names:  # JSONAdapter: the system message lists "Your output fields are: 1. `x`"
        system = _content(messages[0]) if messages else ""
        block = system.split("Your output fields are:", 1)[-1].split("All interactions", 1)[0]
        names = re.findall(r"^\s*\d+\.\s*`(\w+)`", block, flags=re.MULTILINE)
    return [n for n in dict.fromkeys(names)] or ["answer"]


def _asks_json(request: Request) -> bool:
    messages = request.get("messages") or []
    return bool(messages) and "Respond with a JSON object" in _content(messages[-1])


def question(request: Request) -> str:
    """The ``question`` input of a DSPy prompt (its ``[[ ## question ## ]]`` section), or ""."""
    messages = request.get("messages") or []
    last = _content(messages[-1]) if messages else ""
    match = re.search(r"\[\[ ## question ## \]\]\n(.*?)(?:\n\n|\Z)", last, flags=re.DOTALL)
    return match.group(1).strip() if match else ""


def default_fields(name: str, request: Request) -> str:
    """A field's value: ``reasoning`` says it thinks, others echo ``answer-of:<question>``."""
    if name == "reasoning":
        return "Let me think step by step."
    return f"answer-of:{question(request)}"


def chat_reply(values: dict[str, str]) -> str:
    """A reply in ChatAdapter's format: each field's section, then the ``completed`` marker."""
    parts = [f"[[ ## {name} ## ]]\n{value}\n" for name, value in values.items()]
    return "\n".join(parts) + "\n[[ ## completed ## ]]"


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # 64 clients connecting at once must not be refused (default 5)


class LLMServer:
    """An OpenAI-compatible chat completions server on 127.0.0.1, run by a thread of this process.

    Args:
        answer: the reply's content for a request; default: the requested fields (see the module
            docstring), each filled by ``fields``.
        fields: ``fields(name, request) -> str`` for the default ``answer``.
        latency: seconds before answering (a median when ``sigma`` > 0).
        sigma: > 0 draws each latency from a lognormal around ``latency`` (seeded by ``seed``).
        seed: the seed of the latency draws.
        keyed: draw each latency from the seed and the request's messages, not in arrival order.
        rate: requests per second the token bucket admits (None: no limit); above it, 429.
        burst: the bucket's size (requests admitted at once).
        hang: ``hang(request) -> bool``: never answer such requests (until the server stops).
        model: the model name responses carry.
        port: the port to listen on (0: a free one).
    """

    def __init__(
        self,
        *,
        answer: Callable[[Request], str] | None = None,
        fields: Callable[[str, Request], str] = default_fields,
        latency: float = 0.0,
        sigma: float = 0.0,
        seed: int = 0,
        keyed: bool = False,
        rate: float | None = None,
        burst: int = 1,
        hang: Callable[[Request], bool] | None = None,
        model: str = "stand-in",
        port: int = 0,
    ) -> None:
        self.answer = answer
        self.fields = fields
        self.latency = latency
        self.sigma = sigma
        self.rate = rate
        self.burst = burst
        self.hang = hang
        self.model_name = model
        self._seed, self._keyed = seed, keyed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._refilled = time.monotonic()
        self._released = threading.Event()
        self._counts = {
            "requests": 0,
            "answered": 0,
            "rate_limited": 0,
            "hanging": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
        }
        self.requests: list[Request] = []  # the bodies of the answered requests, in order
        self._httpd = _Server(("127.0.0.1", port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._httpd.server_address[1])

    @property
    def api_base(self) -> str:
        """The base URL for ``dspy.LM(..., api_base=...)``: ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        """The LiteLLM model name to use: ``openai/<model>``."""
        return f"openai/{self.model_name}"

    def start(self) -> LLMServer:
        """Serve in a daemon thread; returns the server."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release hanging requests and stop serving, within a few seconds."""
        self._released.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(_STOP_TIMEOUT)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ counters

    def counts(self) -> dict[str, int]:
        """requests, answered, rate_limited, hanging, prompt/completion/total tokens."""
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------------ serving

    def _admit(self) -> float:
        """0 if the bucket admits a request now, else the seconds until it would."""
        if self.rate is None:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self.rate

    def _delay(self, request: Request | None = None) -> float:
        if self.sigma <= 0:
            return self.latency
        mu = math.log(max(self.latency, 1e-6))
        if self._keyed:
            text = json.dumps([self._seed, (request or {}).get("messages")], sort_keys=True)
            digest = hashlib.sha256(text.encode()).digest()
            return random.Random(digest).lognormvariate(mu, self.sigma)
        with self._lock:
            return self._rng.lognormvariate(mu, self.sigma)

    def respond(self, request: Request) -> tuple[int, dict[str, str], dict[str, Any]]:
        """``(status, headers, body)`` for one chat completions request."""
        with self._lock:
            self._counts["requests"] += 1
        wait = self._admit()
        if wait > 0:
            with self._lock:
                self._counts["rate_limited"] += 1
            headers = {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(int(wait * 1e3))}
            error = {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}
            return 429, headers, {"error": error}
        if self.hang is not None and self.hang(request):
            with self._lock:
                self._counts["hanging"] += 1
            self._released.wait()
            return 503, {}, {"error": {"message": "server stopped", "type": "server_error"}}
        delay = self._delay(request)
        if delay > 0:
            self._released.wait(delay)
        content = self._content(request)
        prompt = sum(words(_content(m)) for m in request.get("messages") or [])
        completion = words(content)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        with self._lock:
            self._counts["answered"] += 1
            for key, value in usage.items():
                self._counts[key] += value
            self.requests.append(request)
            number = self._counts["answered"]
        body = {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        return 200, {}, body

    def _content(self, request: Request) -> str:
        if self.answer is not None:
            return self.answer(request)
        values = {name: self.fields(name, request) for name in requested_fields(request)}
        if request.get("response_format") or _asks_json(request):
            return json.dumps(values)
        return chat_reply(values)

    # ------------------------------------------------------------------ other processes

    @staticmethod
    @contextlib.contextmanager
    def in_process(*args: str, timeout: float = 30.0) -> Iterator[RemoteServer]:
        """A default server in a child process (``python -m helpers.llm_server ARGS``).

        For benchmarks that must not count the server's CPU in the parent's. Its counters are
        read over HTTP (:meth:`RemoteServer.counts`).
        """
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
        }
        child = subprocess.Popen(
            [sys.executable, "-m", "helpers.llm_server", *args],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            assert child.stdout is not None
            line = _readline(child, timeout)
            yield RemoteServer(int(line))
        finally:
            child.terminate()
            try:
                child.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(_STOP_TIMEOUT)
            if child.stdout is not None:
                child.stdout.close()


class RemoteServer:
    """A stand-in server running in another process, known by its port."""

    def __init__(self, port: int, model: str = "stand-in") -> None:
        self.port = port
        self.model = f"openai/{model}"
        self.api_base = f"http://127.0.0.1:{port}/v1"

    def counts(self) -> dict[str, int]:
        """The server's counters (``GET /stats``)."""
        with urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as reply:
            return dict(json.loads(reply.read()))


def _readline(child: subprocess.Popen[str], timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(child.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not result or not result[0].strip():
        raise RuntimeError(f"the stand-in server did not start within {timeout} s")
    return result[0]


def _handler(server: LLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the OpenAI client expects
        timeout = 30  # an idle connection's thread ends
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms wait

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, {}, {"error": {"message": "body is not JSON"}})
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {}, {"error": {"message": f"no route {self.path}"}})
                return
            self._send(*server.respond(request))

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/stats":
                self._send(200, {}, server.counts())
            else:
                self._send(404, {}, {"error": {"message": f"no route {self.path}"}})

        def _send(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client went away
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests read the counters instead

    return Handler


@contextlib.contextmanager
def llm_server(**options: Any) -> Iterator[LLMServer]:
    """``with llm_server(latency=...) as server:``: an :class:`LLMServer`, stopped at the end."""
    server = LLMServer(**options)
    with server:
        yield server


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="an OpenAI-compatible stand-in server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--sigma", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keyed", action="store_true", help="latency drawn from the request")
    parser.add_argument("--rate", type=float, default=None, help="requests/s, 429 above")
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--hang", default="", help="never answer prompts holding this word")
    args = parser.parse_args()
    word = args.hang
    server = LLMServer(
        port=args.port,
        latency=args.latency,
        sigma=args.sigma,
        seed=args.seed,
        keyed=args.keyed,
        rate=args.rate,
        burst=args.burst,
        hang=(lambda request: word in json.dumps(request)) if word else None,
    )
    server.start()
    print(server.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _main()
