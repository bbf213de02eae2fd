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

Shortcuts (`shortcuts={"main": p, "sub": q}`, default off): a mixed-quality teacher, so that the warm-started
policy has something to explore and RL something to learn. Each episode has one decision point per agent
episode, where the teacher takes a shortcut with its agent's probability, decided by a seeded hash of (seed,
agent, task text, decision point), so one `seed` gives reproducible demonstrations and another seed (e.g. each SFT
epoch's) a fresh draw. One point per episode keeps the clean path's probability at 1 - p whatever the hop count:

    main:    instead of delegating the last hop, answers at once with what it last read (the previous hop's
             result, or the question's head entity on a 1-hop question): the "answered_early" failure;
    sub:     after a search that shows the hop's document, reports a name from the search results (the first
             hit's title that does not name the hop's subject, section stripped) without reading the document;
    single:  both, at the same points of its own episode (answers early instead of searching the last hop with
             the main rate; after each hop's search, reports a title instead of reading with the sub rate).

A shortcut's final answer is wrong but grounded (it is in the context), and passes the checks below with the
final the teacher gave instead of the chain's. With shortcuts on, the main agent's demonstrations come from
episodes whose sub-agent is the clean teacher, and the sub-agent's from episodes whose main agent is (so a main
demonstration never builds on a wrong report, and every hop is delegated to the sub-agent).

Behaviour log-probs of teacher tokens are recorded as 0 (a deterministic teacher); the SFT objective does
not read them.
"""
from __future__ import annotations

import dataclasses
import hashlib
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
SHORTCUT_AGENTS = ("main", "sub")
_TITLE = re.compile(r'\(id: [^)]*\) "([^"]*)"')


def shortcut_draw(seed: int, agent: str, text: str, point: int) -> float:
    """A uniform draw in [0, 1) fixed by its arguments (a SHA-1 hash: the same on every platform and run)."""
    digest = hashlib.sha1(f"{seed}\x00{agent}\x00{text}\x00{point}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_shortcuts(shortcuts: Mapping[str, float] | None) -> dict[str, float]:
    rates = dict(shortcuts or {})
    if set(rates) - set(SHORTCUT_AGENTS) or any(not 0.0 <= float(v) <= 1.0 for v in rates.values()):
        raise ValueError(f"shortcuts maps {list(SHORTCUT_AGENTS)} to probabilities in [0, 1], got {rates}")
    return {a: float(rates.get(a, 0.0)) for a in SHORTCUT_AGENTS}


def _guess_from_results(observation: str, subject: str) -> str | None:
    """The shortcut's report: the first search hit's title that does not name `subject` (its section, "Name
    (history)", stripped), else the first title; None when the observation shows no hit."""
    titles = [t.split(" (")[0] for t in _TITLE.findall(observation)]
    others = [t for t in titles if subject not in t]
    return (others or titles or [None])[0]


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
                 max_new_tokens: int | None, max_prompt_tokens: int | None, shortcut: Mapping[str, float] | None = None,
                 seed: int = 0):
        self.codec, self.protocol, self.version = codec, protocol, 0
        self.shortcut, self.seed = dict(shortcut or {}), seed
        self.shortcut_finals: dict[str, str] = {}  # task text -> the final answer of a shortcut taken there
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

    def _shortcut(self, agent: str, text: str, point: int, final: str | None) -> tuple[str, str] | None:
        """The final action `final` when the teacher takes `agent`'s shortcut at this decision point, else None."""
        rate = self.shortcut.get(agent, 0.0)
        if final is None or not rate or shortcut_draw(self.seed, agent, text, point) >= rate:
            return None
        self.shortcut_finals[text] = final
        return self.protocol.final_action, final


class MainTeacher(_Teacher):
    """Delegates each hop's sub-question in turn, then answers the gold answer (or, with shortcuts, answers
    with what it last read instead of delegating the last hop)."""

    def __init__(self, codec, protocol, system_prompt, questions: Sequence[Question], *, delegate: str,
                 max_new_tokens=None, max_prompt_tokens=None, shortcut=None, seed=0):
        super().__init__(codec, protocol, system_prompt, {q.question: q for q in questions}, max_new_tokens,
                         max_prompt_tokens, shortcut, seed)
        self.delegate = delegate

    def act(self, text, question: Question, observations):
        done = len(observations)
        if done < question.hops:
            last = observations[-1] if observations else question.chain[0].subject
            shortcut = self._shortcut("main", text, done, last) if done == question.hops - 1 else None
            return shortcut or (self.delegate, question.chain[done].question)
        return self.protocol.final_action, question.answer


class SubTeacher(_Teacher):
    """Searches, reads the hop's document when the search results show its id, and reports the hop's answer."""

    def __init__(self, codec, protocol, system_prompt, hops: Sequence[Hop], *, search: str, read: str,
                 query: str = "subject", fallback_query: bool = True, max_new_tokens=None, max_prompt_tokens=None,
                 shortcut=None, seed=0):
        if query not in SEARCH_QUERIES:
            raise ValueError(f"query={query!r} is not supported; choose one of {list(SEARCH_QUERIES)}")
        super().__init__(codec, protocol, system_prompt, {h.question: h for h in hops}, max_new_tokens,
                         max_prompt_tokens, shortcut, seed)
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
                if next(seen, None) is None:
                    return (self._shortcut("sub", text, 0, _guess_from_results(obs, hop.subject))
                            or (self.read, hop.doc_id))
                return self.protocol.final_action, hop.answer
        return self.protocol.final_action, hop.answer  # not found: ungrounded, dropped by the check


class SingleTeacher(_Teacher):
    """A single agent with the tools: searches each hop's subject name, reads the hop's document when the search
    results show its id, and answers the gold answer after the last hop. Only the subject name is grounded for
    a single agent (hop i's sub-question is nowhere in its context), so there is no fallback query: a hop whose
    document the search does not show ends the episode with an ungrounded answer, dropped by the check."""

    def __init__(self, codec, protocol, system_prompt, questions: Sequence[Question], *, search: str, read: str,
                 max_new_tokens=None, max_prompt_tokens=None, shortcut=None, seed=0):
        super().__init__(codec, protocol, system_prompt, {q.question: q for q in questions}, max_new_tokens,
                         max_prompt_tokens, shortcut, seed)
        self.search, self.read = search, read

    def act(self, text, question: Question, observations):
        seen = iter(observations)
        for i, hop in enumerate(question.chain):
            obs = next(seen, None)
            if obs is None:  # before the last hop: answer early with the last fact read (hop i-1's), or search
                last = question.chain[i - 1].answer if i else hop.subject
                shortcut = self._shortcut("main", text, i, last) if i == question.hops - 1 else None
                return shortcut or (self.search, hop.subject)
            if hop.doc_id not in obs:
                return self.protocol.final_action, question.answer  # not found: ungrounded, dropped
            if next(seen, None) is None:
                return (self._shortcut("sub", text, i, _guess_from_results(obs, hop.subject))
                        or (self.read, hop.doc_id))
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
                        fallback_query: bool = True, chunk_size: int = 512,
                        shortcuts: Mapping[str, float] | None = None, seed: int = 0) -> Demonstrations:
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
      shortcuts: {"main": p, "sub": q}, each teacher's shortcut probability per decision point (module docstring).
      seed: the shortcuts' draw.
    """
    c, codec = controller, controller.codec
    rates = _check_shortcuts(shortcuts)
    if c.delegate_action is None:
        return _single_agent_demonstrations(c, questions, chunk_size, rates, seed)
    hops = [h for q in questions for h in q.chain]
    search, read = c.sub_protocol.tool_actions[:2]

    def run(main_rate: float, sub_rate: float, fields: tuple[str, ...]):
        main = MainTeacher(codec, c.main_protocol, c.config.main_system_prompt, questions, delegate=c.delegate_action,
                           max_new_tokens=getattr(c.main_policy, "max_new_tokens", None),
                           max_prompt_tokens=getattr(c.main_policy, "max_prompt_tokens", None),
                           shortcut={"main": main_rate}, seed=seed)
        sub = SubTeacher(codec, c.sub_protocol, c.config.sub_system_prompt, hops, search=search, read=read,
                         query=query, fallback_query=fallback_query,
                         max_new_tokens=getattr(c.sub_policy, "max_new_tokens", None),
                         max_prompt_tokens=getattr(c.sub_policy, "max_prompt_tokens", None),
                         shortcut={"sub": sub_rate}, seed=seed)
        teacher = Controller(config=c.config, codec=codec, main_policy=main, main_protocol=c.main_protocol,
                             tools=c.tools, sub_policy=sub, sub_protocol=c.sub_protocol,
                             delegate_action=c.delegate_action)

        def check_main(traj, q):
            return check_demonstration(traj, codec, c.main_protocol, q.question,
                                       main.shortcut_finals.get(q.question, q.answer), delegate=c.delegate_action,
                                       grounding={h.question: h.subject for h in q.chain})

        def check_sub(traj, q):
            if traj.call >= q.hops:
                return "extra_call"
            hop = q.chain[traj.call]
            return check_demonstration(traj, codec, c.sub_protocol, hop.question,
                                       sub.shortcut_finals.get(hop.question, hop.answer))

        checks = {"main": ("main", check_main), "sub": ("sub", check_sub)}
        kept, dropped, stats = _run_checked(teacher, questions, chunk_size, {f: checks[f] for f in fields})
        counts = {"main": _count_shortcuts(kept.get("main", []), main, questions),
                  "sub": _count_shortcuts(kept.get("sub", []), sub, questions, hops=True)}
        return kept, dropped, stats, counts

    if not rates["main"] and not rates["sub"]:
        kept, dropped, stats, counts = run(0.0, 0.0, ("main", "sub"))
    else:
        # Each agent's demonstrations come from an episode whose other agent is the clean teacher: a main
        # demonstration never builds on a sub-agent's shortcut (its delegations would be ungrounded), and every
        # hop is delegated for the sub-agent's.
        kept, dropped, stats, counts = run(rates["main"], 0.0, ("main",))
        sub_kept, sub_dropped, _, sub_counts = run(0.0, rates["sub"], ("sub",))
        kept["sub"], counts["sub"] = sub_kept["sub"], sub_counts["sub"]
        dropped.update(sub_dropped)
    stats.update(questions=len(questions), main_kept=len(kept["main"]), sub_kept=len(kept["sub"]),
                 hops=len(hops), main_shortcuts=counts["main"], sub_shortcuts=counts["sub"])
    return Demonstrations(kept["main"], kept["sub"], dropped, dict(stats))


def _count_shortcuts(kept: Sequence[Trajectory], teacher: _Teacher, questions: Sequence[Question],
                     hops: bool = False) -> int:
    """Kept demonstrations whose teacher took a shortcut."""
    texts = [questions[t.query].chain[t.call].question if hops else questions[t.query].question for t in kept]
    return sum(text in teacher.shortcut_finals for text in texts)


def _single_agent_demonstrations(c: Controller, questions: Sequence[Question], chunk_size: int,
                                 rates: Mapping[str, float], seed: int) -> Demonstrations:
    codec, protocol = c.codec, c.main_protocol
    search, read = protocol.tool_actions[:2]
    single = SingleTeacher(codec, protocol, c.config.single_system_prompt, questions, search=search, read=read,
                           max_new_tokens=getattr(c.main_policy, "max_new_tokens", None),
                           max_prompt_tokens=getattr(c.main_policy, "max_prompt_tokens", None), shortcut=rates,
                           seed=seed)
    teacher = Controller(config=c.config, codec=codec, main_policy=single, main_protocol=protocol, tools=c.tools)

    def check(traj, q):
        return check_demonstration(traj, codec, protocol, q.question, single.shortcut_finals.get(q.question, q.answer))

    kept, dropped, stats = _run_checked(teacher, questions, chunk_size, {"main": ("single", check)})
    stats.update(questions=len(questions), main_kept=len(kept["main"]), sub_kept=0,
                 main_shortcuts=_count_shortcuts(kept["main"], single, questions))
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
