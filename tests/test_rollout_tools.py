"""Tools: failures and timeouts become counted error observations, calls run concurrently, BM25 search and
read over a corpus, and the Search-R1 `/retrieve` client against a real server on loopback (up, stopped,
slow). Deadlines in these tests are generous bounds that catch a hang, not speed claims."""
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from mgrpo_jax.data import synthetic
from mgrpo_jax.data.corpus import Document
from mgrpo_jax.rollout import tools

DOCS = [
    Document("d0", "Velmor Guild", "Velmor Guild was founded by Tarin Oskello. Velmor Guild makes glass lenses."),
    Document("d1", "Tarin Oskello", "Tarin Oskello was born in Quessa. Tarin Oskello was mentored by Mira Drovane."),
    Document("d2", "Quessa", "Quessa is a river port. Its harbor freezes in winter."),
    Document("d3", "Mira Drovane", "Mira Drovane was an astronomer. " + "She kept long notes. " * 30),
]


class FnTool(tools.Tool):
    """A tool that runs a given function: the test's way to make a tool fail, hang or sleep."""

    def __init__(self, fn, **kw):
        super().__init__("probe", **kw)
        self.fn = fn

    def run(self, argument):
        return self.fn(argument)


@pytest.fixture(scope="module")
def search():
    return tools.LocalSearch(DOCS, top_k=2, snippet_chars=60, max_chars=500)


# ---------------------------------------------------------------------------------------- Tool base


def test_failures_become_counted_observations():
    def fn(a):
        if a == "boom":
            raise RuntimeError("disk on fire")
        if a == "bad":
            raise tools.ToolInputError("no such thing")
        return a.upper()

    t = FnTool(fn, timeout_s=5.0)
    assert t.call_many(["ok", "boom", "bad", "ok2"]) == [
        "OK", "[probe error: RuntimeError: disk on fire]", "[probe error: no such thing]", "OK2"]
    assert t("boom") == "[probe error: RuntimeError: disk on fire]"
    assert tools.is_error_observation(t("boom"), "probe") and tools.is_error_observation(t("boom"))
    assert not tools.is_error_observation("OK") and not tools.is_error_observation("[note] ok]", "probe")
    s = t.stats()
    assert (s["calls"], s["errors"], s["bad_arguments"], s["timeouts"]) == (7, 4, 1, 0)
    t.reset_stats()
    assert t.stats()["calls"] == 0
    with pytest.raises(TypeError, match="must be str"):
        t.call_many([b"bytes"])


def test_non_str_result_and_short_batches_are_errors():
    assert FnTool(lambda a: 3)("x") == "[probe error: tool returned int, not str]"

    class ShortBatch(tools.Tool):
        batched = True

        def run_batch(self, arguments):
            return ["only one"]

    t = ShortBatch("short")
    assert all(o.startswith("[short error: RuntimeError: run_batch returned 1 results")
               for o in t.call_many(["a", "b"]))
    assert t.stats()["errors"] == 2


def test_hung_call_times_out_without_hanging():
    release = threading.Event()
    t = FnTool(lambda a: release.wait() and a if a == "hang" else a, timeout_s=0.2)
    try:
        start = time.monotonic()
        out = t.call_many(["fast", "hang"])
        assert time.monotonic() - start < 5.0
        assert out == ["fast", "[probe error: timed out after 0.2s]"]
        assert t.stats()["timeouts"] == 1 and t.stats()["errors"] == 0
        # The per-call override, and the late result of the hung call is never counted again.
        assert t.call_many(["hang"], timeout_s=0.05) == ["[probe error: timed out after 0.1s]"]
    finally:
        release.set()
    time.sleep(0.05)
    assert t.stats() == {**t.stats(), "calls": 3, "timeouts": 2, "errors": 0}


def test_calls_run_concurrently_and_respect_max_concurrency():
    # Four calls meet at a barrier: that only works if all four run at the same time.
    barrier = threading.Barrier(4, timeout=5.0)
    t = FnTool(lambda a: f"{a}:{barrier.wait()}", timeout_s=10.0)
    out = t.call_many(["a", "b", "c", "d"])
    assert sorted(o.split(":")[1] for o in out) == ["0", "1", "2", "3"] and t.stats()["errors"] == 0

    active, peak, lock = [0], [0], threading.Lock()

    def fn(a):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return a

    limited = FnTool(fn, timeout_s=10.0, max_concurrency=2)
    assert limited.call_many([str(i) for i in range(6)]) == [str(i) for i in range(6)]
    assert peak[0] <= 2


