"""The kernels as a library: pure jax.numpy (no flax), a stable public surface, one compile per shape."""
import functools
import subprocess
import sys

import jax
import numpy as np
import pytest

import mgrpo_jax.kernels as K
from mgrpo_jax.compilation import CompileCounter


def test_importing_kernels_does_not_import_flax():
    code = "import sys, mgrpo_jax.kernels; bad = [m for m in ('flax', 'optax', 'orbax', 'transformers', 'torch') " \
           "if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    for name in ("group_relative_advantages", "mgrpo_advantages", "token_logprobs", "chunked_token_logprobs",
                 "kl_estimate", "aggregate_loss", "policy_loss", "filter_logits", "grouped_advantages",
                 "grouped_statistics", "sub_advantages", "sub_group_ids"):
        assert callable(getattr(K, name)), name


def _calls():
    """(name, jitted kernel, inputs for three calls with new values of one shape)."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    b, t, h, v = 2, 5, 8, 13

    def fresh(i):
        r = np.random.default_rng(i)
        return dict(
            rewards=r.normal(size=(3, 4)).astype(f32),
            sub=r.normal(size=(3, 4, 2)).astype(f32),
            sub_mask=r.random((3, 4, 2)) > 0.3,
            call_index=r.integers(0, 4, size=(3, 4, 2)).astype(np.int32),
            logits=r.normal(size=(b, t, v)).astype(f32),
            hidden=r.normal(size=(b, t, h)).astype(f32),
            unembed=r.normal(size=(h, v)).astype(f32),
            targets=r.integers(0, v, size=(b, t)).astype(np.int32),
            logp=r.normal(-2, 0.3, size=(b, t)).astype(f32),
            old=r.normal(-2, 0.3, size=(b, t)).astype(f32),
            adv=r.normal(size=(b,)).astype(f32),
            mask=(r.random((b, t)) > 0.2).astype(f32),
        )

    del rng
    specs = {
        "group_relative_advantages": (K.group_relative_advantages, lambda x: (x["rewards"],)),
        "mgrpo_advantages": (K.mgrpo_advantages, lambda x: (x["rewards"], x["sub"], x["sub_mask"])),
        "mgrpo_advantages_per_call_index": (
            lambda m, s, sm, ci: K.mgrpo_advantages(m, s, sm, sub_group="per_call_index", sub_call_index=ci),
            lambda x: (x["rewards"], x["sub"], x["sub_mask"], x["call_index"])),
        "token_logprobs": (functools.partial(K.token_logprobs, temperature=0.8), lambda x: (x["logits"], x["targets"])),
        "token_logprobs_top_p": (functools.partial(K.token_logprobs, top_k=5, top_p=0.7),
                                 lambda x: (x["logits"], x["targets"])),
        "chunked_token_logprobs": (
            jax.grad(lambda hd, w, tg: K.chunked_token_logprobs(hd, w, tg, chunk_size=4).sum(), argnums=(0, 1)),
            lambda x: (x["hidden"], x["unembed"], x["targets"])),
        "chunked_token_logprobs_top_p": (
            jax.grad(lambda hd, w, tg: K.chunked_token_logprobs(hd, w, tg, chunk_size=4, top_p=0.6).sum(),
                     argnums=(0, 1)),
            lambda x: (x["hidden"], x["unembed"], x["targets"])),
        "kl_estimate": (functools.partial(K.kl_estimate, clamp=5.0), lambda x: (x["logp"], x["old"])),
        "aggregate_loss": (functools.partial(K.aggregate_loss, mode="seq-mean-token-mean"),
                           lambda x: (x["logp"], x["mask"])),
        "policy_loss": (jax.grad(lambda lp, o, a, m: K.policy_loss(lp, o, a, m, dual_clip=3.0)[0]),
                        lambda x: (x["logp"], x["old"], x["adv"], x["mask"])),
    }
    inputs = [fresh(i) for i in range(3)]
    return [(name, jax.jit(fn), [args(x) for x in inputs]) for name, (fn, args) in specs.items()]


@pytest.mark.parametrize("name,kernel,calls", _calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_each_kernel_compiles_once_for_new_values(name, kernel, calls):
    with CompileCounter() as compiles:
        for args in calls:
            jax.block_until_ready(kernel(*args))
    assert compiles.count == 1, f"{name} compiled {compiles.count} times for 3 calls of one shape"
    assert kernel._cache_size() == 1
