"""The trajectory store of the decoupled mode: main job -> sub-agent trainer, one complete query group at a time.

MGRPO.md, "Decoupled pipeline": the main job runs rollouts and rewards them, then writes every sub-agent
trajectory record of a query's K rollouts to a shared store; the sub trainer claims complete query groups,
aligns them, updates, and acknowledges what it consumed. Three backends behind one interface:

    memory://[name]                           one program (threads); `name` shares one store per process
    sqlite:///path/to.db                      one host, several processes (the embedded default)
    redis://host:6379/0                       many hosts (the `redis` client; Lua scripts, one round trip each)

Every URL takes `?namespace=<run id>` (keys and rows are namespaced by run; LESSONS.md item 12: no date in any
key, so nothing is orphaned at midnight) and the options of `StoreOptions` (`visibility_timeout_s`,
`retry_deadline_s`, ...), e.g. `redis://127.0.0.1:6379/0?namespace=run1&retry_deadline_s=120`.

Semantics, identical on every backend (tests/test_store.py runs one contract on all three):
  * `write(group)` stores one `QueryGroup` (all sub records of one query's K rollouts, possibly none) as one
    atomic item: a partial group is never visible. Writes are idempotent by group id (run, step, query): a
    retry after an ambiguous failure, or a second write of the same id, returns False and changes nothing.
  * `claim(n, consumer_id)` leases up to n complete groups, oldest write first, for a visibility timeout.
    `ack(claim)` after the consumer's update is committed marks them consumed. A claim that is not acked in
    time returns its groups to the queue at their original position (a crashed consumer loses nothing); a
    late ack of a group that was re-claimed since is rejected (the lease token no longer matches) and counted
    in `ack_rejected`, so every group is acked exactly once. `renew(claim)` extends a lease for a long update.
  * Staleness: `claim(..., min_policy_version=v)` first drops every pending group sampled with a sub-agent
    policy older than v (MGRPO.md: "a staleness bound drops records older than N policy versions"; pass
    v = current_version - max_staleness, see `min_version_for`). Dropped groups are counted, never silent.
  * Failures: an unreachable store (Redis down, SQLite locked) is retried with exponential backoff and a
    warning per attempt, then `StoreUnavailableError` after `retry_deadline_s`. Every single attempt is
    bounded too (socket timeouts, SQLite busy timeout), so nothing hangs forever.

Delivery is exactly-once in what the store counts (each group acked once) and at-least-once in what a consumer
sees: a consumer slower than its visibility timeout may train on a group that another consumer also gets.
Size the timeout above the sub trainer's step time, or `renew` during long steps.

This module imports numpy and the standard library only (no jax), so worker processes start fast.
"""
from __future__ import annotations

import abc
import dataclasses
import difflib
import heapq
import json
import logging
import math
import re
import sqlite3
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")

_INT32 = np.iinfo(np.int32)


# ----------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SubRecord:
    """One sub-agent trajectory tau_S^(k,i), token-exact, with its reward parts.

    Ids: `step` (the main job's step), `query` (index within the step), `rollout` (k), `call` (i, the i-th
    delegation of rollout k). `policy_version`: the sub-agent policy that sampled it.
    tokens: [L] int32 exact sampled ids; loss_mask: [L] int32 in {0, 1}; logprobs: [L] float32 behaviour
    log-probs (0 where loss_mask is 0). turns: [start, end) of each sampled span.
    Rewards (MGRPO.md, "Rewards"): reward = R_S^(k,i); main_reward = R_M^(k); main_correct = c_k (the shared
    fate term's input); judge_score (0 without a judge); format_ok (False -> R_S = 0).
    infra_failures: infrastructure failures (dead tools, failed generations) that touched this record's rollout;
    such a record is no learning signal and the sub job leaves it out of its statistics and batch.
    """

    step: int
    query: int
    rollout: int
    call: int
    policy_version: int
    prompt_len: int
    tokens: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    reward: float
    main_reward: float
    main_correct: float
    format_ok: bool
    judge_score: float = 0.0
    finish_reason: str = ""
    turns: tuple[tuple[int, int], ...] = ()
    infra_failures: int = 0

    def __post_init__(self):
        # Plain Python scalars (numpy ints/floats would not serialize, and equality stays simple).
        for f in ("step", "query", "rollout", "call", "policy_version", "prompt_len", "infra_failures"):
            setattr(self, f, int(getattr(self, f)))
        for f in ("reward", "main_reward", "main_correct", "judge_score"):
            setattr(self, f, float(getattr(self, f)))
        self.format_ok, self.finish_reason = bool(self.format_ok), str(self.finish_reason)
        tokens = np.asarray(self.tokens)
        if tokens.size and (not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < _INT32.min
                            or tokens.max() > _INT32.max):
            raise ValueError(f"record {self.ids}: token ids must be integers that fit int32, got {tokens.dtype} "
                             f"in [{tokens.min()}, {tokens.max()}]")
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        mask = np.asarray(self.loss_mask)
        if mask.size and not np.isin(mask, (0, 1)).all():
            raise ValueError(f"record {self.ids}: loss_mask must be 0/1")
        self.loss_mask = np.ascontiguousarray(mask, dtype=np.int32)
        # float64 -> float32 is the only rounding that may happen: the sampler's log-probs are float32 already.
        self.logprobs = np.ascontiguousarray(self.logprobs, dtype=np.float32)
        if not (self.tokens.ndim == self.loss_mask.ndim == self.logprobs.ndim == 1
                and len(self.tokens) == len(self.loss_mask) == len(self.logprobs)):
            raise ValueError(f"record {self.ids}: tokens, loss_mask and logprobs must be [L] of one length, got "
                             f"{self.tokens.shape}, {self.loss_mask.shape}, {self.logprobs.shape}")
        if not 0 <= self.prompt_len <= len(self.tokens):
            raise ValueError(f"record {self.ids}: prompt_len={self.prompt_len} outside [0, {len(self.tokens)}]")
        self.turns = tuple((int(a), int(b)) for a, b in self.turns)

    @property
    def ids(self) -> tuple[int, int, int, int]:
        """(step, query, rollout k, call i)."""
        return (self.step, self.query, self.rollout, self.call)

    def equals(self, other: SubRecord) -> bool:
        """Bit-exact equality (log-probs compared as their float32 bit patterns, so NaN and -0.0 count)."""
        return (self._scalars() == other._scalars() and np.array_equal(self.tokens, other.tokens)
                and np.array_equal(self.loss_mask, other.loss_mask)
                and np.array_equal(self.logprobs.view(np.uint32), other.logprobs.view(np.uint32)))

    def _scalars(self) -> str:
        # NaN (e.g. an unknown main_correct) must compare equal to itself: compare the JSON text.
        return json.dumps([getattr(self, f.name) for f in dataclasses.fields(self)
                           if f.name not in ("tokens", "loss_mask", "logprobs")])

    @classmethod
    def from_trajectory(cls, traj, *, step: int, reward: float, main_reward: float, main_correct: float,
                        judge_score: float = 0.0, rollout_infra_failures: int = 0) -> SubRecord:
        """From a `rollout.controller.Trajectory` of the sub-agent (its ids, tokens and version carry over);
        `rollout_infra_failures`: those of its rollout (the main trajectory's count, which includes its subs')."""
        if traj.agent != "sub":
            raise ValueError(f"only sub-agent trajectories go to the store, got agent={traj.agent!r}")
        return cls(step=step, query=traj.query, rollout=traj.rollout, call=traj.call,
                   policy_version=traj.policy_version, prompt_len=traj.prompt_len, tokens=traj.tokens,
                   loss_mask=traj.loss_mask, logprobs=traj.logprobs, reward=float(reward),
                   main_reward=float(main_reward), main_correct=float(main_correct), format_ok=traj.format_ok,
                   judge_score=float(judge_score), finish_reason=traj.finish_reason, turns=tuple(traj.turns),
                   infra_failures=max(int(traj.infra_failures), int(rollout_infra_failures)))

    def to_trajectory(self):
        """A `Trajectory` (agent "sub") for `train.batch.pack`; text fields (final, error, task) are not
        stored."""
        from mgrpo_jax.rollout.controller import Trajectory  # lazy: the controller imports jax

        return Trajectory("sub", self.query, self.rollout, self.call, self.prompt_len, self.tokens.tolist(),
                          self.loss_mask.tolist(), self.logprobs.tolist(), list(self.turns), None,
                          self.finish_reason, None, self.policy_version, infra_failures=self.infra_failures)


