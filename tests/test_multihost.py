"""One truth across hosts: a two-process M-GRPO run whose search tool answers differently on each host either
trains both processes on process 0's rollouts (BroadcastToolSet) or stops with an error naming the divergence
(LESSONS.md, item 18). Never a silent mix."""
import json
from pathlib import Path

import pytest

from mgrpo_jax.multihost import check_agreement, digest
from processes import run_processes

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 240


def _run(tmp_path, mode):
    for pid, (status, log) in enumerate(run_processes(WORKER, [tmp_path, mode], tmp_path, timeout_s=TIMEOUT_S)):
        assert status == 0, f"worker {pid} exited with {status} (killed after {TIMEOUT_S} s if negative):\n{log}"
    return [json.loads((tmp_path / f"result_{pid}.json").read_text()) for pid in range(2)]


def test_tools_run_on_process_0_and_both_processes_train_on_the_same_rollouts(tmp_path):
    results = _run(tmp_path, "broadcast")
    for r in results:
        assert r["error"] is None and r["observations_name_host_0"]
        assert r["versions"][0] >= 1  # the main agent did update
    assert results[0]["digests"] == results[1]["digests"] and len(results[0]["digests"]) == 2
    assert results[0]["params_sha256"] == results[1]["params_sha256"]


def test_per_host_tool_results_stop_the_run_with_the_divergence_named(tmp_path):
    results = _run(tmp_path, "local")
    for r in results:
        assert r["error"] is not None and "differ between the processes" in r["error"]
        assert "process(es) [1] disagree with process 0" in r["error"]


def test_decoupled_roles_refuse_a_multi_process_job(tmp_path):
    # The generation service would run the sampler on one host only and hang the others.
    for r in _run(tmp_path, "decoupled"):
        assert r["error"] and "single-process jobs" in r["error"] and "--role all" in r["error"]


def test_agreement_checks_are_no_ops_in_one_process():
    check_agreement("anything", digest("only one process"))  # no collective, no error
    assert digest([1, 2]) != digest([2, 1]) and digest({"a": 1}) == digest({"a": 1})
