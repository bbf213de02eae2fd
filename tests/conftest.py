"""Test set-up: 8 fake CPU devices and an offline Hugging Face hub, fixed before jax is imported."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
) + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# One persistent XLA compilation cache for the session, made by the first process that loads this file (pytest,
# or xdist's controller) and inherited by its workers and by the subprocesses tests start. Tests compile many of
# the same tiny programs, and a hit replaces a compile: the suite takes about half the time. A hit is a program
# still: jax times it under the same event as a compile, so CompileCounter's counts do not change.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mgrpo-jax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny programs compile in under 1 s
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import hypothesis  # noqa: E402

# Derandomized so that CI is reproducible; no deadline because the first example of a jitted kernel compiles.
hypothesis.settings.register_profile("mgrpo", derandomize=True, deadline=None, max_examples=40, print_blob=True)
hypothesis.settings.load_profile("mgrpo")
