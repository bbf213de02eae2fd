"""Trajectory-store throughput on this machine: records/s written, and claimed + acked, per backend (loopback).

    python bench/store.py [--groups 160] [--phase-cap-s 8]

Records of realistic size: 1000-2000 tokens each; groups of K=8 rollouts with d_k ~ Poisson(2) sub trajectories
per rollout (~16 records, ~0.25 MB per group). One process: the producer writes every group (encoding
included), then a consumer claims 2 groups at a time and acks them (decoding included). Backends: memory://,
sqlite (synchronous=FULL, the default, and NORMAL) in a temp dir, and redis (a redis-server started on a free
loopback port, no persistence; skipped with a note when redis-server is not installed). Each phase stops
after --phase-cap-s, so the whole run stays under a minute. This script prints figures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np

from mgrpo_jax.train.store import QueryGroup, SubRecord, open_store

K, RUN = 8, "bench"


def make_groups(n: int, seed: int = 0) -> list[QueryGroup]:
    rng = np.random.default_rng(seed)
    groups = []
    for q in range(n):
        counts = np.minimum(rng.poisson(2.0, K), 6)
        records = []
        for k, d in enumerate(counts):
            for i in range(d):
                length = int(rng.integers(1000, 2001))
                prompt = int(rng.integers(100, 400))
                mask = (np.arange(length) >= prompt).astype(np.int32)
                records.append(SubRecord(step=q // 2, query=q % 2, rollout=k, call=i, policy_version=3,
                                         prompt_len=prompt, tokens=rng.integers(0, 151936, length, dtype=np.int32),
                                         loss_mask=mask, logprobs=(-rng.exponential(size=length) * mask).astype(
                                             np.float32), reward=0.1, main_reward=1.1, main_correct=1.0,
                                         format_ok=True, finish_reason="result", turns=((prompt, length),)))
        groups.append(QueryGroup(RUN, q // 2, q % 2, counts, records, 3))
    return groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: str) -> tuple[subprocess.Popen, int] | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not answer PING within 10s")


def bench(url: str, groups: list[QueryGroup], cap_s: float) -> dict[str, float]:
    store = open_store(url)
    t0 = time.perf_counter()
    written = records_w = bytes_w = 0
    for g in groups:
        store.write(g)
        written += 1
        records_w += len(g.records)
        bytes_w += sum(9 * len(r.tokens) for r in g.records)
        if time.perf_counter() - t0 > cap_s:
            break
    t_write = time.perf_counter() - t0

    t0 = time.perf_counter()
    records_c = 0
    while time.perf_counter() - t0 < cap_s:
        claim = store.claim(2, "bench")
        if not claim.groups:
            break
        records_c += claim.num_records
        store.ack(claim)
    t_claim = time.perf_counter() - t0
    s = store.stats()
    store.close()
    return {"groups": written, "records_w": records_w, "mb": bytes_w / 1e6, "write_s": t_write,
            "records_c": records_c, "claim_s": t_claim, "acked": s.acked}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=160)
    parser.add_argument("--phase-cap-s", type=float, default=8.0)
    args = parser.parse_args()
    groups = make_groups(args.groups)
    n_rec = sum(len(g.records) for g in groups)
    n_tok = sum(len(r.tokens) for g in groups for r in g.records)
    print(f"{len(groups)} groups (K={K}), {n_rec} records, {n_tok / n_rec:.0f} tokens/record, "
          f"{n_rec / len(groups):.1f} records/group; one process on loopback")
    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(tmp)
        urls = [("memory", "memory://?namespace=bench"),
                ("sqlite FULL", f"sqlite:///{tmp}/full.db?namespace=bench"),
                ("sqlite NORMAL", f"sqlite:///{tmp}/normal.db?namespace=bench&synchronous=NORMAL")]
        if redis is not None:
            urls.append(("redis", f"redis://127.0.0.1:{redis[1]}/0?namespace=bench"))
        try:
            print(f"{'backend':<14} {'write rec/s':>12} {'write MB/s':>11} {'claim+ack rec/s':>16} "
                  f"{'acked groups':>13}")
            for name, url in urls:
                r = bench(url, groups, args.phase_cap_s)
                print(f"{name:<14} {r['records_w'] / r['write_s']:>12.0f} {r['mb'] / r['write_s']:>11.1f} "
                      f"{r['records_c'] / r['claim_s']:>16.0f} {r['acked']:>6}/{r['groups']:<6}")
        finally:
            if redis is not None:
                redis[0].kill()
                redis[0].wait()
    if redis is None:
        print("redis: skipped (redis-server not installed: apt-get install -y redis-server)")
    print(f"({os.cpu_count()} CPUs; figures vary with disk and load)")


if __name__ == "__main__":
    main()