def test_tool_argument_errors():
    with pytest.raises(ValueError, match="timeout_s"):
        FnTool(str, timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        FnTool(str).call_many(["x"], timeout_s=-1)
    with pytest.raises(ValueError, match="max_concurrency"):
        FnTool(str, max_concurrency=0)
    with pytest.raises(ValueError, match="identifier"):
        tools.Tool("has space")
    with pytest.raises(ValueError, match="top_k"):
        tools.LocalSearch(DOCS, top_k=0)
    with pytest.raises(ValueError, match="at least one document"):
        tools.LocalSearch([])
    with pytest.raises(ValueError, match="duplicate doc id"):
        tools.ReadDocument(DOCS + DOCS[:1])
    with pytest.raises(ValueError, match="http"):
        tools.HttpRetriever("localhost:8000")


# ------------------------------------------------------------------------------------- local search


def test_bm25_ranks_and_formats(search):
    hits = search.retrieve("Who founded Velmor Guild?")
    assert [h.doc.doc_id for h in hits] == ["d0"] and hits[0].score > 0  # no other doc shares a term
    hits = search.retrieve("Where was Tarin Oskello born?", k=10)  # k is clamped to the corpus
    assert [h.doc.doc_id for h in hits][:2] == ["d1", "d0"]
    assert hits == sorted(hits, key=lambda h: -h.score)
    assert search.retrieve("zzyzx qwop") == []  # unknown words only: nothing scores
    obs = search("astronomer")
    assert obs.startswith('Doc 1 (id: d3) "Mira Drovane": Mira Drovane was an astronomer.')
    assert obs.splitlines()[0].endswith(" ...") and len(obs) <= 500
    assert search("zzyzx") == "No results for this query."
    assert search("   ") == "[search error: empty query; write the words to search for]"
    assert search.stats()["bad_arguments"] == 1


def test_batched_search_equals_one_by_one(search):
    queries = ["Velmor Guild", "Quessa harbor", "astronomer notes", "", "Tarin"]
    batched = search.call_many(queries)
    assert batched == [search(q) for q in queries]


def test_format_hits_respects_max_chars():
    hits = [tools.SearchHit(d, 1.0) for d in DOCS]
    full = tools.format_hits(hits, snippet_chars=1000, max_chars=10_000)
    assert full.count("\n") == 3 and "She kept long notes." in full
    short = tools.format_hits(hits, snippet_chars=1000, max_chars=200)
    assert len(short) <= 200 and short.startswith("Doc 1 (id: d0)") and "Doc 3" not in short
    one = tools.format_hits(hits[3:], snippet_chars=1000, max_chars=50)
    assert len(one) <= 50 and one.endswith(" ...")


def test_read_tool():
    read = tools.ReadDocument(DOCS, max_chars=120)
    assert read(" d1 ") == '"Tarin Oskello" (id: d1)\n' + DOCS[1].text
    assert read("Quessa").startswith('"Quessa" (id: d2)')  # an exact title works too
    long = read("d3")
    assert len(long) == 120 and long.endswith(" ... [truncated]")
    assert read("d9") == "[read error: unknown doc id 'd9'; use an id from the search results]"
    assert read("").startswith("[read error: empty doc id")
    assert read.stats()["bad_arguments"] == 2 and read.stats()["errors"] == 0


def test_search_finds_the_subject_of_synthetic_questions():
    world = synthetic.generate_world(5, num_entities=80)
    qs = synthetic.generate_questions(world, 60, hops=(1,), seed=0)
    search = tools.LocalSearch(world.documents, top_k=3)
    hits = search.retrieve_many([q.question for q in qs])
    # Names are unique made-up words, so a one-hop question finds a document about its subject in the top 3.
    for q, row in zip(qs, hits):
        assert any(h.doc.title.split(" (")[0] == q.chain[0].subject for h in row), q.question


def test_no_jax_import():
    # bm25s imports jax when it can; ours must not let it, even when jax is already loaded.
    code = ("import sys; from mgrpo_jax.rollout import tools; from mgrpo_jax.data.corpus import Document;"
            "tools.LocalSearch([Document('a', 't', 'some words')]); import mgrpo_jax.rollout.rewards;"
            "sys.exit('jax' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    code = ("import jax, sys; from mgrpo_jax.rollout import tools; from mgrpo_jax.data.corpus import Document;"
            "tools.LocalSearch([Document('a', 't', 'some words')]); import bm25s.selection as s;"
            "sys.exit(s.JAX_IS_AVAILABLE or sys.modules['jax'] is not jax)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------------------------- HTTP


class CountingSearch:
    """Wraps a LocalSearch to count requests and optionally answer slowly (a real slow backend)."""

    def __init__(self, inner, delay_s=0.0):
        self.inner, self.delay_s, self.requests, self.top_k = inner, delay_s, 0, inner.top_k

    def retrieve_many(self, queries, k):
        self.requests += 1
        time.sleep(self.delay_s)
        return self.inner.retrieve_many(queries, k)


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_server_speaks_search_r1_format(search):
    with tools.serve_local_search(search) as server:
        out = _post(server.url, {"queries": ["Velmor Guild", "Quessa"], "topk": 1, "return_scores": True})
        assert list(out) == ["result"] and len(out["result"]) == 2
        hit = out["result"][0][0]
        assert hit["document"] == {"id": "d0", "contents": '"Velmor Guild"\n' + DOCS[0].text}
        assert hit["score"] == pytest.approx(search.retrieve("Velmor Guild", k=1)[0].score)
        # Without scores a hit is the bare document; topk defaults to the search's top_k.
        out = _post(server.url, {"queries": ["Tarin Oskello"]})
        assert [d["id"] for d in out["result"][0]] == ["d1", "d0"] and "score" not in out["result"][0][0]
        for bad in ({"queries": "one string"}, {"queries": ["q"], "topk": 0}, [1, 2], {"queries": [" "]}):
            with pytest.raises(urllib.error.HTTPError) as e:
                _post(server.url, bad)
            assert e.value.code == 400 and "error" in json.loads(e.value.read())
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(server.url.replace("/retrieve", "/search"), {"queries": ["q"]})
        assert e.value.code == 404


def test_http_client_matches_local_search_in_one_request(search):
    backend = CountingSearch(search)
    with tools.serve_local_search(backend) as server:
        client = tools.HttpRetriever(server.url.removesuffix("/retrieve"), top_k=2, snippet_chars=60, max_chars=500)
        queries = ["Velmor Guild", "Quessa harbor", "astronomer", "zzyzx", ""]
        assert client.call_many(queries) == search.call_many(queries)
        assert backend.requests == 1  # the batch went as one POST
        remote = client.retrieve_many(["Tarin Oskello born"])
        local = search.retrieve_many(["Tarin Oskello born"], 2)
        assert [(h.doc, h.score) for h in remote[0]] == [(h.doc, pytest.approx(h.score)) for h in local[0]]
    assert client.stats()["errors"] == 0 and client.stats()["bad_arguments"] == 1


def test_stopped_server_gives_counted_error_without_hanging(search):
    server = tools.serve_local_search(search)
    client = tools.HttpRetriever(server.url, timeout_s=5.0, retries=2, backoff_s=0.01)
    assert not tools.is_error_observation(client("Velmor"))
    server.stop()
    server.stop()  # idempotent
    start = time.monotonic()
    out = client.call_many(["Velmor", "Quessa"])
    assert time.monotonic() - start < 5.0
    assert all(o.startswith("[search error: ") and "failed 3 attempts" in o for o in out), out
    s = client.stats()
    assert (s["calls"], s["errors"], s["timeouts"]) == (3, 2, 0)


def test_slow_server_times_out(search):
    slow = CountingSearch(search, delay_s=1.5)
    with tools.serve_local_search(slow) as server:
        client = tools.HttpRetriever(server.url, timeout_s=0.3, attempt_timeout_s=5.0, retries=3)
        start = time.monotonic()
        assert client("Velmor") == "[search error: timed out after 0.3s]"
        assert time.monotonic() - start < 1.2  # well before the server would answer
        assert client.stats()["timeouts"] == 1 and client.stats()["errors"] == 0


class FailingSearch:
    """A backend that raises: ValueError makes the server answer 400, anything else 500."""

    def __init__(self, exc):
        self.exc, self.requests, self.top_k = exc, 0, 3

    def retrieve_many(self, queries, k):
        self.requests += 1
        raise self.exc


def test_http_errors_retry_only_when_worth_it():
    refusing = FailingSearch(ValueError("refused"))
    with tools.serve_local_search(refusing) as server:
        client = tools.HttpRetriever(server.url, retries=3, backoff_s=0.01)
        assert client("Velmor").startswith("[search error: RetrievalError: HTTP 400 from")
        assert refusing.requests == 1  # a client error is not retried
    broken = FailingSearch(RuntimeError("index corrupt"))
    with tools.serve_local_search(broken) as server:
        client = tools.HttpRetriever(server.url, retries=2, backoff_s=0.01)
        assert "failed 3 attempts" in client("Velmor")
        assert broken.requests == 3  # a server error is retried
        assert client.stats()["errors"] == 1
        with pytest.raises(ValueError, match="k must be"):
            client.retrieve_many(["Velmor"], k=0)
        bad = tools.HttpRetriever(server.url.replace("/retrieve", "/nowhere/retrieve"), retries=3)
        assert bad("Velmor").startswith("[search error: RetrievalError: HTTP 404")


# ------------------------------------------------------------------ model errors vs infrastructure, checks


def test_outcomes_separate_model_errors_from_infrastructure(search):
    release = threading.Event()

    def fn(a):
        if a == "bad":
            raise tools.ToolInputError("no such thing")  # the model's argument: its fault
        if a == "boom":
            raise OSError("connection reset")  # the tool's infrastructure
        if a == "hang":
            release.wait()
        return a

    t = FnTool(fn, timeout_s=0.2)
    try:
        out = t.call_outcomes(["ok", "bad", "boom", "hang"])
    finally:
        release.set()
    assert [o.status for o in out] == ["ok", "bad_argument", "error", "timeout"]
    assert [o.infra_failure for o in out] == [False, False, True, True]
    assert [o.observation for o in out] == ["ok", "[probe error: no such thing]",
                                            "[probe error: OSError: connection reset]",
                                            "[probe error: timed out after 0.2s]"]
    assert {o.tool for o in out} == {"probe"}
    # A dead retrieval service is infrastructure; an empty query stays the model's bad argument.
    server = tools.serve_local_search(search)
    client = tools.HttpRetriever(server.url, retries=1, backoff_s=0.01)
    server.stop()
    dead, empty = client.call_outcomes(["Velmor", " "])
    assert (dead.status, dead.infra_failure) == ("error", True) and "RetrievalError" in dead.observation
    assert (empty.status, empty.infra_failure) == ("bad_argument", False)


def test_check_probes_every_tool_and_names_the_fix(search):
    search.check()
    tools.ReadDocument(DOCS).check()
    FnTool(lambda a: 1 / 0).check()  # nothing to probe: a tool without probe_argument passes
    with tools.serve_local_search(search) as server:
        client = tools.HttpRetriever(server.url, retries=1, backoff_s=0.01)
        client.check()
    with pytest.raises(tools.ToolCheckError) as e:  # the same client once its service is gone
        client.check()
    message = str(e.value)
    assert "tool 'search' failed its start-up check" in message and server.url in message
    assert "refused" in message.lower() and "retrieval service running at" in message
    # A service that answers, but not with a usable response, fails the check too.
    with tools.serve_local_search(FailingSearch(RuntimeError("index corrupt"))) as server:
        with pytest.raises(tools.ToolCheckError, match="HTTP 500|failed 2 attempts"):
            tools.HttpRetriever(server.url, retries=1, backoff_s=0.01).check()


def test_corpus_without_searchable_words_is_a_clear_error():
    # bm25s itself fails with "max() arg is an empty sequence".
    for docs in ([Document("d1", "", "")], [Document("d1", "", "the of and"), Document("d2", "a", "")]):
        with pytest.raises(ValueError, match=rf"none of the {len(docs)} documents has a searchable word"):
            tools.LocalSearch(docs)
    # One empty document among others is fine: the others are found.
    assert tools.LocalSearch([Document("empty", "", ""), *DOCS]).retrieve("Quessa harbor")[0].doc.doc_id == "d2"
