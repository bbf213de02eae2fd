"""The paper's comparisons at laptop scale, in one command: warm starts, every setting x seed, docs/results/.

    python launch/repro.py                        # everything: ~2 h on 2 CPU cores (README, "Results")
    python launch/repro.py --settings co_train,main_only --seeds 0,1,2 --jobs 2
    python launch/repro.py --train_set total_steps=3 --warm_start_set warm_start.epochs=1 --out /tmp/smoke

Settings are configs/repro/<setting>.py (configs/repro/common.py explains the design). Steps:
  1. the warm starts the settings need (launch/warm_start.py --config configs/repro/warm_start.py:<kind>), into
     <root>/warm_<kind>/, `--jobs` at once; a finished one (its warm_start/summary.json exists) is reused;
  2. each setting and seed (launch/train.py --config configs/repro/<setting>.py:<root>), into
     <root>/<setting>/seed<N>/, with its output in log.txt there; a finished run is reused, an interrupted one
     resumes from its checkpoint;
  3. where greedy held-out episodes fail, for each warm start and each run (launch/evaluate.py --failures,
     into failures.json beside them; reused when present);
  4. the tables, the curves and results.json in --out (mgrpo_jax/comparison.py).
Each run is its own process (`--jobs` at once). A failed run is reported with its log and left out of the table
(the table's "Runs that did not finish" lists it), and the command exits 1.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from configs.repro.common import DEFAULT_ROOT, WARM_START_OF, rl_config  # noqa: E402
from mgrpo_jax.comparison import summarize_run, write_results  # noqa: E402

SETTINGS = ("single_agent", "main_only", "co_train", "co_train_no_alignment", "shared_model")


def _parse_set(pairs):
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--*_set takes KEY=VALUE (a config key without 'config.'), got {pair!r}")
        out.append(f"--config.{pair}")
    return out


def _override(pairs, key, default):
    """The value of `key` among --train_set KEY=VALUE pairs (the last one wins), else `default`."""
    for pair in pairs:
        if pair.startswith(f"{key}="):
            default = type(default)(pair.split("=", 1)[1])
    return default


def _run(cmd, log_path):
    """Runs cmd with its output in log_path; returns (ok, seconds)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return code == 0, time.perf_counter() - t0


