"""Demonstrations of the protocol for the warm start: teacher policies that know each question's hop chain.

The teachers implement the controller's `Policy` protocol and run through the real `Controller`, so a
demonstration is token-exact in exactly the format of an RL rollout (same chat template, observation
wrapping, context limits, per-turn token limit); only the actions come from the teacher instead of a model.

    main teacher:  <delegate>hop 1's question</delegate> ... <delegate>hop k's question</delegate>
                   <answer>gold answer</answer>
                   (hop i's question names hop i-1's answer, which the main agent read in its previous
                   observation: the sub-agent's result)
    sub teacher:   <search>query</search>          the hop's subject name (or the sub-question itself)
                   <read>doc-id</read>             the hop's document, an id shown in the search results
                   <result>hop answer</result>
    single teacher (a single agent with the tools, no sub-agent), for each hop in turn:
                   <search>the hop's subject name</search> <read>doc-id</read>
                   then <answer>gold answer</answer>
                   (hop i's subject is hop i-1's answer, which the agent read in hop i-1's document)

Grounding. A demonstration must never teach a model to write an id or an answer that its context does not
show. The sub teacher reads the hop's document only when its id is visible in the (possibly truncated) search
observation; if the first search does not show it, it searches again with the other query (the sub-question
or the subject name, `fallback_query`); if that fails too it reports the hop's answer anyway, and that sub
trajectory fails the grounding check below and is dropped (counted in `Demonstrations.dropped`). Reporting the
true answer keeps the *main* demonstration of that rollout valid: the main agent's context does show it.

`check_demonstration` re-reads every trajectory from its tokens, independently of the teachers: each turn's
action must parse, its grounding string (search query, doc id, result or answer, a delegation's subject)
must occur in the agent's task or in an observation before that turn, the episode must end well, and its
final answer must equal the chain's. Trajectories that fail are dropped and counted by reason.

Behaviour log-probs of teacher tokens are recorded as 0 (a deterministic teacher); the SFT objective does
not read them.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from mgrpo_jax.data.synthetic import Hop, Question
from mgrpo_jax.rollout.controller import Controller, TextCodec, Trajectory
from mgrpo_jax.rollout.protocol import AgentProtocol
from mgrpo_jax.rollout.sampler import Sample

SEARCH_QUERIES = ("subject", "question")


def _action_sample(codec: TextCodec, text: str, max_new_tokens: int | None) -> Sample:
    """The action's token ids as the sampler would return them; cut at `max_new_tokens` like the sampler
    (finish "length"), which the controller then records as a format error."""
    ids = np.asarray(codec.encode(text), np.int32)
    reason = "stop"
    if max_new_tokens is not None and len(ids) > max_new_tokens:
        ids, reason = ids[:max_new_tokens], "length"
    return Sample(ids, np.zeros(len(ids), np.float32), reason)


class _Teacher:
    """Shared machinery: find the task of a context by its exact prompt tokens, and read back the context."""

    def __init__(self, codec: TextCodec, protocol: AgentProtocol, system_prompt: str, tasks: Mapping[str, object],
                 max_new_tokens: int | None, max_prompt_tokens: int | None):
        self.codec, self.protocol, self.version = codec, protocol, 0
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self._by_prompt: dict[tuple[int, ...], tuple[str, object]] = {}
        for text, task in tasks.items():
            self._by_prompt[tuple(codec.prompt(system_prompt, text))] = (text, task)
        self._prompt_lens = sorted({len(p) for p in self._by_prompt})
        tag = re.escape(protocol.observation_tag)
        self._observation = re.compile(f"<{tag}>(.*?)</{tag}>", re.S)

    def update(self, params, version: int) -> None:  # the Policy protocol; a teacher has no parameters
        self.version = version

    def _task(self, context: Sequence[int]):
        for n in self._prompt_lens:
            hit = self._by_prompt.get(tuple(int(t) for t in context[:n]))
            if hit is not None:
                return n, hit
        raise KeyError("a teacher got a context whose prompt is not one of its tasks: build the teachers with "
                       "the controller's codec and system prompts, and the same questions")

    def _observations(self, context: Sequence[int], prompt_len: int) -> list[str]:
        return [o.strip() for o in self._observation.findall(self.codec.decode(context[prompt_len:]))]

    def generate(self, prompts, rng, stop_sequences) -> list[Sample]:
        del rng, stop_sequences  # deterministic; every action ends with its closing tag, a stop sequence
        out = []
        for context in prompts:
            prompt_len, (text, task) = self._task(context)
            kind, argument = self.act(text, task, self._observations(context, prompt_len))
            out.append(_action_sample(self.codec, self.protocol.format_action(kind, argument), self.max_new_tokens))
        return out

    def act(self, text: str, task, observations: list[str]) -> tuple[str, str]:
        raise NotImplementedError


class MainTeacher(_Teacher):
    """Delegates each hop's sub-question in turn, then answers the gold answer."""

    def __init__(self, codec, protocol, system_prompt, questions: Sequence[Question], *, delegate: str,
                 max_new_tokens=None, max_prompt_tokens=None):
        super().__init__(codec, protocol, system_prompt, {q.question: q for q in questions}, max_new_tokens,
                         max_prompt_tokens)
        self.delegate = delegate

    def act(self, text, question: Question, observations):
        done = len(observations)
        if done < question.hops:
            return self.delegate, question.chain[done].question
        return self.protocol.final_action, question.answer


