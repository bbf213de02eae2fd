"""One truth across hosts (DESIGN.md, principle 8; LESSONS.md, item 18).

Under multi-controller JAX every process runs the same program and each process's host values are assumed
identical: `jit` takes a host array to be the same on every process, and a batch that differs per host is
stitched into one global array without complaint. Rollouts are not a pure function of replicated inputs: tools
time out, an HTTP retriever answers differently, files differ. So:

- `BroadcastToolSet`: process 0 alone runs the tools and broadcasts each call's outcome; every process feeds the
  same observations to the same (SPMD) sampler, so every process builds the same token records.
- `check_agreement`: every process hashes what it is about to train on (the step's questions, the rollouts'
  token records) and the hashes are compared across processes; any difference stops the run with an error
  naming what differs and which processes, instead of training on a silent mix.

With one process both are no-ops (no collective runs).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


class DivergenceError(RuntimeError):
    """Processes of one multi-controller run hold different values of something that must be identical."""


def _broadcast_bytes(payload: bytes | None) -> bytes:
    """Process 0's `payload` on every process (two broadcasts: the length, then the padded bytes)."""
    from jax.experimental import multihost_utils

    is_source = jax.process_index() == 0
    length = int(multihost_utils.broadcast_one_to_all(np.asarray(len(payload) if is_source else 0, np.int64)))
    buffer = np.zeros(length, np.uint8)
    if is_source:
        buffer[:] = np.frombuffer(payload, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-serializable `value` on every process (other processes' `value` is ignored)."""
    if jax.process_count() == 1:
        return value
    payload = json.dumps(value).encode() if jax.process_index() == 0 else None
    return json.loads(_broadcast_bytes(payload).decode())


def digest(*parts: Any) -> bytes:
    """A SHA-256 of JSON-serializable parts (numpy arrays as lists), stable across processes."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, default=lambda x: np.asarray(x).tolist(), sort_keys=True).encode())
        h.update(b"\0")
    return h.digest()


def check_agreement(what: str, value_digest: bytes) -> None:
    """Raises DivergenceError unless every process passed the same digest of `what`."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.frombuffer(value_digest, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 32]
    differ = [p for p in range(everyone.shape[0]) if not np.array_equal(everyone[p], everyone[0])]
    if differ:
        raise DivergenceError(
            f"{what} differ between the processes of this multi-controller run: process(es) {differ} disagree "
            f"with process 0. Every process must train on the same batch; a per-host difference (tools, files, "
            f"services, seeds) would otherwise be stitched silently into one global batch. Make the inputs "
            f"identical on every host (tools already run on process 0 only and are broadcast).")


def rollout_digest(rollouts) -> bytes:
    """Digest of everything training reads from a `RolloutBatch`: every trajectory's ids, tokens, loss mask,
    behaviour log-probs, final answer and finish reason, and the delegation counts."""
    def record(t):
        return [t.agent, t.query, t.rollout, t.call, t.tokens, t.loss_mask,
                np.asarray(t.logprobs, np.float32).tobytes().hex(), t.final, t.finish_reason]

    return digest([record(t) for t in rollouts.main], [record(t) for t in rollouts.sub], rollouts.sub_counts)


class BroadcastToolSet:
    """A `ToolRunner` whose calls run on process 0 only; every process gets process 0's outcomes.

    Every process must call it at the same point with the same calls (the controller does, being SPMD over
    identical records); the calls themselves are checked too, so a divergence shows where it starts.
    """

    def __init__(self, tools):
        self.inner = tools

    @property
    def tools(self):
        return self.inner.tools

    def __call__(self, calls: Sequence[tuple[str, str]]):
        from mgrpo_jax.rollout.tools import ToolOutcome

        check_agreement("tool calls", digest([list(c) for c in calls]))
        outcomes = self.inner(calls) if jax.process_index() == 0 else None
        shared = broadcast_json(None if outcomes is None else
                                [[o.tool, o.observation, o.status] for o in outcomes])
        return [ToolOutcome(*o) for o in shared]