def _tail(path, lines=15):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where warm starts and runs go (default %(default)s)")
    parser.add_argument("--out", default="docs/results", help="where the table and curves go (default %(default)s)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes at once: warm starts, then RL runs (default %(default)s)")
    parser.add_argument("--train_set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every RL run, e.g. total_steps=3 (repeatable)")
    parser.add_argument("--warm_start_set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the warm starts, e.g. warm_start.epochs=1 (repeatable)")
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not settings or not seeds or args.jobs < 1:
        raise SystemExit("--settings and --seeds must name at least one each, and --jobs must be >= 1")
    root = os.path.abspath(args.root)
    python = sys.executable
    defaults = rl_config(settings[0], root)
    total_steps = _override(args.train_set, "total_steps", int(defaults.total_steps))
    eval_questions = _override(args.train_set, "eval_questions", int(defaults.eval_questions))
    started = time.perf_counter()
    failures = {}

    # -- 1. warm starts -------------------------------------------------------------------------------------
    def warm_start(kind):
        workdir = os.path.join(root, f"warm_{kind}")
        summary = os.path.join(workdir, "warm_start", "summary.json")
        seconds = None
        if not os.path.exists(summary):
            print(f"[repro] warm start {kind} -> {workdir} (log: {workdir}/log.txt)", flush=True)
            ok, seconds = _run([python, "launch/warm_start.py", f"--config=configs/repro/warm_start.py:{kind}",
                                f"--workdir={workdir}", *_parse_set(args.warm_start_set)],
                               os.path.join(workdir, "log.txt"))
            if not ok:
                raise RuntimeError(f"warm start {kind} failed; see {workdir}/log.txt:\n"
                                   f"{_tail(os.path.join(workdir, 'log.txt'))}")
        with open(summary, encoding="utf-8") as f:
            result = json.load(f)
        acc = result["final"].get("greedy/accuracy")
        print(f"[repro] warm start {kind}: held-out accuracy {acc}"
              + (f" ({seconds / 60:.1f} min)" if seconds else " (reused)"), flush=True)
        return result

    kinds = list(dict.fromkeys(WARM_START_OF[s] for s in settings))
    with ThreadPoolExecutor(args.jobs) as pool:  # every setting needs its warm start: stop at the first failure
        try:
            warm = dict(zip(kinds, pool.map(warm_start, kinds)))
        except RuntimeError as e:
            raise SystemExit(f"[repro] {e}") from None

    def failure_analysis(setting, workdir, output, initial):
        """Where greedy held-out episodes fail (launch/evaluate.py --failures) -> output; reused when present."""
        if not os.path.exists(output):
            cmd = [python, "launch/evaluate.py", f"--config=configs/repro/{setting}.py:{root}", f"--workdir={workdir}",
                   "--failures", "--pass_k=0", f"--num_questions={eval_questions}", f"--output={output}",
                   *_parse_set(args.train_set)]
            ok, _ = _run(cmd + (["--initial"] if initial else []), os.path.join(workdir, "log.txt"))
            if not ok:
                raise RuntimeError(f"the failure analysis exited with an error; see {workdir}/log.txt")
        with open(output, encoding="utf-8") as f:
            return json.load(f)

    # Where the warm-started agents fail, once per kind (with the first setting of that kind's config).
    start_failures = {}
    for kind in kinds:
        setting = next(s for s in settings if WARM_START_OF[s] == kind)
        workdir = os.path.join(root, f"warm_{kind}", "eval")
        result = failure_analysis(setting, workdir, os.path.join(workdir, "failures.json"), initial=True)
        for s in settings:
            if WARM_START_OF[s] == kind:
                start_failures[s] = {k: v for k, v in result.items() if k.startswith("failures/")}

    # -- 2. RL runs -----------------------------------------------------------------------------------------
    def analysed(summary, workdir):
        result = failure_analysis(summary.setting, workdir, os.path.join(workdir, "failures.json"), initial=False)
        summary.failures = {k: v for k, v in result.items() if k.startswith("failures/")}
        if abs(result["greedy/accuracy"] - summary.held_out_accuracy) > 1e-9:  # greedy decoding: must agree
            print(f"[repro] WARNING {workdir}: the failure analysis' greedy accuracy {result['greedy/accuracy']} "
                  f"differs from the run's final evaluation {summary.held_out_accuracy}", flush=True)
        return summary

    def run(setting, seed):
        workdir = os.path.join(root, setting, f"seed{seed}")
        timing = os.path.join(workdir, "wall_s.json")
        try:
            summary = summarize_run(workdir, setting, seed, total_steps=total_steps)
            with open(timing, encoding="utf-8") as f:
                summary.wall_s = json.load(f)["wall_s"]
            return analysed(summary, workdir), "reused"
        except (OSError, ValueError, KeyError):
            pass
        ok, seconds = _run([python, "launch/train.py", f"--config=configs/repro/{setting}.py:{root}",
                            f"--workdir={workdir}", f"--config.seed={seed}", *_parse_set(args.train_set)],
                           os.path.join(workdir, "log.txt"))
        if not ok:
            raise RuntimeError(f"exited with an error; see {workdir}/log.txt")
        with open(timing, "w", encoding="utf-8") as f:
            json.dump({"wall_s": seconds}, f)
        summary = summarize_run(workdir, setting, seed, total_steps=total_steps, wall_s=seconds)
        return analysed(summary, workdir), f"{seconds / 60:.1f} min"

    runs = []
    jobs = [(setting, seed) for seed in seeds for setting in settings]  # seed-major: every setting early
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run, *job): job for job in jobs}
        for future, (setting, seed) in futures.items():
            try:
                summary, how = future.result()
            except (RuntimeError, OSError, ValueError) as e:
                failures[f"{setting} seed {seed}"] = str(e)
                print(f"[repro] {setting} seed {seed}: FAILED ({e})", flush=True)
                continue
            runs.append(summary)
            print(f"[repro] {setting} seed {seed}: held-out accuracy {summary.held_out_accuracy:.3f}, "
                  f"reward AUC {summary.reward_auc:.3f} ({how})", flush=True)

    # -- 3. results -----------------------------------------------------------------------------------------
    if not runs:
        raise SystemExit("[repro] no run finished; nothing to tabulate")
    start_accuracy = {s: warm[WARM_START_OF[s]]["final"]["greedy/accuracy"] for s in settings}
    wall = time.perf_counter() - started
    run_minutes = sum(r.wall_s or 0 for r in runs) / 60
    warm_minutes = sum(h["history"][-1]["elapsed_s"] for h in warm.values()) / 60
    meta = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
            "settings": ", ".join(settings), "seeds": ", ".join(map(str, seeds)),
            "RL steps per run": total_steps, "RL runs in parallel": args.jobs,
            "warm starts (minutes, sum)": f"{warm_minutes:.1f}", "RL runs (minutes, sum)": f"{run_minutes:.1f}",
            "this invocation's wall time (minutes; reused runs cost nothing)": f"{wall / 60:.1f}",
            "machine": f"{os.cpu_count()} CPU cores",
            "date": time.strftime("%Y-%m-%d")}
    paths = write_results(args.out, runs, settings=settings, start_accuracy=start_accuracy, meta=meta,
                          failures=failures, start_failures=start_failures)
    print(f"[repro] wrote {', '.join(paths.values())} in {wall / 60:.1f} min", flush=True)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