class SubTeacher(_Teacher):
    """Searches, reads the hop's document when the search results show its id, and reports the hop's answer."""

    def __init__(self, codec, protocol, system_prompt, hops: Sequence[Hop], *, search: str, read: str,
                 query: str = "subject", fallback_query: bool = True, max_new_tokens=None, max_prompt_tokens=None):
        if query not in SEARCH_QUERIES:
            raise ValueError(f"query={query!r} is not supported; choose one of {list(SEARCH_QUERIES)}")
        super().__init__(codec, protocol, system_prompt, {h.question: h for h in hops}, max_new_tokens,
                         max_prompt_tokens)
        self.search, self.read, self.query, self.fallback_query = search, read, query, fallback_query

    def _queries(self, hop: Hop) -> list[str]:
        first = hop.subject if self.query == "subject" else hop.question
        second = hop.question if self.query == "subject" else hop.subject
        return [first, second] if self.fallback_query else [first]

    def act(self, text, hop: Hop, observations):
        # Replay the teacher's earlier turns from their observations: search until a result list shows the
        # hop's document, read it, report.
        seen = iter(observations)
        for query in self._queries(hop):
            obs = next(seen, None)
            if obs is None:
                return self.search, query
            if hop.doc_id in obs:
                return (self.read, hop.doc_id) if next(seen, None) is None else (self.protocol.final_action,
                                                                                  hop.answer)
        return self.protocol.final_action, hop.answer  # not found: ungrounded, dropped by the check


class SingleTeacher(_Teacher):
    """A single agent with the tools: searches each hop's subject name, reads the hop's document when the search
    results show its id, and answers the gold answer after the last hop. Only the subject name is grounded for
    a single agent (hop i's sub-question is nowhere in its context), so there is no fallback query: a hop whose
    document the search does not show ends the episode with an ungrounded answer, dropped by the check."""

    def __init__(self, codec, protocol, system_prompt, questions: Sequence[Question], *, search: str, read: str,
                 max_new_tokens=None, max_prompt_tokens=None):
        super().__init__(codec, protocol, system_prompt, {q.question: q for q in questions}, max_new_tokens,
                         max_prompt_tokens)
        self.search, self.read = search, read

    def act(self, text, question: Question, observations):
        seen = iter(observations)
        for hop in question.chain:
            obs = next(seen, None)
            if obs is None:
                return self.search, hop.subject
            if hop.doc_id not in obs:
                return self.protocol.final_action, question.answer  # not found: ungrounded, dropped
            if next(seen, None) is None:
                return self.read, hop.doc_id
        return self.protocol.final_action, question.answer


