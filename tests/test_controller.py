"""The controller driven by scripted policies: every record checked exactly; limits; a real tiny model."""
import logging
import re

import jax
import numpy as np
import pytest

from mgrpo_jax.rollout.controller import (Controller, ControllerConfig, RolloutBatch, TextCodec, ToolFailureError,
                                          ToolSet, Trajectory)
from mgrpo_jax.rollout.protocol import ProtocolConfig
from rollout_fixtures import ScriptedPolicy, tokenizer, tools, world_and_questions

PROTO = ProtocolConfig()
K = 3


def _observations(prompt):
    """Observation texts after the assistant turn opened (the system prompt mentions the tags too)."""
    answer_part = prompt.split("<|im_start|>assistant\n", 1)[1]
    return re.findall(r"<information>(.*?)</information>", answer_part, re.S)


def _main_script(occurrences):
    """Rollout j of a query plans j delegations (so d_k = 0, 1, 2), then answers with the last result."""

    def script(prompt):
        question = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S).group(1)
        infos = _observations(prompt)
        plan = re.search(r"\[plan (\d)\]", prompt)
        if plan is None:  # first turn: the j-th identical prompt of this batch is rollout j
            j = occurrences.setdefault(question, 0)
            occurrences[question] = j + 1
            if j == 0:
                return "No need to ask.<answer>unknown</answer>"
            return f"<delegate>[plan {j}] hop 1 of: {question}</delegate>"
        d = int(plan.group(1))
        if len(infos) < d:
            return f"<delegate>[plan {d}] hop {len(infos) + 1} of: {question}</delegate>"
        return f"<answer>{infos[-1].strip()}</answer>"

    return script


def _sub_script(prompt):
    subtask = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S).group(1)
    infos = _observations(prompt)
    if "[plan 2] hop 2" in subtask:
        return "I am confused"  # no action: a format error on the second call of 2-delegation rollouts
    if not infos:
        return f"<search>{subtask.split('of: ')[1]}</search>"
    if len(infos) == 1:
        doc = re.search(r"doc-\d+", infos[0])
        return f"<read>{doc.group(0)}</read>"
    return f"<result>read {len(infos[1])} chars</result>"


def _controller(main, sub, **cfg):
    codec = TextCodec(tokenizer(), max_observation_tokens=cfg.pop("max_observation_tokens", 10_000))
    return Controller(config=ControllerConfig(max_observation_tokens=codec.max_observation_tokens, **cfg),
                      codec=codec, main_policy=main, main_protocol=PROTO.main(), tools=ToolSet(tools()),
                      sub_policy=sub, sub_protocol=PROTO.sub()), codec


