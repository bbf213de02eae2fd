"""Decode speed of the KV-cache sampler versus full recompute, and batched controller throughput, on CPU.

    python bench/sampler.py [--new-tokens 256] [--batch 8] [--prompt 64]

1. Greedy decoding of `--new-tokens` tokens for a batch of prompts on a small decoder: the sampler (jitted
   prefill + while_loop over a KV cache) versus full recompute (the same fixed-size buffer re-run through
   the whole model for every new token, also one jitted loop, so both sides are compiled programs).
   Target (issue 4): the cache at least 10x faster.
2. The controller on a generated world with a tiny random model as both agents: episodes/s and the phase
   times it reports.
3. `--warm-start ROOT` (a repro root holding warm_multi/, `launch/repro.py` or `make demo` writes it): real
   multi-turn episodes of the warm-started tiny agents (configs/repro/co_train.py's controller, Q x K episodes
   per batch, sampling at the RL temperature): episodes/s, generated tokens/s, and how much of each agent's
   prompts the slot cache reused from the episode's earlier turns instead of prefilling them again.
Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # the configs' per-agent devices
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mgrpo_jax.models import ModelConfig, init_model  # noqa: E402
from mgrpo_jax.rollout.sampler import Sampler, SamplerConfig  # noqa: E402

SMALL = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4,
                    head_dim=32, architecture="qwen3", qk_norm=True)


def full_recompute_fn(graphdef, prompt_len: int, new_tokens: int):
    """Greedy decoding without a cache: step i re-runs the model over the whole [B, prompt + new] buffer."""
    total = prompt_len + new_tokens

    def run(params, prompts):
        model = nnx.merge(graphdef, params)
        batch = prompts.shape[0]
        tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompts)
        positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))

        def step(i, tokens):
            length = prompt_len + i
            mask = (positions < length).astype(jnp.int32)
            logits = model(tokens, positions, mask)
            nxt = jnp.argmax(logits[:, length - 1], axis=-1).astype(jnp.int32)
            return tokens.at[:, length].set(nxt)

        return jax.lax.fori_loop(0, new_tokens, step, tokens)[:, prompt_len:]

    return jax.jit(run)


def timed(fn, repeats: int = 2) -> float:
    fn()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_decode(args) -> None:
    graphdef, params = nnx.split(init_model(SMALL, seed=0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, SMALL.vocab_size, size=(args.batch, args.prompt)).astype(np.int32)
    sampler = Sampler(graphdef, SMALL, SamplerConfig(batch_size=args.batch, max_new_tokens=args.new_tokens,
                                                     prompt_buckets=(args.prompt,), temperature=0.0))
    cached_out = []
    cached_s = timed(lambda: cached_out.append(sampler.generate(params, prompts.tolist(), jax.random.key(0))))
    recompute = full_recompute_fn(graphdef, args.prompt, args.new_tokens)
    full_out = []
    full_s = timed(lambda: full_out.append(jax.block_until_ready(recompute(params, jnp.asarray(prompts)))), repeats=1)
    agree = np.mean([np.array_equal(s.tokens, f) for s, f in zip(cached_out[-1], np.asarray(full_out[-1]))])
    n = args.batch * args.new_tokens
    print(f"decode {args.new_tokens} new tokens, batch {args.batch}, prompt {args.prompt}, "
          f"{SMALL.num_layers} layers x {SMALL.hidden_size} (float32, CPU)")
    print(f"  KV cache        {cached_s:7.2f} s  {n / cached_s:9.1f} tokens/s")
    print(f"  full recompute  {full_s:7.2f} s  {n / full_s:9.1f} tokens/s")
    print(f"  speed-up {full_s / cached_s:.1f}x; greedy outputs identical for {agree:.0%} of rows")


def bench_controller(args) -> None:
    from mgrpo_jax.data.synthetic import generate_questions, generate_world
    from mgrpo_jax.data.tokenizer import train_tokenizer
    from mgrpo_jax.rollout.controller import Controller, ControllerConfig, SamplerPolicy, TextCodec, ToolSet
    from mgrpo_jax.rollout.protocol import ProtocolConfig
    from mgrpo_jax.rollout.tools import LocalSearch, ReadDocument

    world = generate_world(0, num_entities=60)
    questions = generate_questions(world, 16, seed=0)
    tok = train_tokenizer([d.contents for d in world.documents] + [q.question for q in questions], vocab_size=800)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    sampler = Sampler(graphdef, cfg, SamplerConfig(batch_size=32, max_new_tokens=32, prompt_buckets=(192, 480),
                                                   eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id))
    proto = ProtocolConfig()
    ctrl = Controller(config=ControllerConfig(max_main_context=512, max_sub_context=512, max_observation_tokens=64),
                      codec=TextCodec(tok, 64), main_policy=SamplerPolicy(sampler, params),
                      main_protocol=proto.main(), tools=ToolSet({"search": LocalSearch(world.documents),
                                                                 "read": ReadDocument(world.documents)}),
                      sub_policy=SamplerPolicy(sampler, params), sub_protocol=proto.sub())
    qs = [q.question for q in questions[:8]]
    ctrl.run(qs, 4, jax.random.key(0))  # compile
    start = time.perf_counter()
    batch = ctrl.run(qs, 4, jax.random.key(1))
    elapsed = time.perf_counter() - start
    episodes = len(batch.main) + len(batch.sub)
    turns = sum(len(t.turns) for t in batch.main + batch.sub)
    print(f"\ncontroller: 8 queries x 4 rollouts, tiny random model (hidden 64), batch 32, 32 tokens per turn")
    print(f"  {episodes} episodes ({len(batch.sub)} sub) and {turns} turns in {elapsed:.2f} s: "
          f"{episodes / elapsed:.1f} episodes/s, {turns / elapsed:.1f} turns/s")
    print("  " + ", ".join(f"{k}={v:.3g}" for k, v in sorted(batch.stats.items()) if isinstance(v, float)))


# The sampler settings the multi-turn workload is timed with: what each stage of issue 13's work changed.
MULTITURN_VARIANTS = {
    "before": {"prefill_rows": (), "attention": "", "attention_block": 512},  # every prefill over every row, dense
    "row_blocks": {"attention": "", "attention_block": 512},  # + prefill over a block of the admitted rows
    "tiled": {},  # + attention over the cache in tiles up to its filled extent (the repro configs' setting)
}


def bench_multiturn(args) -> None:
    """Times each variant's rollout batches in interleaved rounds (this machine's speed drifts by +-30% within
    minutes; interleaving exposes every variant to the same drift) and reports the best and median round."""
    import statistics
    import tempfile

    from configs.repro import co_train
    from mgrpo_jax.data.synthetic import read_questions_jsonl
    from mgrpo_jax.experiment import build_experiment

    runs = {}  # variant -> its experiment, and per round: seconds, episodes, sampled tokens
    for name in args.variants:
        config = co_train.get_config(args.warm_start)
        for role in ("main", "sub"):
            for key, value in MULTITURN_VARIANTS[name].items():
                config.agents[role].sampler[key] = value
        exp = build_experiment(config, tempfile.mkdtemp(prefix=f"bench_multiturn_{name}_"))
        questions = [x.question for x in read_questions_jsonl(exp.data.train_files[0])]
        q, k = config.mgrpo.num_queries, config.mgrpo.num_rollouts  # the same in every variant
        exp.controller.run(questions[:q], k, jax.random.key(0))
        for agent in exp.agents.values():  # every program is compiled: the timed batches compile nothing
            agent.policy.sampler.warm_up(agent.policy.params)
            agent.policy.sampler.release()
            agent.policy.sampler.stats.clear()
        runs[name] = {"exp": exp, "questions": questions, "rounds": []}
    for _ in range(args.rounds):
        for run in runs.values():
            episodes = tokens = 0
            start = time.perf_counter()
            for i in range(args.batches):
                batch = run["exp"].controller.run(run["questions"][(i + 1) * q:(i + 2) * q], k, jax.random.key(i + 1))
                trajectories = batch.main + batch.sub
                episodes += len(trajectories)
                tokens += sum(int(sum(t.loss_mask)) for t in trajectories)  # the tokens the agents sampled
            run["rounds"].append((time.perf_counter() - start, episodes, tokens))
    print(f"\nmulti-turn episodes of the warm-started tiny agents ({args.warm_start}): {args.batches} batches of "
          f"{q} x {k} main episodes and their sub-agent episodes per round, {args.rounds} interleaved rounds")
    for name, run in runs.items():
        times = [seconds for seconds, _, _ in run["rounds"]]
        best, median = min(times), statistics.median(times)
        _, episodes, tokens = run["rounds"][-1]  # the same batches every round
        print(f"  {name:10s} {MULTITURN_VARIANTS[name] or 'the repro config'}: {episodes} episodes; best "
              f"{episodes / best:.1f} episodes/s ({tokens / best:.0f} generated tokens/s), median "
              f"{episodes / median:.1f} episodes/s; rounds " + " ".join(f"{t:.2f}" for t in times) + " s")
        for role, agent in run["exp"].agents.items():
            st, cfg = agent.policy.sampler.stats, agent.policy.sampler.config
            prompt = max(st.get("prompt_tokens", 0), 1)
            print(f"    {role} (all rounds): prefill rows {cfg.prefill_rows or 'all'}, attention "
                  f"{cfg.attention or agent.policy.sampler.model_config.attention!r} (tile {cfg.attention_block}); "
                  f"prompt tokens {st.get('prompt_tokens', 0)}, reused from the slot cache "
                  f"{st.get('reused_tokens', 0)} ({st.get('reused_tokens', 0) / prompt:.0%}), prefilled "
                  f"{st.get('prefill_tokens', 0)} in blocks of {st.get('prefill_block_tokens', 0)} token slots; "
                  f"{st.get('prefill_calls', 0)} prefill and {st.get('decode_calls', 0)} decode calls, "
                  f"{st.get('evictions', 0)} evictions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--skip-controller", action="store_true")
    parser.add_argument("--warm-start", default=None, metavar="ROOT",
                        help="a repro root with warm_multi/: time real multi-turn episodes of those agents")
    parser.add_argument("--batches", type=int, default=4, help="rollout batches per round of the --warm-start workload")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of the --warm-start workload")
    parser.add_argument("--variants", nargs="+", default=list(MULTITURN_VARIANTS), choices=list(MULTITURN_VARIANTS),
                        help="sampler settings to time on the --warm-start workload (MULTITURN_VARIANTS)")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if args.warm_start:
        bench_multiturn(args)
        return
    bench_decode(args)
    if not args.skip_controller:
        bench_controller(args)


if __name__ == "__main__":
    main()
