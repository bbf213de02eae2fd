"""The text protocol between agents and tools: action tags, and a parser that accepts any model output.

Each agent turn emits exactly one action, an XML-like tag pair around its argument:

    main agent:  <delegate>subtask</delegate>   runs a sub-agent episode; its result is the observation
                 <answer>final answer</answer>  ends the rollout
    sub-agent:   <search>query</search>         local BM25 search or an HTTP retriever
                 <read>doc-id</read>            one document's text
                 <result>report</result>        ends the sub-agent episode; returned to the main agent
    single agent (the single-agent baseline): the sub-agent's tools plus <answer>.

Observations come back wrapped in <information>...</information>. Free text before the action (reasoning,
`<think>` blocks) is allowed and ignored. The sampler stops at the closing tags (`stop_sequences`), so an
action is the *last* thing in a turn. Every tag name is configurable.

`AgentProtocol.parse` never raises: any string, however malformed, yields a `ParsedAction`; malformed
output has `format_ok=False` and an `error` that says why (these feed the format reward and its metrics).
"""
from __future__ import annotations

import dataclasses
import re

ROLES = ("main", "sub", "single")


@dataclasses.dataclass(frozen=True)
class ParsedAction:
    """One turn's action. `kind` is the action's tag name, None when no action could be read."""

    kind: str | None
    argument: str
    format_ok: bool
    is_final: bool
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class AgentProtocol:
    """The actions one agent role may take, and how its turns are parsed and its observations wrapped.

    Attributes:
      role: "main", "sub" or "single" (informational; the tags decide behaviour).
      tool_actions: tags answered by an observation (a tool call or, for the main agent, a delegation).
      final_action: the tag that ends the agent's episode (answer / result).
      observation_tag: wraps tool output fed back to the agent.
      known_tags: every action tag of the whole system; one of them that this agent may not use is a
        format error rather than free text.
    """

    role: str
    tool_actions: tuple[str, ...]
    final_action: str
    observation_tag: str = "information"
    known_tags: tuple[str, ...] = ()

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} is not supported; choose one of {list(ROLES)}")
        tags = (*self.tool_actions, self.final_action, self.observation_tag)
        for tag in tags:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", tag):
                raise ValueError(f"tag {tag!r} must be a name of letters, digits, '_' or '-' (no brackets)")
        if len(set(tags)) != len(tags):
            raise ValueError(f"the tags of role {self.role!r} must be distinct, got {tags}")

    @property
    def actions(self) -> tuple[str, ...]:
        return (*self.tool_actions, self.final_action)

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """Closing tags of this agent's actions: the sampler stops a turn at any of them."""
        return tuple(f"</{tag}>" for tag in self.actions)

    def format_action(self, kind: str, argument: str) -> str:
        """The text of a well-formed action (for demonstrations and scripted policies)."""
        if kind not in self.actions:
            raise ValueError(f"action {kind!r} is not one of role {self.role!r}'s actions {list(self.actions)}")
        return f"<{kind}>{argument}</{kind}>"

    def wrap_observation(self, text: str) -> str:
        return f"<{self.observation_tag}>{text}</{self.observation_tag}>"

    def parse(self, text: str) -> ParsedAction:
        """Reads the single action of one turn. Never raises; malformed output gives format_ok=False."""
        if not isinstance(text, str):
            return ParsedAction(None, "", False, False, f"model output is {type(text).__name__}, not text")
        all_tags = tuple(dict.fromkeys((*self.actions, *self.known_tags)))
        opening = _opening_tag_pattern(all_tags)
        first = opening.search(text)
        if first is None:
            return ParsedAction(None, "", False, False, f"no action: expected one of {_tag_list(self.actions)}")
        kind = first.group(1)
        if kind not in self.actions:
            return ParsedAction(kind, "", False, False,
                                f"<{kind}> is not an action of the {self.role} agent; use {_tag_list(self.actions)}")
        close = f"</{kind}>"
        end = text.find(close, first.end())
        if end < 0:
            return ParsedAction(kind, "", False, False, f"<{kind}> is never closed by {close} (output cut short?)")
        argument = text[first.end():end]
        if opening.search(argument):
            return ParsedAction(kind, "", False, False, f"<{kind}> contains another action tag")
        argument = argument.strip()
        if not argument:
            return ParsedAction(kind, "", False, False, f"<{kind}> is empty")
        if opening.search(text, end + len(close)):
            return ParsedAction(kind, argument, False, False, "more than one action in one turn")
        return ParsedAction(kind, argument, True, kind == self.final_action)


def _tag_list(tags) -> str:
    return ", ".join(f"<{t}>" for t in tags)


def _opening_tag_pattern(tags: tuple[str, ...]) -> re.Pattern:
    return re.compile("<(" + "|".join(re.escape(t) for t in tags) + ")>")


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Tag names of the whole system (every one configurable), and the three agent protocols built from them."""

    delegate: str = "delegate"
    answer: str = "answer"
    search: str = "search"
    read: str = "read"
    result: str = "result"
    observation: str = "information"
    main_tools: tuple[str, ...] = ()  # extra tools of the main agent's own (the paper's `reason` tool)

    def _all(self) -> tuple[str, ...]:
        return (self.delegate, self.answer, self.search, self.read, self.result, *self.main_tools)

    def main(self) -> AgentProtocol:
        return AgentProtocol("main", (self.delegate, *self.main_tools), self.answer, self.observation, self._all())

    def sub(self) -> AgentProtocol:
        return AgentProtocol("sub", (self.search, self.read), self.result, self.observation, self._all())

    def single(self) -> AgentProtocol:
        return AgentProtocol("single", (self.search, self.read), self.answer, self.observation, self._all())