def test_scripted_rollouts_record_everything_exactly():
    tok = tokenizer()
    _, questions = world_and_questions()
    qs = [q.question for q in questions[:2]]
    main, sub = ScriptedPolicy(tok, _main_script({}), version=7), ScriptedPolicy(tok, _sub_script, version=3)
    ctrl, codec = _controller(main, sub)
    batch = ctrl.run(qs, K, jax.random.key(0))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731

    np.testing.assert_array_equal(batch.sub_counts, [[0, 1, 2], [0, 1, 2]])
    assert [(t.query, t.rollout, t.call, t.agent) for t in batch.main] == \
        [(q, k, -1, "main") for q in range(2) for k in range(K)]
    assert [(t.query, t.rollout, t.call) for t in batch.sub] == \
        [(q, k, i) for q in range(2) for k in range(K) for i in range(k)]
    # Lockstep batching: turn 1 gathers all 6 main episodes; sub episodes of all rollouts run together.
    assert main.calls == [6, 4, 2] and sub.calls[0] == 4

    search, read = tools()["search"], tools()["read"]
    for traj in batch.sub:
        subtask = f"[plan {traj.rollout}] hop {traj.call + 1} of: {qs[traj.query]}"
        expected = list(codec.prompt(ctrl.config.sub_system_prompt, subtask))
        assert traj.tokens[: traj.prompt_len] == expected and traj.policy_version == 3
        assert traj.task == subtask  # what a sub judge reads
        if traj.rollout == 2 and traj.call == 1:
            assert (traj.finish_reason, traj.format_ok, traj.final) == ("format_error", False, None)
            expected += enc("I am confused")
        else:
            hits = search(qs[traj.query])
            doc = re.search(r"doc-\d+", hits).group(0)
            doc_text = read(doc)
            for action, observation in ((f"<search>{qs[traj.query]}</search>", hits),
                                        (f"<read>{doc}</read>", doc_text)):
                expected += enc(action)
                expected += codec.observation(PROTO.sub(), observation)[0]
            expected += enc(f"<result>read {len(doc_text)} chars</result>")
            assert traj.final == f"read {len(doc_text)} chars" and traj.format_ok and traj.tool_calls == 2
        assert traj.tokens == expected
        _check_masks(traj)

    for traj in batch.main:
        assert traj.policy_version == 7 and traj.format_ok and traj.finish_reason == "answer"
        expected = list(codec.prompt(ctrl.config.main_system_prompt, qs[traj.query]))
        assert traj.tokens[: traj.prompt_len] == expected and traj.task == qs[traj.query]
        if traj.rollout == 0:
            expected += enc("No need to ask.<answer>unknown</answer>")
            assert traj.final == "unknown"
        else:
            subs = [s for s in batch.sub if (s.query, s.rollout) == (traj.query, traj.rollout)]
            for i, s in enumerate(subs):
                expected += enc(f"<delegate>[plan {traj.rollout}] hop {i + 1} of: {qs[traj.query]}</delegate>")
                result = s.final if s.format_ok else "[sub-agent failed: format_error]"
                expected += codec.observation(PROTO.main(), result)[0]
            expected += enc(f"<answer>{result}</answer>")
            assert traj.final == result
        assert traj.tokens == expected
        _check_masks(traj)
    assert batch.stats["main_finish/answer"] == 6 and batch.stats["sub_finish/format_error"] == 2


def _check_masks(traj):
    """loss mask 1 exactly on the sampled spans; behaviour log-probs there, 0 elsewhere."""
    mask = np.zeros(len(traj.tokens), int)
    logp = np.zeros(len(traj.tokens), np.float32)
    for start, end in traj.turns:
        mask[start:end] = 1
        logp[start:end] = -0.01 * (1 + np.arange(end - start))
    assert len(traj.loss_mask) == len(traj.logprobs) == len(traj.tokens)
    np.testing.assert_array_equal(traj.loss_mask, mask)
    np.testing.assert_allclose(traj.logprobs, logp, rtol=1e-6)
    assert mask[: traj.prompt_len].sum() == 0


def test_limits_end_episodes_as_format_failures():
    tok = tokenizer()
    _, questions = world_and_questions()
    always_delegate = ScriptedPolicy(tok, lambda p: "<delegate>who?</delegate>")
    endless_search = ScriptedPolicy(tok, lambda p: "<search>who</search>")
    ctrl, _ = _controller(always_delegate, endless_search, max_delegations=2, max_sub_turns=3, max_main_turns=10)
    batch = ctrl.run([questions[0].question], 2, jax.random.key(0))
    assert [t.finish_reason for t in batch.main] == ["max_delegations"] * 2
    assert not any(t.format_ok for t in batch.main)
    assert [t.finish_reason for t in batch.sub] == ["max_turns"] * 4
    np.testing.assert_array_equal(batch.sub_counts, [[2, 2]])
    # Context limit: observations are long, so the sub-agent runs out of context before its turn limit.
    ctrl, _ = _controller(always_delegate, endless_search, max_delegations=1, max_sub_turns=50,
                          max_sub_context=400)
    batch = ctrl.run([questions[0].question], 1, jax.random.key(0))
    assert batch.sub[0].finish_reason == "max_context" and len(batch.sub[0].tokens) <= 400


def test_observations_are_truncated_and_counted():
    tok = tokenizer()
    _, questions = world_and_questions()
    main = ScriptedPolicy(tok, lambda p: "<answer>x</answer>" if _observations(p) else "<delegate>a</delegate>")
    sub = ScriptedPolicy(tok, lambda p: "<result>done</result>" if _observations(p) else "<search>who</search>")
    ctrl, codec = _controller(main, sub, max_observation_tokens=5)
    batch = ctrl.run([questions[0].question], 1, jax.random.key(0))
    assert batch.sub[0].truncated_observations == 1
    obs = codec.observation(PROTO.sub(), "one two three four five six seven eight nine ten")
    assert obs[1] and len(obs[0]) == 5 + len(codec.encode("\n<information>")) + len(codec.encode("</information>\n"))


