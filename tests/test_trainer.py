"""AgentTrainer and the M-GRPO loop: exact losses, real learning signal, compile counts, training modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgrpo_jax.kernels import policy_loss, token_logprobs
from mgrpo_jax.models import ModelConfig, init_model
from mgrpo_jax.rollout.sampler import Sampler, SamplerConfig
from mgrpo_jax.sharding import make_agent_meshes, born_sharded
from mgrpo_jax.train.agent import AgentTrainer, LossConfig, OptimizerConfig
from mgrpo_jax.train.batch import build_batch
from mgrpo_jax.rollout.controller import Trajectory

V = 48
CFG = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8)


def _mesh(n=1, start=0):
    return make_agent_meshes({"agent": {"devices": n, "fsdp": n, "tp": 1}}, devices=jax.devices()[start:start + n])["agent"]


def _agent(name="main", rows=8, mesh=None, seed=0, loss=LossConfig(micro_batch_size=2, chunk_size=16),
           opt=OptimizerConfig(learning_rate=1e-2, weight_decay=0.0), cfg=CFG, **kw):
    graphdef, params, shardings = born_sharded(lambda: init_model(cfg, seed=seed), mesh or _mesh())
    return AgentTrainer(name, graphdef, params, shardings, opt, loss, rows, **kw)


def _random_batch(rng, rows=8, length=12, model=None, temperature=1.0):
    trajs = []
    for r in range(rows):
        n = int(rng.integers(6, length + 1))
        prompt = int(rng.integers(2, 4))
        tokens = rng.integers(0, V, size=n).tolist()
        mask = [0] * prompt + [1] * (n - prompt)
        trajs.append(Trajectory("main", r // 4, r % 4, -1, prompt, tokens, mask, [0.0] * n, [(prompt, n)], "x",
                                "answer", None, 0))
    batch = build_batch(trajs, rng.normal(size=rows), rng.uniform(0.5, 1.5, size=rows), length)
    if model is not None:  # behaviour log-probs: the model's own, slightly perturbed (a near-on-policy sampler)
        lp = _model_logprobs(model, batch, temperature)
        batch["old_logp"][:, 1:] = np.where(batch["loss_mask"][:, 1:] > 0, lp + rng.normal(0, 0.05, lp.shape), 0.0)
    return batch


def _model_logprobs(model, batch, temperature=1.0):
    logits = model(jnp.asarray(batch["tokens"][:, :-1]), jnp.asarray(batch["positions"][:, :-1]),
                   jnp.asarray(batch["attention_mask"][:, :-1]))
    return np.asarray(token_logprobs(logits, batch["tokens"][:, 1:], temperature=temperature))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_update_loss_equals_the_kernels_loss_on_the_whole_batch(agg):
    loss_cfg = LossConfig(micro_batch_size=2, chunk_size=16, agg=agg, temperature=0.8, entropy_coef=0.0)
    agent = _agent(loss=loss_cfg)
    model = nnx.merge(agent.graphdef, agent.params)
    batch = _random_batch(np.random.default_rng(0), model=model, temperature=0.8)
    lp = _model_logprobs(model, batch, 0.8)
    total, denom, _ = policy_loss(lp, batch["old_logp"][:, 1:], batch["advantages"], batch["loss_mask"][:, 1:],
                                  weights=batch["weights"], agg=agg, dual_clip=3.0)
    metrics = agent.update(batch)
    np.testing.assert_allclose(metrics["loss"], float(total / denom), rtol=2e-5, atol=1e-6)
    assert metrics["skipped_steps"] == 0 and metrics["policy_version"] == 1


def test_micro_batching_does_not_change_the_update():
    batch = _random_batch(np.random.default_rng(1), model=init_model(CFG, seed=0))
    a = _agent(loss=LossConfig(micro_batch_size=8, chunk_size=16))
    b = _agent(loss=LossConfig(micro_batch_size=2, chunk_size=16))
    ma, mb = a.update(batch), b.update(batch)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    # Adam's first step moves a weight by lr * g / (|g| + eps): for a gradient at float-cancellation level
    # (~3e-8, a few eps) the summation order of the micro-batches shows at ~1e-3 of lr, so atol is in lr units.
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_non_finite_loss_skips_the_step():
    agent = _agent()
    batch = _random_batch(np.random.default_rng(2))
    batch["old_logp"][0, 5] = np.nan
    batch["loss_mask"][0, 5] = 1
    before = jax.tree.map(np.asarray, (agent.params, agent.opt_state))
    metrics = agent.update(batch)
    assert metrics["skipped_steps"] == 1 and agent.skipped_steps == 1
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves((agent.params, agent.opt_state))):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_few_steps_raise_the_probability_of_rewarded_outputs():
    """The learning signal is real: rewarding first tokens in the lower half of the vocabulary moves mass there."""
    agent = _agent(rows=16, loss=LossConfig(micro_batch_size=8, chunk_size=16),
                   opt=OptimizerConfig(learning_rate=2e-2, weight_decay=0.0))
    sampler = Sampler(agent.graphdef, CFG, SamplerConfig(batch_size=16, max_new_tokens=1, prompt_buckets=(4,)))
    prompt = [3, 7, 11]
    rewarded = np.arange(V) < V // 2

    def mass(params):
        model = nnx.merge(agent.graphdef, params)
        logits = model(jnp.asarray([prompt]), jnp.arange(3)[None], jnp.ones((1, 3), jnp.int32))[0, -1]
        return float(jax.nn.softmax(logits)[rewarded].sum())

    start = mass(agent.params)
    for step in range(6):
        samples = sampler.generate(agent.params, [prompt] * 16, jax.random.key(step))
        rewards = np.array([float(rewarded[s.tokens[0]]) for s in samples])
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        trajs = [Trajectory("main", 0, i, -1, 3, prompt + s.tokens.tolist(), [0] * 3 + [1] * len(s.tokens),
                            [0.0] * 3 + s.logprobs.tolist(), [(3, 3 + len(s.tokens))], None, "answer", None, 0)
                 for i, s in enumerate(samples)]
        agent.update(build_batch(trajs, adv, np.ones(16), 4))
    end = mass(agent.params)
    print(f"rewarded mass {start:.3f} -> {end:.3f}")
    assert end > start + 0.2, (start, end)
    assert agent.compile_count == 1


def test_kl_runs_the_reference_model_only_when_needed():
    loss = LossConfig(kl_coef=0.1, micro_batch_size=2, chunk_size=16)
    with pytest.raises(ValueError, match="needs a reference model"):
        _agent(loss=loss)
    graphdef, params, shardings = born_sharded(lambda: init_model(CFG, seed=0), _mesh())
    ref = jax.tree.map(jnp.copy, params)
    agent = AgentTrainer("main", graphdef, params, shardings, OptimizerConfig(learning_rate=1e-2), loss, 8,
                         ref_params=ref)
    batch = _random_batch(np.random.default_rng(3))
    first = agent.update(batch)
    second = agent.update(batch)
    assert first["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # the policy still equals the reference
    assert second["kl_mean"] > 1e-6
    assert "kl_mean" not in _agent().update(batch)  # kl_coef = 0: no reference model, no KL term


# ---- the M-GRPO loop ---------------------------------------------------------------------------------------

from mgrpo_jax.rollout.controller import Controller, ControllerConfig, SamplerPolicy, TextCodec, ToolSet  # noqa: E402
from mgrpo_jax.rollout.protocol import ProtocolConfig  # noqa: E402
from mgrpo_jax.train.alignment import AlignmentConfig  # noqa: E402
from mgrpo_jax.train.mgrpo import MGRPOConfig, MGRPOTrainer  # noqa: E402
from rollout_fixtures import ScriptedPolicy, tokenizer, tools, world_and_questions  # noqa: E402

Q, K, D, LEN = 2, 4, 2, 320


def _varying_main_script(seed):
    """Delegates a random number of times (0 to 3, so d_k varies every step), then answers."""
    rng = np.random.default_rng(seed)

    def script(prompt):
        turns = prompt.split("<|im_start|>assistant\n", 1)[1].count("<information>")
        if turns == 0:
            script.plan[prompt] = int(rng.integers(0, 4))
        plan = script.plan.get(prompt.split("<|im_start|>assistant\n", 1)[0] + "<|im_start|>assistant\n", 0)
        if turns >= plan:
            return f"<answer>{rng.choice(['Vaska', 'unknown'])}</answer>"
        return "<delegate>find the next fact</delegate>"

    script.plan = {}
    return script


def _sub_script(prompt):
    turns = prompt.split("<|im_start|>assistant\n", 1)[1].count("<information>")
    return "<search>founder</search>" if turns == 0 else "<result>Vaska</result>"


def _sub_model_policy(tok):
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    graphdef, params = nnx.split(init_model(cfg, seed=5))
    sampler = Sampler(graphdef, cfg, SamplerConfig(batch_size=8, max_new_tokens=8, prompt_buckets=(LEN - 8,),
                                                   eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id))
    return SamplerPolicy(sampler, params), cfg


def _loop(mode, sub_policy=None, steps_seed=0):
    tok = tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    protocol = ProtocolConfig()
    main_policy = ScriptedPolicy(tok, _varying_main_script(steps_seed), max_new_tokens=8, max_prompt_tokens=LEN)
    sub_policy = sub_policy or ScriptedPolicy(tok, _sub_script, max_new_tokens=8, max_prompt_tokens=LEN)
    controller = Controller(
        config=ControllerConfig(max_main_context=LEN, max_sub_context=LEN, max_observation_tokens=24,
                                max_main_turns=5, max_delegations=3),
        codec=TextCodec(tok, 24), main_policy=main_policy, main_protocol=protocol.main(), tools=ToolSet(tools()),
        sub_policy=sub_policy, sub_protocol=protocol.sub())
    loss = LossConfig(micro_batch_size=4, chunk_size=64)
    opt = OptimizerConfig(learning_rate=1e-3)
    meshes = make_agent_meshes({"main": {"devices": 2, "fsdp": 2, "tp": 1}, "sub": {"devices": 2, "fsdp": 2, "tp": 1}})
    main = _agent("main", rows=Q * K + (Q * K * D if mode == "shared_model" else 0), mesh=meshes["main"], cfg=cfg,
                  loss=loss, opt=opt)
    trainers = {"main": main}
    if mode == "co_train":
        trainers["sub"] = _agent("sub", rows=Q * K * D, mesh=meshes["sub"], cfg=cfg, seed=5, loss=loss, opt=opt)
    elif mode == "shared_model":
        trainers["sub"] = main
    config = MGRPOConfig(mode=mode, num_rollouts=K, alignment=AlignmentConfig(d_max=D), main_max_len=LEN,
                         sub_max_len=LEN, pad_id=tok.pad_token_id)
    return MGRPOTrainer(config, controller, trainers), trainers


def _questions(step):
    _, questions = world_and_questions()
    picked = [questions[(2 * step + i) % len(questions)] for i in range(Q)]
    return [q.question for q in picked], [q.answer for q in picked]


def test_co_train_compiles_each_update_once_over_20_steps_with_varying_d_k():
    loop, trainers = _loop("co_train")
    seen_counts = set()
    for step in range(20):
        result = loop.step(*_questions(step))
        seen_counts.add(tuple(result.rollouts.sub_counts.reshape(-1)))
        assert result.metrics["main/compile_count"] == 1 and result.metrics["sub/compile_count"] == 1
        assert result.batches["sub"]["tokens"].shape == (Q * K * D, LEN)
    assert len(seen_counts) > 10  # d_k really varied from step to step
    assert trainers["main"].compile_count == 1 and trainers["sub"].compile_count == 1
    assert trainers["main"].version == trainers["sub"].version == 20
    assert loop.controller.main_policy.version == 20
    for key in ("align/dropped", "align/duplicated", "sub/zero_variance_frac", "main/accuracy", "time/rollout_s",
                "main/grad_norm", "sub/clip_frac_high", "main/logprob_gap"):
        assert key in result.metrics, key


def test_main_only_leaves_the_sub_agent_bit_identical_and_co_train_does_not():
    tok = tokenizer()
    for mode in ("main_only", "co_train"):
        sub_policy, _ = _sub_model_policy(tok)
        initial = jax.tree.map(np.array, sub_policy.params)
        loop, trainers = _loop(mode, sub_policy=sub_policy)
        if mode == "co_train":  # the sub trainer's parameters are the ones the sub sampler must use
            sub_policy.update(trainers["sub"].params, 0)
            initial = jax.tree.map(np.array, trainers["sub"].params)
        main_before = jax.tree.map(np.array, trainers["main"].params)
        for step in range(2):
            loop.step(*_questions(step))
        after = jax.tree.map(np.asarray, loop.controller.sub_policy.params)
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(after)))
        assert same == (mode == "main_only"), mode
        assert not all(np.array_equal(a, np.asarray(b)) for a, b in
                       zip(jax.tree.leaves(main_before), jax.tree.leaves(trainers["main"].params)))


def test_shared_model_trains_one_parameter_set_on_both_agents_data():
    loop, trainers = _loop("shared_model")
    result = loop.step(*_questions(0))
    assert set(k.split("/")[0] for k in result.metrics if k.endswith("compile_count")) == {"shared"}
    assert loop.controller.main_policy.params is loop.controller.sub_policy.params is trainers["main"].params
    sampled = result.batches["main"]["loss_mask"].sum() + result.batches["sub"]["loss_mask"].sum()
    assert result.metrics["shared/num_tokens"] == sampled  # both agents' tokens in one update


def test_mode_wiring_errors():
    with pytest.raises(ValueError, match="mode='co_op'"):
        MGRPOConfig(mode="co_op")
    loop, trainers = _loop("co_train")
    with pytest.raises(ValueError, match=r"needs trainers for \['main'\]"):
        MGRPOTrainer(MGRPOConfig(mode="main_only", num_rollouts=K), loop.controller, trainers)


def test_single_agent_mode_calls_tools_itself_and_trains_one_model():
    tok = tokenizer()
    protocol = ProtocolConfig()

    def script(prompt):  # search, then answer with the first document id it saw
        observations = prompt.split("<|im_start|>assistant\n", 1)[1].count("<information>")
        return "<search>founder</search>" if observations == 0 else "<answer>Vaska</answer>"

    policy = ScriptedPolicy(tok, script, max_new_tokens=8, max_prompt_tokens=LEN)
    controller = Controller(config=ControllerConfig(max_main_context=LEN, max_observation_tokens=24),
                            codec=TextCodec(tok, 24), main_policy=policy, main_protocol=protocol.single(),
                            tools=ToolSet(tools()), delegate_action=None)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    main = _agent("main", rows=Q * K, cfg=cfg, loss=LossConfig(micro_batch_size=4, chunk_size=64))
    loop = MGRPOTrainer(MGRPOConfig(mode="single_agent", num_rollouts=K, main_max_len=LEN, sub_max_len=LEN,
                                    pad_id=tok.pad_token_id), controller, {"main": main})
    result = loop.step(*_questions(0))
    assert not result.rollouts.sub and result.rollouts.sub_counts.sum() == 0
    assert all(t.agent == "single" and t.tool_calls == 1 and t.final == "Vaska" for t in result.rollouts.main)
    assert "sub" not in result.batches and result.metrics["main/policy_version"] == 1
    with pytest.raises(ValueError, match="needs a controller with a delegate action"):
        MGRPOTrainer(MGRPOConfig(mode="co_train", num_rollouts=K), controller, {"main": main, "sub": main})
