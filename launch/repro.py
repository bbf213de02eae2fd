"""The paper's comparisons at laptop scale, in two commands: warm starts, every setting x seed, docs/results/.

    python launch/repro.py --jobs 2                    # core: co_train, main_only, single_agent -> docs/results/
    python launch/repro.py --group ablations --jobs 2  # no alignment, shared model, the bottleneck setting
                                                       #   -> docs/results/ablations/ (reuses the core runs)
    python launch/repro.py --group lora --jobs 2       # co_train with LoRA adapters -> docs/results/lora/
    python launch/repro.py --group dynamic --jobs 2    # dynamic sampling, both settings -> docs/results/dynamic/
    python launch/repro.py --group judge --jobs 2      # a sub-agent judge, both settings -> docs/results/judge/
    python launch/repro.py --group delegation --jobs 2 # a main-agent delegation judge -> docs/results/delegation/
    python launch/repro.py --settings co_train,main_only --seeds 0 --train_set total_steps=20 --out /tmp/pilot

Settings are configs/repro/<setting>.py (configs/repro/common.py explains the design). One pool of `--jobs`
processes runs, in order:
  1. the warm starts the settings need (launch/warm_start.py --config configs/repro/warm_start.py:<kind>), into
     <root>/warm_<kind>/, those of more epochs first; a finished one (its warm_start/summary.json exists) is
     reused; then where its greedy held-out episodes fail (launch/evaluate.py --failures --initial, into
     <root>/warm_<kind>/eval/failures.json);
  2. each setting and seed (launch/train.py --config configs/repro/<setting>.py:<root>), into
     <root>/<setting>/seed<N>/, with its output in log.txt there, as soon as its warm start is done (the RL runs
     of the warm starts that finish first go first, and none waits in a process slot for its warm start); a
     finished run is reused, an interrupted one resumes from its checkpoint; then where its final greedy held-out
     episodes fail (failures.json beside it);
  3. the tables, the curves and results.json in --out (mgrpo_jax/comparison.py).
Every process shares one JAX compilation cache (<root>/jax_cache, or $JAX_COMPILATION_CACHE_DIR): runs of the same
shapes compile once. A failed run is reported with its log and left out of the table (the table's "Runs that did
not finish" lists it), and the command exits 1.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

from flax.traverse_util import flatten_dict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from configs.repro.common import (DEFAULT_ROOT, GROUPS, PREAMBLE, SETTING_NOTES, SETTINGS, WARM_START_OF,  # noqa: E402
                                  rl_config, warm_start_config)
from mgrpo_jax.comparison import summarize_run, write_results  # noqa: E402


def _parse_set(pairs):
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--*_set takes KEY=VALUE (a config key without 'config.'), got {pair!r}")
        out.append(f"--config.{pair}")
    return out


def recipe_mismatch(recorded: dict, current: dict) -> list[str]:
    """The keys whose values differ between two recipes (warm-start configs as JSON dicts, plus overrides). Keys
    that only one of them has are not compared: a config key added since (with its default, e.g. a new sampler
    option) does not invalidate the warm starts trained before it. The overrides are one list, compared whole."""
    a, b = flatten_dict(recorded, sep="."), flatten_dict(current, sep=".")
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k])


def _override(pairs, key, default):
    """The value of `key` among --train_set KEY=VALUE pairs (the last one wins), else `default`."""
    for pair in pairs:
        if pair.startswith(f"{key}="):
            default = type(default)(pair.split("=", 1)[1])
    return default


def _tail(path, lines=15):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where warm starts and runs go (default %(default)s)")
    parser.add_argument("--group", default="core", choices=sorted(GROUPS),
                        help="which comparison: its settings and default --out (default %(default)s)")
    parser.add_argument("--out", default=None, help="where the table and curves go (default: docs/results for "
                        "core, docs/results/<group> for the others)")
    parser.add_argument("--settings", default=None, help="comma-separated, of " + ", ".join(SETTINGS) +
                        " (default: the group's)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="processes at once (default %(default)s)")
    parser.add_argument("--train_set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every RL run, e.g. total_steps=3 (repeatable)")
    parser.add_argument("--warm_start_set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the warm starts, e.g. warm_start.epochs=1 (repeatable)")
    args = parser.parse_args(argv)
    settings = [s for s in (args.settings or ",".join(GROUPS[args.group])).split(",") if s]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not settings or not seeds or args.jobs < 1:
        raise SystemExit("--settings and --seeds must name at least one each, and --jobs must be >= 1")
    out_dir = args.out or ("docs/results" if args.group == "core" else os.path.join("docs", "results", args.group))
    root = os.path.abspath(args.root)
    python = sys.executable
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                                       os.path.join(root, "jax_cache"))}
    defaults = rl_config(settings[0], root)
    total_steps = _override(args.train_set, "total_steps", int(defaults.total_steps))
    eval_questions = _override(args.train_set, "eval_questions", int(defaults.eval_questions))
    started = time.perf_counter()
    failures = {}
    print_lock = threading.Lock()

    def say(message):
        with print_lock:
            print(f"[repro] {message}", flush=True)

    def run_logged(cmd, log_path):
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        t0 = time.perf_counter()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
        return code == 0, time.perf_counter() - t0

    def failure_analysis(setting, workdir, output, initial):
        """Where greedy held-out episodes fail (launch/evaluate.py --failures) -> output; reused when present."""
        if not os.path.exists(output):
            cmd = [python, "launch/evaluate.py", f"--config=configs/repro/{setting}.py:{root}", f"--workdir={workdir}",
                   "--failures", "--pass_k=0", f"--num_questions={eval_questions}", f"--output={output}",
                   *_parse_set(args.train_set)]
            ok, _ = run_logged(cmd + (["--initial"] if initial else []), os.path.join(workdir, "log.txt"))
            if not ok:
                raise RuntimeError(f"the failure analysis exited with an error; see {workdir}/log.txt")
        with open(output, encoding="utf-8") as f:
            return json.load(f)

    # -- 1. warm starts (and where the warm-started agents fail) ---------------------------------------------
    def warm_start(kind):
        workdir = os.path.join(root, f"warm_{kind}")
        summary = os.path.join(workdir, "warm_start", "summary.json")
        recipe_path = os.path.join(workdir, "warm_start", "recipe.json")
        # What the warm start would be trained with now: reusing one trained with another recipe (a changed
        # configs/repro/common.py, other --warm_start_set) would compare runs of different warm starts.
        recipe = {"config": json.loads(warm_start_config(kind).to_json_best_effort(sort_keys=True)),
                  "warm_start_set": sorted(args.warm_start_set)}
        seconds = None
        if os.path.exists(summary):
            if os.path.exists(recipe_path):
                with open(recipe_path, encoding="utf-8") as f:
                    differ = recipe_mismatch(json.load(f), recipe)
                if differ:
                    raise RuntimeError(f"{workdir} holds a warm start {kind} trained with another recipe (differing: "
                                       f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}); use another "
                                       "--root, or delete that directory to train it again")
            else:
                say(f"warm start {kind}: {recipe_path} missing (trained before recipes were recorded); reused "
                    "unchecked")
        else:
            say(f"warm start {kind} -> {workdir} (log: {workdir}/log.txt)")
            ok, seconds = run_logged([python, "launch/warm_start.py", f"--config=configs/repro/warm_start.py:{kind}",
                                      f"--workdir={workdir}", *_parse_set(args.warm_start_set)],
                                     os.path.join(workdir, "log.txt"))
            if not ok:
                raise RuntimeError(f"warm start {kind} failed; see {workdir}/log.txt:\n"
                                   f"{_tail(os.path.join(workdir, 'log.txt'))}")
            with open(recipe_path, "w", encoding="utf-8") as f:
                json.dump(recipe, f, indent=1, sort_keys=True)
        with open(summary, encoding="utf-8") as f:
            result = json.load(f)
        say(f"warm start {kind}: held-out accuracy {result['final'].get('greedy/accuracy')}"
            + (f" ({seconds / 60:.1f} min)" if seconds else " (reused)"))
        setting = next(s for s in settings if WARM_START_OF[s] == kind)  # any setting of this kind: same agents
        eval_dir = os.path.join(workdir, "eval")
        analysis = failure_analysis(setting, eval_dir, os.path.join(eval_dir, "failures.json"), initial=True)
        result["failures"] = {k: v for k, v in analysis.items() if k.startswith("failures/")}
        return result

    # -- 2. RL runs -------------------------------------------------------------------------------------------
    def run(setting, seed, warm_future):
        warm_future.result()  # raises when the warm start failed
        workdir = os.path.join(root, setting, f"seed{seed}")
        timing = os.path.join(workdir, "wall_s.json")
        try:
            summary = summarize_run(workdir, setting, seed, total_steps=total_steps)
            with open(timing, encoding="utf-8") as f:
                summary.wall_s = json.load(f)["wall_s"]
            how = "reused"
        except (OSError, ValueError, KeyError):
            say(f"{setting} seed {seed} -> {workdir}")
            ok, seconds = run_logged([python, "launch/train.py", f"--config=configs/repro/{setting}.py:{root}",
                                      f"--workdir={workdir}", f"--config.seed={seed}", *_parse_set(args.train_set)],
                                     os.path.join(workdir, "log.txt"))
            if not ok:
                raise RuntimeError(f"exited with an error; see {workdir}/log.txt")
            with open(timing, "w", encoding="utf-8") as f:
                json.dump({"wall_s": seconds}, f)
            summary = summarize_run(workdir, setting, seed, total_steps=total_steps, wall_s=seconds)
            how = f"{seconds / 60:.1f} min"
        result = failure_analysis(setting, workdir, os.path.join(workdir, "failures.json"), initial=False)
        summary.failures = {k: v for k, v in result.items() if k.startswith("failures/")}
        if abs(result["greedy/accuracy"] - summary.held_out_accuracy) > 1e-9:  # greedy decoding: must agree
            say(f"WARNING {workdir}: the failure analysis' greedy accuracy {result['greedy/accuracy']} differs from "
                f"the run's final evaluation {summary.held_out_accuracy}")
        return summary, how

    # Longest first (more epochs: the single agent's), so that the critical path (that warm start, then its RL
    # runs) starts at once instead of after the shorter warm starts free a slot.
    kinds = sorted(dict.fromkeys(WARM_START_OF[s] for s in settings),
                   key=lambda kind: -warm_start_config(kind).warm_start.epochs)
    with ThreadPoolExecutor(args.jobs) as pool:
        warm: dict[str, Future] = {kind: pool.submit(warm_start, kind) for kind in kinds}
        # A warm start's runs are queued when it has finished (seed-major), so that no process slot sits waiting
        # for a warm start while another run could use it.
        kind_of = {future: kind for kind, future in warm.items()}
        futures = {}
        for done in as_completed(warm.values()):
            for seed in seeds:
                for setting in settings:
                    if WARM_START_OF[setting] == kind_of[done]:
                        futures[pool.submit(run, setting, seed, done)] = (setting, seed)
        runs = []
        for future, (setting, seed) in futures.items():
            try:
                summary, how = future.result()
            except (RuntimeError, OSError, ValueError) as e:
                failures[f"{setting} seed {seed}"] = str(e)
                say(f"{setting} seed {seed}: FAILED ({e})")
                continue
            runs.append(summary)
            say(f"{setting} seed {seed}: held-out accuracy {summary.start_accuracy} -> "
                f"{summary.held_out_accuracy:.3f}, reward AUC {summary.reward_auc:.3f} ({how})")
        warm_results = {}
        for kind, future in warm.items():
            try:
                warm_results[kind] = future.result()
            except RuntimeError as e:
                failures[f"warm start {kind}"] = str(e)

    # -- 3. results -------------------------------------------------------------------------------------------
    if not runs:
        raise SystemExit("[repro] no run finished; nothing to tabulate" +
                         "".join(f"\n  {k}: {v}" for k, v in failures.items()))
    start_accuracy = {s: warm_results[WARM_START_OF[s]]["final"]["greedy/accuracy"] for s in settings
                      if WARM_START_OF[s] in warm_results}
    start_failures = {s: warm_results[WARM_START_OF[s]]["failures"] for s in settings
                      if WARM_START_OF[s] in warm_results}
    wall = time.perf_counter() - started
    run_minutes = sum(r.wall_s or 0 for r in runs) / 60
    warm_minutes = sum(h["history"][-1]["elapsed_s"] for h in warm_results.values()) / 60
    meta = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
            "settings": ", ".join(settings), "seeds": ", ".join(map(str, seeds)),
            "RL steps per run": total_steps, "processes at once": args.jobs,
            "warm starts (minutes, sum)": f"{warm_minutes:.1f}", "RL runs (minutes, sum)": f"{run_minutes:.1f}",
            "this invocation's wall time (minutes; reused runs cost nothing)": f"{wall / 60:.1f}",
            "machine": f"{os.cpu_count()} CPU cores",
            "date": time.strftime("%Y-%m-%d")}
    warm_meta = {kind: {k: v for k, v in r["final"].items() if k.startswith(("explore/", "greedy/accuracy"))}
                 for kind, r in warm_results.items()}
    meta["warm starts (held-out greedy accuracy, room to explore)"] = json.dumps(warm_meta, sort_keys=True)
    # A subset of the group's settings still reads as that group's table, saying which settings it lacks.
    of_group = set(settings) <= set(GROUPS[args.group])
    left_out = [s for s in GROUPS[args.group] if s not in settings]
    missing = f" Not in this table (not run yet): {', '.join(left_out)}." if of_group and left_out else ""
    paths = write_results(out_dir, runs, settings=settings, start_accuracy=start_accuracy, meta=meta,
                          failures=failures, start_failures=start_failures,
                          notes={s: SETTING_NOTES[s] for s in settings},
                          title=f"Results: {args.group}" if of_group else "Results",
                          preamble=PREAMBLE.get(args.group, "") + missing if of_group else "")
    say(f"wrote {', '.join(paths.values())} in {wall / 60:.1f} min")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