def test_bad_wiring_is_a_clear_error():
    tok = tokenizer()
    with pytest.raises(ValueError, match="pass sub_policy and sub_protocol"):
        Controller(config=ControllerConfig(), codec=TextCodec(tok, 16), main_policy=ScriptedPolicy(tok, str),
                   main_protocol=PROTO.main(), tools=ToolSet({}))
    small = ScriptedPolicy(tok, str, max_prompt_tokens=100)
    with pytest.raises(ValueError, match="largest prompt bucket is 100"):
        Controller(config=ControllerConfig(), codec=TextCodec(tok, 16), main_policy=small,
                   main_protocol=PROTO.single(), tools=ToolSet({}))


def test_end_to_end_with_a_tiny_random_model():
    from flax import nnx

    from mgrpo_jax.kernels import token_logprobs
    from mgrpo_jax.models import ModelConfig, init_model
    from mgrpo_jax.rollout.controller import SamplerPolicy
    from mgrpo_jax.rollout.sampler import Sampler, SamplerConfig

    tok = tokenizer()
    _, questions = world_and_questions()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    sampler = Sampler(graphdef, cfg, SamplerConfig(batch_size=4, max_new_tokens=16, prompt_buckets=(128, 256),
                                                   eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id))
    codec = TextCodec(tok, max_observation_tokens=64)
    ctrl = Controller(config=ControllerConfig(max_main_context=272, max_sub_context=272, max_main_turns=2,
                                              max_sub_turns=2, max_observation_tokens=64),
                      codec=codec, main_policy=SamplerPolicy(sampler, state), main_protocol=PROTO.main(),
                      tools=ToolSet(tools()), sub_policy=SamplerPolicy(sampler, state), sub_protocol=PROTO.sub())
    batch = ctrl.run([q.question for q in questions[:3]], 2, jax.random.key(0))
    assert len(batch.main) == 6 and batch.sub_counts.sum() == len(batch.sub)
    model = nnx.merge(graphdef, state)
    for traj in batch.main + batch.sub:
        assert traj.finish_reason  # every episode ended, within its limits
        assert len(traj.turns) <= 2 and len(traj.tokens) <= 272
        _check_turn_masks(traj)
        # Token-exact: the recorded behaviour log-probs are the model's own log-probs of the recorded tokens.
        seq = np.asarray([traj.tokens], np.int32)
        logits = model(seq, np.arange(seq.shape[1])[None], np.ones_like(seq))
        lp = np.asarray(token_logprobs(logits[:, :-1], seq[:, 1:]))[0]
        sampled = np.flatnonzero(traj.loss_mask)
        np.testing.assert_allclose(np.asarray(traj.logprobs)[sampled], lp[sampled - 1], atol=1e-4)
    assert sum(batch.stats[k] for k in batch.stats if k.startswith("main_finish/")) == 6


def _check_turn_masks(traj):
    mask = np.zeros(len(traj.tokens), int)
    for start, end in traj.turns:
        mask[start:end] = 1
    np.testing.assert_array_equal(traj.loss_mask, mask)
    assert np.all(np.asarray(traj.logprobs)[mask == 0] == 0) and np.all(np.asarray(traj.logprobs)[mask == 1] <= 0)


# ------------------------------------------------------------------------------ infrastructure failures


def _closed_port_url():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _plan_script(occurrences, plans):
    """Rollout j of a question runs plans[j]: "answer" at once, or delegates the plan's text, then answers with
    the observation."""

    def script(prompt):
        if _observations(prompt):
            return "<answer>done</answer>"
        question = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S).group(1)
        j = occurrences.setdefault(question, 0)
        occurrences[question] = j + 1
        return "<answer>now</answer>" if plans[j] == "answer" else f"<delegate>{plans[j]}</delegate>"

    return script


def _sub_plan(prompt):
    """The sub-agent does what its subtask says once ("read doc-x" / "search q"), then gives its result."""
    subtask = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S).group(1)
    if _observations(prompt):
        return "<result>found</result>"
    action, argument = subtask.split(" ", 1)
    return f"<{action}>{argument}</{action}>"


