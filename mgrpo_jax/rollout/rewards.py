"""M-GRPO rewards: answer correctness, and the main and sub-agent rewards of one query group.

    main, rollout k:          R_M = 0                                          if the main transcript broke the format
                                  = alpha_f + alpha_c * c_k + alpha_j * judge_M(tau_M^(k), its sub trajectories),
                                    c_k = correct(answer_k, gold) in [0, 1]
    sub, call i of rollout k: R_S = 0                                          if that sub trajectory broke the format
                                  = beta_f + beta_m * c_k + beta_j * judge(tau_S^(k,i))

c_k is taken as 0 when the main format broke, so every sub trajectory of a rollout shares the main agent's
outcome as it was scored ("shared fate"); the main judge's term is the main agent's own (a process reward, e.g.
how faithfully it delegated) and is not shared. The defaults reproduce the paper's code: R_M in {0, 0.1, 1.0}
and R_S = 0 for a bad format, else max(0.1, R_M). The judges are hooks, off by default (the sub judge's weight in
the paper is unpublished; the main judge is ours).

`correct` is normalized exact match by default ("em"), token F1 ("f1"), or any callable
`(prediction: str, golds: tuple[str, ...]) -> float in [0, 1]` (e.g. an LLM judge). Normalization is
SQuAD's, which Search-R1 also uses: lowercase, drop ASCII punctuation, drop the articles a/an/the,
collapse whitespace.

Host-side: plain Python and NumPy; the arrays returned are float32 / int32 / bool.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CORRECT_MODES = ("em", "f1")

CorrectFn = Callable[[str, tuple[str, ...]], float]  # (prediction, gold aliases) -> score in [0, 1]
JudgeFn = Callable[[Any], float]  # (one sub trajectory, whatever the controller records) -> score in [0, 1]
# (one main trajectory, its rollout's sub trajectories in call order) -> score in [0, 1]
MainJudgeFn = Callable[[Any, Sequence[Any]], float]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ------------------------------------------------------------------------------------------ correctness


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lowercase, no punctuation, no articles, single spaces."""
    if not isinstance(text, str):
        raise TypeError(f"an answer must be str, got {type(text).__name__}")
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(gold: str | Sequence[str]) -> tuple[str, ...]:
    """The gold aliases as a tuple; raises ValueError for none, a non-str, or one that normalizes to ''."""
    golds = (gold,) if isinstance(gold, str) else tuple(gold) if isinstance(gold, Sequence) else None
    if not golds:
        raise ValueError(f"gold must be a str or a non-empty sequence of str (aliases), got {gold!r}")
    for g in golds:
        if not isinstance(g, str):
            raise ValueError(f"gold aliases must be str, got {type(g).__name__} in {gold!r}")
        if not normalize_answer(g):
            raise ValueError(f"gold alias {g!r} is empty after normalization; fix the data row")
    return golds


