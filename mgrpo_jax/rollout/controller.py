"""The multi-agent episode controller: Q x K main episodes in lockstep turns, sub-agent episodes batched.

One rollout (MGRPO.md, "One rollout"): the main agent M takes turns; each turn is one action. A delegation
runs a whole sub-agent episode whose result comes back as M's observation; a tool action of M's own is
answered by its tool; an answer ends the rollout. A sub-agent S takes turns of `search` / `read` tool calls
and ends with a result.

Batching: at each main turn every active main episode's next generation goes into one sampler batch; the
sub-agent episodes that those turns delegated, from all rollouts together, then run in lockstep turns of
their own, one sampler batch per turn; all tool calls of a turn run concurrently with timeouts.

Token-exact records (LESSONS.md, item 6): an episode is one growing token sequence: the prompt (rendered
once through the tokenizer's chat template), then for each turn the sampled token ids exactly as sampled
(loss mask 1, behaviour log-probs) and the observation's tokens (loss mask 0). Nothing is ever re-tokenized.

Limits: max turns per agent, max delegations per rollout, max context tokens per agent and max tokens per
turn (the sampler's `max_new_tokens`). An episode that hits one ends, is recorded, and counts as a format
failure (its `finish_reason` says which limit). So do malformed turns (`finish_reason="format_error"`).
A sub-agent whose generation backend is unreachable (`GenerationUnavailableError`, the decoupled mode's
service down past its deadline) ends those sub episodes with `finish_reason="generation_failed"`; the main
episodes see "[sub-agent failed: generation_failed]" and go on.

Infrastructure failures are recorded, never learned from silently: a tool call that timed out or failed
(`rollout.tools`: status "timeout" / "error", as opposed to a bad argument, which is the model's doing) and a
"generation_failed" sub episode each add 1 to the episode's `Trajectory.infra_failures`, and a main episode
adds the counts of the sub episodes it delegated, so `main.infra_failures > 0` marks every rollout an outage
touched (the trainer leaves those out of both agents' updates). Per step, `RolloutBatch.stats` counts each
tool's calls, failures, timeouts, bad arguments and failure rate (`tool/<name>/...`) and the marked rollouts
(`infra_failed_rollouts`); when more than `ControllerConfig.max_tool_failure_rate` of one tool's calls in a
`run` failed, `run` raises ToolFailureError instead of returning a batch that mostly measures the outage.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from mgrpo_jax.rollout.protocol import AgentProtocol
from mgrpo_jax.rollout.sampler import Sample
from mgrpo_jax.rollout.tools import INFRA_FAILURE_STATUSES, OUTCOME_STATUSES, ToolOutcome

log = logging.getLogger(__name__)

FINISH_OK = ("answer", "result")
FINISH_FAILED = ("format_error", "max_turns", "max_context", "max_delegations", "generation_failed")


class GenerationUnavailableError(RuntimeError):
    """A policy's generation backend stayed unreachable past its deadline (e.g. the decoupled mode's sub-agent
    service, `train.service.RemoteSubPolicy`). For sub-agent episodes the controller ends the affected episodes
    with finish_reason "generation_failed" (a format failure) instead of failing the whole rollout."""


class ToolFailureError(RuntimeError):
    """More than `controller.max_tool_failure_rate` of one tool's calls in a rollout batch failed for
    infrastructure reasons (timeouts, service or connection errors): the run stops rather than train on an
    outage. The message names the tool, the counts and the first failure."""


class Policy(Protocol):
    """What the controller needs of an agent's model: batched generation at a policy version."""

    version: int

    def generate(self, prompts: Sequence[Sequence[int]], rng: jax.Array,
                 stop_sequences: Sequence[Sequence[int]]) -> list[Sample]: ...


