"""The sub-agent generation service of the decoupled mode, and its client.

MGRPO.md, "Decoupled pipeline": the main job runs rollouts; the sub-agent's generations are served by the sub
job with its *current* weights. `GenerationService` runs inside the sub job (HTTP, standard library); the
main job's controller talks to it through `RemoteSubPolicy`, which implements the controller's `Policy`.

Endpoints (JSON):

    POST /generate        {"prompts": [[ids]], "stop_sequences": [[ids]], "seed": int}
                          -> {"samples": [{"tokens", "logprobs", "finish_reason", "prompt_truncated"}],
                              "policy_version", "tokenizer_fingerprint", "vocab_size"}
    POST /v1/completions  OpenAI's completions API (see `_CompletionRequest`): string or token-id prompts,
                          decoded text, max_tokens, n, stop, logprobs (0: the sampled tokens' log-probs),
                          stream (server-sent events), usage, seed; plus `stop_token_ids` and, in each choice,
                          `token_ids`, and `policy_version` (extensions, as vLLM has them).
    GET  /v1/models       the one served model
    GET  /health          -> {"status": "ok" | "dead", "policy_version", "max_new_tokens", "max_prompt_tokens",
                              "vocab_size", "tokenizer_fingerprint", "requests", "batches", ...}; 503 when dead

Validation: every field of a request is checked in the connection's own thread before it is queued (seed
range, token ids in [0, vocab), prompt lengths against the largest prompt bucket, stop sequences against the
sampler's stop table), so a bad request is a 400 of its own and never reaches a merged sampler call. A merged
call that fails anyway is retried request by request, so only the request that causes it fails.

Threads: the HTTP server answers each connection on its own thread (with a socket timeout, so a client that
sends less than its Content-Length gets a 408 instead of holding a thread for ever), which puts the request on a
queue and waits; ONE generation thread takes the oldest request plus everything else pending (within
`batch_window_s`), merges requests with the same stop sequences into one sampler call, and answers each. If that
thread ever dies, /health answers 503 with the error, every waiting and later request gets a 503 at once, and
`check()` raises (the sub job calls it every step, so it stops with the error instead of serving nothing).
Token-exact: ids in, sampled ids and behaviour log-probs out, nothing re-tokenized.

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
import http.client
import http.server
import json
import logging
import math
import queue
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mgrpo_jax.rollout.controller import GenerationUnavailableError
from mgrpo_jax.rollout.sampler import FINISH_REASONS, Sample

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits of a seed (without x64): larger seeds would alias smaller ones
MAX_LOGPROB = 1e-4  # a log-prob above this is not one (float32 rounding of log_softmax stays far below it)


class ServiceUnavailableError(GenerationUnavailableError):
    """The generation service stayed unreachable (or kept answering 5xx or garbage) past the client's deadline."""


class InvalidServiceResponseError(GenerationUnavailableError):
    """The generation service answered, but with samples that cannot be right (token ids outside the vocabulary,
    as many log-probs as tokens, ...). Not retried: the delegations of that call fail and are counted, and
    nothing of the answer is recorded or trained on."""


class TokenizerMismatchError(ValueError):
    """The service's sub job tokenizes differently from this job: token ids would mean different text."""


class RequestError(ValueError):
    """A request the service refuses (HTTP `status`, 400 by default); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class GenerationFailedError(RuntimeError):
    """The sampler raised on a validated request (HTTP 500); the service keeps serving."""


class WorkerDeadError(RuntimeError):
    """The service's generation thread has died (HTTP 503)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary: both jobs must tokenize alike (token ids cross between them)."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ServedSample(Sample):
    """A `Sample` from the service, with the sub-agent policy version that generated it (the controller makes an
    episode as old as its oldest turn, so the store's staleness is the generator's, also after a rollback)."""

    policy_version: int = -1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(value, where: str, vocab_size: int, param: str) -> list[int]:
    """A JSON list of token ids, each an int in [0, vocab_size) (RequestError otherwise)."""
    if not isinstance(value, list):
        raise RequestError(f"{where} must be a list of token ids, got {type(value).__name__}", param)
    for j, t in enumerate(value):
        if not _is_int(t):
            raise RequestError(f"{where}[{j}] = {t!r} is not an integer token id", param)
        if not 0 <= t < vocab_size:
            raise RequestError(f"{where}[{j}] = {t} is outside the vocabulary [0, {vocab_size})", param)
    return value


