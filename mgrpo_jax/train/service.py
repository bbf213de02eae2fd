"""The sub-agent generation service of the decoupled mode, and its client.

MGRPO.md, "Decoupled pipeline": the main job runs rollouts; the sub-agent's generations are served by the sub
job with its *current* weights. `GenerationService` runs inside the sub job (HTTP, standard library); the
main job's controller talks to it through `RemoteSubPolicy`, which implements the controller's `Policy`.

Endpoints (JSON):

    POST /generate        {"prompts": [[ids]], "stop_sequences": [[ids]], "seed": int}
                          -> {"samples": [{"tokens", "logprobs", "finish_reason"}], "policy_version": int}
    POST /v1/completions  OpenAI-style: {"prompt": [ids] | [[ids]], "seed", "stop_token_ids": [[ids]] }
                          -> {"choices": [{"index", "token_ids", "logprobs": {"token_logprobs"}, "finish_reason"}],
                              "policy_version"}   (so that an external server's shape can be matched)
    GET  /health          -> {"status": "ok", "policy_version", "max_new_tokens", "max_prompt_tokens",
                              "vocab_size", "tokenizer_fingerprint", "requests", "batches", ...}

Threads: the HTTP server answers each connection on its own thread, which puts the request on a queue and
waits; ONE generation thread takes the oldest request plus everything else pending (within `batch_window_s`),
merges requests with the same stop sequences into one sampler call, and answers each. Token-exact: ids in,
sampled ids and behaviour log-probs out, nothing re-tokenized.

Weight hand-off: `AgentTrainer` donates its parameters on every update, so the service must never read the
trainer's buffers from its own thread. `set_weights(params, version)` is called by the trainer's thread right
after an update is collected and copies the parameters (`x.copy()`: dispatched in that thread before the next
donating update, so the copy always reads live buffers); the copy is swapped in under a lock, and each sampler
batch uses the (params, version) pair it took at its start. Memory cost: one extra copy of the sub-agent's
parameters (not of its optimizer state) on the sub mesh, two for the moment a batch still holds the previous
copy. In exchange generation never blocks an update and an update never waits for a generation.

Determinism: a request served alone reproduces `Sampler.generate(params, prompts, jax.random.key(seed), stops)`
exactly; merged requests draw from a key folded from all their seeds.
"""
from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mgrpo_jax.rollout.controller import GenerationUnavailableError
from mgrpo_jax.rollout.sampler import Sample

log = logging.getLogger(__name__)


