"""The warm start: teacher demonstrations through the real controller, the SFT objective, and SFT steps."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgrpo_jax import sharding
from mgrpo_jax.models import ModelConfig, init_model
from mgrpo_jax.rollout.controller import Controller, ControllerConfig, TextCodec, ToolSet, Trajectory
from mgrpo_jax.rollout.protocol import ProtocolConfig
from mgrpo_jax.train.agent import AgentTrainer, LossConfig, OptimizerConfig, batch_loss
from mgrpo_jax.train.batch import Segment, pack
from mgrpo_jax.train.demonstrations import make_demonstrations, shortcut_draw
from np_reference import token_logprobs as np_token_logprobs
from rollout_fixtures import ScriptedPolicy, tokenizer, tools, world_and_questions

PROTO = ProtocolConfig()


def _controller(max_observation_tokens=10_000, **cfg):
    tok = tokenizer()
    unused = ScriptedPolicy(tok, lambda prompt: pytest.fail("the teachers replace the controller's policies"))
    codec = TextCodec(tok, max_observation_tokens)
    config = ControllerConfig(max_observation_tokens=max_observation_tokens, max_sub_turns=4, **cfg)
    return Controller(config=config, codec=codec, main_policy=unused, main_protocol=PROTO.main(),
                      tools=ToolSet(tools()), sub_policy=unused, sub_protocol=PROTO.sub())


@pytest.fixture(scope="module")
def demos():
    _, questions = world_and_questions()
    return questions, make_demonstrations(_controller(), questions)


def _actions(traj, tok):
    """(tag, argument) of each loss-masked span, read back from the tokens independently of the parser."""
    out = []
    for start, end in traj.turns:
        m = re.fullmatch(r"<(\w+)>(.*)</\1>", tok.decode(traj.tokens[start:end]), re.S)
        assert m, tok.decode(traj.tokens[start:end])
        out.append((m.group(1), m.group(2)))
    return out


def test_demonstrations_follow_the_hop_chains_token_exactly(demos):
    questions, d = demos
    tok = tokenizer()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert not d.dropped and len(d.main) == len(questions)  # generous limits: nothing to drop
    assert len(d.sub) == sum(q.hops for q in questions) and {q.hops for q in questions} == {1, 2, 3, 4}
    for traj in d.main:
        q = questions[traj.query]
        assert traj.agent == "main" and traj.format_ok and traj.final == q.answer
        assert _actions(traj, tok) == [("delegate", h.question) for h in q.chain] + [("answer", q.answer)]
    for traj in d.sub:
        hop = questions[traj.query].chain[traj.call]
        assert traj.agent == "sub" and traj.format_ok and traj.final == hop.answer
        assert _actions(traj, tok) == [("search", hop.subject), ("read", hop.doc_id), ("result", hop.answer)]
        # Grounded: the id read is shown by the search, the result by the document read.
        obs = [tok.decode(traj.tokens[e:s]) for (_, e), (s, _) in zip(traj.turns, traj.turns[1:])]
        assert f"(id: {hop.doc_id})" in obs[0] and hop.answer in obs[1]
    for traj in d.main + d.sub:
        # Loss mask exactly on the teacher's actions, which are the tokenizer's ids of the action text.
        mask = np.zeros(len(traj.tokens), int)
        for start, end in traj.turns:
            mask[start:end] = 1
            assert traj.tokens[start:end] == enc(tok.decode(traj.tokens[start:end]))
        np.testing.assert_array_equal(traj.loss_mask, mask)
        assert mask[: traj.prompt_len].sum() == 0 and not any(traj.logprobs)


def test_ungrounded_demonstrations_are_dropped_and_counted():
    """Observations cut to 20 tokens hide most documents' facts: those sub demonstrations are dropped (never
    taught to report an answer they cannot see); every kept one still shows what it reads and reports."""
    _, questions = world_and_questions()
    tok = tokenizer()
    d = make_demonstrations(_controller(max_observation_tokens=20), questions)
    hops = sum(q.hops for q in questions)
    assert sum(d.dropped.values()) == hops - len(d.sub) + len(questions) - len(d.main) > 0
    assert d.dropped["sub/ungrounded_result"] > 0 and len(d.main) == len(questions)
    for traj in d.sub:
        hop = questions[traj.query].chain[traj.call]
        acts = _actions(traj, tok)
        assert acts[-2:] == [("read", hop.doc_id), ("result", hop.answer)]
        assert [a for a, _ in acts[:-2]] in (["search"], ["search", "search"])
        seen = tok.decode(traj.tokens[: traj.turns[-1][0]])
        assert hop.doc_id in tok.decode(traj.tokens[: traj.turns[-2][0]]) and hop.answer in seen


def test_single_agent_demonstrations_search_and_read_every_hop_then_answer():
    """A single-agent controller (tools, no sub-agent) gets the single teacher: per hop, a search for the hop's
    subject and a read of its document, then the answer; with short observations the hops whose document the
    search hides are dropped and counted, and every kept demonstration still shows what it reads and answers."""
    _, questions = world_and_questions()
    tok = tokenizer()
    unused = ScriptedPolicy(tok, lambda prompt: pytest.fail("the teacher replaces the controller's policy"))

    def single(max_observation_tokens):
        config = ControllerConfig(max_observation_tokens=max_observation_tokens, max_main_turns=12,
                                  max_main_context=4096)
        return Controller(config=config, codec=TextCodec(tok, max_observation_tokens), main_policy=unused,
                          main_protocol=PROTO.single(), tools=ToolSet(tools()))

    d = make_demonstrations(single(10_000), questions)
    assert not d.dropped and not d.sub and len(d.main) == len(questions)
    for traj in d.main:
        q = questions[traj.query]
        assert traj.agent == "single" and traj.format_ok and traj.final == q.answer
        expected = [a for h in q.chain for a in (("search", h.subject), ("read", h.doc_id))]
        assert _actions(traj, tok) == expected + [("answer", q.answer)]
        obs = [tok.decode(traj.tokens[e:s]) for (_, e), (s, _) in zip(traj.turns, traj.turns[1:])]
        for i, hop in enumerate(q.chain):  # the search shows the id read; the document shows the hop's answer
            assert f"(id: {hop.doc_id})" in obs[2 * i] and hop.answer in obs[2 * i + 1]

    short = make_demonstrations(single(20), questions)
    assert sum(short.dropped.values()) == len(questions) - len(short.main) > 0
    assert set(short.dropped) <= {"single/ungrounded_answer", "single/ungrounded_search"}
    for traj in short.main:
        q = questions[traj.query]
        seen = tok.decode(traj.tokens[: traj.turns[-1][0]])
        assert q.answer in seen and all(h.doc_id in seen for h in q.chain)


def _single(max_observation_tokens=10_000):
    tok = tokenizer()
    unused = ScriptedPolicy(tok, lambda prompt: pytest.fail("the teacher replaces the controller's policy"))
    config = ControllerConfig(max_observation_tokens=max_observation_tokens, max_main_turns=12, max_main_context=4096)
    return Controller(config=config, codec=TextCodec(tok, max_observation_tokens), main_policy=unused,
                      main_protocol=PROTO.single(), tools=ToolSet(tools()))


def _titles(observation):
    """Hit titles of a search observation, sections stripped (read independently of the teacher's regex)."""
    return [line.split('"')[1].split(" (")[0] for line in observation.splitlines() if line.startswith("Doc ")]


def test_shortcut_demonstrations_answer_early_or_report_without_reading():
    """With shortcuts, each decision point takes the shortcut exactly when its seeded draw says so: the main
    teacher answers with what it last read instead of delegating the next hop; the sub teacher reports a hit's
    title instead of reading. Each agent's demonstrations come from episodes whose other agent is clean, and
    every one passes the grounding checks."""
    _, questions = world_and_questions()
    tok = tokenizer()
    rate, seed = 0.5, 3
    d = make_demonstrations(_controller(), questions, shortcuts={"main": rate, "sub": rate}, seed=seed)
    assert not d.dropped and len(d.main) == len(questions) and len(d.sub) == sum(q.hops for q in questions)
    early = 0
    for traj in d.main:
        q = questions[traj.query]
        acts = _actions(traj, tok)
        delegated = len(acts) - 1
        assert acts[:-1] == [("delegate", h.question) for h in q.chain[:delegated]]
        assert delegated in (q.hops - 1, q.hops)  # one decision point: the last hop
        if delegated < q.hops:
            early += 1
            assert shortcut_draw(seed, "main", q.question, delegated) < rate
            # what it last read: the previous hop's (clean) result, or the head entity before any delegation
            assert acts[-1] == ("answer", q.chain[delegated - 1].answer if delegated else q.chain[0].subject)
        else:
            assert shortcut_draw(seed, "main", q.question, q.hops - 1) >= rate
            assert acts[-1] == ("answer", q.answer)
    reported = 0
    for traj in d.sub:
        hop = questions[traj.query].chain[traj.call]
        acts = _actions(traj, tok)
        if shortcut_draw(seed, "sub", hop.question, 0) < rate:
            reported += 1
            assert [a for a, _ in acts] == ["search", "result"] and acts[-1][1] != hop.answer
            titles = _titles(tok.decode(traj.tokens[traj.turns[0][1]:traj.turns[1][0]]))
            assert acts[-1][1] == ([t for t in titles if hop.subject not in t] or titles)[0]
        else:
            assert acts[-2:] == [("read", hop.doc_id), ("result", hop.answer)]
    assert 0 < early < len(d.main) and 0 < reported < len(d.sub)
    assert d.stats["main_shortcuts"] == early and d.stats["sub_shortcuts"] == reported
    again = make_demonstrations(_controller(), questions, shortcuts={"main": rate, "sub": rate}, seed=seed)
    assert [list(t.tokens) for t in again.sub] == [list(t.tokens) for t in d.sub]  # reproducible
    other = make_demonstrations(_controller(), questions, shortcuts={"main": rate, "sub": rate}, seed=seed + 1)
    assert [list(t.tokens) for t in other.main] != [list(t.tokens) for t in d.main]  # a fresh draw

    always = make_demonstrations(_controller(), questions, shortcuts={"main": 1.0})
    for t in always.main:
        q = questions[t.query]
        last_read = q.chain[-2].answer if q.hops > 1 else q.chain[0].subject
        assert _actions(t, tok) == [("delegate", h.question) for h in q.chain[:-1]] + [("answer", last_read)]
    assert len(always.sub) == sum(q.hops for q in questions) and always.stats["sub_shortcuts"] == 0
    with pytest.raises(ValueError, match="probabilities in"):
        make_demonstrations(_controller(), questions, shortcuts={"main": 1.5})
    with pytest.raises(ValueError, match="probabilities in"):
        make_demonstrations(_controller(), questions, shortcuts={"judge": 0.5})


def test_single_agent_shortcuts_answer_early_or_report_a_title():
    _, questions = world_and_questions()
    tok = tokenizer()
    rate, seed = 0.4, 1
    d = make_demonstrations(_single(), questions, shortcuts={"main": rate, "sub": rate}, seed=seed)
    assert not d.dropped and len(d.main) == len(questions)
    taken = 0
    for traj in d.main:
        q = questions[traj.query]
        acts = _actions(traj, tok)
        expected = []
        for i, hop in enumerate(q.chain):  # the teacher's episode, replayed from the draws
            if i == q.hops - 1 and shortcut_draw(seed, "main", q.question, i) < rate:
                expected.append(("answer", q.chain[i - 1].answer if i else hop.subject))
                break
            expected.append(("search", hop.subject))
            if shortcut_draw(seed, "sub", q.question, i) < rate:
                obs = tok.decode(traj.tokens[traj.turns[len(expected) - 1][1]:traj.turns[len(expected)][0]])
                titles = _titles(obs)
                expected.append(("answer", ([t for t in titles if hop.subject not in t] or titles)[0]))
                break
            expected.append(("read", hop.doc_id))
        else:
            expected.append(("answer", q.answer))
        taken += expected[-1] != ("answer", q.answer)
        assert acts == expected
    assert 0 < taken == d.stats["main_shortcuts"] < len(questions)


def _tiny_model(vocab, seed=0):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    return cfg, init_model(cfg, seed=seed)


def test_sft_objective_is_the_weighted_token_mean_nll():
    """On packed rows (several demonstrations per row), the SFT loss is the weighted token-mean NLL of each
    demonstration scored alone (an unpacked forward in float64 NumPy log-softmax)."""
    rng = np.random.default_rng(0)
    cfg, model = _tiny_model(vocab=50)
    lengths, weights = [12, 5, 9, 7], [1.0, 0.0, 2.0, 0.5]
    rows = []
    for i, n in enumerate(lengths):
        tokens = rng.integers(0, 50, n).tolist()
        mask = [0] + (rng.random(n - 1) < 0.6).astype(int).tolist()
        rows.append(Trajectory("sub", 0, 0, i, 1, tokens, mask, [0.0] * n, [], None, "result", None, 0))
    batch = pack([Segment(t, float(rng.normal()), w) for t, w in zip(rows, weights)], row_len=16, rows=2)
    assert batch.arrays["segment_ids"].max() > 1  # rows really hold several demonstrations
    graphdef, state = nnx.split(model)
    loss = jax.jit(lambda s, b: batch_loss(nnx.merge(graphdef, s), b, LossConfig(objective="sft", chunk_size=5)))
    total, denom, metrics = loss(state, batch.arrays)

    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, jnp.arange(t.shape[1])[None], jnp.ones_like(t)))
    expected_total = expected_denom = nll_sum = count = 0.0
    for t, w in zip(rows, weights):
        logits = np.asarray(forward(state, jnp.asarray([t.tokens], jnp.int32))[0], np.float64)
        logp = np_token_logprobs(logits[None, :-1], np.asarray([t.tokens[1:]]))[0]
        m = np.asarray(t.loss_mask[1:])
        expected_total += w * -(logp * m).sum()
        expected_denom += w * m.sum()
        nll_sum, count = nll_sum - (logp * m).sum(), count + m.sum()
    np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)
    np.testing.assert_allclose(float(denom), expected_denom, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["nll"]), nll_sum / count, rtol=1e-5)
    # Advantages and behaviour log-probs do not enter the SFT objective.
    other = loss(state, {**batch.arrays, "advantages": -batch.arrays["advantages"],
                         "old_logp": batch.arrays["old_logp"] - 3})
    assert float(other[0]) == float(total)


