"""Results of a comparison of training settings over seeds: per-run summaries from each run's metrics.jsonl, the
table (held-out accuracy at the end, area under the training-reward curve, mean and spread over seeds) and the
reward curves. `launch/repro.py` runs the paper's comparisons (configs/repro/) and writes these to docs/results/.

    runs = [summarize_run(workdir, setting, seed) for ...]
    write_results("docs/results", runs, start_accuracy={"co_train": 0.25, ...}, meta={...})

Definitions (stated in the table's header as well):
  reward AUC       the area under the per-step training-reward curve (main agent's mean reward over its Q x K
                   episodes) divided by the number of steps, i.e. the mean training reward over the run. It counts
                   how much reward a setting collected, not only where it ended.
  held-out acc.    exact-match accuracy of greedy episodes on the held-out questions after the last step; its
                   curve is the run's evaluations every `eval_every` steps (step 0: the starting agents).
  RL-question acc. the same on the first questions RL trains on (train_greedy/...), beside held-out: whether RL
                   learns its own questions, and whether that carries over.
  spread           the sample standard deviation over seeds, and [min, max].
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

REWARD_KEY = "main/reward_mean"
TRAIN_ACCURACY_KEY = "main/accuracy"
HELD_OUT_KEY = "greedy/accuracy"
RL_QUESTIONS_KEY = "train_greedy/accuracy"
FORMAT_ERROR_KEY = "greedy/format_error_rate"
SMOOTHING = 5  # steps in the moving average of the plotted curves
# Averaged over a run's steps for the diagnostics table: where the learning signal is and what alignment did.
DIAGNOSTIC_KEYS = ("main/zero_variance_frac", "sub/zero_variance_frac", "main/format_error_rate",
                   "rollout/delegations_per_rollout", "sub/reward_mean", "sub/format_error_rate",
                   "align/duplicated", "align/borrowed", "align/masked", "align/dropped", "main/sampled_entropy",
                   "sub/sampled_entropy", "main/clip_frac_low", "main/clip_frac_high", "sub/clip_frac_low",
                   "sub/clip_frac_high", "main/grad_norm", "sub/grad_norm", "main/skipped_empty", "sub/skipped_empty",
                   "main/zero_variance_frac_trained", "dynamic/rounds", "dynamic/filled_groups")


@dataclasses.dataclass
class RunSummary:
    setting: str
    seed: int
    reward: np.ndarray  # per step, the main agent's mean training reward
    train_accuracy: np.ndarray  # per step, the main agent's training accuracy
    held_out_accuracy: float  # greedy, after the last step
    held_out_format_error: float
    wall_s: float | None = None
    diagnostics: dict[str, float] = dataclasses.field(default_factory=dict)  # DIAGNOSTIC_KEYS' means over steps
    failures: dict[str, float] = dataclasses.field(default_factory=dict)  # evaluation.failure_breakdown at the end
    held_out_curve: dict[int, float] = dataclasses.field(default_factory=dict)  # step -> greedy accuracy (0: start)
    rl_curve: dict[int, float] = dataclasses.field(default_factory=dict)  # step -> greedy accuracy, RL questions

    @property
    def start_accuracy(self) -> float | None:
        """Held-out greedy accuracy of the starting agents, when the run evaluated them (step 0)."""
        return self.held_out_curve.get(0)

    @property
    def rl_accuracy(self) -> tuple[float, float] | None:
        """(start, end) greedy accuracy on the RL questions, when the run evaluated them at both ends."""
        if 0 in self.rl_curve and self.steps in self.rl_curve:
            return self.rl_curve[0], self.rl_curve[self.steps]
        return None

    @property
    def steps(self) -> int:
        return len(self.reward)

    @property
    def reward_auc(self) -> float:
        return reward_auc(self.reward)


def reward_auc(curve: Sequence[float]) -> float:
    """Area under a per-step curve divided by its number of steps (each step a unit-width bar): the mean."""
    curve = np.asarray(curve, np.float64)
    if curve.size == 0 or not np.all(np.isfinite(curve)):
        raise ValueError(f"reward_auc needs a non-empty, finite curve; got {curve.size} values")
    return float(curve.mean())


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The entries of a metrics.jsonl (MetricsWriter), in order; a bad line is an error naming path:line."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e})") from None
    return entries


def training_steps(entries: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """Step -> the last logged training entry of that step (a resumed run may log a step twice)."""
    return {int(e["step"]): e for e in entries if REWARD_KEY in e}


def evaluation_curves(entries: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    """{HELD_OUT_KEY, RL_QUESTIONS_KEY} -> step -> greedy accuracy of the evaluations logged (a step's last entry
    counts: a resumed run may log a step twice)."""
    return {key: {int(e["step"]): float(e[key]) for e in entries if key in e}
            for key in (HELD_OUT_KEY, RL_QUESTIONS_KEY)}


def reward_trend(entries: Sequence[Mapping[str, Any]]) -> str:
    """'training reward (main agent): first N steps a -> last N steps b' of a run's metrics entries, or '' when
    the run has too few steps to compare (what launch/train.py prints at the end)."""
    per_step = training_steps(entries)
    rewards = [per_step[s][REWARD_KEY] for s in sorted(per_step)]
    n = min(10, len(rewards) // 2)
    if n < 1:
        return ""
    first, last = sum(rewards[:n]) / n, sum(rewards[-n:]) / n
    return (f"training reward (main agent, mean of {n} steps): first {n} steps {first:.3f} -> last {n} steps "
            f"{last:.3f} ({len(rewards)} steps)")


def evaluation_curve(entries: Sequence[Mapping[str, Any]]) -> str:
    """'greedy accuracy by step: held-out 0: a%, 10: b%, ...; RL questions ...' from the evaluations during a
    run, or '' when it made fewer than two (what launch/train.py prints)."""
    curves = evaluation_curves(entries)
    parts = []
    for name, key in (("held-out", HELD_OUT_KEY), ("RL questions", RL_QUESTIONS_KEY)):
        curve = curves[key]
        if len(curve) > 1:
            parts.append(f"{name} " + ", ".join(f"{step}: {100 * acc:.1f}%" for step, acc in sorted(curve.items())))
    return ("greedy accuracy by step: " + "; ".join(parts)) if parts else ""


def summarize_run(workdir: str, setting: str, seed: int, *, total_steps: int | None = None,
                  wall_s: float | None = None) -> RunSummary:
    """One run's curves and final held-out evaluation from workdir/metrics.jsonl.

    A resumed run may log a step twice; the last entry of each step counts. Raises ValueError, naming the file,
    when steps are missing (fewer than `total_steps`, or a gap) or the final evaluation is absent.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the run of {setting} seed {seed} has not started")
    entries = read_metrics(path)
    train = training_steps(entries)
    final = next((e for e in reversed(entries) if HELD_OUT_KEY in e), None)
    steps = sorted(train)
    expected = list(range(1, (total_steps or (steps[-1] if steps else 0)) + 1))
    if not steps or steps != expected:
        missing = sorted(set(expected) - set(steps))
        raise ValueError(f"{path}: training steps {missing[:5]}{'...' if len(missing) > 5 else ''} are missing "
                         f"(logged {len(steps)} of {len(expected)}); finish the run (same command) or delete it")
    if final is None or int(final["step"]) != steps[-1]:
        raise ValueError(f"{path}: no held-out evaluation after the last step {steps[-1]}; the run did not finish")
    diagnostics = {k: float(np.mean([train[s][k] for s in steps])) for k in DIAGNOSTIC_KEYS
                   if all(k in train[s] for s in steps)}
    curves = evaluation_curves(entries)
    return RunSummary(setting, int(seed), np.array([train[s][REWARD_KEY] for s in steps], np.float64),
                      np.array([train[s].get(TRAIN_ACCURACY_KEY, np.nan) for s in steps], np.float64),
                      float(final[HELD_OUT_KEY]), float(final.get(FORMAT_ERROR_KEY, np.nan)), wall_s, diagnostics,
                      held_out_curve=curves[HELD_OUT_KEY], rl_curve=curves[RL_QUESTIONS_KEY])