def exact_match(prediction: str | None, gold: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold alias, else 0.0 (also for None)."""
    golds = _golds(gold)
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def f1(prediction: str | None, gold: str | Sequence[str]) -> float:
    """SQuAD token F1 of the normalized prediction, the best over gold aliases; 0.0 for None or no overlap."""
    golds = _golds(gold)
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    best = 0.0
    for g in golds:
        ref = normalize_answer(g).split()
        same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
        if same:
            precision, recall = same / len(pred), same / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


_CORRECT_FNS: dict[str, CorrectFn] = {"em": exact_match, "f1": f1}


def _check_score(name: str, value, verb: str = "must return") -> float:
    # `not 0 <= v <= 1` also rejects NaN.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} {verb} a number in [0, 1], got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward weights and scorers (see the module docstring for the equations).

    alpha_f, alpha_c, alpha_j: main format, correctness and judge weights.
    beta_f, beta_m, beta_j: sub-agent format, shared main outcome and judge weights.
    correct: "em" | "f1" | a callable (prediction, golds) -> [0, 1].
    sub_judge: a callable (sub trajectory) -> [0, 1], or None. Required when beta_j > 0; with beta_j == 0 it
      is still run and its score reported (monitoring without shaping the reward).
    main_judge: a callable (main trajectory, its sub trajectories in call order) -> [0, 1], or None; likewise
      required when alpha_j > 0.
    """

    alpha_f: float = 0.1
    alpha_c: float = 0.9
    alpha_j: float = 0.0
    beta_f: float = 0.1
    beta_m: float = 0.9
    beta_j: float = 0.0
    correct: str | CorrectFn = "em"
    sub_judge: JudgeFn | None = None
    main_judge: MainJudgeFn | None = None

    def __post_init__(self):
        for key in ("alpha_f", "alpha_c", "alpha_j", "beta_f", "beta_m", "beta_j"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"RewardConfig.{key} must be a finite number >= 0, got {v!r}")
        if not callable(self.correct) and self.correct not in CORRECT_MODES:
            raise ValueError(f"RewardConfig.correct={self.correct!r} is not supported; choose one of "
                             f"{list(CORRECT_MODES)} or pass a callable (prediction, golds) -> [0, 1]")
        for judge, weight in (("sub_judge", "beta_j"), ("main_judge", "alpha_j")):
            if getattr(self, judge) is not None and not callable(getattr(self, judge)):
                raise ValueError(f"RewardConfig.{judge} must be None or a callable, got {getattr(self, judge)!r}")
            if getattr(self, weight) > 0 and getattr(self, judge) is None:
                raise ValueError(f"RewardConfig.{weight}={getattr(self, weight)} needs a {judge} callable; set one "
                                 f"or {weight}=0")

    def correctness(self, prediction: str | None, gold: str | Sequence[str]) -> float:
        """correct(prediction, gold) in [0, 1]; 0.0 when there is no prediction."""
        golds = _golds(gold)
        if prediction is None:
            return 0.0
        if callable(self.correct):
            return _check_score("RewardConfig.correct", self.correct(prediction, golds))
        return _CORRECT_FNS[self.correct](prediction, golds)


# ------------------------------------------------------------------------------------------------ groups


def _means(obj) -> dict[str, float]:
    """Means of the float and bool array fields (ids and counts left out); 0.0 for an empty group."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, np.ndarray) and v.dtype.kind in "fb":
            out[f.name] = float(np.mean(v)) if v.size else 0.0
    return out


@dataclasses.dataclass(frozen=True)
class MainRewards:
    """The main agent's rewards for one group of K rollouts; every field is shaped [K].

    reward = format + correct + judge, float32.
    format: alpha_f * format_ok.   correct: alpha_c * correct_score.   judge: alpha_j * judge_score.
    correct_score: correct(answer, gold) in [0, 1], 0 where the format broke (the c_k the sub-agents share).
    judge_score: the main judge's score in [0, 1]; 0 where the format broke or there is no judge.
    format_ok: bool.
    """

    reward: np.ndarray
    format: np.ndarray
    correct: np.ndarray
    judge: np.ndarray
    correct_score: np.ndarray
    judge_score: np.ndarray
    format_ok: np.ndarray

    def means(self) -> dict[str, float]:
        """Group means of every field, for logging (format_ok's mean is the well-formed fraction)."""
        return _means(self)


@dataclasses.dataclass(frozen=True)
class SubRewards:
    """Rewards of every sub trajectory of one group, flattened rollout-major; every field is shaped [N],
    N = sum_k d_k.

    reward = format + shared + judge, float32.
    format: beta_f * format_ok.   shared: beta_m * c_k.   judge: beta_j * judge_score.
    judge_score: the judge's score in [0, 1]; 0 where the format broke or there is no judge.
    format_ok: bool.   rollout: int32, k.   call: int32, i (the call's index within its rollout).
    num_rollouts: K (rollouts with no sub-agent call have no entries, so K is not recoverable from `rollout`).
    """

    reward: np.ndarray
    format: np.ndarray
    shared: np.ndarray
    judge: np.ndarray
    judge_score: np.ndarray
    format_ok: np.ndarray
    rollout: np.ndarray
    call: np.ndarray
    num_rollouts: int

    def per_rollout(self, field: str = "reward") -> list[np.ndarray]:
        """`field` split by rollout: a list of K arrays, the k-th shaped [d_k]."""
        values = getattr(self, field)
        return [values[self.rollout == k] for k in range(self.num_rollouts)]

    def means(self) -> dict[str, float]:
        """Means over the group's sub trajectories of every float/bool field, for logging."""
        return _means(self)


def _check_flags(name: str, flags) -> list[bool]:
    flags = list(flags)
    for f in flags:
        if not isinstance(f, (bool, np.bool_)):
            raise ValueError(f"{name} must hold bools, got {type(f).__name__} {f!r}")
    return [bool(f) for f in flags]


def main_rewards(
    answers: Sequence[str | None],
    format_ok: Sequence[bool],
    gold: str | Sequence[str],
    config: RewardConfig = RewardConfig(),
    trajectories: Sequence[tuple[Any, Sequence[Any]]] | None = None,
) -> MainRewards:
    """Main-agent rewards of one query's K rollouts.

    Args:
      answers: [K] the final answer text of each rollout, None when it gave none.
      format_ok: [K] whether each main transcript kept the format (decided by the protocol parser).
      gold: the gold answer, or a sequence of accepted aliases.
      config: weights and scorers.
      trajectories: [K] (main trajectory, its sub trajectories in call order), what `config.main_judge` reads.
        Required when that judge is set; it only sees well-formed rollouts.

    Returns:
      MainRewards, fields shaped [K].
    """
    answers = list(answers)
    ok = _check_flags("format_ok", format_ok)
    if len(answers) != len(ok):
        raise ValueError(f"answers has {len(answers)} entries but format_ok has {len(ok)}; one per rollout")
    for a in answers:
        if a is not None and not isinstance(a, str):
            raise ValueError(f"answers must be str or None, got {type(a).__name__} {a!r}")
    golds = _golds(gold)
    judge = config.main_judge
    if judge is not None:
        if trajectories is None or len(trajectories) != len(ok):
            raise ValueError("RewardConfig.main_judge is set: pass one (main trajectory, sub trajectories) pair per "
                             f"rollout (trajectories=...), got {None if trajectories is None else len(trajectories)} "
                             f"for {len(ok)} rollouts")
    score = [config.correctness(a, golds) if o else 0.0 for a, o in zip(answers, ok)]
    jscore = [_check_score("RewardConfig.main_judge", judge(*trajectories[k])) if judge and o else 0.0
              for k, o in enumerate(ok)]
    fmt = [config.alpha_f * o for o in ok]
    cor = [config.alpha_c * s for s in score]
    jpart = [config.alpha_j * j for j in jscore]
    f32 = lambda xs: np.asarray(xs, np.float64).reshape(len(xs)).astype(np.float32)  # noqa: E731 - sum in f64
    return MainRewards(
        reward=f32([f + c + j for f, c, j in zip(fmt, cor, jpart)]), format=f32(fmt), correct=f32(cor),
        judge=f32(jpart), correct_score=f32(score), judge_score=f32(jscore),
        format_ok=np.asarray(ok, bool).reshape(len(ok)))


def sub_rewards(
    format_ok: Sequence[Sequence[bool]],
    main_correct: Sequence[float],
    config: RewardConfig = RewardConfig(),
    trajectories: Sequence[Sequence[Any]] | None = None,
) -> SubRewards:
    """Sub-agent rewards of one query's K rollouts, d_k calls in rollout k (0 allowed).

    Args:
      format_ok: K lists, the k-th of d_k bools: whether each sub trajectory kept the format.
      main_correct: [K] the rollout's correctness c_k in [0, 1], 0 where the main format broke:
        pass `MainRewards.correct_score`.
      config: weights and scorers.
      trajectories: K lists shaped like `format_ok`, each entry what `config.sub_judge` reads. Required
        when a judge is set; the judge only sees well-formed trajectories (a broken one scores 0 anyway).

    Returns:
      SubRewards, fields shaped [sum_k d_k], rollout-major.
    """
    flags = [_check_flags(f"format_ok[{k}]", row) for k, row in enumerate(format_ok)]
    shared_score = [_check_score(f"main_correct[{k}]", c, "must be") for k, c in enumerate(main_correct)]
    if len(flags) != len(shared_score):
        raise ValueError(f"format_ok has {len(flags)} rollouts but main_correct has {len(shared_score)}")
    judge = config.sub_judge
    if judge is not None:
        if trajectories is None:
            raise ValueError("RewardConfig.sub_judge is set: pass the sub trajectories (trajectories=...)")
        trajectories = [list(row) for row in trajectories]
        if [len(r) for r in trajectories] != [len(r) for r in flags]:
            raise ValueError(f"trajectories must be shaped like format_ok: {[len(r) for r in trajectories]} "
                             f"calls per rollout vs {[len(r) for r in flags]}")

    fmt, shared, jscore, ok_flat, rollout, call = [], [], [], [], [], []
    for k, row in enumerate(flags):
        for i, ok in enumerate(row):
            j = _check_score("RewardConfig.sub_judge", judge(trajectories[k][i])) if judge and ok else 0.0
            fmt.append(config.beta_f * ok)
            shared.append(config.beta_m * shared_score[k] * ok)
            jscore.append(j)
            ok_flat.append(ok)
            rollout.append(k)
            call.append(i)
    jpart = [config.beta_j * j for j in jscore]
    f32 = lambda xs: np.asarray(xs, np.float64).reshape(len(xs)).astype(np.float32)  # noqa: E731
    out = SubRewards(
        reward=f32([a + b + c for a, b, c in zip(fmt, shared, jpart)]), format=f32(fmt), shared=f32(shared),
        judge=f32(jpart), judge_score=f32(jscore), format_ok=np.asarray(ok_flat, bool).reshape(len(ok_flat)),
        rollout=np.asarray(rollout, np.int32).reshape(len(rollout)), call=np.asarray(call, np.int32).reshape(len(call)),
        num_rollouts=len(flags))
    return out


def group_rewards(
    answers: Sequence[str | None],
    main_format_ok: Sequence[bool],
    gold: str | Sequence[str],
    sub_format_ok: Sequence[Sequence[bool]],
    config: RewardConfig = RewardConfig(),
    sub_trajectories: Sequence[Sequence[Any]] | None = None,
    main_trajectories: Sequence[Any] | None = None,
) -> tuple[MainRewards, SubRewards]:
    """Both agents' rewards for one query group: `main_rewards`, then `sub_rewards` sharing its c_k.
    sub_trajectories: K lists of the rollout's sub trajectories in call order (for the judges);
    main_trajectories: [K] (for `config.main_judge`, which reads each with its row of sub_trajectories)."""
    pairs = None
    if config.main_judge is not None:
        if main_trajectories is None or sub_trajectories is None:
            raise ValueError("RewardConfig.main_judge is set: pass main_trajectories and sub_trajectories")
        pairs = list(zip(main_trajectories, sub_trajectories, strict=True))
    main = main_rewards(answers, main_format_ok, gold, config, pairs)
    if len(sub_format_ok) != len(main.reward):
        raise ValueError(f"sub_format_ok has {len(sub_format_ok)} rollouts but there are {len(main.reward)} answers")
    return main, sub_rewards(sub_format_ok, main.correct_score.tolist(), config, sub_trajectories)
