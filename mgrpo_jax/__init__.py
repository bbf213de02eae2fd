"""mgrpo_jax: M-GRPO training of multi-agent LLM systems in JAX.

The top-level package imports nothing heavy, so that `import mgrpo_jax.kernels` stays pure `jax.numpy`
(no flax). Import the subpackages you need: `mgrpo_jax.kernels`, `mgrpo_jax.models`, ...
"""
__version__ = "0.1.0.dev0"
