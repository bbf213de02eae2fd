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


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight = str(tmp_path / "straight")
    train(_config(), straight)
    reference = _comparable(read_metrics_jsonl(straight))
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    stopped = str(tmp_path / "stopped")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs",
           "tiny_cpu.py"), "--workdir", stopped, *_flags(total_steps=1000)]
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

    train(_config(), stopped)  # same command, same workdir: resumes
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
    ("controller.max_main_context", 4096, r"largest prompt bucket"),
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
