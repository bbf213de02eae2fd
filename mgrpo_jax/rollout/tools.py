"""Tools the agents call: local BM25 search, document reading, and a client for Search-R1's retrieval service.

Every tool maps an argument string (what the agent wrote inside its action tag) to an observation string.
A tool call never raises and never hangs: a failure becomes an error observation the agent can read,

    [search error: timed out after 5.0s]
    [read error: unknown doc id 'doc-99999'; use an id from the search results]

and is counted per tool (`Tool.stats()`: calls, errors, bad_arguments, timeouts). `call_many` runs a batch of
calls concurrently with one deadline; `call_outcomes` does the same and says how each call ended
(`ToolOutcome.status`), which is what separates the model's mistakes from infrastructure failures:

    "ok"            the tool answered
    "bad_argument"  ToolInputError: the agent's argument cannot be used (empty query, unknown doc id). The
                    model's fault: the observation is ordinary learning signal.
    "timeout"       the call ran out of its time budget (a hung tool, a service that does not answer)
    "error"         any other exception: RetrievalError (the service failed or answered nonsense), connection
                    errors (OSError, URLError), a bug in the tool. Not the model's fault.

"timeout" and "error" are infrastructure failures (`ToolOutcome.infra_failure`): the controller marks every
trajectory they touch (`Trajectory.infra_failures`) so that an outage does not become learning signal, and
stops a step in which too large a share of calls failed. `Tool.check()` makes one real call at start-up (a
retriever that does not answer fails the run before any model is built).

The HTTP API is Search-R1's `/retrieve` (so its dense retrievers plug in unchanged):

    POST /retrieve  {"queries": ["...", ...], "topk": 3, "return_scores": true}
    200 {"result": [[{"document": {"id": "doc-1", "contents": "\\"Title\\"\\ntext"}, "score": 7.1}, ...], ...]}

(without return_scores each hit is the bare document). `serve_local_search` serves that API over a
`LocalSearch` from a thread; `HttpRetriever` is the client (standard library only).

Host-side only: nothing here imports JAX (see `_import_bm25s` for why that takes care).
"""
from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import logging
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, wait
from typing import Any

from mgrpo_jax.data.corpus import Document, check_unique_ids, split_contents

log = logging.getLogger(__name__)

_DEFAULT = object()  # "use the tool's own timeout_s"
_MAX_ERROR_CHARS = 300


class ToolInputError(ValueError):
    """The agent's argument cannot be used (empty query, unknown doc id). Counted as a bad argument, not a
    tool failure: it measures the policy, not the infrastructure."""


class ToolTimeout(TimeoutError):
    """A tool ran out of its time budget on its own (e.g. an HTTP retry loop). Counted as a timeout."""


class RetrievalError(RuntimeError):
    """The retrieval service failed: it did not answer, or not with a usable `/retrieve` response."""


class ToolCheckError(RuntimeError):
    """A tool failed its start-up check (`Tool.check`); the message names the tool and what to fix."""


OUTCOME_STATUSES = ("ok", "bad_argument", "timeout", "error")
INFRA_FAILURE_STATUSES = ("timeout", "error")  # not the model's fault (module docstring)


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """How one call ended: the observation the agent sees and a status of OUTCOME_STATUSES."""

    tool: str
    observation: str
    status: str

    @property
    def infra_failure(self) -> bool:
        """A timeout or a tool/service error: infrastructure, not the model's argument."""
        return self.status in INFRA_FAILURE_STATUSES


@dataclasses.dataclass
class ToolStats:
    """Counters of one tool since construction or the last `reset_stats`. Every call lands in exactly one
    of: ok, errors (the tool failed), bad_arguments (ToolInputError), timeouts."""

    calls: int = 0
    errors: int = 0
    bad_arguments: int = 0
    timeouts: int = 0
    busy_s: float = 0.0  # summed wall time of the calls, batched calls sharing their batch's time


def error_observation(tool_name: str, message: str) -> str:
    """The observation an agent sees for a failed call: `[<tool> error: <message>]`."""
    message = " ".join(str(message).split())  # one line: observations are embedded in prompts
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 3] + "..."
    return f"[{tool_name} error: {message}]"