@dataclasses.dataclass(eq=False)
class QueryGroup:
    """Every sub record of one query's K rollouts: the unit the store writes and claims.

    sub_counts: [K] int32 d_k (0 included: a group with no delegation still exists so the consumer can align).
    records: sum(d_k) records in (rollout, call) order, calls of rollout k numbered 0..d_k-1.
    policy_version: the oldest sub-agent policy version in the group (the staleness check uses it); with no
    records, the version the sub-agent had when the rollouts ran.
    """

    run: str
    step: int
    query: int
    sub_counts: np.ndarray
    records: list[SubRecord]
    policy_version: int

    def __post_init__(self):
        self.step, self.query, self.policy_version = int(self.step), int(self.query), int(self.policy_version)
        self.sub_counts = np.asarray(self.sub_counts, dtype=np.int32).reshape(-1)
        self.records = list(self.records)
        self.validate()

    @property
    def group_id(self) -> str:
        """Unique within a run: the step and the query's index in it."""
        return f"{self.step}:{self.query}"

    @property
    def num_rollouts(self) -> int:
        return len(self.sub_counts)

    def validate(self) -> None:
        """Raises ValueError unless the records are exactly the group that `sub_counts` describes."""
        where = f"query group run={self.run!r} step={self.step} query={self.query}"
        if not self.run or "\n" in self.run:
            raise ValueError(f"{where}: run must be a non-empty single-line string")
        if len(self.sub_counts) < 1 or (self.sub_counts < 0).any():
            raise ValueError(f"{where}: sub_counts must be [K] non-negative counts, got {self.sub_counts.tolist()}")
        expected = [(self.step, self.query, k, i) for k, d in enumerate(self.sub_counts.tolist()) for i in range(d)]
        got = [r.ids for r in self.records]
        if got != expected:
            raise ValueError(f"{where}: records must be (step, query, rollout, call) = {expected} in that order "
                             f"(sub_counts={self.sub_counts.tolist()}), got {got}")
        if self.records and self.policy_version != min(r.policy_version for r in self.records):
            raise ValueError(f"{where}: policy_version={self.policy_version} must be the oldest record's version "
                             f"{min(r.policy_version for r in self.records)} (use QueryGroup.from_records)")

    @classmethod
    def from_records(cls, run: str, step: int, query: int, num_rollouts: int, records: Sequence[SubRecord],
                     policy_version: int) -> QueryGroup:
        """Sorts records into (rollout, call) order and counts d_k. policy_version: the sub-agent's version
        during these rollouts, used only when there are no records (else the oldest record's)."""
        records = sorted(records, key=lambda r: (r.rollout, r.call))
        counts = np.bincount([r.rollout for r in records], minlength=num_rollouts).astype(np.int32)
        if len(counts) != num_rollouts:
            raise ValueError(f"a record has rollout >= num_rollouts={num_rollouts}")
        version = min(r.policy_version for r in records) if records else policy_version
        return cls(run, step, query, counts, records, version)

    def equals(self, other: QueryGroup) -> bool:
        return ((self.run, self.step, self.query, self.policy_version)
                == (other.run, other.step, other.query, other.policy_version)
                and np.array_equal(self.sub_counts, other.sub_counts) and len(self.records) == len(other.records)
                and all(a.equals(b) for a, b in zip(self.records, other.records)))