def _listify(value):
    """Tuples and NumPy arrays and scalars (Python callers) -> lists and ints; anything else unchanged."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    return value


@dataclasses.dataclass
class _Request:
    prompts: list[list[int]]
    stops: tuple[tuple[int, ...], ...]
    seed: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    samples: list[Sample] | None = None
    version: int = -1
    error: Exception | None = None

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()


class GenerationService:
    """Serves `sampler` with the sub-agent's current parameters over HTTP (see the module docstring).

    sampler: a `rollout.sampler.Sampler`; params, version: the initial weights (copied). host/port: the bind
    address (loopback by default; port 0 picks a free one, see `.port`). batch_window_s: how long the generation
    thread waits for more requests to merge after the first one. request_timeout_s: how long a request waits for
    its answer before a 503. tokenizer: the sub-agent's (decodes /v1/completions text, encodes string prompts,
    and its fingerprint goes into /health and every /generate answer). model_name: the id /v1/models lists.
    client_timeout_s: a connection that sends nothing for this long is answered 408 (mid-body) or closed (idle).
    max_body_bytes: larger bodies are a 413. max_request_rows: prompts (times n) per request.
    """

    def __init__(self, sampler, params, version: int, *, host: str = "127.0.0.1", port: int = 0,
                 batch_window_s: float = 0.005, request_timeout_s: float = 300.0, info: dict | None = None,
                 tokenizer=None, model_name: str = "mgrpo_jax-sub", client_timeout_s: float = 30.0,
                 max_body_bytes: int = 64 << 20, max_request_rows: int = 65536):
        self.sampler = sampler
        self.batch_window_s, self.request_timeout_s = batch_window_s, request_timeout_s
        self.client_timeout_s, self.max_body_bytes, self.max_request_rows = client_timeout_s, max_body_bytes, \
            max_request_rows
        self.tokenizer, self.model_name = tokenizer, model_name
        # Ids the model can embed and, with a tokenizer, decode.
        self.vocab_size = int(sampler.model_config.vocab_size)
        if tokenizer is not None:
            self.vocab_size = min(self.vocab_size, len(tokenizer))
        self.info = {"vocab_size": self.vocab_size, "model": model_name}
        if tokenizer is not None:
            self.info["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
        self.info.update(info or {})
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._params, self._version = None, 0
        self.set_weights(params, version)
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self.requests = 0  # answered requests
        self.batches = 0  # sampler calls (merged requests count once)
        self.failed_requests = 0  # requests whose generation raised (answered 500)
        self.last_request_time = time.monotonic()
        self._stopping = threading.Event()
        self._worker_error: str | None = None
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

    @property
    def worker_alive(self) -> bool:
        return bool(self._threads) and self._threads[0].is_alive() and self._worker_error is None

    def check(self) -> None:
        """Raises WorkerDeadError if the generation thread has died (the sub job calls this every step)."""
        if self._threads and not self._stopping.is_set() and not self.worker_alive:
            raise WorkerDeadError(f"the generation service's worker thread died ({self._worker_error or 'no error'}"
                                  f"); {self.url} cannot serve the sub-agent any more")

    def health(self) -> dict[str, Any]:
        out = {"status": "ok", "policy_version": self.policy_version,
               "max_new_tokens": self.sampler.config.max_new_tokens,
               "max_prompt_tokens": self.sampler.config.prompt_buckets[-1], "requests": self.requests,
               "batches": self.batches, "failed_requests": self.failed_requests, "queued": self._queue.qsize(),
               **self.info}
        if self._threads and not self.worker_alive:
            out.update(status="dead", error=f"generation worker died: {self._worker_error or 'no error'}")
        return out

    # -- generation -------------------------------------------------------------------------------------

    def validate(self, prompts, stop_sequences, seed, names: tuple[str, str] = ("prompts", "stop_sequences")
                 ) -> _Request:
        """Checks one request's fields (RequestError naming the field, as `names` call the prompts and the stop
        sequences) and returns it normalized."""
        p_name, s_name = names
        if not isinstance(prompts, list):
            raise RequestError(f"{p_name} must be a list of token-id lists, got {type(prompts).__name__}", p_name)
        if len(prompts) > self.max_request_rows:
            raise RequestError(f"{len(prompts)} prompts in one request exceed the service's max_request_rows="
                               f"{self.max_request_rows}; split the request", p_name)
        cfg = self.sampler.config
        longest = cfg.prompt_buckets[-1]
        for i, p in enumerate(prompts):
            _token_ids(p, f"{p_name}[{i}]", self.vocab_size, p_name)
            if not p:
                raise RequestError(f"{p_name}[{i}] is empty; every prompt needs at least one token", p_name)
            if len(p) > longest and cfg.overflow == "error":
                raise RequestError(f"{p_name}[{i}] has {len(p)} tokens, more than the largest prompt bucket "
                                   f"{longest} of the sub-agent's sampler (sampler.prompt_buckets)", p_name)
        if not isinstance(stop_sequences, list):
            raise RequestError(f"{s_name} must be a list of token-id lists", s_name)
        if len(stop_sequences) > cfg.max_stop_sequences:
            raise RequestError(f"{len(stop_sequences)} stop sequences exceed the sampler's max_stop_sequences="
                               f"{cfg.max_stop_sequences}", s_name)
        for i, s in enumerate(stop_sequences):
            _token_ids(s, f"{s_name}[{i}]", self.vocab_size, s_name)
            if not 1 <= len(s) <= cfg.max_stop_tokens:
                raise RequestError(f"{s_name}[{i}] has {len(s)} tokens; each needs 1 to the sampler's "
                                   f"max_stop_tokens={cfg.max_stop_tokens}", s_name)
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise RequestError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}", "seed")
        return _Request([list(p) for p in prompts], tuple(tuple(s) for s in stop_sequences), seed)

    def submit(self, prompts: Sequence[Sequence[int]], stop_sequences: Sequence[Sequence[int]], seed: int,
               timeout_s: float | None = None, names: tuple[str, str] = ("prompts", "stop_sequences")
               ) -> tuple[list[Sample], int]:
        """Validates and queues one request, then waits for it (what the HTTP handler does).

        Returns (samples, version). Raises RequestError (a bad field), GenerationFailedError (the sampler raised),
        WorkerDeadError (the generation thread is dead) or TimeoutError (no answer within the timeout)."""
        req = self.validate(_listify(prompts), _listify(stop_sequences), _listify(seed), names)
        if not req.prompts:
            return [], self.policy_version
        self.check()
        self._queue.put(req)
        deadline = time.monotonic() + (self.request_timeout_s if timeout_s is None else timeout_s)
        while not req.done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            self.check()  # the worker died after this request was queued: answer now, not at the deadline
            if time.monotonic() >= deadline:
                raise TimeoutError("generation did not finish in time")
        if req.error is not None:
            raise req.error
        return req.samples, req.version

    def _generation_loop(self) -> None:
        pending: list[_Request] = []
        try:
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
                    try:
                        self._serve(stops, reqs)
                    except Exception as err:  # noqa: BLE001  a bug here must not take the service down
                        log.exception("generation service: serving %d request(s) failed", len(reqs))
                        for r in reqs:
                            if not r.done.is_set():
                                r.fail(GenerationFailedError(f"{type(err).__name__}: {err}"))
        except BaseException as err:  # noqa: BLE001  recorded: /health, submit() and check() report it
            self._worker_error = f"{type(err).__name__}: {err}"
            log.critical("the generation service's worker thread died: %s", self._worker_error)
        finally:
            if not self._stopping.is_set() and self._worker_error is None:
                self._worker_error = "the worker thread exited"
            dead = WorkerDeadError(f"the generation worker is gone ({self._worker_error or 'service stopping'})")
            for r in pending:
                if not r.done.is_set():
                    r.fail(dead)
            while True:  # whoever still waits gets an answer now
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item.fail(dead)

    def _serve(self, stops, reqs: list[_Request]) -> None:
        """One sampler call for requests with the same stop sequences; if it raises, each request alone."""
        with self._lock:
            params, version = self._params, self._version
        try:
            samples = self._generate(params, stops, reqs)
        except Exception as err:  # noqa: BLE001
            if len(reqs) > 1:
                log.warning("a merged generation of %d requests failed (%s: %s); serving them one by one", len(reqs),
                            type(err).__name__, err)
                for r in reqs:
                    self._serve(stops, [r])
                return
            log.warning("generation failed: %s: %s", type(err).__name__, err)
            self.failed_requests += 1
            reqs[0].fail(GenerationFailedError(f"generation failed: {type(err).__name__}: {err}"))
            return
        self.batches += 1
        start = 0
        for r in reqs:
            r.samples, r.version = samples[start:start + len(r.prompts)], version
            start += len(r.prompts)
            self.requests += 1
            r.done.set()
        self.last_request_time = time.monotonic()

    def _generate(self, params, stops, reqs: list[_Request]) -> list[Sample]:
        key = jax.random.key(reqs[0].seed)
        for r in reqs[1:]:
            key = jax.random.fold_in(key, r.seed)
        return self.sampler.generate(params, [p for r in reqs for p in r.prompts], key, [list(s) for s in stops])

    # -- HTTP -------------------------------------------------------------------------------------------

    def _handler_class(self):
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = service.client_timeout_s  # socket timeout: a silent client cannot hold a thread for ever

            def log_message(self, fmt, *args):  # the default logs every request to stderr
                log.debug("service: " + fmt, *args)

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def _error(self, err: RequestError, openai: bool) -> None:
                if openai:  # OpenAI's error object (its clients read error.message)
                    body = {"error": {"message": str(err), "type": "invalid_request_error" if err.status < 500
                                      else "server_error", "param": err.param, "code": err.code}}
                else:
                    body = {"error": str(err), "param": err.param}
                self._reply(err.status, body)

            def _body(self) -> dict:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    self.close_connection = True
                    raise RequestError("chunked request bodies are not supported; send a Content-Length", status=411)
                length = self.headers.get("Content-Length")
                if length is None:
                    self.close_connection = True
                    raise RequestError("a POST needs a Content-Length header", status=411)
                try:
                    n = int(length)
                except ValueError:
                    n = -1
                if n < 0:
                    self.close_connection = True
                    raise RequestError(f"bad Content-Length {length!r}")
                if n > service.max_body_bytes:
                    self.close_connection = True  # the body stays unread
                    raise RequestError(f"the body has {n} bytes, more than the service's max_body_bytes="
                                       f"{service.max_body_bytes}", status=413)
                try:
                    data = self.rfile.read(n)
                except (TimeoutError, socket.timeout):
                    self.close_connection = True
                    raise RequestError(f"the body did not arrive within {service.client_timeout_s}s (Content-Length "
                                       f"{n})", status=408) from None
                if len(data) < n:
                    self.close_connection = True
                    raise RequestError(f"the connection closed after {len(data)} of the {n} bytes of Content-Length")
                try:
                    body = json.loads(data or b"{}")
                except (ValueError, UnicodeDecodeError) as err:
                    raise RequestError(f"the body is not JSON: {err}") from None
                if not isinstance(body, dict):
                    raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
                return body

            def do_GET(self):
                path = self.path.split("?")[0].rstrip("/")
                openai = path.startswith("/v1")
                try:
                    if path == "/health":
                        health = service.health()
                        self._reply(200 if health["status"] == "ok" else 503, health)
                    elif path == "/v1/models":
                        self._reply(200, {"object": "list", "data": [service.model_card()]})
                    elif path.startswith("/v1/models/"):
                        name = path[len("/v1/models/"):]
                        if name != service.model_name:
                            raise RequestError(f"the model `{name}` does not exist; this service serves "
                                               f"`{service.model_name}`", "model", 404, "model_not_found")
                        self._reply(200, service.model_card())
                    elif path in ("/generate", "/v1/completions"):
                        raise RequestError(f"{path} takes POST", status=405)
                    else:
                        raise RequestError(f"no such endpoint {self.path}; GET /health or /v1/models", status=404)
                except RequestError as err:
                    self._error(err, openai)

            def do_POST(self):
                path = self.path.split("?")[0].rstrip("/")
                openai = path.startswith("/v1")
                try:
                    if path not in ("/generate", "/v1/completions"):
                        raise RequestError(f"no such endpoint {self.path}; POST /generate or /v1/completions",
                                           status=404)
                    body = self._body()
                    if path == "/generate":
                        self._reply(200, service.handle_generate(body))
                    else:
                        service.handle_completions(body, self)
                except RequestError as err:
                    self._error(err, openai)
                except GenerationFailedError as err:
                    self._error(RequestError(str(err), status=500), openai)
                except (WorkerDeadError, TimeoutError) as err:
                    self._error(RequestError(f"{type(err).__name__}: {err}", status=503), openai)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client left; nothing to answer
                except Exception as err:  # noqa: BLE001  a bug: answer it (and keep the connection usable)
                    log.exception("generation service: unexpected error on %s", path)
                    self._error(RequestError(f"internal error: {type(err).__name__}: {err}", status=500), openai)

        return Handler

    # -- endpoints --------------------------------------------------------------------------------------

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mgrpo_jax",
                "max_new_tokens": self.sampler.config.max_new_tokens,
                "max_prompt_tokens": self.sampler.config.prompt_buckets[-1]}

    def handle_generate(self, body: dict) -> dict:
        unknown = sorted(set(body) - {"prompts", "stop_sequences", "seed"})
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; /generate takes prompts, stop_sequences, seed",
                               unknown[0])
        if "prompts" not in body:
            raise RequestError("missing field `prompts` (a list of token-id lists)", "prompts")
        samples, version = self.submit(body["prompts"], body.get("stop_sequences", []), body.get("seed", 0))
        return {"samples": [{"tokens": s.tokens.tolist(), "logprobs": s.logprobs.tolist(),
                             "finish_reason": s.finish_reason, "prompt_truncated": int(s.prompt_truncated)}
                            for s in samples],
                "policy_version": version, "vocab_size": self.vocab_size,
                "tokenizer_fingerprint": self.info.get("tokenizer_fingerprint")}

    def handle_completions(self, body: dict, handler) -> None:
        """POST /v1/completions: answers through `handler` (JSON, or server-sent events when streaming)."""
        req = _CompletionRequest.parse(body, self)
        rows = [p for p in req.prompts for _ in range(req.n)]  # choice index = prompt index * n + j (OpenAI's order)
        samples, version = self.submit(rows, req.stop_token_ids, req.seed, names=("prompt", "stop_token_ids"))
        choices = [_Choice.build(s, req, self.tokenizer) for s in samples]
        prompt_tokens = sum(len(p) for p in req.prompts)
        completion_tokens = sum(len(c.tokens) for c in choices)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": f"mgrpo_jax-v{version}", "policy_version": version}
        if not req.stream:
            handler._reply(200, {**head, "choices": [c.json(i, req.logprobs is not None)
                                                     for i, c in enumerate(choices)], "usage": usage})
            return
        # Server-sent events in OpenAI's format. The sampler decodes a whole batch in one compiled loop, so the
        # events are written once the generation is complete (one per token): the format, not the latency.
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def event(payload) -> None:
            data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        usage_field = {"usage": None} if req.include_usage else {}
        for pos in range(max(len(c.tokens) for c in choices)):
            for i, c in enumerate(choices):
                if pos < len(c.tokens):
                    last = pos == len(c.tokens) - 1
                    event({**head, **usage_field, "choices": [c.json(i, req.logprobs is not None, pos, last)]})
        if req.include_usage:
            event({**head, "choices": [], "usage": usage})
        event("[DONE]")
        handler.wfile.write(b"0\r\n\r\n")


# ------------------------------------------------------------------------------------------------------
# /v1/completions
# ------------------------------------------------------------------------------------------------------

# Accepted only at the value that means "off" (anything else is a 400 naming the parameter).
_NEUTRAL = {"echo": (False,), "suffix": (None, ""), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
            "logit_bias": ({},)}
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "n", "best_of", "temperature", "top_p", "logprobs",
                      "stream", "stream_options", "stop", "stop_token_ids", "seed", "user", *_NEUTRAL}
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the completions API


@dataclasses.dataclass
class _CompletionRequest:
    prompts: list[list[int]]
    max_tokens: int
    n: int
    logprobs: int | None
    stream: bool
    include_usage: bool
    stop: list[str]
    stop_token_ids: list[list[int]]
    seed: int

    @classmethod
    def parse(cls, body: dict, service: GenerationService) -> _CompletionRequest:
        cfg = service.sampler.config
        unknown = sorted(set(body) - _COMPLETION_FIELDS)
        if unknown:
            raise RequestError(f"unsupported parameter {unknown[0]!r} (this service takes: "
                               f"{', '.join(sorted(_COMPLETION_FIELDS))})", unknown[0])
        for name, neutral in _NEUTRAL.items():
            if body.get(name) is not None and not any(body[name] == v and type(body[name]) is type(v)
                                                      for v in neutral):
                raise RequestError(f"{name}={body[name]!r} is not supported by this service (only "
                                   f"{neutral[0]!r})", name)
        model = body.get("model")
        if model is not None and model != service.model_name:
            raise RequestError(f"the model `{model}` does not exist; this service serves `{service.model_name}` "
                               "(GET /v1/models)", "model", 404, "model_not_found")

        def integer(name, default, lo, hi, why=""):
            value = body.get(name)
            if value is None:
                return default
            if not _is_int(value) or not lo <= value <= hi:
                raise RequestError(f"{name} must be an integer in [{lo}, {hi}]{why}, got {value!r}", name)
            return value

        def matches(name, compiled, what):
            value = body.get(name)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isclose(
                    value, compiled, rel_tol=1e-6, abs_tol=1e-6):
                raise RequestError(f"{name}={value!r}: this service samples with {name}={compiled} ({what}); "
                                   f"omit {name} or pass {compiled}", name)

        # The sampler compiles its temperature and top-p in; serving another would recompile per request, so they
        # are refused rather than silently ignored.
        matches("temperature", cfg.temperature, "the sub-agent sampler's compiled temperature")
        matches("top_p", cfg.top_p, "the sub-agent sampler's compiled top_p")
        max_tokens = integer("max_tokens", min(DEFAULT_MAX_TOKENS, cfg.max_new_tokens), 1, cfg.max_new_tokens,
                             " (the sub-agent sampler's max_new_tokens)")
        n = integer("n", 1, 1, service.max_request_rows)
        if body.get("best_of") is not None and body["best_of"] != n:
            raise RequestError(f"best_of={body['best_of']!r} is not supported (only best_of = n)", "best_of")
        logprobs = body.get("logprobs")
        if logprobs is not None and (not _is_int(logprobs) or logprobs != 0):
            raise RequestError(f"logprobs={logprobs!r}: this service returns the sampled tokens' log-probs "
                               "(logprobs=0), not the most likely alternatives (top_logprobs)", "logprobs")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not stream:
                raise RequestError("stream_options is only allowed with stream=true", "stream_options")
            if not isinstance(options, dict) or set(options) - {"include_usage"}:
                raise RequestError(f"stream_options takes only include_usage, got {options!r}", "stream_options")
            include_usage = bool(options.get("include_usage", False))
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"stop must be a non-empty string or a list of up to 4 of them, got {body['stop']!r}",
                               "stop")
        if stop and service.tokenizer is None:
            raise RequestError("stop strings need the service's tokenizer, and it has none; use stop_token_ids",
                               "stop")
        stop_ids = body.get("stop_token_ids")
        stop_ids = [] if stop_ids is None else stop_ids
        if isinstance(stop_ids, list) and all(_is_int(t) for t in stop_ids):
            stop_ids = [[t] for t in stop_ids]  # vLLM's form: each id stops on its own
        if not isinstance(stop_ids, list):
            raise RequestError("stop_token_ids must be a list of token ids or of token-id lists", "stop_token_ids")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(MAX_SEED + 1)  # OpenAI samples afresh unless given a seed
        elif not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise RequestError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}", "seed")
        if "prompt" not in body:
            raise RequestError("missing field `prompt`", "prompt")
        prompts = cls._prompts(body["prompt"], service)
        if len(prompts) * n > service.max_request_rows:
            raise RequestError(f"{len(prompts)} prompts x n={n} exceed the service's max_request_rows="
                               f"{service.max_request_rows}", "n")
        return cls(prompts, max_tokens, n, logprobs, stream, include_usage, stop, stop_ids, seed)

    @staticmethod
    def _prompts(prompt, service: GenerationService) -> list[list[int]]:
        """OpenAI's prompt forms: "text", ["text", ...], [ids], [[ids], ...] -> token-id lists (checked later)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt must be a string, a list of strings, a list of token ids or a list of "
                               "token-id lists, and not empty", "prompt")
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if service.tokenizer is None:
                    raise RequestError("string prompts need the service's tokenizer, and it has none; send token "
                                       "ids", "prompt")
                if not p:
                    raise RequestError(f"prompt {i} is an empty string", "prompt")
                p = list(service.tokenizer.encode(p, add_special_tokens=True))
            elif not isinstance(p, list):
                raise RequestError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}",
                                   "prompt")
            out.append(p)
        return out