# ------------------------------------------------------------------------------------------------- checks


def _turn_contexts(traj: Trajectory, codec: TextCodec, task_text: str) -> list[str]:
    """For each sampled turn, the text the agent had seen before it: its task and every earlier observation."""
    seen, out, prev_end = [task_text], [], None
    for start, end in traj.turns:
        if prev_end is not None:
            seen.append(codec.decode(traj.tokens[prev_end:start]))
        out.append("\n".join(seen))
        prev_end = end
    return out


def check_demonstration(traj: Trajectory, codec: TextCodec, protocol: AgentProtocol, task_text: str,
                        expected_final: str, *, delegate: str | None = None,
                        grounding: Mapping[str, str] | None = None) -> str | None:
    """None when `traj` is a good demonstration, else the reason it is not.

    Checks: the episode ended with its final action (format_ok); only sampled turns carry loss; every turn
    parses as one well-formed action whose grounding string occurs in what the agent had seen (its task
    `task_text` and the observations before the turn); the final argument equals `expected_final`.
    `grounding` maps a delegated sub-question to the entity name it must mention (the main agent's
    delegations); other actions ground their own argument.
    """
    if not traj.format_ok:
        return f"finish_{traj.finish_reason}"
    sampled = np.zeros(len(traj.tokens), bool)
    for start, end in traj.turns:
        sampled[start:end] = True
    if not np.array_equal(np.asarray(traj.loss_mask, bool), sampled):
        return "loss_mask"
    for (start, end), seen in zip(traj.turns, _turn_contexts(traj, codec, task_text)):
        action = protocol.parse(codec.decode(traj.tokens[start:end]))
        if not action.format_ok:
            return "format"
        if action.kind == delegate:
            needed = (grounding or {}).get(action.argument)
            if needed is None:
                return "unknown_delegation"
        else:
            needed = action.argument
        if needed not in seen:
            return f"ungrounded_{action.kind}"
    if traj.final != expected_final:
        return "wrong_final"
    return None


# ------------------------------------------------------------------------------------------ generation


@dataclasses.dataclass
class Demonstrations:
    """Kept demonstrations (token-exact `Trajectory` records) and what was dropped, by agent and reason."""

    main: list[Trajectory]
    sub: list[Trajectory]
    dropped: Counter
    stats: dict

    def __iter__(self):  # `main, sub = make_demonstrations(...)`
        return iter((self.main, self.sub))