def test_sft_options_are_validated():
    with pytest.raises(ValueError, match="loss.objective"):
        LossConfig(objective="dpo")
    with pytest.raises(ValueError, match="kl_coef"):
        LossConfig(objective="sft", kl_coef=0.1)


def test_sft_steps_raise_the_likelihood_of_the_demonstrations(demos):
    """A few SFT updates of a tiny sub-agent through AgentTrainer (packed, micro-batched) lower the
    demonstrations' NLL; the update's reported loss is the NLL of the whole batch before the step."""
    _, d = demos
    tok = tokenizer()
    rows = sorted(d.sub, key=lambda t: len(t.tokens))[:4]
    max_len = -(-max(len(t.tokens) for t in rows) // 16) * 16
    cfg, _ = _tiny_model(vocab=len(tok))
    mesh = sharding.make_agent_meshes({"sub": {"devices": 1}}, devices=jax.devices()[:1])["sub"]
    graphdef, params, shardings = sharding.born_sharded(lambda: init_model(cfg, seed=0), mesh)
    loss_cfg = LossConfig(objective="sft", micro_batch_size=1, chunk_size=256)
    trainer = AgentTrainer("sub_sft", graphdef, params, shardings,
                           OptimizerConfig(learning_rate=1e-2, weight_decay=0.0), loss_cfg, row_len=max_len,
                           pad_id=tok.pad_token_id)
    batch = trainer.pack([Segment(t) for t in rows])
    assert batch.num_micro_batches > 1
    loss = jax.jit(lambda p, b: batch_loss(nnx.merge(graphdef, p), b, loss_cfg))

    def nll(p):
        parts = [loss(p, m)[:2] for m in batch.micro_batches()]
        return float(sum(t for t, _ in parts) / sum(d for _, d in parts))

    before = nll(trainer.params)
    first = trainer.update(batch)
    np.testing.assert_allclose(first["loss"], before, rtol=1e-4)
    for _ in range(5):
        metrics = trainer.update(batch)
    after = nll(trainer.params)
    assert after < 0.8 * before, (before, after)
    assert metrics["num_tokens"] == sum(sum(t.loss_mask[1:]) for t in rows) and trainer.compile_count == 1