class ServiceUnavailableError(GenerationUnavailableError):
    """The generation service stayed unreachable (or kept answering 5xx) past the client's deadline."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary: both jobs must tokenize alike (token ids cross between them)."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


@dataclasses.dataclass
class _Request:
    prompts: list[list[int]]
    stops: tuple[tuple[int, ...], ...]
    seed: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    samples: list[Sample] | None = None
    version: int = -1
    error: str | None = None


class GenerationService:
    """Serves `sampler` with the sub-agent's current parameters over HTTP (see the module docstring).

    sampler: a `rollout.sampler.Sampler`; params, version: the initial weights (copied). host/port: the bind
    address (loopback by default; port 0 picks a free one, see `.port`). batch_window_s: how long the generation
    thread waits for more requests to merge after the first one. request_timeout_s: how long a request waits for
    its answer before a 503.
    """

    def __init__(self, sampler, params, version: int, *, host: str = "127.0.0.1", port: int = 0,
                 batch_window_s: float = 0.005, request_timeout_s: float = 300.0, info: dict | None = None):
        self.sampler = sampler
        self.batch_window_s, self.request_timeout_s = batch_window_s, request_timeout_s
        self.info = dict(info or {})
        self._lock = threading.Lock()
        self._params, self._version = None, 0
        self.set_weights(params, version)
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self.requests = 0  # answered requests
        self.batches = 0  # sampler calls (merged requests count once)
        self.last_request_time = time.monotonic()
        self._stopping = threading.Event()
        try:
            self._server = http.server.ThreadingHTTPServer((host, port), self._handler_class())
        except OSError as err:
            raise OSError(f"the sub-agent generation service cannot listen on {host}:{port} ({err}); choose another "
                          "decoupled.service_port (or stop what holds it)") from err
        self._server.daemon_threads = True
        self._threads: list[threading.Thread] = []

    # -- weights ----------------------------------------------------------------------------------------

    def set_weights(self, params, version: int) -> None:
        """Call from the trainer's thread after an update is collected (before the next one is dispatched)."""
        own = jax.tree.map(lambda x: x.copy(), params)
        with self._lock:
            self._params, self._version = own, int(version)

    @property
    def policy_version(self) -> int:
        with self._lock:
            return self._version

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> GenerationService:
        self._threads = [threading.Thread(target=self._generation_loop, name="mgrpo-generate", daemon=True),
                         threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                          name="mgrpo-http", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("sub-agent generation service on %s (policy version %d)", self.url, self.policy_version)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._threads:  # shutdown() waits for serve_forever, which only runs once started
            self._server.shutdown()
        self._server.server_close()
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "policy_version": self.policy_version,
                "max_new_tokens": self.sampler.config.max_new_tokens,
                "max_prompt_tokens": self.sampler.config.prompt_buckets[-1], "requests": self.requests,
                "batches": self.batches, "queued": self._queue.qsize(), **self.info}

    # -- generation -------------------------------------------------------------------------------------

    def submit(self, prompts: Sequence[Sequence[int]], stop_sequences: Sequence[Sequence[int]], seed: int,
               timeout_s: float | None = None) -> tuple[list[Sample], int]:
        """Queues one request and waits for it (what the HTTP handler does). Returns (samples, version)."""
        req = _Request([[int(t) for t in p] for p in prompts], tuple(tuple(int(t) for t in s) for s in stop_sequences),
                       int(seed))
        if not req.prompts:
            return [], self.policy_version
        self._queue.put(req)
        if not req.done.wait(self.request_timeout_s if timeout_s is None else timeout_s):
            raise TimeoutError("generation did not finish in time")
        if req.error is not None:
            raise ValueError(req.error)
        return req.samples, req.version

    def _generation_loop(self) -> None:
        while not self._stopping.is_set():
            first = self._queue.get()
            if first is None:
                break
            pending = [first]
            deadline = time.monotonic() + self.batch_window_s
            while True:  # everything that is already waiting, plus what arrives within the window
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._stopping.set()
                    break
                pending.append(item)
            by_stops: dict[tuple, list[_Request]] = {}
            for req in pending:
                by_stops.setdefault(req.stops, []).append(req)
            for stops, reqs in by_stops.items():
                self._serve(stops, reqs)

    def _serve(self, stops, reqs: list[_Request]) -> None:
        with self._lock:
            params, version = self._params, self._version
        key = jax.random.key(reqs[0].seed)
        for r in reqs[1:]:
            key = jax.random.fold_in(key, r.seed)
        prompts = [p for r in reqs for p in r.prompts]
        try:
            samples = self.sampler.generate(params, prompts, key, [list(s) for s in stops])
        except Exception as err:  # a bad request (prompt too long, too many stops): answer it, keep serving
            log.warning("generation failed for %d request(s): %s", len(reqs), err)
            for r in reqs:
                r.error = f"{type(err).__name__}: {err}"
                r.done.set()
            return
        self.batches += 1
        start = 0
        for r in reqs:
            r.samples, r.version = samples[start:start + len(r.prompts)], version
            start += len(r.prompts)
            self.requests += 1
            r.done.set()
        self.last_request_time = time.monotonic()

    # -- HTTP -------------------------------------------------------------------------------------------

    def _handler_class(self):
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # the default logs every request to stderr
                log.debug("service: " + fmt, *args)

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") == "/health":
                    self._reply(200, service.health())
                else:
                    self._reply(404, {"error": f"no such endpoint {self.path}; use /health, /generate"})

            def do_POST(self):
                path = self.path.rstrip("/")
                if path not in ("/generate", "/v1/completions"):
                    self._reply(404, {"error": f"no such endpoint {self.path}; use /generate or /v1/completions"})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                    if path == "/generate":
                        prompts, stops = body["prompts"], body.get("stop_sequences", [])
                    else:
                        prompts = body["prompt"]
                        prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
                        stops = body.get("stop_token_ids", [])
                    if not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts):
                        raise ValueError("prompts must be a list of token-id lists")
                    samples, version = service.submit(prompts, stops, int(body.get("seed", 0)))
                except TimeoutError as err:
                    self._reply(503, {"error": str(err)})
                    return
                except (ValueError, KeyError, TypeError) as err:
                    self._reply(400, {"error": f"bad request: {type(err).__name__}: {err}"})
                    return
                if path == "/generate":
                    out = {"samples": [{"tokens": s.tokens.tolist(), "logprobs": s.logprobs.tolist(),
                                        "finish_reason": s.finish_reason} for s in samples]}
                else:
                    out = {"object": "text_completion", "choices": [
                        {"index": i, "text": "", "token_ids": s.tokens.tolist(),
                         "logprobs": {"token_logprobs": s.logprobs.tolist()},
                         "finish_reason": "length" if s.finish_reason == "length" else "stop"}
                        for i, s in enumerate(samples)]}
                self._reply(200, {**out, "policy_version": version})

        return Handler