def make_demonstrations(controller: Controller, questions: Sequence[Question], *, query: str = "subject",
                        fallback_query: bool = True, chunk_size: int = 512) -> Demonstrations:
    """Runs the teachers through a copy of `controller` (its config, codec, protocols and tools; the teachers
    replace its policies) on `questions`, one rollout each; returns the demonstrations that pass
    `check_demonstration`. A single-agent controller (no sub-agent) gets the single teacher; its
    demonstrations are in `main` and `sub` is empty.

    Args:
      controller: the run's controller (multi-agent: its main protocol delegates to a sub-agent).
      questions: synthetic questions with their hop chains (e.g. `read_questions_jsonl(train.jsonl)`).
      query: the sub teacher's first search: "subject" (the hop's subject name) or "question" (the sub-question).
      fallback_query: search once more with the other query when the first does not show the document.
      chunk_size: questions per controller run (bounds the size of one batch of tool calls).
    """
    c, codec = controller, controller.codec
    if c.delegate_action is None:
        return _single_agent_demonstrations(c, questions, chunk_size)
    main = MainTeacher(codec, c.main_protocol, c.config.main_system_prompt, questions, delegate=c.delegate_action,
                       max_new_tokens=getattr(c.main_policy, "max_new_tokens", None),
                       max_prompt_tokens=getattr(c.main_policy, "max_prompt_tokens", None))
    hops = [h for q in questions for h in q.chain]
    search, read = c.sub_protocol.tool_actions[:2]
    sub = SubTeacher(codec, c.sub_protocol, c.config.sub_system_prompt, hops, search=search, read=read, query=query,
                     fallback_query=fallback_query, max_new_tokens=getattr(c.sub_policy, "max_new_tokens", None),
                     max_prompt_tokens=getattr(c.sub_policy, "max_prompt_tokens", None))
    teacher = Controller(config=c.config, codec=codec, main_policy=main, main_protocol=c.main_protocol, tools=c.tools,
                         sub_policy=sub, sub_protocol=c.sub_protocol, delegate_action=c.delegate_action)

    def check_main(traj, q):
        return check_demonstration(traj, codec, c.main_protocol, q.question, q.answer, delegate=c.delegate_action,
                                   grounding={h.question: h.subject for h in q.chain})

    def check_sub(traj, q):
        if traj.call >= q.hops:
            return "extra_call"
        hop = q.chain[traj.call]
        return check_demonstration(traj, codec, c.sub_protocol, hop.question, hop.answer)

    kept, dropped, stats = _run_checked(teacher, questions, chunk_size,
                                        {"main": ("main", check_main), "sub": ("sub", check_sub)})
    stats.update(questions=len(questions), main_kept=len(kept["main"]), sub_kept=len(kept["sub"]),
                 hops=len(hops))
    return Demonstrations(kept["main"], kept["sub"], dropped, dict(stats))


def _single_agent_demonstrations(c: Controller, questions: Sequence[Question], chunk_size: int) -> Demonstrations:
    codec, protocol = c.codec, c.main_protocol
    search, read = protocol.tool_actions[:2]
    single = SingleTeacher(codec, protocol, c.config.single_system_prompt, questions, search=search, read=read,
                           max_new_tokens=getattr(c.main_policy, "max_new_tokens", None),
                           max_prompt_tokens=getattr(c.main_policy, "max_prompt_tokens", None))
    teacher = Controller(config=c.config, codec=codec, main_policy=single, main_protocol=protocol, tools=c.tools)
    def check(traj, q):
        return check_demonstration(traj, codec, protocol, q.question, q.answer)

    kept, dropped, stats = _run_checked(teacher, questions, chunk_size, {"main": ("single", check)})
    stats.update(questions=len(questions), main_kept=len(kept["main"]), sub_kept=0)
    return Demonstrations(kept["main"], [], dropped, dict(stats))


def _run_checked(teacher: Controller, questions: Sequence[Question], chunk_size: int,
                 checks: Mapping[str, tuple[str, Callable]]) -> tuple[dict[str, list[Trajectory]], Counter, Counter]:
    """Runs the teacher controller over `questions`, `chunk_size` at a time (one rollout each), and checks every
    trajectory: `checks` maps a RolloutBatch field ("main" / "sub") to (label, check(traj, question) -> None or
    the reason it is not a good demonstration). Returns the kept trajectories per field (query ids made global),
    the dropped ones counted as "<label>/<reason>", and the summed numeric rollout statistics."""
    kept = {field: [] for field in checks}
    dropped, stats = Counter(), Counter()
    for lo in range(0, len(questions), chunk_size):
        chunk = list(questions[lo:lo + chunk_size])
        batch = teacher.run([q.question for q in chunk], 1, jax.random.key(0))
        for key, value in batch.stats.items():
            if isinstance(value, (int, float)) and "/" in key:
                stats[key] += value
        for field, (label, check) in checks.items():
            for traj in getattr(batch, field):
                why = check(traj, chunk[traj.query])
                traj.query += lo
                if why is None:
                    kept[field].append(traj)
                else:
                    dropped[f"{label}/{why}"] += 1
    return kept, dropped, stats