def is_error_observation(observation: str, tool_name: str | None = None) -> bool:
    """Whether `observation` is an error observation (of `tool_name`, or of any tool when None)."""
    if tool_name is not None:
        return observation.startswith(f"[{tool_name} error: ")
    head, _, _ = observation.partition(" error: ")
    return observation.startswith("[") and head[1:].isidentifier() and observation.endswith("]")


def _check_timeout(timeout_s):
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
    return timeout_s


class Tool:
    """A named tool: `tool(argument) -> observation`, `tool.call_many(arguments) -> observations`.

    Subclasses implement `run(argument) -> str`, which may raise (ToolInputError for a bad argument, any
    other exception for a failure), and may implement `run_batch(arguments) -> list[str | Exception]` to
    serve a whole `call_many` in one go (one BM25 pass, one HTTP request); a batched tool sets
    `batched = True`. A subclass that can be probed returns an argument from `probe_argument()` (used by
    `check()` at start-up) and says what to fix in `check_hint()`.

    Every call runs in a daemon thread and the caller waits at most `timeout_s`: a hung call is abandoned
    (its thread keeps running; daemon, so it cannot hold up interpreter exit, which is why this does not
    use a ThreadPoolExecutor, whose workers are joined at exit). At most `max_concurrency` calls of this
    tool run at once; calls queued behind them spend their own timeout waiting.
    """

    batched = False

    def __init__(self, name: str, *, timeout_s: float | None = 30.0, max_concurrency: int = 16):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"tool name must be an identifier (it appears in error observations), got {name!r}")
        _check_timeout(timeout_s)
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        self.name = name
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._stats = ToolStats()
        self._stats_lock = threading.Lock()

    # -- to implement -------------------------------------------------------------------------------------

    def run(self, argument: str) -> str:
        raise NotImplementedError

    def run_batch(self, arguments: Sequence[str]) -> list[str | BaseException]:
        raise NotImplementedError

    # -- calling ------------------------------------------------------------------------------------------

    def __call__(self, argument: str) -> str:
        return self.call_many([argument])[0]

    def call_many(self, arguments: Sequence[str], *, timeout_s: float | None = _DEFAULT) -> list[str]:
        """Runs one call per argument concurrently; returns one observation per argument, in order.

        Args:
          arguments: the agents' argument strings.
          timeout_s: the most the caller waits for this batch (default: the tool's `timeout_s`; None waits
            for as long as the calls take).

        Returns:
          list[str], len(arguments): each the tool's output or an error observation. Never raises for a
          failing or slow tool; raises TypeError only for a non-str argument (a caller bug).
        """
        return [o.observation for o in self.call_outcomes(arguments, timeout_s=timeout_s)]

    def call_outcomes(self, arguments: Sequence[str], *, timeout_s: float | None = _DEFAULT) -> list[ToolOutcome]:
        """`call_many`, with how each call ended: one ToolOutcome per argument, in order."""
        args = list(arguments)
        for a in args:
            if not isinstance(a, str):
                raise TypeError(f"{self.name}: tool arguments must be str, got {type(a).__name__}")
        if not args:
            return []
        timeout = self.timeout_s if timeout_s is _DEFAULT else _check_timeout(timeout_s)
        if self.batched:
            jobs = [(list(range(len(args))), lambda: self.run_batch(args))]
        else:
            jobs = [([i], lambda a=a: [self.run(a)]) for i, a in enumerate(args)]

        abandoned = threading.Event()  # set once the caller stops waiting, so queued jobs never start
        futures = []
        start = time.monotonic()
        for _, job in jobs:
            fut: Future = Future()
            threading.Thread(target=self._worker, args=(job, fut, abandoned), daemon=True,
                             name=f"tool-{self.name}").start()
            futures.append(fut)
        done, _ = wait(futures, timeout=timeout)
        abandoned.set()
        elapsed = time.monotonic() - start

        outcomes: list[str | BaseException | None] = [None] * len(args)
        for (indices, _), fut in zip(jobs, futures):
            if fut in done:
                exc = fut.exception()
                results = [exc] * len(indices) if exc is not None else fut.result()
                if exc is None and len(results) != len(indices):
                    bad = RuntimeError(f"run_batch returned {len(results)} results for {len(indices)} arguments")
                    results = [bad] * len(indices)
            else:
                results = [ToolTimeout()] * len(indices)
            for i, r in zip(indices, results):
                outcomes[i] = r
        return self._observe(outcomes, timeout, elapsed)

    def _worker(self, job, fut: Future, abandoned: threading.Event) -> None:
        with self._slots:
            if abandoned.is_set():  # the caller gave up while this job waited for a slot
                fut.set_exception(ToolTimeout())
                return
            try:
                fut.set_result(job())
            except BaseException as e:  # noqa: BLE001 - every failure becomes an observation
                fut.set_exception(e)

    def _observe(self, outcomes, timeout: float | None, elapsed_s: float) -> list[ToolOutcome]:
        """Turns results and exceptions into observations with a status, and counts them (all counting happens
        here, once per call, so a result that arrives after its deadline is never counted twice)."""
        out = []
        counts = ToolStats(calls=len(outcomes), busy_s=elapsed_s)
        for r in outcomes:
            if isinstance(r, str):
                out.append(ToolOutcome(self.name, r, "ok"))
            elif isinstance(r, ToolTimeout):
                counts.timeouts += 1
                after = f" after {timeout:.1f}s" if timeout is not None else ""
                out.append(ToolOutcome(self.name, error_observation(self.name, f"timed out{after}"), "timeout"))
            elif isinstance(r, ToolInputError):
                counts.bad_arguments += 1
                out.append(ToolOutcome(self.name, error_observation(self.name, str(r)), "bad_argument"))
            else:  # RetrievalError, OSError, a bug in the tool: infrastructure (module docstring)
                counts.errors += 1
                if isinstance(r, BaseException):
                    msg = f"{type(r).__name__}: {r}" if str(r) else type(r).__name__
                else:
                    msg = f"tool returned {type(r).__name__}, not str"
                log.debug("tool %s failed: %s", self.name, msg)
                out.append(ToolOutcome(self.name, error_observation(self.name, msg), "error"))
        with self._stats_lock:
            for f in dataclasses.fields(ToolStats):
                setattr(self._stats, f.name, getattr(self._stats, f.name) + getattr(counts, f.name))
        return out

    # -- start-up check -----------------------------------------------------------------------------------

    def probe_argument(self) -> str | None:
        """An argument for `check`'s real call (None: this tool has nothing to probe)."""
        return None

    def check_hint(self) -> str:
        """What to fix when `check` fails (subclasses name their service or data)."""
        return "check the tool's configuration"

    def check(self) -> None:
        """One real call with `probe_argument()`, for start-up: raises ToolCheckError naming the tool, what
        failed and `check_hint()` unless the tool answers normally. Counted in `stats()` like any call."""
        probe = self.probe_argument()
        if probe is None:
            return
        outcome = self.call_outcomes([probe])[0]
        if outcome.status != "ok":
            raise ToolCheckError(f"tool {self.name!r} failed its start-up check: a probe call ({probe!r}) ended "
                                 f"with {outcome.status}: {outcome.observation}; {self.check_hint()}")

    # -- counters -----------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """A snapshot of the counters: {"calls", "errors", "bad_arguments", "timeouts", "busy_s"}."""
        with self._stats_lock:
            return dataclasses.asdict(self._stats)

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = ToolStats()


