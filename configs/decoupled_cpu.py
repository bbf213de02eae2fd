"""The decoupled mode on one CPU machine: main agent and sub-agent as two jobs (two processes).

Derives from tiny_cpu (same task, models and M-GRPO settings) and assumes:
  * both jobs run on this host with the same --workdir: the store is SQLite at <workdir>/store.db and the
    sub job's generation service listens on 127.0.0.1:8765 (change decoupled.service_port if it is taken);
  * each job has its own devices: main and sub each use one (fake) CPU device of their own process;
  * the sub-agent trains off-policy (up to decoupled.max_staleness versions behind), so truncated importance
    sampling is on (agents.sub.loss.tis_cap = 2.0);
  * alignment.d_max is a fixed integer (the sub job's batch shape must be known before any data arrives).

    python launch/train.py --config configs/decoupled_cpu.py --workdir /tmp/mgrpo_dec --role sub &
    python launch/train.py --config configs/decoupled_cpu.py --workdir /tmp/mgrpo_dec --role main

Across hosts: --config.decoupled.store_url=redis://HOST:6379/0?namespace=RUN on both, and on the main job
--config.decoupled.service_url=http://SUB_HOST:8765 with --config.decoupled.service_host=0.0.0.0 on the sub job.
"""
from configs import tiny_cpu


def get_config():
    c = tiny_cpu.get_config()
    c.mode = "co_train"
    c.agents.sub.loss.tis_cap = 2.0
    c.checkpoint.save_interval_steps = 1  # the sub job acks only what a checkpoint holds: commit every update
    c.decoupled.max_staleness = 4
    return c
