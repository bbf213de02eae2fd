"""Test set-up: 8 fake CPU devices and an offline Hugging Face hub, fixed before jax is imported."""
import os

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
) + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import hypothesis  # noqa: E402

# Derandomized so that CI is reproducible; no deadline because the first example of a jitted kernel compiles.
hypothesis.settings.register_profile("mgrpo", derandomize=True, deadline=None, max_examples=40, print_blob=True)
hypothesis.settings.load_profile("mgrpo")