def groups_from_rollouts(run: str, step: int, rollouts, sub_rewards: np.ndarray, main_rewards: np.ndarray,
                         main_correct: np.ndarray | None, sub_policy_version: int) -> list[QueryGroup]:
    """The producer's side: one `QueryGroup` per query of a `RolloutBatch`.

    sub_rewards: [sum d_k] in the batch's flat (query, rollout, call) order; main_rewards, main_correct: [Q, K]
    (main_correct None -> NaN: unknown). sub_policy_version: the sub-agent's version during these rollouts.
    """
    counts = np.asarray(rollouts.sub_counts)
    q_n, k_n = counts.shape
    if len(rollouts.sub) != len(sub_rewards):
        raise ValueError(f"{len(rollouts.sub)} sub trajectories but {len(sub_rewards)} sub rewards")
    correct = np.full((q_n, k_n), np.nan) if main_correct is None else np.asarray(main_correct)
    per_query: list[list[SubRecord]] = [[] for _ in range(q_n)]
    for traj, reward in zip(rollouts.sub, sub_rewards):
        q, k = traj.query, traj.rollout
        main = rollouts.main[q * k_n + k]
        per_query[q].append(SubRecord.from_trajectory(traj, step=step, reward=float(reward),
                                                      main_reward=float(main_rewards[q, k]),
                                                      main_correct=float(correct[q, k]),
                                                      rollout_infra_failures=main.infra_failures))
    groups = [QueryGroup.from_records(run, step, q, k_n, recs, sub_policy_version) for q, recs in enumerate(per_query)]
    for q, g in enumerate(groups):
        if not np.array_equal(g.sub_counts, counts[q]):
            raise ValueError(f"query {q}: sub_counts {counts[q].tolist()} disagree with the trajectories "
                             f"({g.sub_counts.tolist()})")
    return groups


# Serialization: b"MGS1" | u32 header length | JSON header | all tokens int32 LE | all masks u8 | all logprobs
# float32 LE. Arrays travel as raw little-endian bytes (exact ids, bit-exact float32 log-probs); the few scalars
# go through JSON, whose float repr round-trips a Python float exactly.
_MAGIC = b"MGS1"
_SCALAR_FIELDS = ("rollout", "call", "policy_version", "prompt_len", "reward", "main_reward", "main_correct",
                  "format_ok", "judge_score", "finish_reason", "turns", "infra_failures")


def encode_group(group: QueryGroup) -> bytes:
    """QueryGroup -> bytes (compact; ~9 bytes per token)."""
    header = {"run": group.run, "step": group.step, "query": group.query, "policy_version": group.policy_version,
              "sub_counts": group.sub_counts.tolist(),
              "records": [{**{f: getattr(r, f) for f in _SCALAR_FIELDS}, "len": len(r.tokens)} for r in group.records]}
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [_MAGIC, struct.pack("<I", len(head)), head]
    parts += [r.tokens.astype("<i4", copy=False).tobytes() for r in group.records]
    parts += [r.loss_mask.astype(np.uint8).tobytes() for r in group.records]
    parts += [r.logprobs.astype("<f4", copy=False).tobytes() for r in group.records]
    return b"".join(parts)


def decode_group(blob: bytes) -> QueryGroup:
    """bytes -> QueryGroup (validated, so a corrupt item raises instead of training on garbage)."""
    if blob[:4] != _MAGIC:
        raise ValueError(f"not a trajectory-store group (magic {blob[:4]!r}, expected {_MAGIC!r}): the store holds "
                         "data of another program or format version")
    (n,) = struct.unpack_from("<I", blob, 4)
    header = json.loads(blob[8:8 + n])
    lens = [r["len"] for r in header["records"]]
    total = sum(lens)
    off = 8 + n
    if len(blob) != off + 9 * total:
        raise ValueError(f"corrupt trajectory-store group: {len(blob)} bytes, expected {off + 9 * total}")
    tokens = np.frombuffer(blob, "<i4", total, off).astype(np.int32)
    masks = np.frombuffer(blob, np.uint8, total, off + 4 * total).astype(np.int32)
    logprobs = np.frombuffer(blob, "<f4", total, off + 5 * total).astype(np.float32)
    bounds = np.cumsum([0] + lens)
    records = []
    for r, a, b in zip(header["records"], bounds[:-1], bounds[1:]):
        scalars = {f: r[f] for f in _SCALAR_FIELDS if f in r}  # fields added later keep their defaults
        records.append(SubRecord(step=header["step"], query=header["query"], tokens=tokens[a:b],
                                 loss_mask=masks[a:b], logprobs=logprobs[a:b], **scalars))
    return QueryGroup(header["run"], header["step"], header["query"], header["sub_counts"], records,
                      header["policy_version"])


# ----------------------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------------------


class StoreUnavailableError(RuntimeError):
    """The store stayed unreachable (or locked) past `retry_deadline_s`."""