# ------------------------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One retrieved document and its retriever score (higher is better; None if the service gave none)."""

    doc: Document
    score: float | None


def format_hits(hits: Sequence[SearchHit], *, snippet_chars: int, max_chars: int) -> str:
    """The observation for a search: one line per hit, `Doc i (id: ...) "Title": snippet`.

    The snippet is the start of the document, cut at a word boundary; hits that do not fit in
    `max_chars` are left out (the first one is cut instead), so the observation never exceeds max_chars.
    """
    if not hits:
        return "No results for this query."
    lines = []
    used = 0
    for i, hit in enumerate(hits, 1):
        text = hit.doc.text
        if len(text) > snippet_chars:
            cut = text[:snippet_chars].rsplit(" ", 1)[0] or text[:snippet_chars]
            text = cut + " ..."
        line = f'Doc {i} (id: {hit.doc.doc_id}) "{hit.doc.title}": {text}'
        extra = len(line) + (1 if lines else 0)
        if used + extra > max_chars:
            if not lines:
                lines.append(line[: max(0, max_chars - 4)] + " ...")
            break
        lines.append(line)
        used += extra
    return "\n".join(lines)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_query(query) -> str:
    if not isinstance(query, str):
        raise TypeError(f"a search query must be str, got {type(query).__name__}")
    query = query.strip()
    if not query:
        raise ToolInputError("empty query; write the words to search for")
    return query


