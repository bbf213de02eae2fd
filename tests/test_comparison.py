"""Results of the comparisons (mgrpo_jax/comparison.py): run summaries from metrics.jsonl, the table, the curves;
and launch/repro.py end to end on a tiny budget."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mgrpo_jax.comparison import (RunSummary, _smooth, evaluation_curve, markdown_table, read_metrics, reward_auc,
                                  reward_trend, summarize_run, summarize_settings, write_results)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_metrics(workdir, entries):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")


def _step(step, reward, accuracy=0.0):
    return {"step": step, "main/reward_mean": reward, "main/accuracy": accuracy, "time/update_s": 1.0,
            "main/zero_variance_frac": accuracy / 2}


def test_reward_auc_is_the_mean_of_the_per_step_curve():
    assert reward_auc([0.0, 0.5, 1.0, 0.5]) == pytest.approx(0.5)
    assert reward_auc([0.2]) == pytest.approx(0.2)
    for bad in ([], [0.1, float("nan")]):
        with pytest.raises(ValueError, match="finite"):
            reward_auc(bad)


def test_what_launch_train_prints_the_reward_trend_and_the_evaluation_curve(tmp_path):
    workdir = str(tmp_path / "run")
    path = os.path.join(workdir, "metrics.jsonl")
    assert reward_trend([]) == evaluation_curve([]) == ""  # no entries (launch/train.py: no metrics file yet)
    # 4 steps (first 2 vs last 2), evaluations at steps 0, 2 and 4, the step-2 one logged twice (resumed run).
    _write_metrics(workdir, [{"step": 0, "greedy/accuracy": 0.0, "train_greedy/accuracy": 0.25},
                             _step(1, 0.1), _step(2, 0.3), {"step": 2, "greedy/accuracy": 0.5},
                             {"step": 2, "greedy/accuracy": 0.125, "train_greedy/accuracy": 0.5},
                             _step(3, 0.5), _step(4, 0.7), {"step": 4, "greedy/accuracy": 0.25}])
    entries = read_metrics(path)
    assert reward_trend(entries) == ("training reward (main agent, mean of 2 steps): first 2 steps 0.200 -> last 2 "
                                     "steps 0.600 (4 steps)")
    assert evaluation_curve(entries) == ("greedy accuracy by step: held-out 0: 0.0%, 2: 12.5%, 4: 25.0%; "
                                         "RL questions 0: 25.0%, 2: 50.0%")
    _write_metrics(workdir, [_step(1, 0.1), {"step": 1, "greedy/accuracy": 0.5}])
    entries = read_metrics(path)
    assert reward_trend(entries) == evaluation_curve(entries) == ""  # one step, one evaluation: nothing to compare


def test_summarize_run_keeps_the_last_entry_of_each_step_and_the_final_evaluation(tmp_path):
    workdir = str(tmp_path / "run")
    # A run interrupted after step 2 and resumed from step 1 logs step 2 twice; the later entry counts.
    _write_metrics(workdir, [_step(1, 0.1, 0.0), _step(2, 0.9, 1.0), _step(2, 0.3, 0.25), _step(3, 0.5, 0.5),
                             {"step": 3, "greedy/accuracy": 0.375, "greedy/format_error_rate": 0.125}])
    run = summarize_run(workdir, "co_train", 2, total_steps=3, wall_s=12.0)
    np.testing.assert_allclose(run.reward, [0.1, 0.3, 0.5])
    np.testing.assert_allclose(run.train_accuracy, [0.0, 0.25, 0.5])
    assert (run.held_out_accuracy, run.held_out_format_error, run.steps, run.seed) == (0.375, 0.125, 3, 2)
    assert run.reward_auc == pytest.approx(0.3)
    assert run.diagnostics == pytest.approx({"main/zero_variance_frac": 0.125})  # only keys every step has


def test_unfinished_or_damaged_runs_are_errors_that_name_the_file(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="has not started"):
        summarize_run(workdir, "co_train", 0)
    _write_metrics(workdir, [_step(1, 0.1), _step(3, 0.2), {"step": 3, "greedy/accuracy": 0.5}])
    with pytest.raises(ValueError, match=r"metrics.jsonl: training steps \[2\] are missing"):
        summarize_run(workdir, "co_train", 0)
    _write_metrics(workdir, [_step(1, 0.1), _step(2, 0.2), {"step": 2, "greedy/accuracy": 0.5}])
    with pytest.raises(ValueError, match=r"steps \[3, 4\] are missing \(logged 2 of 4\)"):
        summarize_run(workdir, "co_train", 0, total_steps=4)
    _write_metrics(workdir, [_step(1, 0.1), _step(2, 0.2)])
    with pytest.raises(ValueError, match="no held-out evaluation after the last step 2"):
        summarize_run(workdir, "co_train", 0)
    with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON line"):
        read_metrics(os.path.join(workdir, "metrics.jsonl"))


def _run(setting, seed, rewards, held_out, wall=None):
    return RunSummary(setting, seed, np.asarray(rewards, float), np.zeros(len(rewards)), held_out, 0.1, wall,
                      {"main/zero_variance_frac": 0.25},
                      {"failures/correct": held_out, "failures/format": 1 - held_out, "failures/format@hop1": 0.1})


def test_settings_rows_hold_mean_sample_std_and_range_over_seeds():
    runs = [_run("a", 0, [0.0, 1.0], 0.2, 10.0), _run("a", 1, [0.5, 0.5], 0.4, 20.0),
            _run("a", 2, [1.0, 1.0], 0.9, 30.0), _run("b", 0, [0.1] * 20 + [0.7] * 2, 0.3)]
    rows = summarize_settings(runs, ["b", "a", "missing"])
    assert [r["setting"] for r in rows] == ["b", "a"]
    b, a = rows
    acc = np.array([0.2, 0.4, 0.9])
    assert a["seeds"] == [0, 1, 2] and a["steps"] == 2
    assert a["held_out_accuracy"] == pytest.approx({"mean": acc.mean(), "std": acc.std(ddof=1), "min": 0.2, "max": 0.9})
    assert a["reward_auc"]["mean"] == pytest.approx(np.mean([0.5, 0.5, 1.0]))
    assert a["final_reward"]["mean"] == pytest.approx(np.mean([1.0, 0.5, 1.0]))  # the last step of 2
    assert a["wall_s"]["mean"] == pytest.approx(20.0) and b["wall_s"] is None
    assert b["held_out_accuracy"]["std"] == 0.0  # one seed: no spread
    assert b["final_reward"]["mean"] == pytest.approx(0.7)  # the last 10% of 22 steps: 2 steps
    table = markdown_table(rows, {"a": 0.25})
    assert "| a | 3 | 25.0 | 50.0 ± 36.1 [20.0, 90.0] | +25.0 |" in table
    assert "| b | 1 | - | 30.0 ± 0.0 [30.0, 30.0] | - |" in table


def test_curves_of_evaluations_during_training_and_the_per_seed_change(tmp_path):
    """Evaluations at step 0, every eval_every steps and at the end become the held-out and RL-question curves; the
    table's start is the runs' own step-0 evaluation and the change is end - start per seed, with its spread."""
    runs = []
    for seed, (start, mid, end) in enumerate([(0.25, 0.5, 0.75), (0.25, 0.375, 0.5)]):
        workdir = str(tmp_path / f"seed{seed}")
        _write_metrics(workdir, [{"step": 0, "greedy/accuracy": start, "train_greedy/accuracy": 0.5},
                                 _step(1, 0.1), _step(2, 0.2),
                                 {"step": 2, "greedy/accuracy": mid, "train_greedy/accuracy": 0.625},
                                 {**_step(2, 0.3), "greedy/accuracy": mid, "train_greedy/accuracy": 0.625},  # resumed
                                 _step(3, 0.4), _step(4, 0.5),
                                 {"step": 4, "greedy/accuracy": end, "greedy/format_error_rate": 0.0,
                                  "train_greedy/accuracy": 0.75 + 0.125 * seed}])
        runs.append(summarize_run(workdir, "co_train", seed, total_steps=4))
    assert runs[0].held_out_curve == {0: 0.25, 2: 0.5, 4: 0.75} and runs[0].start_accuracy == 0.25
    assert runs[1].rl_curve == {0: 0.5, 2: 0.625, 4: 0.875} and runs[1].rl_accuracy == (0.5, 0.875)
    np.testing.assert_allclose(runs[0].reward, [0.1, 0.3, 0.4, 0.5])  # the resumed step's entry counts
    row = summarize_settings(runs)[0]
    changes = np.array([0.5, 0.25])
    assert row["held_out_change"] == pytest.approx({"mean": changes.mean(), "std": changes.std(ddof=1),
                                                    "min": 0.25, "max": 0.5})
    table = markdown_table([row], {"co_train": 0.9}, notes={"co_train": "both agents"})  # the runs' start wins
    assert "| co_train | both agents | 2 | 25.0 | 62.5 ± 17.7 [50.0, 75.0] | +37.5 ± 17.7 | 50.0 → 81.2 ± 8.8" \
        in table
    paths = write_results(str(tmp_path / "out"), runs, notes={"co_train": "both agents"}, preamble="Why.")
    with open(paths["accuracy_plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["markdown"], encoding="utf-8") as f:
        text = f.read()
    assert "Why." in text and "![accuracy curves](accuracy_curves.png)" in text
    with open(paths["json"], encoding="utf-8") as f:
        assert json.load(f)["runs"][1]["held_out_curve"] == {"0": 0.25, "2": 0.375, "4": 0.5}


def test_smoothing_is_a_trailing_moving_average():
    curve = np.array([1.0, 3.0, 2.0, 8.0, 0.0, 4.0])
    expected = [np.mean(curve[max(0, i - 2):i + 1]) for i in range(len(curve))]
    np.testing.assert_allclose(_smooth(curve, 3), expected)


def test_write_results_writes_the_table_the_curves_and_every_run(tmp_path):
    runs = [_run(s, seed, np.linspace(0.1, 0.2 + 0.1 * seed, 12), 0.1 * (seed + 1), 5.0)
            for s in ("co_train", "main_only") for seed in (0, 1)]
    paths = write_results(str(tmp_path / "out"), runs, start_accuracy={"co_train": 0.1, "main_only": 0.1},
                          meta={"command": "python launch/repro.py"}, failures={"shared_model seed 0": "log.txt"},
                          start_failures={"co_train": {"failures/correct": 0.1, "failures/format": 0.9}})
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(paths["plot"]) > 10_000
    with open(paths["json"], encoding="utf-8") as f:
        data = json.load(f)
    assert len(data["runs"]) == 4 and data["runs"][3]["reward"] == pytest.approx(list(np.linspace(0.1, 0.3, 12)))
    assert [r["setting"] for r in data["settings"]] == ["co_train", "main_only"]
    with open(paths["markdown"], encoding="utf-8") as f:
        text = f.read()
    assert "| co_train | 2 | 10.0 | 15.0 ± 7.1 [10.0, 20.0] |" in text
    assert "shared_model seed 0: log.txt" in text and "python launch/repro.py" in text
    assert "| setting | main/zero_variance_frac |" in text and "| co_train | 0.250 |" in text
    # Failures: the warm start's row, then the end (mean over seeds: correct 0.1 and 0.2); hop keys only in JSON.
    assert "| setting | when | correct | format |" in text
    assert "| co_train | start | 10.0 | 90.0 |" in text and "| co_train | end | 15.0 | 85.0 |" in text
    assert "| main_only | end | 15.0 | 85.0 |" in text and "| main_only | start |" not in text
    assert data["runs"][0]["failures"]["failures/format@hop1"] == 0.1 and "@hop" not in text
    with pytest.raises(ValueError, match="no finished runs"):
        write_results(str(tmp_path / "empty"), [])


def test_recipe_mismatch_compares_common_keys_and_the_overrides():
    """launch/repro.py's reuse check: a changed value or override list differs; a key added since does not."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("repro_launcher", os.path.join(ROOT, "launch", "repro.py"))
    repro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repro)
    recorded = {"config": {"warm_start": {"epochs": 10}, "seed": 0}, "warm_start_set": []}
    assert repro.recipe_mismatch(recorded, {"config": {"warm_start": {"epochs": 10, "new_option": ()}, "seed": 0},
                                            "warm_start_set": []}) == []
    assert repro.recipe_mismatch(recorded, {"config": {"warm_start": {"epochs": 24}, "seed": 0},
                                            "warm_start_set": ["seed=1"]}) == ["config.warm_start.epochs",
                                                                               "warm_start_set"]