def test_infrastructure_failures_mark_their_rollouts_and_are_counted(caplog):
    """A dead retriever (a real client against a closed port) is infrastructure and marks the sub episode and its
    main rollout; a bad doc id is the model's mistake and marks nothing; both are counted per tool."""
    from mgrpo_jax.rollout.tools import HttpRetriever

    tok = tokenizer()
    _, questions = world_and_questions()
    qs = [q.question for q in questions[:2]]
    plans = ["answer", "read doc-99999", "search Velmor Guild"]
    main = ScriptedPolicy(tok, _plan_script({}, plans))
    dead = HttpRetriever(_closed_port_url(), retries=1, backoff_s=0.01)
    runner = ToolSet({"search": dead, "read": tools()["read"]})
    codec = TextCodec(tok, max_observation_tokens=10_000)
    ctrl = Controller(config=ControllerConfig(max_tool_failure_rate=1.0), codec=codec, main_policy=main,
                      main_protocol=PROTO.main(), tools=runner, sub_policy=ScriptedPolicy(tok, _sub_plan),
                      sub_protocol=PROTO.sub())
    with caplog.at_level(logging.WARNING, logger="mgrpo_jax.rollout.controller"):
        batch = ctrl.run(qs, len(plans), jax.random.key(0))
    assert [r.getMessage()[:37] for r in caplog.records] == ["tool 'search' failed 2 of its 2 calls"]
    assert [t.infra_failures for t in batch.main] == [0, 0, 1] * 2
    assert [(t.rollout, t.infra_failures) for t in batch.sub] == [(1, 0), (2, 1)] * 2
    for t in batch.sub:  # the observation still reaches the agent; only the mark tells them apart
        assert "[read error: unknown doc id" in tok.decode(t.tokens) if t.rollout == 1 else \
            "[search error: RetrievalError" in tok.decode(t.tokens)
    s = batch.stats
    assert (s["tool/search/calls"], s["tool/search/failures"], s["tool/search/failure_rate"]) == (2, 2, 1.0)
    assert (s["tool/read/calls"], s["tool/read/failures"], s["tool/read/bad_arguments"]) == (2, 0, 2)
    assert s["tool/read/failure_rate"] == 0.0 and s["tool/search/timeouts"] == 0 and s["tool_failures"] == 2
    assert s["infra_failed_rollouts"] == 2 and s["infra_failed_sub_episodes"] == 2

    # Past the configured share the step stops, naming the tool, the counts, the failure and the key.
    main = ScriptedPolicy(tok, _plan_script({}, plans))
    ctrl = Controller(config=ControllerConfig(max_tool_failure_rate=0.5), codec=codec, main_policy=main,
                      main_protocol=PROTO.main(), tools=runner, sub_policy=ScriptedPolicy(tok, _sub_plan),
                      sub_protocol=PROTO.sub())
    with pytest.raises(ToolFailureError, match=r"tool 'search' failed 2 of its 2 calls .*0 timeouts, 2 errors.*"
                                               r"controller.max_tool_failure_rate=0.5.*\[search error: Retrieval"):
        ctrl.run(qs, len(plans), jax.random.key(0))


def test_own_tool_failures_and_failed_generations_mark_the_rollout():
    from mgrpo_jax.rollout.tools import HttpRetriever
    from mgrpo_jax.train.service import RemoteSubPolicy

    tok = tokenizer()
    _, questions = world_and_questions()
    # A single agent whose own search hits a dead service.
    single = ScriptedPolicy(tok, lambda p: "<answer>x</answer>" if _observations(p) else "<search>Quessa</search>")
    dead = HttpRetriever(_closed_port_url(), retries=0)
    ctrl = Controller(config=ControllerConfig(max_tool_failure_rate=1.0), codec=TextCodec(tok, 64),
                      main_policy=single, main_protocol=PROTO.single(), tools=ToolSet({"search": dead}))
    batch = ctrl.run([questions[0].question], 2, jax.random.key(0))
    assert [t.infra_failures for t in batch.main] == [1, 1] and batch.stats["infra_failed_rollouts"] == 2
    # A sub-agent whose generation service is down: "generation_failed" marks the sub episode and its rollout.
    main = ScriptedPolicy(tok, lambda p: "<answer>x</answer>" if _observations(p) else "<delegate>who?</delegate>")
    down = RemoteSubPolicy(_closed_port_url(), max_new_tokens=16, max_prompt_tokens=4096, deadline_s=0.3,
                           request_timeout_s=0.2)
    ctrl = Controller(config=ControllerConfig(), codec=TextCodec(tok, 64), main_policy=main,
                      main_protocol=PROTO.main(), tools=ToolSet(tools()), sub_policy=down, sub_protocol=PROTO.sub())
    batch = ctrl.run([questions[0].question], 2, jax.random.key(0))
    assert [t.finish_reason for t in batch.sub] == ["generation_failed"] * 2
    assert [t.infra_failures for t in batch.sub] == [1, 1] and [t.infra_failures for t in batch.main] == [1, 1]
    assert batch.stats["infra_failed_rollouts"] == 2 and batch.stats["tool_failures"] == 0


