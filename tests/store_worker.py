"""Consumers of the trajectory-store tests (test_store.py): imported for threads, run as a script for processes.

    python tests/store_worker.py consume <url> <out.json> <consumer_id> <expected_groups>
    python tests/store_worker.py crash <url> <n_groups>     # claims, prints "claimed <ids>", then waits to be killed

Never collected by pytest (no test_ prefix). Imports only numpy and the store (no jax), so processes start fast.
"""
from __future__ import annotations

import json
import os
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mgrpo_jax.train.store import TrajectoryStore, open_store  # noqa: E402


def consume(store: TrajectoryStore, consumer_id: str, expected_groups: int, batch: int = 2,
            deadline_s: float = 60.0, work_s: float = 0.005) -> dict:
    """Claims, "trains" (sleeps work_s), acks, until the store has acked or dropped `expected_groups`.

    Returns what this consumer acked (group ids and record ids) and what it saw, for the exactly-once checks.
    """
    acked_groups, acked_records, claimed_groups, lost = [], [], [], 0
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        claim = store.claim(batch, consumer_id)
        if not claim.groups:
            s = store.stats()
            if s.acked + s.dropped_stale >= expected_groups:
                break
            time.sleep(0.02)
            continue
        for g in claim.groups:
            g.validate()  # complete groups only: a partial one would fail here
        claimed_groups += claim.group_ids
        time.sleep(work_s)
        result = store.ack(claim)
        lost += len(result.lost)
        done = set(result.acked)
        for g in claim.groups:
            if g.group_id in done:
                acked_groups.append(g.group_id)
                acked_records += [list(r.ids) for r in g.records]
    else:
        raise TimeoutError(f"consumer {consumer_id}: the store did not finish {expected_groups} groups in "
                           f"{deadline_s}s: {store.stats()}")
    return {"acked_groups": acked_groups, "acked_records": acked_records, "claimed_groups": claimed_groups,
            "lost": lost}


def main(argv: list[str]) -> None:
    mode, url = argv[0], argv[1]
    store = open_store(url)
    if mode == "consume":
        out, consumer_id, expected = argv[2], argv[3], int(argv[4])
        result = consume(store, consumer_id, expected)
        with open(out, "w") as f:
            json.dump(result, f)
    elif mode == "crash":
        claim = store.claim(int(argv[2]), "crasher")
        print("claimed", " ".join(claim.group_ids), flush=True)
        time.sleep(600)  # the test SIGKILLs us: a consumer that dies holding a claim
    else:
        raise SystemExit(f"unknown mode {mode!r}: consume | crash")


if __name__ == "__main__":
    main(sys.argv[1:])
