"""A whole training run, in the plainly separated sections of a big_vision train script:

    distributed -> experiment (data, tokenizer, meshes, models, samplers, controller, trainers) -> input
    iterator -> checkpoint restore -> the loop (step, metrics, periodic eval, checkpoint; SIGTERM/SIGINT save
    and exit cleanly) -> final evaluation -> final checkpoint.

`launch/train.py` is this function behind command-line flags; tests call it directly.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax

from mgrpo_jax import checkpoint as ckpt_lib
from mgrpo_jax.data.pipeline import make_qa_iterator, questions_and_golds, read_qa_rows
from mgrpo_jax.evaluation import Evaluator
from mgrpo_jax.experiment import build_experiment
from mgrpo_jax.metrics import MetricsWriter, Progress
from mgrpo_jax.sharding import initialize_distributed

logger = logging.getLogger(__name__)

PROGRESS_KEYS = ("main/reward_mean", "main/accuracy", "main/format_error_rate", "sub/reward_mean", "main/loss")


def _held_out(exp, count: int) -> tuple[list[str], list[Any]]:
    files = exp.data.eval_files
    if not files or count <= 0:
        return [], []
    rows = read_qa_rows(files, on_bad_row=exp.config.task.on_bad_row)[0][:count]
    return questions_and_golds(rows)


def _rl_questions(exp, count: int) -> tuple[list[str], list[Any]]:
    """The first `count` questions RL trains on (after task.skip_train_questions), in file order."""
    task = exp.config.task
    if count <= 0:
        return [], []
    skip = int(task.get("skip_train_questions", 0))
    limit = int(task.get("max_train_questions", 0))
    rows = read_qa_rows(exp.data.train_files, on_bad_row=task.on_bad_row)[0][skip:]
    return questions_and_golds(rows[:min(count, limit) if limit else count])


def train(config, workdir: str, *, stop_after: int | None = None, experiment=None, after_step=None,
          evaluate: bool = True) -> dict[str, float]:
    """Trains to config.total_steps (or `stop_after` more steps, for tests); returns the last metrics.

    The decoupled main job (train/decoupled.py) passes its own `experiment` (role "main") and `after_step(step,
    result, golds) -> metrics`, called after each step and before that step's checkpoint (it writes the step's
    sub-agent records to the store); `evaluate=False` skips held-out evaluation.

    Resumes from the latest checkpoint in workdir when there is one: parameters, optimizer states, policy
    versions, the data iterator, the D_max estimator and the step counter, so the resumed run continues
    exactly as an uninterrupted one would.
    """
    # -- distributed ------------------------------------------------------------------------------------
    initialize_distributed(config.get("distributed", None))

    # -- experiment -------------------------------------------------------------------------------------
    exp = build_experiment(config, workdir) if experiment is None else experiment
    loop = exp.loop
    trainers = {name: t for name, t in loop.trainers.items() if hasattr(t, "params")}
    if config.mode == "shared_model":
        trainers = {"main": trainers["main"]}  # one parameter set, saved once

    # -- input ------------------------------------------------------------------------------------------
    # Every process runs the same rollouts, so every process reads the same questions.
    data = make_qa_iterator(exp.data.train_files, int(config.mgrpo.num_queries), seed=config.seed,
                            shuffle=bool(config.task.shuffle), num_epochs=None, process_index=0, process_count=1,
                            on_bad_row=config.task.on_bad_row,
                            skip_first=int(config.task.get("skip_train_questions", 0)),
                            max_rows=int(config.task.get("max_train_questions", 0)))
    held_q, held_g = _held_out(exp, int(config.eval_questions) if evaluate else 0)
    train_q, train_g = _rl_questions(exp, int(config.get("eval_train_questions", 0)) if evaluate else 0)
    evaluator = Evaluator(exp.controller, loop.config.rewards)

    def evaluate_now(step: int) -> dict[str, float]:
        """Greedy accuracy on the held-out questions (greedy/...) and on the first RL questions
        (train_greedy/...), side by side: is RL learning its own questions, and does it carry over?"""
        out = evaluator.run(held_q, held_g, greedy=True) if held_q else {}
        if train_q:
            out.update({f"train_{k}": v for k, v in evaluator.run(train_q, train_g, greedy=True).items()})
        logger.info("step %d: greedy accuracy %s", step, ", ".join(
            f"{name} {out[key]:.3f} ({len(q)} questions)" for name, key, q in
            (("held-out", "greedy/accuracy", held_q), ("RL questions", "train_greedy/accuracy", train_q)) if q))
        return out

    # -- checkpoint -------------------------------------------------------------------------------------
    agent_names = ["main"] if loop.config.mode in ("single_agent", "shared_model", "main_only") else ["main", "sub"]
    checkpointer = ckpt_lib.Checkpointer(workdir, agent_names,
                                         save_interval_steps=int(config.checkpoint.save_interval_steps),
                                         max_to_keep=int(config.checkpoint.max_to_keep))
    start = 0
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(trainers)
        start = restored.step
        for name, state in restored.agents.items():
            ckpt_lib.load_agent_state(trainers[name], state)
        if restored.data_state is not None:
            data.set_state(restored.data_state)
        loop.step_count = int(restored.extra.get("step_count", start))
        if "d_max" in restored.extra:
            loop.d_max.load_state_dict(restored.extra["d_max"])
        _hand_weights_to_samplers(exp)
        logger.info("resumed from step %d in %s", start, workdir)

    def save(step: int, force: bool = False) -> None:
        checkpointer.save(step, dict(trainers), data_state=data.get_state(), force=force,
                          extra={"step_count": loop.step_count, "d_max": loop.d_max.state_dict()})

    # -- loop -------------------------------------------------------------------------------------------
    total = int(config.total_steps)
    end = total if stop_after is None else min(total, start + stop_after)
    writer = MetricsWriter(workdir)
    progress = Progress(total, keys=PROGRESS_KEYS, start_step=start, every=int(config.log_every))
    eval_every = int(config.get("eval_every", 0))
    metrics: dict[str, float] = {}
    failing = False
    try:
        with ckpt_lib.ShutdownRequest() as stop:
            if eval_every and start == 0 and end > 0 and (held_q or train_q):
                writer.write(0, evaluate_now(0))  # the curve's first point: the starting policy
                writer.flush()
            for step in range(start, end):
                questions, golds = questions_and_golds(next(data))
                result = loop.step(questions, golds, more_questions=lambda: questions_and_golds(next(data)))
                metrics = result.metrics
                if after_step is not None:
                    metrics.update(after_step(step, result, result.golds))  # the queries it trained on
                metrics["data/skipped_rows"] = float(data.dataset.num_skipped)
                if eval_every and (step + 1) % eval_every == 0 and step + 1 < total and (held_q or train_q):
                    metrics.update(evaluate_now(step + 1))  # the last step's is the final one below
                if (step + 1) % int(config.log_every) == 0 or step + 1 == end:
                    writer.write(step + 1, metrics)
                    writer.flush()  # users (and tests) tail metrics.jsonl while the run goes on
                progress.update(step + 1, metrics)
                save(step + 1, force=stop.requested)
                if stop.requested:
                    logger.warning("stopping after step %d on %s; resume with the same command", step + 1,
                                   stop.signal_name)
                    return metrics
            # -- final evaluation and checkpoint -----------------------------------------------------------
            if end == total and (held_q or train_q):
                final = evaluate_now(end)
                metrics.update(final)
                writer.write(end, final)
                logger.info("final evaluation: %s", ", ".join(f"{k}={v:.3f}" for k, v in final.items()))
            if end > start:
                save(end, force=True)
    except BaseException:
        failing = True
        raise
    finally:
        close_all([("progress line", progress.close), ("metrics writer", writer.close),
                   ("checkpointer", checkpointer.close)], failing=failing)
    return metrics


def close_all(closers, *, failing: bool = False) -> None:
    """Calls every `(name, close)` even when some raise (a full disk fails each of them). When the run is already
    failing its own error is the one that propagates and close errors are logged, one line each; otherwise the
    first close error is raised once, after the others were closed and logged."""
    first: BaseException | None = None
    for name, close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - close the rest first
            if first is None and not failing:
                first = e
            else:
                logger.error("closing the %s also failed: %s: %s", name, type(e).__name__, e)
    if first is not None:
        raise first


def _hand_weights_to_samplers(exp) -> None:
    """After a restore, the samplers must use the restored parameters (and versions)."""
    for name, agent in exp.agents.items():
        if agent.trainer is not None:
            agent.policy.update(agent.trainer.params, agent.trainer.version)


def configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("MGRPO_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("bm25s", "absl", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # jax logs compiles at WARNING when asked to
    if "JAX_LOG_COMPILES" not in os.environ:  # the user's JAX_LOG_COMPILES=1 wins
        jax.config.update("jax_log_compiles", False)


def load_trained(config, workdir: str, step: int | None = None):
    """The run's experiment with every trained agent's parameters restored from its checkpoint at `step`
    (default: the latest), for evaluation and export. Returns (experiment, restored step)."""
    exp = build_experiment(config, workdir)
    trainers = {name: a.trainer for name, a in exp.agents.items() if a.trainer is not None and name == a.name}
    checkpointer = ckpt_lib.Checkpointer(workdir, list(trainers) or ["main"])
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints; train first (launch/train.py "
                                    f"--workdir {workdir}) or pass the run's --workdir")
        restored = checkpointer.restore(trainers, step)
    finally:
        checkpointer.close()
    for name, state in restored.agents.items():
        ckpt_lib.load_agent_state(trainers[name], state)
    _hand_weights_to_samplers(exp)
    return exp, restored.step