@dataclasses.dataclass(frozen=True)
class StoreOptions:
    """Options every backend takes (as keyword arguments or URL query parameters).

    visibility_timeout_s: how long a claim leases its groups before they return to the queue.
    retry_deadline_s: how long an operation retries an unreachable/locked store before raising.
    initial_backoff_s, max_backoff_s: the exponential backoff between retries.
    op_timeout_s: the bound of one attempt (Redis socket timeouts; SQLite busy timeout).
    """

    namespace: str = "default"
    visibility_timeout_s: float = 600.0
    retry_deadline_s: float = 60.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    op_timeout_s: float = 5.0

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", self.namespace):
            raise ValueError(f"store namespace={self.namespace!r}: use the run id, made of letters, digits, '_', "
                             "'.' and '-' (it becomes part of every key)")
        for key in ("visibility_timeout_s", "retry_deadline_s", "initial_backoff_s", "max_backoff_s",
                    "op_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"store option {key} must be > 0, got {getattr(self, key)}")


@dataclasses.dataclass
class Claim:
    """Groups leased to one consumer until `deadline` (the backend's clock: seconds). `token` is the lease."""

    token: str
    consumer_id: str
    groups: list[QueryGroup]
    deadline: float

    @property
    def group_ids(self) -> list[str]:
        return [g.group_id for g in self.groups]

    @property
    def num_records(self) -> int:
        return sum(len(g.records) for g in self.groups)

    def __len__(self) -> int:
        return len(self.groups)


@dataclasses.dataclass(frozen=True)
class AckResult:
    """acked: the claim's groups now consumed by this claim (a retried ack counts its groups again, once).
    lost: groups whose lease expired and went to another consumer (or were dropped): not counted here."""

    acked: tuple[str, ...]
    lost: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StoreStats:
    """Counts of one namespace, in groups unless named `records_*`.

    written = acked + dropped_stale + pending + in_flight. claimed counts every lease (a re-claim after an
    expiry again); expired counts leases that timed out and returned their group; ack_rejected counts groups
    of late acks whose lease had gone to someone else.
    """

    written: int
    claimed: int
    acked: int
    expired: int
    dropped_stale: int
    ack_rejected: int
    pending: int
    in_flight: int
    records_written: int
    records_acked: int
    records_dropped: int


_COUNTERS = ("written", "claimed", "acked", "expired", "dropped_stale", "ack_rejected", "records_written",
             "records_acked", "records_dropped")


def min_version_for(current_version: int, max_staleness: int) -> int:
    """The `min_policy_version` that keeps records at most `max_staleness` sub-agent versions old."""
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    return current_version - max_staleness


class TrajectoryStore(abc.ABC):
    """One namespace (run) of a trajectory store. Thread-safe; open one per process (`open_store(url)`).

    Subclasses implement the `_`-prefixed primitives, each one atomic on its backend; this class validates,
    serializes, and retries transient failures.
    """

    #: exceptions of one attempt that mean "unreachable / busy, try again"
    transient_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, url: str, options: StoreOptions):
        self.url, self.options = url, options

    @property
    def namespace(self) -> str:
        return self.options.namespace

    # -- public API -------------------------------------------------------------------------------------

    def write(self, group: QueryGroup) -> bool:
        """Stores one complete query group atomically. Returns False (and changes nothing) when a group with
        this id was already written to this namespace (a retried or repeated write)."""
        if group.run != self.namespace:
            raise ValueError(f"group of run {group.run!r} written to the store namespace {self.namespace!r}: "
                             f"open the store with ?namespace={group.run}")
        group.validate()
        blob = encode_group(group)
        new = self._retry("write", lambda: self._write(group.group_id, group.policy_version, len(group.records),
                                                       blob))
        if not new:
            log.info("trajectory store %s: group %s already written; ignored", self.url, group.group_id)
        return new

    def claim(self, n_groups: int, consumer_id: str, *, min_policy_version: int | None = None,
              visibility_timeout_s: float | None = None) -> Claim:
        """Leases up to `n_groups` complete groups, oldest first (possibly none: an empty Claim).

        min_policy_version: pending groups sampled with an older sub-agent policy are dropped first (counted in
        `dropped_stale`). visibility_timeout_s: the lease; default `options.visibility_timeout_s`.
        """
        if n_groups < 1:
            raise ValueError(f"claim n_groups must be >= 1, got {n_groups}")
        timeout = self.options.visibility_timeout_s if visibility_timeout_s is None else visibility_timeout_s
        if not timeout > 0:
            raise ValueError(f"visibility_timeout_s must be > 0, got {timeout}")
        token = uuid.uuid4().hex
        # If a claim ran but its reply was lost (a dropped connection), the retry leases further groups under the
        # same token; the groups of the lost reply are in no Claim object, so they expire and return: nothing lost.
        items, deadline = self._retry("claim", lambda: self._claim(n_groups, consumer_id, token, timeout,
                                                                   min_policy_version))
        return Claim(token, consumer_id, [decode_group(blob) for _, blob in items], deadline)

    def ack(self, claim: Claim) -> AckResult:
        """Marks the claim's groups consumed. Groups whose lease was lost (expired, then re-claimed or dropped)
        are rejected: returned in `lost`, counted in `ack_rejected`, logged, never consumed twice."""
        if not claim.groups:
            return AckResult((), ())
        acked, lost = self._retry("ack", lambda: self._ack(claim.token, claim.group_ids))
        if lost:
            log.warning("trajectory store %s: late ack by consumer %r: %d group(s) %s had expired and were "
                        "re-claimed; not counted. Raise visibility_timeout_s above the sub trainer's step time, "
                        "or renew() during long steps.", self.url, claim.consumer_id, len(lost), list(lost))
        return AckResult(tuple(acked), tuple(lost))

    def renew(self, claim: Claim, visibility_timeout_s: float | None = None) -> int:
        """Extends the lease of the claim's groups that it still holds to now + timeout; returns how many."""
        if not claim.groups:
            return 0
        timeout = self.options.visibility_timeout_s if visibility_timeout_s is None else visibility_timeout_s
        held, deadline = self._retry("renew", lambda: self._renew(claim.token, claim.group_ids, timeout))
        if held:
            claim.deadline = deadline
        return held

    def stats(self) -> StoreStats:
        """Counts of this namespace (expired leases are returned to the queue first, so they count as pending)."""
        return StoreStats(**self._retry("stats", self._stats))

    def close(self) -> None:
        """Releases connections. The stored data stays (except for memory://)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- retries ----------------------------------------------------------------------------------------

    def _unavailable_hint(self) -> str:
        return ""

    def _retry(self, op: str, fn: Callable[[], T]) -> T:
        """fn(), retried on `transient_errors` with exponential backoff until `retry_deadline_s`."""
        opts = self.options
        start = time.monotonic()
        backoff, attempt = opts.initial_backoff_s, 0
        while True:
            attempt += 1
            try:
                out = fn()
            except self.transient_errors as err:
                elapsed = time.monotonic() - start
                left = opts.retry_deadline_s - elapsed
                if left <= 0:
                    raise StoreUnavailableError(
                        f"trajectory store {self.url}: {op} failed for {elapsed:.1f}s ({attempt} attempts; "
                        f"retry_deadline_s={opts.retry_deadline_s}); last error: {type(err).__name__}: {err}. "
                        f"{self._unavailable_hint()}") from err
                wait = min(backoff, opts.max_backoff_s, left)
                log.warning("trajectory store %s unreachable during %s (attempt %d, %s: %s); retrying in %.2fs, "
                            "giving up in %.1fs", self.url, op, attempt, type(err).__name__, err, wait, left)
                time.sleep(wait)
                backoff *= 2
                continue
            if attempt > 1:
                log.warning("trajectory store %s: %s succeeded after %d attempts (%.1fs)", self.url, op, attempt,
                            time.monotonic() - start)
            return out

    # -- backend primitives (each atomic) ----------------------------------------------------------------

    @abc.abstractmethod
    def _write(self, group_id: str, policy_version: int, num_records: int, blob: bytes) -> bool: ...

    @abc.abstractmethod
    def _claim(self, n: int, consumer_id: str, token: str, timeout_s: float,
               min_version: int | None) -> tuple[list[tuple[str, bytes]], float]: ...

    @abc.abstractmethod
    def _ack(self, token: str, group_ids: list[str]) -> tuple[list[str], list[str]]: ...

    @abc.abstractmethod
    def _renew(self, token: str, group_ids: list[str], timeout_s: float) -> tuple[int, float]: ...

    @abc.abstractmethod
    def _stats(self) -> dict[str, int]: ...


# ----------------------------------------------------------------------------------------------------------
# memory://
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _MemGroup:
    seq: int
    version: int
    num_records: int
    blob: bytes | None
    state: str = "pending"  # pending | in_flight | acked | dropped
    lease: str | None = None
    deadline: float = 0.0
    ack_token: str | None = None


class _MemoryState:
    """One namespace's data; shared by every handle opened on the same memory://name."""

    def __init__(self):
        self.lock = threading.Lock()
        self.groups: dict[str, _MemGroup] = {}  # every id ever written (acked/dropped ones without payload)
        self.pending: dict[str, int] = {}  # id -> seq; indexes keep claims O(pending), not O(history)
        self.in_flight: set[str] = set()
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.next_seq = 0