class SamplerPolicy:
    """A `Sampler` plus the agent's current parameters; the trainer swaps `params` after each update.

    `params` are the parameters as given (the trainer's, which export and warm start read); at each weight sync
    the sampler makes its rollout copy of them once (compute dtype, rollout layout) and forgets its cached rows.
    `release()` frees the sampler's KV cache and rollout copy (the controller calls it when a rollout batch ends,
    so that the update that follows has the memory)."""

    def __init__(self, sampler, params, version: int = 0):
        self.sampler, self.params, self.version = sampler, params, version
        sampler.prepare(params)

    @property
    def max_new_tokens(self) -> int:
        return self.sampler.config.max_new_tokens

    @property
    def max_prompt_tokens(self) -> int:
        return self.sampler.config.prompt_buckets[-1]

    def update(self, params, version: int) -> None:
        self.sampler.release()
        self.params, self.version = params, version
        self.sampler.prepare(params)

    def release(self) -> None:
        self.sampler.release()

    def generate(self, prompts, rng, stop_sequences):
        return self.sampler.generate(self.params, prompts, rng, stop_sequences)


ToolRunner = Callable[[Sequence[tuple[str, str]]], list[ToolOutcome | str]]
"""Runs (tool name, argument) calls concurrently; returns one ToolOutcome per call (a plain str counts as an
answered call), never raises."""


class ToolSet:
    """A `ToolRunner` over named tools (`mgrpo_jax.rollout.tools.Tool`): one turn's calls are grouped by tool
    and each group runs through the tool's concurrent, timed `call_outcomes` (failures become error observations
    with their status)."""

    def __init__(self, tools: Mapping[str, Any]):
        self.tools = dict(tools)

    def __call__(self, calls: Sequence[tuple[str, str]]) -> list[ToolOutcome]:
        out: list[ToolOutcome | None] = [None] * len(calls)
        by_tool: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(calls):
            by_tool.setdefault(name, []).append(i)
        for name, idx in by_tool.items():
            tool = self.tools.get(name)
            if tool is None:  # the model chose an action this task has no tool for: its doing, not an outage
                text = f"[{name} error: no such tool; available: {sorted(self.tools)}]"
                outcomes = [ToolOutcome(name, text, "bad_argument")] * len(idx)
            else:
                outcomes = tool.call_outcomes([calls[i][1] for i in idx])
            for i, outcome in zip(idx, outcomes):
                out[i] = outcome
        return out


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Episode limits and prompts. `max_*_context` bound each agent's whole token sequence."""

    max_main_turns: int = 8
    max_sub_turns: int = 6
    max_delegations: int = 4
    max_main_context: int = 2048
    max_sub_context: int = 1024
    max_observation_tokens: int = 256
    # A run stops (ToolFailureError) when more than this share of one tool's calls in a rollout batch failed
    # for infrastructure reasons; 1.0 never stops, 0.0 stops at the first failure.
    max_tool_failure_rate: float = 0.5
    main_system_prompt: str = (
        "You answer questions by delegating research. Each turn, write exactly one action: "
        "<delegate>a self-contained sub-question</delegate> to have a research assistant find a fact, or "
        "<answer>the final short answer</answer>. Results come back in <information>...</information>.")
    sub_system_prompt: str = (
        "You are a research assistant. Each turn, write exactly one action: <search>query</search> to search "
        "the documents, <read>doc-id</read> to read one, or <result>the fact you found</result> to finish. "
        "Tool output comes back in <information>...</information>.")
    single_system_prompt: str = (
        "You answer questions by searching documents. Each turn, write exactly one action: "
        "<search>query</search>, <read>doc-id</read>, or <answer>the final short answer</answer>. "
        "Tool output comes back in <information>...</information>.")

    def __post_init__(self):
        for key in ("max_main_turns", "max_sub_turns", "max_main_context", "max_sub_context",
                    "max_observation_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"controller.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_delegations < 0:
            raise ValueError(f"controller.max_delegations must be >= 0, got {self.max_delegations}")
        rate = self.max_tool_failure_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"controller.max_tool_failure_rate must be a number in [0, 1] (the share of a tool's "
                             f"calls per step that may fail; 1.0 never stops), got {rate!r}")


