"""The warm start: supervised fine-tuning of each agent on demonstrations of the protocol, before RL.

    experiment (build_experiment: data, tokenizer, meshes, models, controller) -> demonstrations of the
    training questions (train.demonstrations, through the real controller) -> per agent, an SFT AgentTrainer
    (objective "sft", its own optimizer) on the agent's parameters and mesh -> epochs of shuffled, fixed-shape
    batches, both agents' updates dispatched back to back -> held-out greedy accuracy (evaluation.Evaluator)
    between epochs -> each agent saved as a Hugging Face directory (with the tokenizer) under
    workdir/warm_start/<agent>.

Demonstrations come from `train.demonstrations`' teachers. With `shortcuts` (each teacher's probability of a
shortcut per decision point), every epoch gets a fresh draw of them (seed = the epoch), so that the model learns
the teacher's mixture at each decision point rather than which training question took the shortcut: the
warm-started policy samples both behaviours on new questions, which is the room RL has. `agent_epochs` stops an
agent's SFT early (a weaker agent: the comparisons' bottleneck setting). After the last epoch, `explore_questions`
questions RL will train on are rolled out `explore_k` times each with the training samplers: pass@k, the share of
groups whose rewards are all equal per agent (no signal for a group-relative update) and the sampled entropy,
logged as `explore/...`.

An RL run starts from the result with `agents.<role>.checkpoint=<workdir>/warm_start/<role>` and
`tokenizer.path=<workdir>/warm_start/main`, and must keep the warm start's task, controller and prompts.
`launch/warm_start.py` is this function behind command-line flags. Settings live in `config.warm_start`
(see configs/warm_start_tiny.py); a config without that block gets the `WarmStartConfig` defaults.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from mgrpo_jax.data.pipeline import questions_and_golds, read_qa_rows
from mgrpo_jax.data.synthetic import read_questions_jsonl
from mgrpo_jax.evaluation import Evaluator
from mgrpo_jax.experiment import Experiment, build_experiment, make, to_dict
from mgrpo_jax.rollout.controller import Trajectory
from mgrpo_jax.train.agent import AgentTrainer, LossConfig, OptimizerConfig
from mgrpo_jax.train.batch import PackedBatch, Segment
from mgrpo_jax.train.demonstrations import SEARCH_QUERIES, SHORTCUT_AGENTS, Demonstrations, make_demonstrations

logger = logging.getLogger(__name__)

MODES = ("co_train", "main_only", "shared_model", "single_agent")
LENGTH_MULTIPLE = 16  # SFT rows hold the longest demonstration, rounded up to this


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
    """config.warm_start. `optimizer` holds OptimizerConfig keys; its total_steps is set from the epochs.
    `repeat[agent]`: passes over that agent's demonstrations per epoch (the main agent's rows are short and
    cheap; it can take more updates than the sub-agent in the same wall time). `batch_size` demonstrations make
    one update; they are packed into micro-batches of `micro_batch_size` rows (`train.batch`)."""

    epochs: int = 6
    batch_size: int = 32
    micro_batch_size: int = 4
    max_questions: int = 0
    query: str = "subject"
    fallback_query: bool = True
    eval_every_epochs: int = 1
    eval_train_questions: int = 0
    repeat: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"main": 1, "sub": 1})
    optimizer: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {
        "learning_rate": 3e-3, "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.01})
    shortcuts: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"main": 0.0, "sub": 0.0})
    agent_epochs: Mapping[str, int] = dataclasses.field(default_factory=dict)  # agent -> its epochs (0: all)
    explore_questions: int = 0
    explore_k: int = 4
    questions_per_epoch: int = 0  # > 0: each epoch demonstrates a fresh seeded sample of this many questions

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("warm_start.epochs, batch_size and micro_batch_size must be >= 1")
        if self.max_questions < 0 or self.eval_every_epochs < 0 or self.eval_train_questions < 0:
            raise ValueError("warm_start.max_questions, eval_every_epochs and eval_train_questions must be >= 0")
        if set(self.repeat) - {"main", "sub"} or any(int(v) < 1 for v in self.repeat.values()):
            raise ValueError(f"warm_start.repeat maps 'main' / 'sub' to passes per epoch >= 1, got {dict(self.repeat)}")
        if self.query not in SEARCH_QUERIES:
            raise ValueError(f"warm_start.query={self.query!r} is not supported; choose one of {list(SEARCH_QUERIES)}")
        if set(self.shortcuts) - set(SHORTCUT_AGENTS) or any(not 0 <= float(v) <= 1 for v in self.shortcuts.values()):
            raise ValueError(f"warm_start.shortcuts maps 'main' / 'sub' to probabilities in [0, 1], got "
                             f"{dict(self.shortcuts)}")
        if set(self.agent_epochs) - {"main", "sub"} or any(not 0 <= int(v) <= self.epochs
                                                           for v in self.agent_epochs.values()):
            raise ValueError(f"warm_start.agent_epochs maps 'main' / 'sub' to epochs in [1, warm_start.epochs="
                             f"{self.epochs}] (0: all of them), got {dict(self.agent_epochs)}")
        if self.questions_per_epoch < 0:
            raise ValueError(f"warm_start.questions_per_epoch must be >= 0, got {self.questions_per_epoch}")
        if self.explore_questions < 0 or self.explore_k < 2:
            raise ValueError("warm_start.explore_questions must be >= 0 and explore_k >= 2 (a group needs two rollouts)")


@dataclasses.dataclass
class WarmStartResult:
    history: list[dict[str, float]]  # one entry per epoch: mean NLL per agent, time, accuracy when evaluated
    final: dict[str, float]  # the last evaluation (greedy/accuracy, ...)
    checkpoints: dict[str, str]  # role -> Hugging Face directory
    demonstrations: dict[str, Any]  # kept / dropped counts


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sft_groups(mode: str, demos: list[Demonstrations]) -> dict[str, tuple[list[str], list[list[Trajectory]]]]:
    """Model name -> (the roles it plays, its demonstrations per draw): one model per agent, or one for both
    roles (shared_model), or the single agent's."""
    if mode == "single_agent":
        return {"main": (["main"], [d.main for d in demos])}
    if mode == "shared_model":  # one model learns both roles
        return {"main": (["main", "sub"], [d.main + d.sub for d in demos])}
    return {"main": (["main"], [d.main for d in demos]), "sub": (["sub"], [d.sub for d in demos])}


