"""Failure analysis (mgrpo_jax.evaluation.classify_episode / failure_breakdown): scripted agents that go wrong in
known places, through the real controller, are classified where they first went wrong."""
import re

import jax
import numpy as np
import pytest

from mgrpo_jax.data.synthetic import DelegationJudge
from mgrpo_jax.evaluation import FAILURE_KINDS, Evaluator, failure_breakdown
from mgrpo_jax.rollout.controller import Controller, ControllerConfig, TextCodec, ToolSet
from mgrpo_jax.rollout.protocol import ProtocolConfig
from mgrpo_jax.rollout.rewards import RewardConfig
from mgrpo_jax.train.mgrpo import compute_rewards
from rollout_fixtures import ScriptedPolicy, tokenizer, tools, world_and_questions

PROTO = ProtocolConfig()
OBSERVATION = re.compile(r"<information>")


def _observations_after(text, task):
    """Observations the agent got after its task (the system prompt mentions the tag too)."""
    return len(OBSERVATION.findall(text[text.index(task):]))


def _questions(n):
    """n questions of 2+ hops whose hop sub-questions are unique (the scripts find their task by its text)."""
    _, questions = world_and_questions(n_questions=40)
    seen, out = set(), []
    for q in questions:
        hops = {h.question for h in q.chain}
        if q.hops >= 2 and not hops & seen:
            out.append(q)
            seen |= hops
    assert len(out) >= n
    return out[:n]


def _find(text, questions):
    """The question whose text is in the (last) user message; None for a sub task."""
    for i, q in enumerate(questions):
        if q.question in text:
            return i
    return None


def _evaluator(controller):
    return Evaluator(controller, RewardConfig())


MULTI_FAULTS = ["correct", "answered_early", "wrong_delegation", "missed_document", "wrong_fact", "wrong_answer",
                "format"]


def _faulty_agents(questions, faults):
    """A controller whose scripted main and sub-agents go wrong on question i as faults[i] says."""
    hop_of = {h.question: (i, j) for i, q in enumerate(questions) for j, h in enumerate(q.chain)}
    wrong_doc = questions[0].chain[0].doc_id

    def main(text):
        i = _find(text, questions)
        q, fault = questions[i], faults[i]
        done = _observations_after(text, q.question)
        if fault == "format":
            return "I am not sure what to do."
        if fault == "answered_early" and done == 0:
            return "<answer>nobody</answer>"
        if done < q.hops:
            return "<delegate>who is it?</delegate>" if fault == "wrong_delegation" else \
                f"<delegate>{q.chain[done].question}</delegate>"
        return f"<answer>{q.answer if fault == 'correct' else 'wrong'}</answer>"  # a wrong fact misleads it

    def sub(text):
        hits = [hq for hq in hop_of if hq in text]
        if not hits:  # a delegation that names no hop: search, read nothing, report nothing useful
            return "<result>unknown</result>"
        i, j = hop_of[hits[0]]
        hop, fault, done = questions[i].chain[j], faults[i], _observations_after(text, hits[0])
        if done == 0:
            return f"<search>{hop.subject}</search>"
        if done == 1:
            return f"<read>{wrong_doc if fault == 'missed_document' else hop.doc_id}</read>"
        return f"<result>{'nonsense' if fault in ('missed_document', 'wrong_fact') else hop.answer}</result>"

    tok = tokenizer()
    return Controller(config=ControllerConfig(max_observation_tokens=10_000, max_sub_turns=4),
                      codec=TextCodec(tok, 10_000), main_policy=ScriptedPolicy(tok, main),
                      main_protocol=PROTO.main(), tools=ToolSet(tools()), sub_policy=ScriptedPolicy(tok, sub),
                      sub_protocol=PROTO.sub())


def test_multi_agent_failures_are_classified_where_they_first_went_wrong():
    questions, faults = _questions(7), MULTI_FAULTS
    out = failure_breakdown(_evaluator(_faulty_agents(questions, faults)), questions)
    by_kind = {k: v for k, v in out.items() if "@" not in k}
    assert by_kind == pytest.approx({f"failures/{k}": faults.count(k) / len(faults) for k in FAILURE_KINDS})
    # Every scripted fault happens at the first hop (the malformed main agent never delegated it); a wrong final
    # answer, after every hop went right, has no hop.
    assert {k: v for k, v in out.items() if "@" in k} == pytest.approx(
        {f"failures/{k}@hop1": 1 / 7 for k in ("format", "answered_early", "wrong_delegation", "missed_document",
                                                "wrong_fact")})