class RemoteSubPolicy:
    """The controller's `Policy` for a sub-agent served by a `GenerationService` (or anything with its
    /generate shape).

    generate() POSTs one request; a connection error, timeout or 5xx is retried with exponential backoff until
    `deadline_s` has passed since the call began, then `ServiceUnavailableError` (the controller turns it into
    failed delegations). A 4xx (a bad request) raises ValueError at once. `version`: the sub-agent policy
    version the service last reported (versions only grow, so it is a lower bound of what the next call uses).
    max_new_tokens / max_prompt_tokens: the service's sampler limits (the controller's context checks use them).
    """

    def __init__(self, url: str, *, max_new_tokens: int, max_prompt_tokens: int, deadline_s: float = 120.0,
                 request_timeout_s: float = 60.0, initial_backoff_s: float = 0.1, max_backoff_s: float = 2.0):
        self.url = url.rstrip("/")
        self.max_new_tokens, self.max_prompt_tokens = int(max_new_tokens), int(max_prompt_tokens)
        self.deadline_s, self.request_timeout_s = deadline_s, request_timeout_s
        self.initial_backoff_s, self.max_backoff_s = initial_backoff_s, max_backoff_s
        self.version = 0
        self.failures = 0  # calls that gave up (ServiceUnavailableError)
        self.retries = 0  # attempts that failed and were retried

    def update(self, params=None, version: int | None = None) -> None:
        """No-op: the sub job owns the weights (kept for the `SamplerPolicy` interface)."""

    def _call(self, method: str, path: str, body: dict | None, timeout_s: float) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def _with_retries(self, method: str, path: str, body: dict | None, deadline_s: float) -> dict:
        start = time.monotonic()
        backoff, attempt = self.initial_backoff_s, 0
        while True:
            attempt += 1
            left = deadline_s - (time.monotonic() - start)
            try:
                return self._call(method, path, body, max(0.1, min(self.request_timeout_s, left)))
            except urllib.error.HTTPError as err:
                if err.code < 500:
                    detail = err.read().decode(errors="replace")
                    raise ValueError(f"generation service {self.url}{path} rejected the request ({err.code}): "
                                     f"{detail}") from err
                last = err
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as err:
                last = err
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise ServiceUnavailableError(
                    f"sub-agent generation service {self.url} unreachable for {time.monotonic() - start:.1f}s "
                    f"({attempt} attempts; last error: {type(last).__name__}: {last}). Is the sub job "
                    "(launch/train.py --role sub) running and is decoupled.service_url right?") from last
            self.retries += 1
            wait = min(backoff, self.max_backoff_s, left)
            log.warning("generation service %s%s unreachable (attempt %d: %s); retrying in %.2fs, giving up in "
                        "%.1fs", self.url, path, attempt, last, wait, left)
            time.sleep(wait)
            backoff *= 2

    def health(self, deadline_s: float | None = None) -> dict:
        """GET /health (retried like generate). Updates `version`."""
        out = self._with_retries("GET", "/health", None, self.deadline_s if deadline_s is None else deadline_s)
        self.version = max(self.version, int(out["policy_version"]))
        return out

    def refresh_version(self) -> int:
        """Best effort: the service's current version (unchanged when it is down)."""
        try:
            self.health(deadline_s=min(5.0, self.deadline_s))
        except ServiceUnavailableError:
            pass
        return self.version

    def generate(self, prompts, rng, stop_sequences) -> list[Sample]:
        if not len(prompts):
            return []
        seed = int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max))
        body = {"prompts": [[int(t) for t in p] for p in prompts],
                "stop_sequences": [[int(t) for t in s] for s in stop_sequences], "seed": seed}
        try:
            out = self._with_retries("POST", "/generate", body, self.deadline_s)
        except ServiceUnavailableError:
            self.failures += 1
            raise
        self.version = max(self.version, int(out["policy_version"]))
        samples = [Sample(np.asarray(s["tokens"], np.int32), np.asarray(s["logprobs"], np.float32),
                          s["finish_reason"]) for s in out["samples"]]
        if len(samples) != len(prompts):
            raise ValueError(f"generation service returned {len(samples)} samples for {len(prompts)} prompts")
        return samples