def sft_row_len(rows: list[list[Trajectory]]) -> int:
    """SFT rows hold the longest demonstration of any draw, rounded up to LENGTH_MULTIPLE."""
    return _round_up(max(len(t.tokens) for epoch_rows in rows for t in epoch_rows), LENGTH_MULTIPLE)


class _SFTAgent:
    """One model's SFT: its demonstrations (one set per epoch, or one for all), its AgentTrainer, and a seeded
    shuffled pass per epoch for its first `epochs` epochs."""

    def __init__(self, name: str, exp: Experiment, roles: list[str], rows: list[list[Trajectory]], max_len: int,
                 ws: WarmStartConfig, seed: int):
        agent = exp.agents[roles[0]]
        self.name, self.roles, self.rows_by_epoch, self.max_len = name, roles, rows, max_len
        self.pad_id = exp.tokenizer.pad_token_id
        self.repeat = int(ws.repeat.get(name, 1))
        self.epochs = int(ws.agent_epochs.get(name, 0)) or ws.epochs
        self.steps = [self.repeat * -(-len(self._rows(e)) // ws.batch_size) for e in range(self.epochs)]
        optimizer = make(OptimizerConfig, {**to_dict(ws.optimizer), "total_steps": sum(self.steps)},
                         "warm_start.optimizer")
        chunk = int(exp.config.agents[roles[0]].loss.get("chunk_size", 1024))
        loss = LossConfig(objective="sft", micro_batch_size=ws.micro_batch_size, chunk_size=chunk)
        params = agent.policy.params
        shardings = jax.tree.map(lambda x: x.sharding, params)
        self.trainer = AgentTrainer(f"{name}_sft", agent.graphdef, params, shardings, optimizer, loss, row_len=max_len,
                                    pad_id=self.pad_id)
        self.batch_size = ws.batch_size
        self._rng = np.random.default_rng(seed)
        self._passes: list[list[int]] = []
        self._epoch_rows: list[Trajectory] = []

    def _rows(self, epoch: int) -> list[Trajectory]:
        return self.rows_by_epoch[min(epoch, len(self.rows_by_epoch) - 1)]

    def new_epoch(self, epoch: int) -> None:
        """Epoch `epoch` (from 0): its demonstrations, shuffled `repeat` times; nothing once the agent is done."""
        if epoch >= self.epochs:
            self._passes = []
            return
        self._epoch_rows = self._rows(epoch)
        self._passes = [list(self._rng.permutation(len(self._epoch_rows))) for _ in range(self.repeat)]

    def next_batch(self) -> PackedBatch | None:
        while self._passes and not self._passes[0]:
            self._passes.pop(0)
        if not self._passes:
            return None
        order = self._passes[0]
        take, self._passes[0] = order[: self.batch_size], order[self.batch_size:]
        return self.trainer.pack([Segment(self._epoch_rows[i]) for i in take])

    def hand_back(self, exp: Experiment) -> None:
        """The experiment's samplers (and RL trainers, whose parameter buffers the SFT update donated) get the
        fine-tuned parameters."""
        for role in self.roles:
            exp.agents[role].policy.update(self.trainer.params, 0)
            rl = exp.loop.trainers.get(role)
            if isinstance(rl, AgentTrainer):
                rl.params = self.trainer.params


def _held_out(exp: Experiment) -> tuple[list[str], list[Any]]:
    count = int(exp.config.get("eval_questions", 0))
    if not exp.data.eval_files or count <= 0:
        return [], []
    rows = read_qa_rows(exp.data.eval_files, on_bad_row=exp.config.task.on_bad_row)[0][:count]
    return questions_and_golds(rows)


def warm_start(config, workdir: str, *, log: Callable[[str], None] = logger.info) -> WarmStartResult:
    """SFT of every agent of `config` on demonstrations of its training questions; see the module docstring."""
    ws = make(WarmStartConfig, config.get("warm_start", {}), "warm_start")
    if config.mode not in MODES:
        raise ValueError(f"warm_start supports config.mode in {list(MODES)}, got {config.mode!r}")
    if config.task.kind != "synthetic":
        raise ValueError("warm_start needs config.task.kind='synthetic': demonstrations follow each question's "
                         "hop chain, which only generated questions carry")
    started = time.perf_counter()

    # -- experiment ---------------------------------------------------------------------------------------
    exp = build_experiment(config, workdir)
    log(f"experiment built in {time.perf_counter() - started:.1f}s")

    # -- demonstrations -----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    # The warm start's own questions when the task has them (task.rl_fraction: heads RL and evaluation never
    # share with it), else the training questions.
    questions = [q for f in (exp.data.warm_start_files or exp.data.train_files) for q in read_questions_jsonl(f)]
    if ws.max_questions:
        questions = questions[: ws.max_questions]
    sampled = 0 < ws.questions_per_epoch < len(questions)
    # A fresh draw per epoch: of the shortcuts, and of the questions when an epoch takes a sample of them.
    draws = ws.epochs if sampled or any(float(v) for v in ws.shortcuts.values()) else 1

    def epoch_questions(epoch: int) -> list:
        if not sampled:
            return questions
        pick = np.random.default_rng([int(config.seed), epoch]).choice(len(questions), ws.questions_per_epoch,
                                                                        replace=False)
        return [questions[i] for i in sorted(pick)]

    demos: list[Demonstrations] = [
        make_demonstrations(exp.controller, epoch_questions(epoch), query=ws.query, fallback_query=ws.fallback_query,
                            shortcuts=ws.shortcuts, seed=epoch) for epoch in range(draws)]
    first = demos[0]
    demo_stats = {**first.stats, "dropped": dict(first.dropped), "draws": draws}
    log(f"demonstrations: {len(first.main)} main ({first.stats.get('main_shortcuts', 0)} with a shortcut), "
        f"{len(first.sub)} sub ({first.stats.get('sub_shortcuts', 0)} with a shortcut) from "
        f"{first.stats['questions']} of {len(questions)} questions in {time.perf_counter() - t0:.1f}s ({draws} "
        f"draw(s), the first shown); dropped {dict(first.dropped) or 'none'}")
    if not first.main or (config.mode != "single_agent" and not first.sub):
        raise ValueError(f"no usable demonstrations ({demo_stats}); raise controller.max_observation_tokens or "
                         "task.search_top_k so that search results show the documents")

    # -- one SFT trainer per model ------------------------------------------------------------------------
    agents = {}
    for i, (name, (roles, rows)) in enumerate(sft_groups(config.mode, demos).items()):
        max_len = sft_row_len(rows)
        agents[name] = _SFTAgent(name, exp, roles, rows, max_len, ws, seed=int(config.seed) + i)
        log(f"{name}: {len(rows[0])} demonstrations, rows of {max_len} tokens, {agents[name].steps[0]} "
            f"updates of {ws.batch_size} per epoch for {agents[name].epochs} epochs")

    # -- epochs -------------------------------------------------------------------------------------------
    held_q, held_g = _held_out(exp)
    train_q, train_g = [q.question for q in questions[: ws.eval_train_questions]], \
        [q.answer for q in questions[: ws.eval_train_questions]]
    evaluator = Evaluator(exp.controller, exp.loop.config.rewards)

    def evaluate() -> dict[str, float]:
        for agent in agents.values():
            agent.hand_back(exp)
        out = {}
        if held_q:
            out.update(evaluator.run(held_q, held_g, greedy=True))
        if train_q:
            out.update({f"train_{k}": v for k, v in evaluator.run(train_q, train_g, greedy=True).items()})
        return out

    history: list[dict[str, float]] = []
    final: dict[str, float] = {}
    for epoch in range(1, ws.epochs + 1):
        t0 = time.perf_counter()
        nll = {name: [] for name in agents}
        for agent in agents.values():
            agent.new_epoch(epoch - 1)
        while True:
            pending = {}
            for name, agent in agents.items():  # dispatched back to back: the agents' updates overlap
                batch = agent.next_batch()
                if batch is not None:
                    pending[name] = (agent.trainer.dispatch(batch), batch.num_loss_tokens)
            if not pending:
                break
            for name, (metrics, tokens) in pending.items():
                metrics = agents[name].trainer.collect(metrics)
                if tokens:  # an update without loss tokens is skipped and has no NLL
                    nll[name].append((metrics["nll"], metrics["entropy_mean"], tokens))
        entry = {"epoch": epoch, "train_s": time.perf_counter() - t0}
        for name, values in nll.items():
            if values:  # token means over the epoch; an agent past its agent_epochs has none
                v = np.array(values)
                entry[f"{name}/nll"] = float(np.sum(v[:, 0] * v[:, 2]) / np.sum(v[:, 2]))
                entry[f"{name}/entropy"] = float(np.sum(v[:, 1] * v[:, 2]) / np.sum(v[:, 2]))
        if (ws.eval_every_epochs and epoch % ws.eval_every_epochs == 0) or epoch == ws.epochs:
            t1 = time.perf_counter()
            final = evaluate()
            entry.update(final)
            entry["eval_s"] = time.perf_counter() - t1
        entry["elapsed_s"] = time.perf_counter() - started
        history.append(entry)
        log("epoch " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))

    # -- room to explore ----------------------------------------------------------------------------------
    if ws.explore_questions:
        t1 = time.perf_counter()
        rl = [q for f in exp.data.train_files for q in read_questions_jsonl(f)]
        if not exp.data.warm_start_files:  # the training questions the warm start did not demonstrate
            rl = rl[len(questions):] if ws.max_questions else []
        rl = rl[: ws.explore_questions]
        if rl:
            sampled = evaluator.run([q.question for q in rl], [q.answer for q in rl], greedy=False, k=ws.explore_k,
                                    rng=jax.random.key(int(config.seed)))
            explore = {f"explore/{k.split('/', 1)[1]}": v for k, v in sampled.items()}  # accuracy: pass@k
            explore["explore/k"] = float(ws.explore_k)
            final.update(explore)
            history[-1].update(explore)
            log("room to explore (RL questions, training samplers): " + ", ".join(
                f"{k}={v:.3g}" for k, v in explore.items()) + f" in {time.perf_counter() - t1:.1f}s")

    # -- save ---------------------------------------------------------------------------------------------
    from mgrpo_jax.models.hf import save_hf

    out_dir = os.path.join(workdir, "warm_start")
    checkpoints = {}
    for name, agent in agents.items():
        path = os.path.join(out_dir, name)
        save_hf(agent.trainer.params, exp.agents[agent.roles[0]].model_config, path, tokenizer=exp.tokenizer)
        for role in agent.roles:
            checkpoints[role] = path
    result = WarmStartResult(history, final, checkpoints, demo_stats)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)
    log(f"saved {checkpoints} in {time.perf_counter() - started:.1f}s total")
    return result