_IMPORT_LOCK = threading.Lock()


def _import_bm25s():
    """Imports bm25s without letting it import JAX.

    bm25s imports jax at import time when it can (an optional top-k accelerator) and runs a jax op right
    away, which initializes a device backend: in a tool server that grabs an accelerator, and in a trainer
    it can run before `jax.distributed.initialize`. A None entry in sys.modules makes `import jax` fail
    inside bm25s, which then falls back to NumPy; the real entries are put back at once. (The window is the
    bm25s import only; it happens once per process.)
    """
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    with _IMPORT_LOCK:
        hidden = {name: mod for name, mod in sys.modules.items() if name == "jax" or name.startswith("jax.")}
        sys.modules["jax"] = None  # type: ignore[assignment]
        try:
            import bm25s
        finally:
            del sys.modules["jax"]
            sys.modules.update(hidden)
        # bm25s sets its own logger to DEBUG at import, which floods a run's log with a line per index build
        # and per empty query; WARNING is the quiet default (set it lower after the first search to debug).
        logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class SearchTool(Tool):
    """A search tool whose subclasses implement `retrieve_many(queries) -> [[SearchHit]]`: a turn's queries go
    out in one batch (one BM25 pass, one HTTP request). Bad queries answer alone with an input error; a failed
    retrieval fails every query it carried. Subclasses set `snippet_chars` and `max_chars`."""

    batched = True
    top_k: int
    snippet_chars: int
    max_chars: int

    def retrieve_many(self, queries: Sequence[str], k: int | None = None) -> list[list[SearchHit]]:
        raise NotImplementedError

    def probe_argument(self) -> str:
        return "test"

    def _checked(self, queries: Sequence[str], k: int | None) -> tuple[list[str], int]:
        """Validated queries and k (default `top_k`); raises ToolInputError / ValueError."""
        k = self.top_k if k is None else k
        _check_positive_int("k", k)
        return [_check_query(q) for q in queries], k

    def run(self, argument: str) -> str:
        return self.run_batch([argument])[0]

    def run_batch(self, arguments: Sequence[str]) -> list[str | BaseException]:
        out: list[str | BaseException | None] = [None] * len(arguments)
        good = []
        for i, a in enumerate(arguments):
            try:
                _check_query(a)
                good.append(i)
            except ToolInputError as e:
                out[i] = e
        if good:
            try:
                hits = self.retrieve_many([arguments[i] for i in good])
            except Exception as e:  # noqa: BLE001 - one failed request fails every query it carried
                hits = [e] * len(good)
            for i, h in zip(good, hits):
                out[i] = h if isinstance(h, BaseException) else format_hits(
                    h, snippet_chars=self.snippet_chars, max_chars=self.max_chars)
        return out