@dataclasses.dataclass
class Trajectory:
    """One agent episode, token-exact.

    tokens, loss_mask, logprobs: [L] (prompt + every turn). loss_mask is 1 exactly on the tokens this agent
    sampled; logprobs holds their behaviour log-probs (0 elsewhere). turns: [start, end) of each sampled span.
    Ids: `query`, `rollout` (k), `call` (i-th delegation of that rollout; -1 for a main trajectory).
    infra_failures: infrastructure failures this episode met (module docstring): its own tool calls that timed
    out or failed, 1 for a "generation_failed" sub episode, and for a main episode also those of every sub
    episode it delegated. > 0 on a main trajectory: the whole rollout was touched by an outage.
    task: the user message the episode answered (the question, or the sub-task the main agent delegated), as text:
    what a judge reads (RewardConfig.sub_judge) without decoding the prompt.
    """

    agent: str
    query: int
    rollout: int
    call: int
    prompt_len: int
    tokens: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    turns: list[tuple[int, int]]
    final: str | None
    finish_reason: str
    error: str | None
    policy_version: int
    tool_calls: int = 0
    truncated_observations: int = 0
    infra_failures: int = 0
    task: str = ""

    @property
    def format_ok(self) -> bool:
        return self.finish_reason in FINISH_OK

    @property
    def num_sampled(self) -> int:
        return int(sum(self.loss_mask))


@dataclasses.dataclass
class RolloutBatch:
    """All trajectories of Q queries x K rollouts.

    main: Q*K trajectories in (query, rollout) order. sub: every sub trajectory in (query, rollout, call)
    order (the flat order `train.alignment` indexes). sub_counts: [Q, K] d_k. stats: scalars of the batch
    (timings, finish reasons, `tool/<name>/{calls,failures,timeouts,bad_arguments,failure_rate}`,
    `tool_failures`, `infra_failed_rollouts`, `infra_failed_sub_episodes`), logged as `rollout/<key>`.
    """

    main: list[Trajectory]
    sub: list[Trajectory]
    sub_counts: np.ndarray
    stats: dict[str, Any]

    @property
    def num_queries(self) -> int:
        return int(self.sub_counts.shape[0])

    def select(self, queries: Sequence[int]) -> RolloutBatch:
        """The batch of these queries' rollouts, in this order, numbered 0.. again (trajectories are copied with
        their new `query`; the records are otherwise shared). Stats are the whole batch's: they describe what was
        sampled, not what was kept."""
        k_n = self.sub_counts.shape[1]
        new_index = {int(q): i for i, q in enumerate(queries)}
        if len(new_index) != len(queries) or not all(0 <= q < self.num_queries for q in new_index):
            raise ValueError(f"select needs distinct query indices in [0, {self.num_queries}), got {list(queries)}")
        main = [dataclasses.replace(t, query=i) for q, i in new_index.items()
                for t in self.main[q * k_n:(q + 1) * k_n]]
        sub = [dataclasses.replace(self.sub[j], query=new_index[self.sub[j].query])
               for j in self.sub_positions(new_index)]
        counts = self.sub_counts[list(new_index)] if new_index else self.sub_counts[:0]
        return RolloutBatch(main, sub, counts, dict(self.stats))

    def sub_positions(self, queries: Sequence[int]) -> np.ndarray:
        """Indices into `sub` of these queries' records, query by query in this order (each query's in the flat
        order): where `select(queries)`'s sub records, and anything indexed like `sub`, come from."""
        by_query = [[] for _ in range(self.num_queries)]
        for j, t in enumerate(self.sub):
            by_query[t.query].append(j)
        return np.array([j for q in queries for j in by_query[q]], dtype=int)

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """One batch of several batches' queries, numbered in order. Stats add up (counts, seconds), but for the
        per-rollout mean of delegations and each tool's failure rate, which are recomputed, and `main_turns`, the
        longest."""
        if len(batches) == 1:
            return batches[0]
        main, sub, offset = [], [], 0
        for b in batches:
            main += [dataclasses.replace(t, query=t.query + offset) for t in b.main]
            sub += [dataclasses.replace(t, query=t.query + offset) for t in b.sub]
            offset += b.num_queries
        counts = np.concatenate([b.sub_counts for b in batches])
        stats = Counter()
        for b in batches:
            stats.update({k: v for k, v in b.stats.items() if not k.endswith("failure_rate")})
        stats = dict(stats, main_turns=max(b.stats.get("main_turns", 0) for b in batches),
                     delegations_per_rollout=float(counts.mean()) if counts.size else 0.0)
        for key in [k for k in stats if k.startswith("tool/") and k.endswith("/calls")]:
            calls, failures = stats[key], stats.get(key[:-len("calls")] + "failures", 0)
            stats[key[:-len("calls")] + "failure_rate"] = failures / calls if calls else 0.0
        return cls(main, sub, counts, stats)