def test_repro_command_end_to_end_on_a_tiny_budget(tmp_path):
    """launch/repro.py as the README runs it, shrunk: both warm-start kinds it needs (multi-agent, single agent),
    two settings x one seed of RL with evaluations at step 0, 1 and 2, the results; then a second invocation
    reuses every finished run."""
    root, out = str(tmp_path / "repro"), str(tmp_path / "results")
    common = ["eval_questions=4", "task.num_entities=40", "task.num_questions=80"]
    cmd = [sys.executable, "launch/repro.py", f"--root={root}", f"--out={out}", "--settings=co_train,single_agent",
           "--seeds=0", "--warm_start_set=warm_start.epochs=1", "--warm_start_set=warm_start.explore_questions=4",
           "--warm_start_set=warm_start.explore_k=2",
           "--warm_start_set=warm_start.questions_per_epoch=24", "--train_set=total_steps=2",
           "--train_set=eval_every=1", "--train_set=eval_train_questions=3",
           # Dense attention over the cache: the RL configs' tiles compile twice as long, and these caches are small
           # (tiles are tested in tests/test_sampler.py).
           "--train_set=agents.main.sampler.attention=dense", "--train_set=agents.sub.sampler.attention=dense"]
    for pair in common:
        cmd += [f"--warm_start_set={pair}", f"--train_set={pair}"]
    # repro.py's own cache (asserted below), not the test session's (conftest)
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for kind in ("multi", "single"):
        assert os.path.exists(os.path.join(root, f"warm_{kind}", "warm_start", "main", "config.json"))
        with open(os.path.join(root, f"warm_{kind}", "warm_start", "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        assert summary["demonstrations"]["questions"] == 24  # the epoch's sample of the warm start's questions
        assert summary["final"]["explore/k"] == 2  # pass@2 (explore/accuracy) and the zero-variance groups of 2
        assert {"explore/accuracy", "explore/main_zero_variance_frac"} <= set(summary["final"])
    assert not os.path.exists(os.path.join(root, "warm_shared"))  # no setting needed it
    assert os.listdir(os.path.join(root, "jax_cache"))  # the runs shared one compilation cache
    with open(os.path.join(root, "warm_multi", "data", "warm_start.jsonl"), encoding="utf-8") as f:
        warm_heads = {json.loads(line)["metadata"]["head"] for line in f}
    for split in ("train", "heldout"):  # RL and evaluation ask about heads the warm start never demonstrated
        with open(os.path.join(root, "warm_multi", "data", f"{split}.jsonl"), encoding="utf-8") as f:
            assert not warm_heads & {json.loads(line)["metadata"]["head"] for line in f}
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        data = json.load(f)
    assert sorted((r["setting"], r["seed"], len(r["reward"])) for r in data["runs"]) == \
        [("co_train", 0, 2), ("single_agent", 0, 2)]
    for r in data["runs"]:  # the failure analysis re-ran the final greedy evaluation: the same episodes
        assert r["failures"]["failures/correct"] == pytest.approx(r["held_out_accuracy"])
        assert sorted(r["held_out_curve"]) == sorted(r["rl_curve"]) == ["0", "1", "2"]
        assert r["held_out_curve"]["2"] == r["held_out_accuracy"]
        # step 0 evaluates the warm-started agents: the warm start's own final evaluation
        with open(os.path.join(root, f"warm_{'single' if r['setting'] == 'single_agent' else 'multi'}",
                               "warm_start", "summary.json"), encoding="utf-8") as f:
            assert r["held_out_curve"]["0"] == pytest.approx(json.load(f)["final"]["greedy/accuracy"])
    assert set(data["start_failures"]) == {"co_train", "single_agent"}
    for name in ("reward_curves.png", "accuracy_curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("(reused)") == 4 and "WARNING" not in again.stdout, \
        again.stdout
    # A warm start trained with another recipe is never reused silently: the runs it would feed are refused.
    changed = subprocess.run(cmd + ["--warm_start_set=warm_start.epochs=2"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode == 1 and "trained with another recipe" in changed.stdout, changed.stdout