class LocalSearch(SearchTool):
    """BM25 search over an in-memory corpus (the `bm25s` library, NumPy backend), as the `search` tool.

    Args:
      documents: the corpus (unique doc ids).
      top_k: hits per query (clamped to the corpus size). Hits with score 0 (no query term) are left out.
      snippet_chars: characters of each hit's text shown in the observation.
      max_chars: bound on the whole observation.
      k1, b: BM25 parameters (bm25s' "lucene" variant).
      name, timeout_s, max_concurrency: see Tool.

    Queries are lowercased, split on word characters and stripped of English stop words, like the corpus.
    """

    def __init__(self, documents: Iterable[Document], *, top_k: int = 3, snippet_chars: int = 200,
                 max_chars: int = 2000, k1: float = 1.5, b: float = 0.75, name: str = "search",
                 timeout_s: float | None = 30.0, max_concurrency: int = 16):
        super().__init__(name, timeout_s=timeout_s, max_concurrency=max_concurrency)
        for key, value in (("top_k", top_k), ("snippet_chars", snippet_chars), ("max_chars", max_chars)):
            _check_positive_int(key, value)
        self.documents: tuple[Document, ...] = tuple(check_unique_ids(documents))
        if not self.documents:
            raise ValueError("LocalSearch needs at least one document")
        self.top_k, self.snippet_chars, self.max_chars = top_k, snippet_chars, max_chars
        bm25s = _import_bm25s()
        self._bm25s = bm25s
        self._index = bm25s.BM25(k1=k1, b=b, backend="numpy")
        # Titles are indexed with the text: an entity's name is the first thing an agent searches for.
        corpus_tokens = self._tokenize([f"{d.title}\n{d.text}" for d in self.documents])
        if not any(corpus_tokens):  # bm25s would fail deep inside with "max() arg is an empty sequence"
            raise ValueError(f"LocalSearch: none of the {len(self.documents)} documents has a searchable word (they "
                             "are empty or only stop words); give the corpus documents with text")
        self._index.index(corpus_tokens, show_progress=False)
        self._vocab = set(self._index.vocab_dict)
        self._lock = threading.Lock()  # bm25s does not document thread safety; retrieval is fast anyway

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def retrieve_many(self, queries: Sequence[str], k: int | None = None) -> list[list[SearchHit]]:
        """Top-k hits for each query, best first. Raises ToolInputError for an empty query."""
        queries, k = self._checked(queries, k)
        if not queries:
            return []
        k = min(k, len(self.documents))
        # Unknown words carry no BM25 weight; dropping them keeps bm25s from seeing out-of-vocabulary tokens.
        tokens = [[t for t in q if t in self._vocab] for q in self._tokenize(queries)]
        with self._lock:
            ids, scores = self._index.retrieve(tokens, k=k, show_progress=False, backend_selection="numpy",
                                               n_threads=0)
        return [[SearchHit(self.documents[int(i)], float(s)) for i, s in zip(row_ids, row_scores) if s > 0]
                for row_ids, row_scores in zip(ids, scores)]

    def retrieve(self, query: str, k: int | None = None) -> list[SearchHit]:
        return self.retrieve_many([query], k)[0]

    def check_hint(self) -> str:
        return f"the BM25 index over {len(self.documents)} documents does not answer; check the corpus"


class ReadDocument(Tool):
    """The `read` tool: the full text of one document, by doc id (or by exact title).

    Args:
      documents: the corpus (e.g. `LocalSearch.documents`).
      max_chars: longer documents are cut and end with " ... [truncated]".
    """

    def __init__(self, documents: Iterable[Document], *, max_chars: int = 4000, name: str = "read",
                 timeout_s: float | None = 30.0, max_concurrency: int = 16):
        super().__init__(name, timeout_s=timeout_s, max_concurrency=max_concurrency)
        _check_positive_int("max_chars", max_chars)
        docs = check_unique_ids(documents)
        self.max_chars = max_chars
        self._by_id = {d.doc_id: d for d in docs}
        self._by_title: dict[str, Document] = {}
        for d in docs:
            self._by_title.setdefault(d.title, d)  # first wins, so a repeated title reads deterministically

    def run(self, argument: str) -> str:
        key = argument.strip().strip("\"'`").strip()
        if not key:
            raise ToolInputError("empty doc id; pass an id from the search results, e.g. 'doc-00012'")
        doc = self._by_id.get(key) or self._by_title.get(key)
        if doc is None:
            raise ToolInputError(f"unknown doc id {key!r}; use an id from the search results")
        out = f'"{doc.title}" (id: {doc.doc_id})\n{doc.text}'
        if len(out) > self.max_chars:
            out = out[: self.max_chars - len(" ... [truncated]")] + " ... [truncated]"
        return out

    def probe_argument(self) -> str | None:
        return next(iter(self._by_id), None)

    def check_hint(self) -> str:
        return "check the corpus"


# -------------------------------------------------------------------------------------- HTTP client