class _Episode:
    """A running episode: the growing token record plus its bookkeeping."""

    def __init__(self, agent: str, query: int, rollout: int, call: int, prompt: list[int], version: int,
                 task: str):
        self.traj = Trajectory(agent, query, rollout, call, len(prompt), list(prompt), [0] * len(prompt),
                               [0.0] * len(prompt), [], None, "", None, version, task=task)
        self.turns = 0
        self.delegations = 0
        self.waiting: tuple[str, str] | None = None  # the pending (action, argument) of this turn

    @property
    def done(self) -> bool:
        return bool(self.traj.finish_reason)

    def end(self, reason: str, error: str | None = None, final: str | None = None) -> None:
        self.traj.finish_reason, self.traj.error, self.traj.final = reason, error, final

    def add_sampled(self, sample: Sample) -> None:
        start = len(self.traj.tokens)
        self.traj.tokens += [int(t) for t in sample.tokens]
        self.traj.loss_mask += [1] * len(sample.tokens)
        self.traj.logprobs += [float(x) for x in sample.logprobs]
        self.traj.turns.append((start, len(self.traj.tokens)))
        # A served sample (train/service.py) names the policy version that generated it: the record is as old as
        # its oldest turn, whatever version the client had seen when the episode began.
        served = getattr(sample, "policy_version", None)
        if served is not None:
            self.traj.policy_version = served if self.turns == 0 else min(self.traj.policy_version, served)
        self.turns += 1

    def add_observation(self, ids: list[int], truncated: bool) -> None:
        self.traj.tokens += ids
        self.traj.loss_mask += [0] * len(ids)
        self.traj.logprobs += [0.0] * len(ids)
        self.traj.truncated_observations += int(truncated)


