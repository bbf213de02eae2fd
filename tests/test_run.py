"""Whole runs: SIGTERM + resume equals an uninterrupted run step for step; bad configs fail clearly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import tiny_cpu
from mgrpo_jax.experiment import build_experiment
from mgrpo_jax.metrics import read_metrics_jsonl
from mgrpo_jax.train.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
OVERRIDES = {
    "total_steps": STEPS, "eval_questions": 0, "checkpoint.save_interval_steps": 100,
    "mgrpo.num_queries": 2, "mgrpo.num_rollouts": 2, "mgrpo.alignment.d_max": 1,
    "controller.max_main_context": 256, "controller.max_sub_context": 256, "controller.max_observation_tokens": 32,
    "task.num_entities": 40, "task.num_questions": 60, "tokenizer.vocab_size": 512,
    # A large learning rate and weight decay: parameters change visibly every step, so a restore that lost
    # anything (weights, optimizer moments, step counter, data position) shows in the metrics.
    "agents.main.optimizer.learning_rate": 1e-2, "agents.sub.optimizer.learning_rate": 1e-2,
}
for agent in ("main", "sub"):
    OVERRIDES.update({f"agents.{agent}.sampler.max_new_tokens": 8, f"agents.{agent}.sampler.batch_size": 4,
                      f"agents.{agent}.sampler.prompt_buckets": (128, 248), f"agents.{agent}.loss.micro_batch_size": 2,
                      f"agents.{agent}.loss.chunk_size": 128})


def _config(**more):
    config = tiny_cpu.get_config()
    for key, value in {**OVERRIDES, **more}.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


def _flags(**more):
    out = []
    for key, value in {**OVERRIDES, **more}.items():
        out.append(f"--config.{key}={','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return out


def _comparable(rows):
    drop = ("time/", "tokens_per_s", "rollout/main_generate_s", "rollout/sub_generate_s", "rollout/tool_s",
            "rollout/rollout_s", "rollout/sub_episodes_s")
    return [{k: v for k, v in r.items() if not any(k.startswith(d) or k.endswith(d) for d in drop)} for r in rows]


# Dynamic sampling draws extra questions inside a step (the random agents' groups are mostly all-equal): the data
# position a checkpoint saves must include them.
DYNAMIC = {"mgrpo.dynamic_sampling.enabled": True, "mgrpo.dynamic_sampling.max_rounds": 2}


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight = str(tmp_path / "straight")
    train(_config(**DYNAMIC), straight)
    reference = _comparable(read_metrics_jsonl(straight))
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert sum(r["dynamic/rounds"] for r in reference) > STEPS  # some steps drew more questions

    stopped = str(tmp_path / "stopped")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs",
           "tiny_cpu.py"), "--workdir", stopped, *_flags(total_steps=1000, **DYNAMIC)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = os.path.join(stopped, "metrics.jsonl")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(metrics_file) and sum(1 for _ in open(metrics_file)) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out
    saved = sorted(int(d) for d in os.listdir(os.path.join(stopped, "checkpoints")) if d.isdigit())
    assert saved and 1 <= saved[-1] < STEPS, saved

    train(_config(**DYNAMIC), stopped)  # same command, same workdir: resumes
    resumed = _comparable(read_metrics_jsonl(stopped))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(reference, resumed):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key, a[key], b[key])


@pytest.mark.parametrize("key,value,message", [
    ("agents.main.model.hiden_size", 64, r"agents.main.model: unknown key\(s\) \['hiden_size'\]"),
    ("mode", "solo", r"mgrpo.mode='solo'|mode='solo' is not supported"),
    ("agents.main.mesh", {"devices": 64, "fsdp": 64, "tp": 1}, r"needs 65 devices \(main: 64, sub: 1\)"),
    ("agents.main.loss.pack_len", 100, r"agents.main.loss.pack_len=100 is shorter than the agent's context limit"),
    ("agents.main.loss.agg", "mean", r"agents.main.loss: .*agg='mean'"),
    ("agents.main.loss.temperature", 0.5, r"differs from agents.main.sampler.temperature"),
    ("task.kind", "web", r"task.kind='web' is not supported"),
    ("mgrpo.alignment.pad_mode", "copy", r"mgrpo.alignment: .*pad_mode='copy'"),
    ("mgrpo.dynamic_sampling.max_rounds", 0, r"mgrpo.dynamic_sampling: .*max_rounds must be >= 1"),
    ("controller.max_main_context", 4096, r"largest prompt bucket"),
    ("controller.max_tool_failure_rate", 2.0, r"controller.max_tool_failure_rate must be a number in \[0, 1\]"),
    # Greedy rollouts of a training agent: identical samples, zero advantages, grad norm 0.0 every step.
    ("agents.main.sampler.temperature", 0.0, r"agents.main.sampler.temperature=0.0: a training agent must sample"),
])
def test_bad_configs_fail_at_start_up_with_the_key_named(tmp_path, key, value, message):
    config = _config()
    if key.endswith("hiden_size"):
        config.agents.main.model.hiden_size = value
    else:
        config = _config(**{key: value})
    with pytest.raises(ValueError, match=message):
        build_experiment(config, str(tmp_path))


def test_locked_config_rejects_a_mistyped_flag(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.py"), "--workdir", str(tmp_path), "--config.totl_steps=3"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "totl_steps" in out.stderr


def test_a_retriever_that_does_not_answer_stops_the_run_at_start_up(tmp_path):
    """The issue's closed-port scenario: before, training ran on with every search an error observation."""
    import socket

    from mgrpo_jax.rollout.tools import ToolCheckError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ToolCheckError) as e:
        build_experiment(_config(**{"task.retriever_url": url}), str(tmp_path))
    message = str(e.value)
    assert f"tool 'search' failed its start-up check" in message and f"{url}/retrieve" in message
    assert "refused" in message.lower() and "task.retriever_url" in message