_MEMORY: dict[tuple[str, str], _MemoryState] = {}
_MEMORY_LOCK = threading.Lock()


class MemoryStore(TrajectoryStore):
    """In one program (threads). Groups are stored serialized, exactly as the other backends hold them, so a
    consumer never shares arrays with the producer. `name` shares one store between handles of a process."""

    def __init__(self, name: str = "", options: StoreOptions = StoreOptions()):
        super().__init__(f"memory://{name}?namespace={options.namespace}", options)
        if name:
            with _MEMORY_LOCK:
                self._s = _MEMORY.setdefault((name, options.namespace), _MemoryState())
        else:
            self._s = _MemoryState()

    def _reap(self, now: float) -> None:
        s = self._s
        for gid in [gid for gid in s.in_flight if s.groups[gid].deadline <= now]:
            g = s.groups[gid]
            g.state, g.lease = "pending", None
            s.in_flight.discard(gid)
            s.pending[gid] = g.seq
            s.counters["expired"] += 1

    def _write(self, group_id, policy_version, num_records, blob):
        s = self._s
        with s.lock:
            if group_id in s.groups:
                return False
            s.groups[group_id] = _MemGroup(s.next_seq, policy_version, num_records, blob)
            s.pending[group_id] = s.next_seq
            s.next_seq += 1
            s.counters["written"] += 1
            s.counters["records_written"] += num_records
            return True

    def _claim(self, n, consumer_id, token, timeout_s, min_version):
        s = self._s
        with s.lock:
            now = time.monotonic()
            self._reap(now)
            if min_version is not None:
                for gid in [gid for gid in s.pending if s.groups[gid].version < min_version]:
                    g = s.groups[gid]
                    g.state, g.blob = "dropped", None
                    del s.pending[gid]
                    s.counters["dropped_stale"] += 1
                    s.counters["records_dropped"] += g.num_records
            out = []
            for gid in heapq.nsmallest(n, s.pending, key=s.pending.__getitem__):
                g = s.groups[gid]
                g.state, g.lease, g.deadline = "in_flight", token, now + timeout_s
                del s.pending[gid]
                s.in_flight.add(gid)
                out.append((gid, g.blob))
            s.counters["claimed"] += len(out)
            return out, now + timeout_s

    def _ack(self, token, group_ids):
        s = self._s
        acked, lost = [], []
        with s.lock:
            for gid in group_ids:
                g = s.groups.get(gid)
                if g is not None and g.state == "in_flight" and g.lease == token:
                    g.state, g.lease, g.blob, g.ack_token = "acked", None, None, token
                    s.in_flight.discard(gid)
                    s.counters["acked"] += 1
                    s.counters["records_acked"] += g.num_records
                    acked.append(gid)
                elif g is not None and g.state == "acked" and g.ack_token == token:
                    acked.append(gid)  # a retried ack
                else:
                    lost.append(gid)
            s.counters["ack_rejected"] += len(lost)
        return acked, lost

    def _renew(self, token, group_ids, timeout_s):
        s = self._s
        with s.lock:
            deadline = time.monotonic() + timeout_s
            held = [s.groups[g] for g in group_ids if g in s.groups and s.groups[g].state == "in_flight"
                    and s.groups[g].lease == token]
            for g in held:
                g.deadline = deadline
            return len(held), deadline

    def _stats(self):
        s = self._s
        with s.lock:
            self._reap(time.monotonic())
            return {**s.counters, "pending": len(s.pending), "in_flight": len(s.in_flight)}