class TextCodec:
    """The tokenizer side of the protocol: prompts through the chat template, observations, stop tokens."""

    def __init__(self, tokenizer: Any, max_observation_tokens: int):
        self.tokenizer = tokenizer
        self.max_observation_tokens = max_observation_tokens

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prompt(self, system: str, user: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
            return [int(i) for i in ids]
        return self.encode(f"System: {system}\nUser: {user}\nAssistant:")

    def observation(self, protocol: AgentProtocol, text: str) -> tuple[list[int], bool]:
        """Observation tokens: the text's first `max_observation_tokens` tokens inside the wrapper tags."""
        body = self.encode(text)
        truncated = len(body) > self.max_observation_tokens
        body = body[: self.max_observation_tokens]
        tag = protocol.observation_tag
        return self.encode(f"\n<{tag}>") + body + self.encode(f"</{tag}>\n"), truncated

    def stop_sequences(self, protocol: AgentProtocol) -> list[list[int]]:
        return [self.encode(s) for s in protocol.stop_sequences]


class Controller:
    """Runs M-GRPO rollouts for a main agent (and its sub-agent), or for a single agent with tools.

    main_protocol decides the setting: a main protocol whose tool actions include the delegate tag delegates
    to `sub_policy`; its other tool actions (and all of a single agent's) go to `tools`.
    """

    def __init__(self, *, config: ControllerConfig, codec: TextCodec, main_policy: Policy,
                 main_protocol: AgentProtocol, tools: ToolRunner, sub_policy: Policy | None = None,
                 sub_protocol: AgentProtocol | None = None, delegate_action: str | None = "delegate"):
        self.config, self.codec, self.tools = config, codec, tools
        self.main_policy, self.main_protocol = main_policy, main_protocol
        self.sub_policy, self.sub_protocol = sub_policy, sub_protocol
        self.delegate_action = delegate_action if delegate_action in main_protocol.tool_actions else None
        if self.delegate_action and (sub_policy is None or sub_protocol is None):
            raise ValueError(f"the main protocol has a <{delegate_action}> action: pass sub_policy and sub_protocol")
        self._check_context(main_policy, config.max_main_context, "max_main_context")
        if self.delegate_action:
            self._check_context(sub_policy, config.max_sub_context, "max_sub_context")
        self.main_stops = codec.stop_sequences(main_protocol)
        self.sub_stops = codec.stop_sequences(sub_protocol) if sub_protocol else []

    @staticmethod
    def _check_context(policy, max_context: int, key: str) -> None:
        # A prompt may grow to max_context - max_new_tokens tokens; the sampler must take it without truncating.
        longest = getattr(policy, "max_prompt_tokens", None)
        new = getattr(policy, "max_new_tokens", 0)
        if longest is not None and max_context - new > longest:
            raise ValueError(f"controller.{key}={max_context} allows prompts of {max_context - new} tokens but the "
                             f"sampler's largest prompt bucket is {longest}; raise sampler.prompt_buckets or lower "
                             f"controller.{key}")

    # ------------------------------------------------------------------------------------------------------

    def run(self, questions: Sequence[str], num_rollouts: int, rng: jax.Array) -> RolloutBatch:
        """Q questions x K rollouts -> every main and sub trajectory, token-exact, plus statistics."""
        try:
            return self._run(questions, num_rollouts, rng)
        finally:  # every episode has ended: the policies' KV caches (kept across turns) can go
            for policy in {id(p): p for p in (self.main_policy, self.sub_policy) if p is not None}.values():
                getattr(policy, "release", lambda: None)()

    def _run(self, questions: Sequence[str], num_rollouts: int, rng: jax.Array) -> RolloutBatch:
        if num_rollouts < 1 or not questions:
            raise ValueError(f"need at least one question and num_rollouts >= 1, got {len(questions)}, {num_rollouts}")
        cfg, started = self.config, time.perf_counter()
        timers = Counter()
        tool_log = _ToolLog()
        system = cfg.main_system_prompt if self.delegate_action else cfg.single_system_prompt
        agent = "main" if self.delegate_action else "single"
        prompts = [self.codec.prompt(system, q) for q in questions]
        episodes = [_Episode(agent, q, k, -1, prompts[q], self.main_policy.version, questions[q])
                    for q in range(len(questions)) for k in range(num_rollouts)]
        subs: list[_Episode] = []
        turn = 0
        while True:
            active = self._admit(episodes, cfg.max_main_context, self.main_policy)
            if not active:
                break
            rng, key, sub_key = jax.random.split(rng, 3)
            t0 = time.perf_counter()
            samples = self.main_policy.generate([e.traj.tokens for e in active], key, self.main_stops)
            timers["main_generate_s"] += time.perf_counter() - t0
            delegations, calls = [], []
            for ep, sample in zip(active, samples):
                action = self._take_turn(ep, sample, self.main_protocol, cfg.max_main_turns)
                if action is None:
                    continue
                if action.kind == self.delegate_action:
                    if ep.delegations >= cfg.max_delegations:
                        ep.end("max_delegations", f"more than {cfg.max_delegations} delegations")
                        continue
                    delegations.append((ep, action.argument))
                    ep.delegations += 1
                else:
                    calls.append((ep, action.kind, action.argument))
            observations = self._run_tools(calls, self.main_protocol, timers, tool_log)
            if delegations:
                t0 = time.perf_counter()
                results, finished = self._run_sub_episodes(delegations, sub_key, timers, tool_log)
                timers["sub_episodes_s"] += time.perf_counter() - t0
                subs += finished
                observations += [(ep, text) for (ep, _), text in zip(delegations, results)]
                for (ep, _), sub_ep in zip(delegations, finished):  # an outage in a delegation marks its rollout
                    ep.traj.infra_failures += sub_ep.traj.infra_failures
            for ep, text in observations:
                ids, truncated = self.codec.observation(self.main_protocol, text)
                ep.add_observation(ids, truncated)
            turn += 1

        subs.sort(key=lambda e: (e.traj.query, e.traj.rollout, e.traj.call))
        counts = np.zeros((len(questions), num_rollouts), np.int32)
        for e in subs:
            counts[e.traj.query, e.traj.rollout] += 1
        main = [e.traj for e in episodes]
        sub = [e.traj for e in subs]
        stats = dict(timers, rollout_s=time.perf_counter() - started, main_turns=turn)
        stats.update(_finish_counts(f"{agent}_finish", main))
        stats.update(_finish_counts("sub_finish", sub))
        stats["delegations_per_rollout"] = float(counts.mean())
        stats.update(tool_log.stats(getattr(self.tools, "tools", {})))
        stats["infra_failed_rollouts"] = sum(t.infra_failures > 0 for t in main)
        stats["infra_failed_sub_episodes"] = sum(t.infra_failures > 0 for t in sub)
        tool_log.check(cfg.max_tool_failure_rate)
        return RolloutBatch(main, sub, counts, stats)

    def _admit(self, episodes: list[_Episode], max_context: int, policy) -> list[_Episode]:
        """The episodes that take another turn; ends those whose context cannot fit one more turn."""
        room = getattr(policy, "max_new_tokens", 0)
        active = []
        for ep in episodes:
            if ep.done:
                continue
            if len(ep.traj.tokens) + room > max_context:
                ep.end("max_context", f"{len(ep.traj.tokens)} tokens + a turn of {room} exceed {max_context}")
                continue
            active.append(ep)
        return active

    def _take_turn(self, ep: _Episode, sample: Sample, protocol: AgentProtocol, max_turns: int):
        """Records the sampled turn and parses it; returns the tool action to run, or None if the episode ended."""
        ep.add_sampled(sample)
        action = protocol.parse(self.codec.decode(sample.tokens))
        if not action.format_ok:
            ep.end("format_error", action.error)
            return None
        if action.is_final:
            ep.end("result" if protocol.role == "sub" else "answer", final=action.argument)
            return None
        if ep.turns >= max_turns:
            ep.end("max_turns", f"no {protocol.final_action} within {max_turns} turns")
            return None
        ep.traj.tool_calls += 1
        return action

    def _run_tools(self, calls, protocol: AgentProtocol, timers: Counter,
                   tool_log: _ToolLog) -> list[tuple[_Episode, str]]:
        if not calls:
            return []
        t0 = time.perf_counter()
        outcomes = self.tools([(kind, argument) for _, kind, argument in calls])
        timers["tool_s"] += time.perf_counter() - t0
        timers["tool_calls"] += len(calls)
        out = []
        for (ep, kind, _), outcome in zip(calls, outcomes):
            if isinstance(outcome, str):  # a plain ToolRunner: an answered call
                outcome = ToolOutcome(kind, outcome, "ok")
            tool_log.add(outcome)
            ep.traj.infra_failures += int(outcome.infra_failure)
            out.append((ep, outcome.observation))
        return out

    def _run_sub_episodes(self, delegations, rng, timers: Counter,
                          tool_log: _ToolLog) -> tuple[list[str], list[_Episode]]:
        """Runs one sub-agent episode per delegation, all in lockstep; returns the main agent's observations."""
        cfg = self.config
        episodes = []
        for ep, subtask in delegations:
            prompt = self.codec.prompt(cfg.sub_system_prompt, subtask)
            episodes.append(_Episode("sub", ep.traj.query, ep.traj.rollout, ep.delegations - 1, prompt,
                                     self.sub_policy.version, subtask))
        while True:
            active = self._admit(episodes, cfg.max_sub_context, self.sub_policy)
            if not active:
                break
            rng, key = jax.random.split(rng)
            t0 = time.perf_counter()
            try:
                samples = self.sub_policy.generate([e.traj.tokens for e in active], key, self.sub_stops)
            except GenerationUnavailableError as err:
                # The delegations fail; the main episodes get "[sub-agent failed: generation_failed]" and go on.
                for ep in active:
                    ep.end("generation_failed", str(err))
                    ep.traj.infra_failures += 1
                timers["sub_generation_failures"] += len(active)
                continue
            finally:
                timers["sub_generate_s"] += time.perf_counter() - t0
            calls = []
            for ep, sample in zip(active, samples):
                action = self._take_turn(ep, sample, self.sub_protocol, cfg.max_sub_turns)
                if action is not None:
                    calls.append((ep, action.kind, action.argument))
            for ep, text in self._run_tools(calls, self.sub_protocol, timers, tool_log):
                ids, truncated = self.codec.observation(self.sub_protocol, text)
                ep.add_observation(ids, truncated)
        results = [e.traj.final if e.traj.format_ok else f"[sub-agent failed: {e.traj.finish_reason}]"
                   for e in episodes]
        return results, episodes


class _ToolLog:
    """One `run`'s tool calls by tool and outcome status, and each tool's first infrastructure failure."""

    def __init__(self):
        self.counts: Counter[tuple[str, str]] = Counter()
        self.first_failure: dict[str, str] = {}

    def add(self, outcome: ToolOutcome) -> None:
        self.counts[outcome.tool, outcome.status] += 1
        if outcome.infra_failure:
            self.first_failure.setdefault(outcome.tool, outcome.observation)

    def _tool(self, name: str) -> tuple[int, int]:
        calls = sum(self.counts[name, status] for status in OUTCOME_STATUSES)
        return calls, sum(self.counts[name, status] for status in INFRA_FAILURE_STATUSES)

    def stats(self, known_tools) -> dict[str, float]:
        """`tool/<name>/...` for every known tool (0 calls included, so every step logs the same keys)."""
        out: dict[str, float] = {}
        for name in sorted(set(known_tools) | {tool for tool, _ in self.counts}):
            calls, failures = self._tool(name)
            out.update({f"tool/{name}/calls": calls, f"tool/{name}/failures": failures,
                        f"tool/{name}/timeouts": self.counts[name, "timeout"],
                        f"tool/{name}/bad_arguments": self.counts[name, "bad_argument"],
                        f"tool/{name}/failure_rate": failures / calls if calls else 0.0})
        out["tool_failures"] = sum(n for (_, status), n in self.counts.items() if status in INFRA_FAILURE_STATUSES)
        return out

    def check(self, max_rate: float) -> None:
        """Raises ToolFailureError for a tool whose failure share is over `max_rate`; logs the others' failures."""
        for name in sorted({tool for tool, _ in self.counts}):
            calls, failures = self._tool(name)
            if failures and failures / calls <= max_rate:
                log.warning("tool %r failed %d of its %d calls in this rollout batch (the rollouts they touched are "
                            "marked infra_failures); the first failure: %s", name, failures, calls,
                            self.first_failure[name])
            elif failures:
                raise ToolFailureError(
                    f"tool {name!r} failed {failures} of its {calls} calls in this rollout batch "
                    f"({self.counts[name, 'timeout']} timeouts, {self.counts[name, 'error']} errors), more than "
                    f"controller.max_tool_failure_rate={max_rate}; the first failure: {self.first_failure[name]}. "
                    "Fix the tool or its service (for search: task.retriever_url, or the corpus), or raise "
                    "controller.max_tool_failure_rate (1.0 never stops)")


def _finish_counts(prefix: str, trajectories: Sequence[Trajectory]) -> dict[str, int]:
    counts = Counter(t.finish_reason for t in trajectories)
    return {f"{prefix}/{reason}": int(n) for reason, n in sorted(counts.items())}