def _spread(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def summarize_settings(runs: Sequence[RunSummary], settings: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per setting (in `settings` order, else first-seen order): seeds, and the spread over seeds of
    held-out accuracy, reward AUC, final-10%-of-steps training reward and held-out format errors."""
    order = list(settings) if settings is not None else list(dict.fromkeys(r.setting for r in runs))
    rows = []
    for setting in order:
        group = [r for r in runs if r.setting == setting]
        if not group:
            continue
        tail = [float(r.reward[-max(1, r.steps // 10):].mean()) for r in group]
        starts = [r.start_accuracy for r in group]
        rl = [r.rl_accuracy for r in group]
        rows.append({
            "setting": setting, "seeds": sorted(r.seed for r in group), "steps": group[0].steps,
            "start_accuracy": _spread(starts) if None not in starts else None,
            "held_out_accuracy": _spread([r.held_out_accuracy for r in group]),
            "held_out_change": (_spread([r.held_out_accuracy - r.start_accuracy for r in group])
                                if None not in starts else None),
            "rl_start_accuracy": _spread([a[0] for a in rl]) if None not in rl else None,
            "rl_accuracy": _spread([a[1] for a in rl]) if None not in rl else None,
            "reward_auc": _spread([r.reward_auc for r in group]),
            "final_reward": _spread(tail),
            "held_out_format_error": _spread([r.held_out_format_error for r in group]),
            "wall_s": _spread([r.wall_s for r in group]) if all(r.wall_s is not None for r in group) else None,
            "diagnostics": {k: float(np.mean([r.diagnostics[k] for r in group])) for k in DIAGNOSTIC_KEYS
                            if all(k in r.diagnostics for r in group)},
            "failures": {k: float(np.mean([r.failures[k] for r in group])) for k in group[0].failures
                         if all(k in r.failures for r in group)},
        })
    return rows


def _cell(s: Mapping[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return (f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f} "
            f"[{s['min'] * scale:.{digits}f}, {s['max'] * scale:.{digits}f}]")


def markdown_table(rows: Sequence[Mapping[str, Any]], start_accuracy: Mapping[str, float] | None = None,
                   notes: Mapping[str, str] | None = None) -> str:
    """The results table (Markdown): accuracies in %, mean ± sd [min, max] over seeds. The start is each run's own
    step-0 evaluation when it made one, else `start_accuracy[setting]` (the warm start's); the change is per
    seed (end - start) when the runs measured their start. `notes[setting]`: what the setting matches."""
    start_accuracy, notes = start_accuracy or {}, notes or {}
    rl = any(r.get("rl_accuracy") for r in rows)
    head = ["setting"] + (["matches"] if notes else []) + ["seeds", "held-out acc. at start (%)",
                                                         "held-out acc. at end (%)", "change (points)"]
    head += ["RL-question acc. start → end (%)"] if rl else []
    head += ["reward AUC", "training reward, last 10% of steps", "held-out format errors (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = r["held_out_accuracy"]
        if r.get("start_accuracy"):
            start = f"{100 * r['start_accuracy']['mean']:.1f}"
            change = (f"{100 * r['held_out_change']['mean']:+.1f} ± {100 * r['held_out_change']['std']:.1f}")
        elif r["setting"] in start_accuracy:
            start = f"{100 * start_accuracy[r['setting']]:.1f}"
            change = f"{100 * (acc['mean'] - start_accuracy[r['setting']]):+.1f}"
        else:
            start = change = "-"
        cells = [r["setting"]] + ([notes.get(r["setting"], "")] if notes else [])
        cells += [str(len(r["seeds"])), start, _cell(acc, 100), change]
        if rl:
            cells.append(f"{100 * r['rl_start_accuracy']['mean']:.1f} → {_cell(r['rl_accuracy'], 100)}"
                         if r.get("rl_accuracy") else "-")
        cells += [_cell(r["reward_auc"], digits=3), _cell(r["final_reward"], digits=3),
                  _cell(r["held_out_format_error"], 100)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Means over steps and seeds of DIAGNOSTIC_KEYS (Markdown); '-' where a setting does not have the key."""
    keys = [k for k in DIAGNOSTIC_KEYS if any(k in r["diagnostics"] for r in rows)]
    lines = ["| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r['diagnostics'][k]:.3f}" if k in r["diagnostics"] else "-" for k in keys]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failures_table(rows: Sequence[Mapping[str, Any]], start: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Where held-out episodes fail (evaluation.failure_breakdown kinds, in %): per setting the warm start's
    and the mean over seeds at the end. Hop-level keys (`kind@hopN`) stay in results.json."""
    start = start or {}
    keys = list(dict.fromkeys(k for r in rows for k in r["failures"] if "@" not in k))
    keys += [k for k in dict.fromkeys(k for f in start.values() for k in f if "@" not in k) if k not in keys]
    if not keys:
        return ""
    names = [k.split("/", 1)[1] for k in keys]
    lines = ["| setting | when | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        for when, values in (("start", start.get(r["setting"])), ("end", r["failures"])):
            if values:
                cells = [f"{100 * values[k]:.1f}" if k in values else "-" for k in keys]
                lines.append(f"| {r['setting']} | {when} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average over what exists so far)."""
    c = np.cumsum(np.insert(np.asarray(curve, np.float64), 0, 0.0))
    n = np.arange(1, len(curve) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def plot_curves(path: str, runs: Sequence[RunSummary], settings: Sequence[str] | None = None,
                start_accuracy: Mapping[str, float] | None = None, title: str = "") -> None:
    """PNG: left, the training reward per step (moving average over SMOOTHING steps; line = mean over seeds,
    band = min..max over seeds); right, held-out accuracy at the start and the end (bars: mean, dots: seeds)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    order = list(settings) if settings is not None else list(dict.fromkeys(r.setting for r in runs))
    order = [s for s in order if any(r.setting == s for r in runs)]
    start_accuracy = start_accuracy or {}
    fig, (ax_curve, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.6, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, setting in enumerate(order):
        group = [r for r in runs if r.setting == setting]
        steps = min(r.steps for r in group)
        curves = np.stack([_smooth(r.reward[:steps], SMOOTHING) for r in group])
        x = np.arange(1, steps + 1)
        color = colors[i % len(colors)]
        ax_curve.plot(x, curves.mean(0), color=color, label=f"{setting} ({len(group)} seeds)")
        ax_curve.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.15, linewidth=0)
        end = [r.held_out_accuracy * 100 for r in group]
        ax_acc.bar(i + 0.2, np.mean(end), width=0.38, color=color, label="end" if i == 0 else None)
        ax_acc.scatter([i + 0.2] * len(end), end, color="black", s=10, zorder=3)
        if setting in start_accuracy:
            ax_acc.bar(i - 0.2, start_accuracy[setting] * 100, width=0.38, color=color, alpha=0.35,
                       label="start (warm start)" if i == 0 else None)
    ax_curve.set_xlabel("RL step")
    ax_curve.set_ylabel(f"training reward (main agent, {SMOOTHING}-step moving average)")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    ax_acc.set_xticks(range(len(order)), order, rotation=20, ha="right", fontsize=8)
    ax_acc.set_ylabel("held-out greedy accuracy (%)")
    ax_acc.grid(axis="y", alpha=0.3)
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_curves(path: str, runs: Sequence[RunSummary], settings: Sequence[str] | None = None,
                         title: str = "") -> None:
    """PNG: greedy accuracy at each evaluation step, held-out (solid) and RL questions (dashed, when evaluated);
    line = mean over seeds, band = min..max over seeds, at the steps every seed of the setting evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(settings) if settings is not None else list(dict.fromkeys(r.setting for r in runs))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, setting in enumerate(s for s in order if any(r.setting == s for r in runs)):
        group = [r for r in runs if r.setting == setting]
        color = colors[i % len(colors)]
        for curve_of, style, label in ((lambda r: r.held_out_curve, "-", "held-out"),
                                       (lambda r: r.rl_curve, "--", "RL questions")):
            steps = sorted(set.intersection(*(set(curve_of(r)) for r in group)))
            if len(steps) < 2:
                continue
            values = np.array([[curve_of(r)[t] * 100 for t in steps] for r in group])
            ax.plot(steps, values.mean(0), style, color=color, marker="o", markersize=3,
                    label=f"{setting}, {label} ({len(group)} seeds)")
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.12, linewidth=0)
    ax.set_xlabel("RL step")
    ax.set_ylabel("greedy accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out_dir: str, runs: Sequence[RunSummary], *, settings: Sequence[str] | None = None,
                  start_accuracy: Mapping[str, float] | None = None, meta: Mapping[str, Any] | None = None,
                  failures: Mapping[str, str] | None = None,
                  start_failures: Mapping[str, Mapping[str, float]] | None = None,
                  notes: Mapping[str, str] | None = None, title: str = "Results",
                  preamble: str = "") -> dict[str, str]:
    """Writes out_dir/results.json (every run's curves and the per-setting rows), results.md (`preamble`, the
    table, the definitions and `meta`), reward_curves.png and, when the runs evaluated during training,
    accuracy_curves.png. `notes[setting]`: what the setting matches (a table column). Returns {kind: path}."""
    if not runs:
        raise ValueError("write_results got no finished runs")
    os.makedirs(out_dir, exist_ok=True)
    rows = summarize_settings(runs, settings)
    meta = dict(meta or {})
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md"),
             "plot": os.path.join(out_dir, "reward_curves.png")}
    curves = any(len(r.held_out_curve) > 1 for r in runs)
    if curves:
        paths["accuracy_plot"] = os.path.join(out_dir, "accuracy_curves.png")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "start_accuracy": dict(start_accuracy or {}), "notes": dict(notes or {}),
                   "start_failures": {k: dict(v) for k, v in (start_failures or {}).items()}, "settings": rows,
                   "failures": dict(failures or {}),
                   "runs": [{"setting": r.setting, "seed": r.seed, "held_out_accuracy": r.held_out_accuracy,
                             "held_out_format_error": r.held_out_format_error, "reward_auc": r.reward_auc,
                             "wall_s": r.wall_s, "diagnostics": r.diagnostics, "failures": r.failures,
                             "reward": r.reward.tolist(), "train_accuracy": r.train_accuracy.tolist(),
                             "held_out_curve": {str(k): v for k, v in sorted(r.held_out_curve.items())},
                             "rl_curve": {str(k): v for k, v in sorted(r.rl_curve.items())}} for r in runs]},
                  f, indent=1)
    plot_curves(paths["plot"], runs, settings, start_accuracy)
    if curves:
        plot_accuracy_curves(paths["accuracy_plot"], runs, settings)
    lines = [f"# {title}", ""] + ([preamble, ""] if preamble else []) + [
             markdown_table(rows, start_accuracy, notes), "",
             "Mean ± sample standard deviation [min, max] over seeds. *Reward AUC*: the area under the per-step "
             "training-reward curve divided by the number of steps (the mean training reward of the main agent "
             "over the run). *Held-out accuracy*: exact match of greedy episodes on the held-out questions; *at "
             "start*: the starting (warm-started) agents', measured by each run before its first step; *change*: "
             "end - start per seed. *RL-question accuracy*: the same on the first questions RL trains on.", ""]
    if curves:
        lines += ["![accuracy curves](accuracy_curves.png)", ""]
    lines += ["![reward curves](reward_curves.png)", "",
             "## Diagnostics (means over steps, then seeds)", "", diagnostics_table(rows), "",
             "*zero_variance_frac*: the fraction of groups whose rewards are all equal (no learning signal); with "
             "dynamic sampling over every sampled group, *_trained* over the groups the update kept, *dynamic/rounds* "
             "rollout batches per step, *dynamic/filled_groups* all-equal groups trained because the rounds ran out. "
             "*align/**: sub-agent slots per step that alignment kept as duplicates, borrowed from sibling "
             "rollouts, left masked, or dropped.", ""]
    table = failures_table(rows, start_failures)
    if table:
        lines += ["## Where held-out episodes fail (% of questions, greedy)", "", table, "",
                  "The first thing that went wrong in each episode, by the question's hop chain "
                  "(`launch/evaluate.py --failures`; mgrpo_jax.evaluation.FAILURE_DOC): *wrong_delegation*, a "
                  "delegated sub-question that does not name the hop's subject; *missed_document*, the hop's "
                  "document never read; *wrong_fact*, read but a wrong fact reported; *format*, a malformed "
                  "episode or a limit. *answered_early*, *wrong_delegation* and *wrong_answer* are the main "
                  "agent's errors, *missed_document* and *wrong_fact* the sub-agent's (a single agent's own). "
                  "*start*: the warm-started agents; *end*: mean over seeds.", ""]
    if failures:
        lines += ["## Runs that did not finish", ""] + [f"- {k}: {v}" for k, v in failures.items()] + [""]
    if meta:
        lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return paths