# ----------------------------------------------------------------------------------------------------------
# sqlite:///path
# ----------------------------------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_groups (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- write order: claims go oldest first
    run TEXT NOT NULL,
    group_id TEXT NOT NULL,
    policy_version INTEGER NOT NULL,
    num_records INTEGER NOT NULL,
    state TEXT NOT NULL,                     -- pending | in_flight | acked | dropped
    lease TEXT,                              -- the claim token holding an in_flight group
    consumer TEXT,
    deadline REAL,                           -- unix time the lease ends
    ack_token TEXT,                          -- the claim that acked it (a retried ack is recognised)
    payload BLOB,                            -- the encoded group; NULL once acked or dropped
    UNIQUE (run, group_id)
);
CREATE INDEX IF NOT EXISTS store_groups_state ON store_groups (run, state, seq);
CREATE TABLE IF NOT EXISTS store_counters (
    run TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (run, name)
);
"""


def _sqlite_transient(err: BaseException) -> bool:
    return isinstance(err, sqlite3.OperationalError) and ("locked" in str(err) or "busy" in str(err))


class _SqliteBusy(Exception):
    """A sqlite3.OperationalError that means "locked / busy": worth retrying."""


class SqliteStore(TrajectoryStore):
    """One host, several processes: one SQLite file in WAL mode (readers never block the writer).

    Every primitive is one `BEGIN IMMEDIATE` transaction, which takes the database's write lock up front, so
    the reap -> drop -> select -> lease of a claim is atomic across processes. The busy timeout
    (`op_timeout_s`) bounds each attempt; `_retry` bounds the whole. Wall-clock deadlines: leases compare
    `time.time()` of the processes of one host. Not for network file systems (SQLite locking is unreliable
    there): use Redis across hosts.
    """

    transient_errors = (_SqliteBusy,)

    def __init__(self, path: str, options: StoreOptions = StoreOptions(), synchronous: str = "FULL"):
        super().__init__(f"sqlite:///{path}?namespace={options.namespace}", options)
        if synchronous.upper() not in ("FULL", "NORMAL"):
            raise ValueError(f"sqlite synchronous={synchronous!r}: choose FULL (survives power loss) or NORMAL "
                             "(survives process crashes; faster)")
        self.path = path
        self._lock = threading.Lock()  # one connection per handle; serialize its users
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves (the module's implicit BEGIN is deferred,
            # which could let two claimers read the same pending rows before either writes).
            self._db = sqlite3.connect(path, timeout=options.op_timeout_s, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.OperationalError as err:
            raise ValueError(f"cannot open the SQLite trajectory store at {path!r} ({err}): does the directory "
                             "exist and is it writable?") from err
        self._run = options.namespace

        def setup():
            with self._tx(immediate=False):
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            exists = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'store_counters'").fetchone()
            if exists:  # a read: opening needs no write lock (another process may be holding it)
                return
            with self._tx() as db:  # not executescript: it would COMMIT our BEGIN IMMEDIATE first
                for statement in _SQLITE_SCHEMA.split(";\n"):
                    if statement.strip():
                        db.execute(statement)

        self._retry("open", setup)

    def _unavailable_hint(self) -> str:
        return (f"Another process holds the write lock of {self.path} (a stuck writer, or a long transaction); "
                "find it, or raise retry_deadline_s / op_timeout_s.")

    class _Tx:
        def __init__(self, store: SqliteStore, immediate: bool):
            self.store, self.immediate = store, immediate

        def __enter__(self):
            self.store._lock.acquire()
            try:
                if self.immediate:
                    self.store._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                self.store._lock.release()
                if _sqlite_transient(err):
                    raise _SqliteBusy(str(err)) from err
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb):
            db = self.store._db
            try:
                if self.immediate and db.in_transaction:  # some errors make SQLite roll back by itself
                    db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            except sqlite3.OperationalError as err:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if _sqlite_transient(err):
                    raise _SqliteBusy(str(err)) from err
                raise
            finally:
                self.store._lock.release()
            if isinstance(exc, sqlite3.OperationalError) and _sqlite_transient(exc):
                raise _SqliteBusy(str(exc)) from exc
            return False

    def _tx(self, immediate: bool = True) -> SqliteStore._Tx:
        return SqliteStore._Tx(self, immediate)

    def _bump(self, db, name: str, by: int) -> None:
        if by:
            db.execute("INSERT INTO store_counters (run, name, value) VALUES (?, ?, ?) "
                       "ON CONFLICT (run, name) DO UPDATE SET value = value + excluded.value", (self._run, name, by))

    def _reap(self, db, now: float) -> None:
        cur = db.execute("UPDATE store_groups SET state = 'pending', lease = NULL, consumer = NULL, deadline = NULL "
                         "WHERE run = ? AND state = 'in_flight' AND deadline <= ?", (self._run, now))
        self._bump(db, "expired", cur.rowcount)

    def _write(self, group_id, policy_version, num_records, blob):
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO store_groups (run, group_id, policy_version, num_records, state,"
                             " payload) VALUES (?, ?, ?, ?, 'pending', ?)",
                             (self._run, group_id, policy_version, num_records, blob))
            if cur.rowcount == 0:
                return False
            self._bump(db, "written", 1)
            self._bump(db, "records_written", num_records)
            return True

    def _claim(self, n, consumer_id, token, timeout_s, min_version):
        with self._tx() as db:
            now = time.time()
            self._reap(db, now)
            if min_version is not None:
                rows = db.execute("SELECT COUNT(*), COALESCE(SUM(num_records), 0) FROM store_groups "
                                  "WHERE run = ? AND state = 'pending' AND policy_version < ?",
                                  (self._run, min_version)).fetchone()
                db.execute("UPDATE store_groups SET state = 'dropped', payload = NULL "
                           "WHERE run = ? AND state = 'pending' AND policy_version < ?", (self._run, min_version))
                self._bump(db, "dropped_stale", rows[0])
                self._bump(db, "records_dropped", rows[1])
            rows = db.execute("SELECT seq, group_id, payload FROM store_groups WHERE run = ? AND state = 'pending' "
                              "ORDER BY seq LIMIT ?", (self._run, n)).fetchall()
            deadline = now + timeout_s
            db.executemany("UPDATE store_groups SET state = 'in_flight', lease = ?, consumer = ?, deadline = ? "
                           "WHERE seq = ?", [(token, consumer_id, deadline, seq) for seq, _, _ in rows])
            self._bump(db, "claimed", len(rows))
            return [(gid, bytes(blob)) for _, gid, blob in rows], deadline

    def _ack(self, token, group_ids):
        acked, lost = [], []
        with self._tx() as db:
            records = 0
            for gid in group_ids:
                row = db.execute("SELECT state, lease, ack_token, num_records FROM store_groups "
                                 "WHERE run = ? AND group_id = ?", (self._run, gid)).fetchone()
                if row is not None and row[0] == "in_flight" and row[1] == token:
                    db.execute("UPDATE store_groups SET state = 'acked', lease = NULL, consumer = NULL, "
                               "deadline = NULL, ack_token = ?, payload = NULL WHERE run = ? AND group_id = ?",
                               (token, self._run, gid))
                    acked.append(gid)
                    records += row[3]
                    self._bump(db, "acked", 1)
                elif row is not None and row[0] == "acked" and row[2] == token:
                    acked.append(gid)  # a retried ack
                else:
                    lost.append(gid)
            self._bump(db, "records_acked", records)
            self._bump(db, "ack_rejected", len(lost))
        return acked, lost

    def _renew(self, token, group_ids, timeout_s):
        with self._tx() as db:
            deadline = time.time() + timeout_s
            held = 0
            for gid in group_ids:
                held += db.execute("UPDATE store_groups SET deadline = ? WHERE run = ? AND group_id = ? AND "
                                   "state = 'in_flight' AND lease = ?", (deadline, self._run, gid, token)).rowcount
            return held, deadline

    def _stats(self):
        with self._tx() as db:
            self._reap(db, time.time())
            counters = dict(db.execute("SELECT name, value FROM store_counters WHERE run = ?", (self._run,)))
            states = dict(db.execute("SELECT state, COUNT(*) FROM store_groups WHERE run = ? GROUP BY state",
                                     (self._run,)))
        return {**{k: counters.get(k, 0) for k in _COUNTERS}, "pending": states.get("pending", 0),
                "in_flight": states.get("in_flight", 0)}

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ----------------------------------------------------------------------------------------------------------
# redis://
# ----------------------------------------------------------------------------------------------------------

# Keys of one namespace (all in one Redis Cluster slot thanks to the {namespace} hash tag; no date anywhere):
#   pending      ZSET  group id -> write seq          (claim order: oldest first)
#   pending_ver  ZSET  group id -> policy version     (the staleness drop: a range query)
#   inflight     ZSET  group id -> lease deadline, ms (server clock: the hosts' clocks may disagree)
#   lease        HASH  group id -> claim token
#   data         HASH  group id -> encoded group       (deleted once acked or dropped)
#   info         HASH  group id -> "seq:version:num_records"  (kept: makes writes idempotent)
#   done         HASH  group id -> ack token, or "dropped"
#   counters     HASH  the StoreStats counters, and next_seq
# Every operation is one Lua script: atomic, one round trip.
_LUA_PRELUDE = """
local K_PENDING, K_PVER, K_INFLIGHT, K_LEASE, K_DATA, K_INFO, K_DONE, K_COUNT =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function info(gid)
    local s = redis.call('HGET', K_INFO, gid)
    local seq, ver, nrec = string.match(s, '^(%-?%d+):(%-?%d+):(%d+)$')
    return seq, ver, tonumber(nrec)
