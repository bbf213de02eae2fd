"""Imported first by every launch script, before jax: the process-level set-up they share.

- On a CPU-only machine, expose 8 host devices (XLA_FLAGS) so that per-agent meshes can be laid out as on an
  accelerator; a count already in XLA_FLAGS is kept. The flag only affects the host platform.
- Put the repository root on sys.path, so `configs.*` (which the config files import) resolve.
"""
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