@dataclasses.dataclass
class _Choice:
    """One completion: its tokens and log-probs, its text cut into one piece per token, its finish reason."""

    tokens: list[int]
    logprobs: list[float]
    pieces: list[str]  # "".join(pieces) == text; piece i: the text token i completes (when stream/logprobs/stop)
    token_strings: list[str]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @classmethod
    def build(cls, sample: Sample, req: _CompletionRequest, tokenizer) -> _Choice:
        tokens, logprobs = sample.tokens.tolist(), sample.logprobs.tolist()
        reason = "length" if sample.finish_reason == "length" else "stop"
        if len(tokens) > req.max_tokens:  # the sampler always decodes to max_new_tokens; the request wants fewer
            tokens, logprobs, reason = tokens[:req.max_tokens], logprobs[:req.max_tokens], "length"
        if req.stream or req.logprobs is not None or req.stop:
            pieces = _text_pieces(tokens, tokenizer)
        else:  # only the whole text is needed
            text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
            pieces = [text] + [""] * (len(tokens) - 1)
        if req.stop:  # OpenAI's stop strings end the text before them; the tokens up to the one completing it stay
            text, longest = "", max(len(s) for s in req.stop)
            for i, piece in enumerate(pieces):
                begin = max(0, len(text) - longest + 1)  # a stop string may start in earlier pieces
                text += piece
                hits = [h for h in (text.find(s, begin) for s in req.stop) if h >= 0]
                if hits:
                    tokens, logprobs, pieces, reason = tokens[:i + 1], logprobs[:i + 1], pieces[:i + 1], "stop"
                    excess = len(text) - min(hits)
                    for j in range(i, -1, -1):  # cut the text at the stop string, from the last piece back
                        take = min(excess, len(pieces[j]))
                        pieces[j], excess = pieces[j][:len(pieces[j]) - take], excess - take
                        if not excess:
                            break
                    break
        strings = [tokenizer.decode([t], skip_special_tokens=False) for t in tokens] \
            if tokenizer is not None and req.logprobs is not None else [""] * len(tokens)
        return cls(tokens, logprobs, pieces, strings, reason)

    def json(self, index: int, with_logprobs: bool, pos: int | None = None, last: bool = True) -> dict:
        """The choice (pos=None) or its pos-th streamed chunk."""
        span = slice(None) if pos is None else slice(pos, pos + 1)
        offsets = np.cumsum([0] + [len(p) for p in self.pieces[:-1]]).tolist() if self.pieces else []
        logprobs = None
        if with_logprobs:
            logprobs = {"tokens": self.token_strings[span], "token_logprobs": self.logprobs[span],
                        "top_logprobs": None, "text_offset": offsets[span]}
        return {"index": index, "text": "".join(self.pieces[span]), "logprobs": logprobs,
                "finish_reason": self.finish_reason if last else None, "token_ids": self.tokens[span]}