end
local function reap(now)
    local ids = redis.call('ZRANGEBYSCORE', K_INFLIGHT, '-inf', now)
    for _, gid in ipairs(ids) do
        local seq, ver = info(gid)
        redis.call('ZREM', K_INFLIGHT, gid)
        redis.call('HDEL', K_LEASE, gid)
        redis.call('ZADD', K_PENDING, seq, gid)
        redis.call('ZADD', K_PVER, ver, gid)
    end
    if #ids > 0 then redis.call('HINCRBY', K_COUNT, 'expired', #ids) end
end
"""

_LUA_WRITE = _LUA_PRELUDE + """
local gid, ver, nrec = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HEXISTS', K_INFO, gid) == 1 then return 0 end
local seq = redis.call('HINCRBY', K_COUNT, 'next_seq', 1)
redis.call('HSET', K_INFO, gid, seq .. ':' .. ver .. ':' .. nrec)
redis.call('HSET', K_DATA, gid, ARGV[4])
redis.call('ZADD', K_PENDING, seq, gid)
redis.call('ZADD', K_PVER, ver, gid)
redis.call('HINCRBY', K_COUNT, 'written', 1)
redis.call('HINCRBY', K_COUNT, 'records_written', nrec)
return 1
"""

_LUA_CLAIM = _LUA_PRELUDE + """
local n, token, timeout_ms, minv = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now = now_ms()
reap(now)
if minv ~= '' then
    local stale = redis.call('ZRANGEBYSCORE', K_PVER, '-inf', '(' .. minv)
    local recs = 0
    for _, gid in ipairs(stale) do
        local _, _, nrec = info(gid)
        recs = recs + nrec
        redis.call('ZREM', K_PENDING, gid)
        redis.call('ZREM', K_PVER, gid)
        redis.call('HDEL', K_DATA, gid)
        redis.call('HSET', K_DONE, gid, 'dropped')
    end
    if #stale > 0 then
        redis.call('HINCRBY', K_COUNT, 'dropped_stale', #stale)
        redis.call('HINCRBY', K_COUNT, 'records_dropped', recs)
    end
end
local deadline = now + timeout_ms
local ids = redis.call('ZRANGE', K_PENDING, 0, n - 1)
local out = {deadline}
for _, gid in ipairs(ids) do
    redis.call('ZREM', K_PENDING, gid)
    redis.call('ZREM', K_PVER, gid)
    redis.call('ZADD', K_INFLIGHT, deadline, gid)
    redis.call('HSET', K_LEASE, gid, token)
    out[#out + 1] = gid
    out[#out + 1] = redis.call('HGET', K_DATA, gid)
end
if #ids > 0 then redis.call('HINCRBY', K_COUNT, 'claimed', #ids) end
return out
"""

_LUA_ACK = _LUA_PRELUDE + """
local token = ARGV[1]
local acked, lost, fresh, recs = {}, {}, 0, 0
for i = 2, #ARGV do
    local gid = ARGV[i]
    if redis.call('HGET', K_LEASE, gid) == token then
        local _, _, nrec = info(gid)
        redis.call('ZREM', K_INFLIGHT, gid)
        redis.call('HDEL', K_LEASE, gid)
        redis.call('HDEL', K_DATA, gid)
        redis.call('HSET', K_DONE, gid, token)
        acked[#acked + 1] = gid
        fresh = fresh + 1
        recs = recs + nrec
    elseif redis.call('HGET', K_DONE, gid) == token then
        acked[#acked + 1] = gid
    else
        lost[#lost + 1] = gid
    end
end
if fresh > 0 then
    redis.call('HINCRBY', K_COUNT, 'acked', fresh)
    redis.call('HINCRBY', K_COUNT, 'records_acked', recs)
end
if #lost > 0 then redis.call('HINCRBY', K_COUNT, 'ack_rejected', #lost) end
return {acked, lost}
"""

_LUA_RENEW = _LUA_PRELUDE + """
local token, deadline = ARGV[1], now_ms() + tonumber(ARGV[2])
local held = 0
for i = 3, #ARGV do
    if redis.call('HGET', K_LEASE, ARGV[i]) == token then
        redis.call('ZADD', K_INFLIGHT, 'XX', deadline, ARGV[i])
        held = held + 1
    end
end
return {held, deadline}
"""

_LUA_STATS = _LUA_PRELUDE + """
reap(now_ms())
local out = redis.call('HGETALL', K_COUNT)
out[#out + 1] = 'pending'
out[#out + 1] = redis.call('ZCARD', K_PENDING)
out[#out + 1] = 'in_flight'
out[#out + 1] = redis.call('ZCARD', K_INFLIGHT)
return out
"""


class RedisStore(TrajectoryStore):
    """Many hosts: one Redis server (or one Cluster slot per run). Each primitive is one Lua script, so it is
    atomic; lease deadlines use the server's clock. Durability is the server's: run it with AOF
    (`appendonly yes`) if a Redis restart must not lose the queue.

    `redis_url`: what `redis.Redis.from_url` takes (redis://, rediss://, unix://, user:password@).
    """

    def __init__(self, redis_url: str, options: StoreOptions = StoreOptions()):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as err:
            raise ImportError("the Redis trajectory store needs the `redis` client: pip install redis "
                              "(setup.py pins the supported range)") from err
        super().__init__(f"{redis_url}{'&' if '?' in redis_url else '?'}namespace={options.namespace}", options)
        self.transient_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                 redis.exceptions.ReadOnlyError)
        # redis-py's own retries (with backoff up to seconds) would hide failures from our deadline: off.
        self._client = redis.Redis.from_url(redis_url, socket_timeout=options.op_timeout_s,
                                            socket_connect_timeout=options.op_timeout_s,
                                            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        prefix = f"mgrpo:{{{options.namespace}}}:"
        self.keys = [prefix + k for k in ("pending", "pending_ver", "inflight", "lease", "data", "info", "done",
                                          "counters")]
        self._scripts = {name: self._client.register_script(src) for name, src in
                         (("write", _LUA_WRITE), ("claim", _LUA_CLAIM), ("ack", _LUA_ACK), ("renew", _LUA_RENEW),
                          ("stats", _LUA_STATS))}
        self._address = redis_url.split("?")[0]

    def _unavailable_hint(self) -> str:
        return (f"Is redis-server running and reachable at {self._address}? Start it (or fix the URL), or raise "
                "retry_deadline_s to wait longer.")

    def _run_script(self, name: str, args: list):
        return self._scripts[name](keys=self.keys, args=args)

    def _write(self, group_id, policy_version, num_records, blob):
        return bool(self._run_script("write", [group_id, int(policy_version), int(num_records), blob]))

    def _claim(self, n, consumer_id, token, timeout_s, min_version):
        out = self._run_script("claim", [n, token, max(1, round(timeout_s * 1000)),
                                         "" if min_version is None else int(min_version)])
        items = [(out[i].decode(), out[i + 1]) for i in range(1, len(out), 2)]
        return items, out[0] / 1000.0

    def _ack(self, token, group_ids):
        acked, lost = self._run_script("ack", [token, *group_ids])
        return [g.decode() for g in acked], [g.decode() for g in lost]

    def _renew(self, token, group_ids, timeout_s):
        held, deadline = self._run_script("renew", [token, max(1, round(timeout_s * 1000)), *group_ids])
        return int(held), deadline / 1000.0

    def _stats(self):
        out = self._run_script("stats", [])
        values = {out[i].decode(): int(out[i + 1]) for i in range(0, len(out), 2)}
        return {k: values.get(k, 0) for k in (*_COUNTERS, "pending", "in_flight")}

    def close(self) -> None:
        self._client.close()


# ----------------------------------------------------------------------------------------------------------
# open_store(url)
# ----------------------------------------------------------------------------------------------------------

_OPTION_TYPES = {f.name: f.type for f in dataclasses.fields(StoreOptions)}


def _unknown_options(names, scheme: str):
    hints = {n: difflib.get_close_matches(n, [*_OPTION_TYPES, "synchronous"], 1) for n in sorted(names)}
    said = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
    raise ValueError(f"unknown trajectory-store option(s) for {scheme}://: {said}; allowed: {sorted(_OPTION_TYPES)}"
                     " and, for sqlite, synchronous")


def open_store(url: str, **options: Any) -> TrajectoryStore:
    """A store from its URL; options (StoreOptions fields, and `synchronous` for SQLite) come from the URL's
    query string and/or keyword arguments (keywords win).

        memory://               a private in-process store;  memory://name  one shared per process and name
        sqlite:///path/to.db    (sqlite:////abs/path also works; a relative path is relative to the cwd)
        redis://127.0.0.1:6379/0?namespace=run1
    """
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    ours = {k: query.pop(k) for k in list(query) if k in _OPTION_TYPES or k == "synchronous"}
    ours.update(options)
    synchronous = ours.pop("synchronous", "FULL")
    if set(ours) - set(_OPTION_TYPES):
        _unknown_options(set(ours) - set(_OPTION_TYPES), parts.scheme)
    typed = {}
    for key, value in ours.items():
        try:
            typed[key] = value if key == "namespace" else float(value)
        except ValueError as err:
            raise ValueError(f"trajectory-store option {key}={value!r} must be a number") from err
        if isinstance(typed[key], float) and not math.isfinite(typed[key]):
            raise ValueError(f"trajectory-store option {key}={value!r} must be finite")
    opts = StoreOptions(**typed)
    scheme = parts.scheme
    if scheme in ("memory", "sqlite") and query:  # redis:// passes the rest to the redis client
        _unknown_options(query, scheme)
    if scheme == "memory":
        return MemoryStore(parts.netloc + parts.path, opts)
    if scheme == "sqlite":
        if parts.netloc or not parts.path or parts.path == "/":
            raise ValueError(f"bad SQLite store URL {url!r}: write sqlite:///relative/path.db or "
                             "sqlite:////absolute/path.db")
        return SqliteStore(parts.path[1:], opts, synchronous=synchronous)
    if scheme in ("redis", "rediss", "unix"):
        rest = urllib.parse.urlencode(query)
        return RedisStore(urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, rest, "")), opts)
    raise ValueError(f"unknown trajectory-store URL {url!r}: use memory://, sqlite:///path.db or "
                     "redis://host:port/db (each with optional ?namespace=<run id>)")
