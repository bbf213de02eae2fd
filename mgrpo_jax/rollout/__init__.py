"""Rollouts: the KV-cache sampler, the action protocol, the multi-agent episode controller, tools, rewards.

Import the module you need (`mgrpo_jax.rollout.sampler`, `.protocol`, `.tools`, ...); this package
imports nothing itself, so host-side modules (protocol, tools, rewards) load without JAX.
"""