def test_close_all_closes_everything_and_reports_the_first_error_once(tmp_path, caplog):
    """A full disk (metrics.jsonl on /dev/full): the metrics writer's close fails, the checkpointer after it is
    still closed (its pending save finalized), and the error is raised once; while the run is already failing,
    close errors are logged on one line instead of chained onto the run's own error."""
    import errno
    import logging

    import jax.numpy as jnp

    from mgrpo_jax import checkpoint as ckpt_lib
    from mgrpo_jax.metrics import MetricsWriter
    from mgrpo_jax.train.run import close_all

    for failing in (False, True):
        workdir = tmp_path / str(failing)
        workdir.mkdir()
        os.symlink("/dev/full", workdir / "metrics.jsonl")
        writer = MetricsWriter(workdir, process_index=0, tensorboard=False)
        writer.write(1, {"main/loss": 0.5})
        checkpointer = ckpt_lib.Checkpointer(workdir, ["main"])
        checkpointer.save(1, {"main": ckpt_lib.AgentState({"w": jnp.ones(3)}, {"m": jnp.zeros(3)})}, force=True)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="mgrpo_jax.train.run"):
            if failing:
                close_all([("metrics writer", writer.close), ("checkpointer", checkpointer.close)], failing=True)
            else:
                with pytest.raises(OSError) as e:
                    close_all([("metrics writer", writer.close), ("checkpointer", checkpointer.close)])
                assert e.value.errno == errno.ENOSPC
        logged = [r.getMessage() for r in caplog.records]
        assert logged == (["closing the metrics writer also failed: OSError: [Errno 28] No space left on device"]
                          if failing else [])
        assert ckpt_lib.Checkpointer(workdir, ["main"]).latest_step() == 1


def test_jax_log_compiles_from_the_environment_is_respected():
    import mgrpo_jax

    code = ("import jax; from mgrpo_jax.train.run import configure_logging; configure_logging(); "
            "print('log_compiles', jax.config.jax_log_compiles); jax.jit(lambda x: x + 1)(1)")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(mgrpo_jax.__file__)))  # the code under test
    out = subprocess.run([sys.executable, "-c", code], cwd=package_root, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_LOG_COMPILES": "1", "PYTHONPATH": package_root})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "log_compiles True" in out.stdout and "Compiling" in out.stderr