def test_max_tool_failure_rate_is_validated():
    from mgrpo_jax.experiment import make

    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match=r"config controller: controller.max_tool_failure_rate must be a number"):
            make(ControllerConfig, {"max_tool_failure_rate": bad}, "controller")
    assert ControllerConfig().max_tool_failure_rate == 0.5


def _batch(q_n, k_n, counts, stats, tag):
    """A hand-built batch: main trajectories hold [tag, q, k], sub ones [tag, q, k, call]."""
    def traj(agent, q, k, call, tokens):
        return Trajectory(agent, q, k, call, 1, tokens, [0] * len(tokens), [0.0] * len(tokens), [], None, "answer",
                          None, 0)
    main = [traj("main", q, k, -1, [tag, q, k]) for q in range(q_n) for k in range(k_n)]
    sub = [traj("sub", q, k, i, [tag, q, k, i]) for q in range(q_n) for k in range(k_n) for i in range(counts[q][k])]
    return RolloutBatch(main, sub, np.asarray(counts), stats)


def test_rollout_batches_concatenate_and_select_queries_renumbered():
    a = _batch(2, 2, [[1, 0], [2, 1]], {"tool/search/calls": 4, "tool/search/failures": 1,
                                         "tool/search/failure_rate": 0.25, "rollout_s": 1.0, "main_turns": 3}, 7)
    b = _batch(1, 2, [[0, 3]], {"tool/search/calls": 0, "tool/search/failures": 0, "tool/search/failure_rate": 0.0,
                                 "rollout_s": 2.0, "main_turns": 5}, 8)
    both = RolloutBatch.concat([a, b])
    assert both.num_queries == 3 and both.sub_counts.tolist() == [[1, 0], [2, 1], [0, 3]]
    assert [(t.query, t.tokens[0]) for t in both.main] == [(0, 7), (0, 7), (1, 7), (1, 7), (2, 8), (2, 8)]
    assert [(t.query, t.rollout, t.call) for t in both.sub][-3:] == [(2, 1, 0), (2, 1, 1), (2, 1, 2)]
    assert both.stats["tool/search/calls"] == 4 and both.stats["tool/search/failure_rate"] == 0.25
    assert both.stats["rollout_s"] == 3.0 and both.stats["main_turns"] == 5
    assert both.stats["delegations_per_rollout"] == pytest.approx(7 / 6)
    assert a.main[2].query == 1  # the inputs are not renumbered in place

    picked = both.select([2, 0])
    assert both.sub_positions([2, 0]).tolist() == [4, 5, 6, 0]  # where picked.sub's records sit in both.sub
    assert picked.sub_counts.tolist() == [[0, 3], [1, 0]]
    assert [(t.query, t.tokens) for t in picked.main] == [(0, [8, 0, 0]), (0, [8, 0, 1]), (1, [7, 0, 0]),
                                                           (1, [7, 0, 1])]
    # Flat (query, rollout, call) order, the order alignment indexes.
    assert [(t.query, t.tokens) for t in picked.sub] == [(0, [8, 0, 1, 0]), (0, [8, 0, 1, 1]), (0, [8, 0, 1, 2]),
                                                          (1, [7, 0, 0, 0])]
    with pytest.raises(ValueError, match="distinct query indices"):
        both.select([0, 0])
    with pytest.raises(ValueError, match="distinct query indices"):
        both.select([3])