def test_delegation_judge_reads_the_real_controller_s_records():
    """The main-agent judge (data.synthetic.DelegationJudge) in the main reward, on episodes of the real controller:
    it sees each main trajectory with its sub trajectories in call order, and scores what the main agent did."""
    questions, faults = _questions(7), MULTI_FAULTS
    world, _ = world_and_questions(n_questions=40)
    batch = _faulty_agents(questions, faults).run([q.question for q in questions], 1, jax.random.key(0))
    config = RewardConfig(alpha_j=0.5, main_judge=DelegationJudge(world, soft=False))
    main_r, _, parts = compute_rewards(batch, [q.answer for q in questions], 1, config)
    # A wrong report (missed_document, wrong_fact) makes the next true sub-question a miscopy of what the main
    # agent was told: only its first hop counts.
    first_only = {"missed_document": 1 / questions[3].hops, "wrong_fact": 1 / questions[4].hops}
    expected = [{"correct": 1.0, "wrong_answer": 1.0}.get(f, first_only.get(f, 0.0)) for f in faults]
    correct = [1.0 if f == "correct" else 0.0 for f in faults]
    fmt = [0.0 if f == "format" else 0.1 for f in faults]
    np.testing.assert_allclose(main_r[:, 0], [a + 0.9 * c + 0.5 * j for a, c, j in zip(fmt, correct, expected)],
                               rtol=1e-6)
    assert parts["main/reward_judge_score"] == pytest.approx(np.mean(expected))


def test_single_agent_failures_are_classified_where_they_first_went_wrong():
    questions = _questions(4)
    faults = ["correct", "missed_document", "wrong_answer", "format"]

    def single(text):
        i = _find(text, questions)
        q, fault = questions[i], faults[i]
        done = _observations_after(text, q.question)
        if fault == "format":
            return "hmm"
        steps = [a for h in q.chain for a in (f"<search>{h.subject}</search>", f"<read>{h.doc_id}</read>")]
        if fault == "missed_document":
            steps = steps[:1]  # searches once, reads nothing
        if done < len(steps):
            return steps[done]
        return f"<answer>{q.answer if fault == 'correct' else 'wrong'}</answer>"

    tok = tokenizer()
    controller = Controller(config=ControllerConfig(max_observation_tokens=10_000, max_main_turns=12),
                            codec=TextCodec(tok, 10_000), main_policy=ScriptedPolicy(tok, single),
                            main_protocol=PROTO.single(), tools=ToolSet(tools()))
    out = failure_breakdown(_evaluator(controller), questions)
    assert out == pytest.approx({**{f"failures/{k}": faults.count(k) / len(faults) for k in FAILURE_KINDS},
                                 "failures/missed_document@hop1": 1 / 4, "failures/format@hop1": 1 / 4})


def test_failure_breakdown_needs_hop_chains():
    tok = tokenizer()
    controller = Controller(config=ControllerConfig(), codec=TextCodec(tok, 64),
                            main_policy=ScriptedPolicy(tok, lambda t: "<answer>x</answer>"),
                            main_protocol=PROTO.single(), tools=ToolSet(tools()))
    with pytest.raises(ValueError, match="hop chains"):
        failure_breakdown(_evaluator(controller), ["a plain question"])


def test_evaluate_script_reports_failures_of_the_initial_weights_on_either_split(tmp_path):
    """launch/evaluate.py --initial --failures, on held-out and on training questions (--split train --offset):
    every question is classified exactly once, and the JSON says which questions were used."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for split, offset in (("heldout", 0), ("train", 5)):
        out = tmp_path / f"{split}.json"
        cmd = [sys.executable, "launch/evaluate.py", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path / 'w'}",
               "--initial", "--failures", "--pass_k=0", "--num_questions=6", f"--split={split}", f"--offset={offset}",
               f"--output={out}"]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        result = json.loads(out.read_text())
        assert (result["split"], result["offset"], result["greedy/num_questions"]) == (split, offset, 6)
        kinds = {k: v for k, v in result.items() if k.startswith("failures/") and "@" not in k}
        assert set(kinds) == {f"failures/{k}" for k in FAILURE_KINDS} and sum(kinds.values()) == pytest.approx(1.0)
        assert kinds["failures/correct"] == pytest.approx(result["greedy/accuracy"])
        assert "wrong_delegation" in done.stdout  # the legend printed with the figures
