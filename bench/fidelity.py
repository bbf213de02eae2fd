"""The algorithm-fidelity figures of issue 17, before and after, on CPU. Prints figures only; asserts nothing.

    python bench/fidelity.py [--queries 2000] [--rollouts 8] [--d-max 3] [--tokens 32]

1. Importance ratio under top-k / top-p: a tiny random model samples with the Sampler (top_k=8, then
   top_p=0.5); the chunked kernel rescores the samples through the model's hidden states, under the full
   tempered softmax (what the trainer did before) and under the sampler's filtered distribution (top_k= /
   top_p= passed through). On-policy, the first-epoch ratio exp(trainer - behaviour) should be 1.
2. Sub-agent groups: d_k ~ Poisson(2) calls per rollout, K rollouts, D_max slots, the default alignment.
   Before, per_call_index grouped slot i across the K rollouts; the figure is the fraction of filled slots
   whose record's call index differs from its group's. After, the group is (query, the record's own call
   index). Also: records whose copies got different advantages, align/dropped against the records that
   are really absent, and (per_rollout) non-zero advantages carried by borrowed slots.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax.kernels import chunked_token_logprobs, group_relative_advantages, sub_group_ids
from mgrpo_jax.models import ModelConfig, init_model
from mgrpo_jax.rollout.sampler import Sampler, SamplerConfig
from mgrpo_jax.train.alignment import AlignmentConfig, align, align_sub_slots

TINY = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, architecture="qwen3", qk_norm=True)


def ratio_figures(new_tokens: int, weight_scale: float) -> None:
    graphdef, state = nnx.split(init_model(TINY, seed=3))
    state = jax.tree.map(lambda x: x * weight_scale if x.ndim >= 2 else x, state)
    model = nnx.merge(graphdef, state)
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 4], [11], [2, 4, 6, 8, 10], [3], [9, 9], [1, 2, 3], [40, 41]]
    for top_k, top_p in [(8, 1.0), (0, 0.5)]:
        cfg = SamplerConfig(batch_size=8, max_new_tokens=new_tokens, prompt_buckets=(8,), temperature=1.0,
                            top_k=top_k, top_p=top_p)
        samples = Sampler(graphdef, TINY, cfg).generate(state, prompts, jax.random.key(0))
        seqs = [p + s.tokens.tolist() for p, s in zip(prompts, samples)]
        width = max(map(len, seqs))
        tokens = jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32)
        mask = jnp.asarray([[1] * len(s) + [0] * (width - len(s)) for s in seqs], jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(width - 1), (len(seqs), width - 1))
        hidden = model(tokens[:, :-1], positions, mask[:, :-1], return_hidden=True)
        scored = {}
        for name, opts in [("full softmax (before)", {}), ("filtered (after)", dict(top_k=top_k, top_p=top_p))]:
            lp = np.asarray(chunked_token_logprobs(hidden, model.unembedding(), tokens[:, 1:], chunk_size=64, **opts))
            scored[name] = np.concatenate([np.exp(lp[i, len(p) - 1:len(p) - 1 + len(s.tokens)] - s.logprobs)
                                           for i, (p, s) in enumerate(zip(prompts, samples))])
        label = f"top_k={top_k}" if top_k else f"top_p={top_p}"
        for name, r in scored.items():
            print(f"  {label:10s} {name:22s} ratio mean {r.mean():.4f}  min {r.min():.4f}  max|r-1| "
                  f"{np.abs(r - 1).max():.2e}  ({r.size} tokens)")


def group_figures(n_queries: int, k: int, d_max: int) -> None:
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(n_queries, k))
    rewards = rng.integers(0, 3, size=int(counts.sum())).astype(np.float32) / 2
    config = AlignmentConfig(d_max=d_max)
    flat_call = np.concatenate([np.arange(c) for c in counts.reshape(-1)])  # independent of the module

    out = align(counts, d_max, config, np.random.default_rng(1))
    valid = out.index >= 0
    record_call = np.where(valid, flat_call[np.where(valid, out.index, 0)], -1)
    slot = np.broadcast_to(np.arange(d_max), out.index.shape)
    before = np.mean(record_call[valid] != slot[valid])
    ids, _ = sub_group_ids("per_call_index", valid, sub_call_index=out.call_index)
    after = np.mean(record_call[valid] != (np.asarray(ids) // n_queries)[valid])
    print(f"  per_call_index slots whose record's call index is not the group's: before {before:.1%}, "
          f"after {after:.1%}  ({int(valid.sum())} slots)")

    slot_rewards = np.where(valid, rewards[np.where(valid, out.index, 0)], 0.0)
    old_adv = np.asarray(group_relative_advantages(slot_rewards, valid, axis=1))  # slot i across K
    new_adv = align_sub_slots(counts, rewards, d_max, config, np.random.default_rng(1),
                              sub_group="per_call_index").advantages

    def split_copies(adv):
        copies = [adv[out.index == f] for f in np.unique(out.index[valid])]
        multi = [c for c in copies if len(c) > 1]
        return sum(len(set(c.tolist())) > 1 for c in multi), len(multi)

    (b_n, n_multi), (a_n, _) = split_copies(old_adv), split_copies(new_adv)
    print(f"  records in several slots whose copies got different advantages: before {b_n}/{n_multi}, "
          f"after {a_n}/{n_multi}")
    old_dropped = int(np.maximum(counts - d_max, 0).sum())
    absent = int(counts.sum()) - len(np.unique(out.index[valid]))
    print(f"  align/dropped: before {old_dropped}, after {out.stats['dropped']}; records absent from the batch "
          f"{absent}")
    old_rollout = np.asarray(group_relative_advantages(slot_rewards, valid, axis=2))
    borrowed_nonzero = int((old_rollout[out.borrowed] != 0).sum())
    new = align_sub_slots(counts, rewards, d_max, config, np.random.default_rng(1), sub_group="per_rollout")
    print(f"  per_rollout: borrowed slots with a non-zero advantage: before {borrowed_nonzero} of "
          f"{int(out.borrowed.sum())}, after {int((new.advantages[new.alignment.borrowed] != 0).sum())} of "
          f"{int(new.alignment.borrowed.sum())} (borrowing is off under per_rollout)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--d-max", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    for scale in (1.0, 8.0):
        print(f"1. first-epoch importance ratio, tiny random model (weights x{scale:g}), temperature 1.0")
        ratio_figures(args.tokens, scale)
    print(f"2. sub-agent groups, d_k ~ Poisson(2), Q={args.queries}, K={args.rollouts}, D_max={args.d_max}")
    group_figures(args.queries, args.rollouts, args.d_max)


if __name__ == "__main__":
    main()