def _text_pieces(tokens: list[int], tokenizer) -> list[str]:
    """The decoded text split by token: piece i is what token i adds (empty while a multi-byte character is still
    incomplete, the whole character with the token that completes it). "".join == decode(tokens)."""
    if tokenizer is None or not tokens:
        return [""] * len(tokens)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    pieces, emitted = [], ""
    for i in range(len(tokens)):
        text = tokenizer.decode(tokens[:i + 1], skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            pieces.append("")
            continue
        pieces.append(text[len(emitted):])
        emitted = text
    if full.startswith(emitted):
        pieces[-1] += full[len(emitted):]
    else:  # decoding a prefix changed earlier text: keep the text right, give it to the last token
        pieces = [""] * (len(tokens) - 1) + [full]
    return pieces


# ------------------------------------------------------------------------------------------------------
# client
# ------------------------------------------------------------------------------------------------------


class _BadAnswer(Exception):
    """A response that is not the JSON object it should be (retried: a proxy or a restart can cause it)."""


class RemoteSubPolicy:
    """The controller's `Policy` for a sub-agent served by a `GenerationService` (or anything with its
    /generate shape).

    generate() POSTs one request; a connection error, timeout, 5xx or a body that is not JSON is retried with
    exponential backoff until `deadline_s` has passed since the call began, then `ServiceUnavailableError` (the
    controller turns it into failed delegations). A 4xx (a bad request) raises ValueError at once. An answer that
    parses but cannot be right (a sample count, token ids outside [0, vocab_size), token and log-prob counts that
    differ, a non-finite or positive log-prob, more tokens than max_new_tokens) raises
    `InvalidServiceResponseError` at once: those delegations fail and are counted, and none of it is recorded.
    A service whose tokenizer fingerprint differs from `tokenizer_fingerprint` raises `TokenizerMismatchError`
    (checked on every answer, so also when the service comes up after this job started).

    version: the sub-agent policy version of the service's latest answer (it can go down: a restarted sub job
    resumes from its checkpoint). Each returned sample is a `ServedSample` carrying its own version.
    max_new_tokens / max_prompt_tokens: the service's sampler limits (the controller's context checks use them).
    vocab_size / tokenizer_fingerprint: this job's tokenizer (`expect_tokenizer`); None skips those checks.
    """

    def __init__(self, url: str, *, max_new_tokens: int, max_prompt_tokens: int, deadline_s: float = 120.0,
                 request_timeout_s: float = 60.0, initial_backoff_s: float = 0.1, max_backoff_s: float = 2.0,
                 vocab_size: int | None = None, tokenizer_fingerprint: str | None = None):
        self.url = url.rstrip("/")
        self.max_new_tokens, self.max_prompt_tokens = int(max_new_tokens), int(max_prompt_tokens)
        self.deadline_s, self.request_timeout_s = deadline_s, request_timeout_s
        self.initial_backoff_s, self.max_backoff_s = initial_backoff_s, max_backoff_s
        self.vocab_size, self.tokenizer_fingerprint = vocab_size, tokenizer_fingerprint
        self.version = 0
        self.failures = 0  # calls that gave up (ServiceUnavailableError)
        self.retries = 0  # attempts that failed and were retried
        self.invalid_responses = 0  # answers refused (InvalidServiceResponseError)

    def expect_tokenizer(self, tokenizer) -> None:
        """Checks every answer against this tokenizer: ids in [0, len(tokenizer)), the same fingerprint."""
        self.vocab_size, self.tokenizer_fingerprint = len(tokenizer), tokenizer_fingerprint(tokenizer)

    def update(self, params=None, version: int | None = None) -> None:
        """No-op: the sub job owns the weights (kept for the `SamplerPolicy` interface)."""

    def _call(self, method: str, path: str, body: dict | None, timeout_s: float) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
            try:
                out = json.loads(raw)
            except ValueError as err:
                raise _BadAnswer(f"answered {resp.status} with a body that is not JSON ({err}; content-type "
                                 f"{resp.headers.get('Content-Type')!r}, starts {raw[:120]!r})") from None
        if not isinstance(out, dict):
            raise _BadAnswer(f"answered {resp.status} with JSON that is not an object ({type(out).__name__})")
        return out

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
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError, _BadAnswer,
                    http.client.HTTPException) as err:
                last = err
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise ServiceUnavailableError(
                    f"sub-agent generation service {self.url}{path} unreachable or unusable for {time.monotonic() - start:.1f}s "
                    f"({attempt} attempts; last error: {type(last).__name__}: {last}). Is the sub job "
                    "(launch/train.py --role sub) running and is decoupled.service_url right?") from None
            self.retries += 1
            wait = min(backoff, self.max_backoff_s, left)
            log.warning("generation service %s%s unusable (attempt %d: %s); retrying in %.2fs, giving up in "
                        "%.1fs", self.url, path, attempt, last, wait, left)
            time.sleep(wait)
            backoff *= 2

    def _invalid(self, path: str, problem: str) -> InvalidServiceResponseError:
        self.invalid_responses += 1
        err = InvalidServiceResponseError(f"sub-agent generation service {self.url}{path} answered with {problem}; "
                                          "the answer is discarded (those delegations fail)")
        log.error("%s", err)
        return err

    def _check_service(self, out: dict, path: str) -> int:
        """The answer's tokenizer fingerprint and policy version (common to /health and /generate)."""
        theirs = out.get("tokenizer_fingerprint")
        if self.tokenizer_fingerprint is not None and theirs is not None and theirs != self.tokenizer_fingerprint:
            raise TokenizerMismatchError(
                f"the sub job at {self.url} tokenizes differently (vocabulary fingerprint {theirs} vs this job's "
                f"{self.tokenizer_fingerprint}): token ids cross between the jobs, so both must use the same "
                "tokenizer (same config.tokenizer / task settings)")
        version = out.get("policy_version")
        if not _is_int(version):
            raise self._invalid(path, f"policy_version={version!r} (not an integer)")
        return version

    def health(self, deadline_s: float | None = None) -> dict:
        """GET /health (retried like generate). Checks the tokenizer fingerprint; updates `version`."""
        out = self._with_retries("GET", "/health", None, self.deadline_s if deadline_s is None else deadline_s)
        self.version = self._check_service(out, "/health")
        return out

    def refresh_version(self) -> int:
        """Best effort: the service's current version (unchanged when it is down)."""
        try:
            self.health(deadline_s=min(5.0, self.deadline_s))
        except GenerationUnavailableError:
            pass
        return self.version

    def generate(self, prompts, rng, stop_sequences) -> list[ServedSample]:
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
        version = self._check_service(out, "/generate")
        samples = self._samples(out.get("samples"), len(prompts), version)
        self.version = version
        return samples

    def _samples(self, raw, n_prompts: int, version: int) -> list[ServedSample]:
        """Validates the /generate answer's samples (InvalidServiceResponseError naming the first problem)."""
        if not isinstance(raw, list) or len(raw) != n_prompts:
            got = f"{len(raw)} samples" if isinstance(raw, list) else f"samples={type(raw).__name__}"
            raise self._invalid("/generate", f"{got} for {n_prompts} prompts")
        vocab = self.vocab_size
        out = []
        for i, s in enumerate(raw):
            if not isinstance(s, dict) or not isinstance(s.get("tokens"), list) \
                    or not isinstance(s.get("logprobs"), list):
                raise self._invalid("/generate", f"sample {i} without token and log-prob lists")
            tokens, logprobs, reason = s["tokens"], s["logprobs"], s.get("finish_reason")
            if len(tokens) != len(logprobs):
                raise self._invalid("/generate", f"sample {i}: {len(tokens)} tokens but {len(logprobs)} log-probs")
            if not 1 <= len(tokens) <= self.max_new_tokens:
                raise self._invalid("/generate", f"sample {i}: {len(tokens)} tokens (1 to max_new_tokens="
                                    f"{self.max_new_tokens} expected)")
            bad = [t for t in tokens if not _is_int(t) or not 0 <= t < (vocab if vocab is not None else 2**31)]
            if bad:
                raise self._invalid("/generate", f"sample {i}: token id {bad[0]!r} outside the vocabulary "
                                    f"[0, {vocab if vocab is not None else 2**31})")
            lp = np.asarray([x if isinstance(x, (int, float)) and not isinstance(x, bool) else np.nan
                             for x in logprobs], np.float64)
            if not np.all(np.isfinite(lp)) or np.any(lp > MAX_LOGPROB):
                worst = next(x for x, v in zip(logprobs, lp) if not np.isfinite(v) or v > MAX_LOGPROB)
                raise self._invalid("/generate", f"sample {i}: log-prob {worst!r} (finite and <= 0 expected)")
            if reason not in FINISH_REASONS:
                raise self._invalid("/generate", f"sample {i}: finish_reason {reason!r} (one of "
                                    f"{list(FINISH_REASONS)} expected)")
            truncated = s.get("prompt_truncated", 0)
            out.append(ServedSample(np.asarray(tokens, np.int32), lp.astype(np.float32), reason,
                                    int(truncated) if _is_int(truncated) else 0, version))
        return out