def _parse_hit(item: Any) -> SearchHit:
    """One hit of a `/retrieve` response: {"document": {...}, "score": s} or a bare document."""
    if isinstance(item, Mapping) and "document" in item:
        doc, score = item["document"], item.get("score")
    else:
        doc, score = item, None
    if not isinstance(doc, Mapping):
        raise RetrievalError(f"a hit must be a JSON object, got {type(doc).__name__}")
    doc_id = str(doc.get("id", doc.get("doc_id", "")))
    if "title" in doc and "text" in doc:
        title, text = str(doc["title"]), str(doc["text"])
    elif "contents" in doc:
        title, text = split_contents(str(doc["contents"]))
    else:
        raise RetrievalError(f"a hit has neither 'contents' nor 'title'+'text': {sorted(doc)}")
    if score is not None and not isinstance(score, (int, float)):
        score = float(score)  # some servers send numpy floats as strings
    return SearchHit(Document(doc_id or "?", title, text), None if score is None else float(score))


class HttpRetriever(SearchTool):
    """Client of a Search-R1-compatible `/retrieve` service, as the `search` tool (standard library only).

    A `call_many` sends one POST for the whole batch. Each attempt waits at most `attempt_timeout_s`;
    connection errors, timeouts, HTTP 429 and 5xx are retried up to `retries` times with exponential
    backoff (`backoff_s`, 2 x backoff_s, ...), all within the tool's `timeout_s` budget. Other HTTP errors
    and malformed responses fail at once.

    Args:
      url: the service, "http://host:port" or ".../retrieve".
      top_k, snippet_chars, max_chars: as in LocalSearch.
      use_env_proxy: route through the http_proxy/https_proxy of the environment. Off by default: the
        retriever normally sits on the cluster network, and a proxy meant for the internet would carry (or
        refuse) that traffic.
    """

    def __init__(self, url: str, *, top_k: int = 3, snippet_chars: int = 200, max_chars: int = 2000,
                 timeout_s: float | None = 10.0, attempt_timeout_s: float = 5.0, retries: int = 2,
                 backoff_s: float = 0.2, use_env_proxy: bool = False, name: str = "search",
                 max_concurrency: int = 16):
        super().__init__(name, timeout_s=timeout_s, max_concurrency=max_concurrency)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        for key, value in (("top_k", top_k), ("snippet_chars", snippet_chars), ("max_chars", max_chars)):
            _check_positive_int(key, value)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        for key, value in (("attempt_timeout_s", attempt_timeout_s), ("backoff_s", backoff_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    key == "attempt_timeout_s" and value == 0):
                raise ValueError(f"{key} must be a number of seconds (> 0 for a timeout), got {value!r}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/retrieve") else url + "/retrieve"
        self.top_k, self.snippet_chars, self.max_chars = top_k, snippet_chars, max_chars
        self.attempt_timeout_s, self.retries, self.backoff_s = float(attempt_timeout_s), retries, float(backoff_s)
        handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    def retrieve_many(self, queries: Sequence[str], k: int | None = None) -> list[list[SearchHit]]:
        """Top-k hits per query from the service. Raises ToolTimeout, RetrievalError or OSError on failure."""
        queries, k = self._checked(queries, k)
        if not queries:
            return []
        body = json.dumps({"queries": queries, "topk": k, "return_scores": True}).encode()
        payload = self._post(body)
        result = payload.get("result") if isinstance(payload, Mapping) else None
        if not isinstance(result, list) or len(result) != len(queries):
            got = f"{len(result)} result lists" if isinstance(result, list) else repr(payload)[:200]
            raise RetrievalError(f"expected {{'result': [...]}} with {len(queries)} lists, got {got}")
        return [[_parse_hit(item) for item in hits] for hits in result]

    def check_hint(self) -> str:
        return (f"is a Search-R1 compatible retrieval service running at {self.url}? Start it, or point the client "
                "at the host and port where it runs")

    def _post(self, body: bytes) -> Any:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            wait_s = self.attempt_timeout_s
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    raise ToolTimeout()
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(request, timeout=wait_s) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError as e:
                    raise RetrievalError(f"the service did not answer JSON: {e}") from e
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    detail = e.read(300).decode("utf-8", "replace")
                    raise RetrievalError(f"HTTP {e.code} from {self.url}: {detail}") from e
                failure: Exception = e
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, timed out
                failure = e
            if attempt >= self.retries:
                reason = getattr(failure, "reason", failure)  # URLError wraps the socket error
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    raise ToolTimeout() from failure
                raise RetrievalError(f"{self.url} failed {attempt + 1} attempts: {reason}") from failure
            pause = self.backoff_s * 2**attempt
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            log.debug("retrieve attempt %d failed (%s); retrying in %.2fs", attempt + 1, failure, pause)
            time.sleep(pause)
            attempt += 1



# -------------------------------------------------------------------------------------- HTTP server

_MAX_BODY_BYTES = 8 << 20


class _RetrieveHandler(http.server.BaseHTTPRequestHandler):
    server: _RetrievalHTTPServer

    def do_POST(self):  # noqa: N802 - the http.server API
        if self.path.split("?")[0].rstrip("/") != "/retrieve":
            return self._send(404, {"error": f"unknown path {self.path!r}; POST /retrieve"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return self._send(400, {"error": "bad Content-Length"})
        if length > _MAX_BODY_BYTES:
            return self._send(413, {"error": f"request body over {_MAX_BODY_BYTES} bytes"})
        try:
            request = json.loads(self.rfile.read(length) or b"null")
            queries, k, with_scores = self._check(request)
            hits = self.server.search.retrieve_many(queries, k)
        except (ValueError, TypeError) as e:  # includes JSON errors and ToolInputError
            return self._send(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a server answers, it does not die
            log.exception("retrieve failed")
            return self._send(500, {"error": f"{type(e).__name__}: {e}"})
        docs = [[{"id": h.doc.doc_id, "contents": h.doc.contents} for h in row] for row in hits]
        if with_scores:
            result = [[{"document": d, "score": h.score} for d, h in zip(drow, hrow)]
                      for drow, hrow in zip(docs, hits)]
        else:
            result = docs
        self._send(200, {"result": result})

    def _check(self, request) -> tuple[list[str], int, bool]:
        if not isinstance(request, dict):
            raise ValueError('the body must be a JSON object {"queries": [...], "topk": k, "return_scores": bool}')
        queries = request.get("queries")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise ValueError("'queries' must be a list of strings")
        k = request.get("topk")
        k = self.server.default_top_k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"'topk' must be an int >= 1, got {k!r}")
        with_scores = request.get("return_scores", False)
        if not isinstance(with_scores, bool):
            raise ValueError(f"'return_scores' must be true or false, got {with_scores!r}")
        return queries, k, with_scores

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - the http.server API
        log.debug("%s %s", self.address_string(), format % args)


class _RetrievalHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a slow request to finish
    search: Any
    default_top_k: int

    def handle_error(self, request, client_address):
        # A client that gave up (timed out) closes its socket; writing the late answer then fails. Expected.
        log.debug("request from %s failed", client_address, exc_info=True)


class RetrievalServer:
    """A running `/retrieve` server (see `serve_local_search`). Stop it with `stop()` or a `with` block."""

    def __init__(self, httpd: _RetrievalHTTPServer):
        self._httpd = httpd
        self.host, self.port = httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}/retrieve"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"retrieve-{self.port}")
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        """Stops accepting requests and closes the port; requests in flight are abandoned. Idempotent."""
        if not self._stopped:
            self._stopped = True
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()

    def __enter__(self) -> RetrievalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_local_search(search, host: str = "127.0.0.1", port: int = 0, *,
                       default_top_k: int | None = None) -> RetrievalServer:
    """Serves Search-R1's `/retrieve` API over `search` from a background thread.

    Args:
      search: anything with `retrieve_many(queries: list[str], k: int) -> list[list[SearchHit]]`
        (a LocalSearch, or another HttpRetriever to proxy a service).
      host, port: where to listen; port 0 picks a free port (read it from `.port` / `.url`).
      default_top_k: k when a request has no "topk" (default: `search.top_k`, else 3).

    Returns:
      A started RetrievalServer.
    """
    if not callable(getattr(search, "retrieve_many", None)):
        raise ValueError(f"search must have retrieve_many(queries, k), got {type(search).__name__}")
    if default_top_k is None:
        default_top_k = getattr(search, "top_k", 3)
    _check_positive_int("default_top_k", default_top_k)
    httpd = _RetrievalHTTPServer((host, port), _RetrieveHandler)
    httpd.search = search
    httpd.default_top_k = default_top_k
    return RetrievalServer(httpd)
