"""Evaluate a run's checkpoint on held-out questions: accuracy and format-error rate, greedy and pass@k.

    python launch/evaluate.py --config configs/tiny_cpu.py --workdir /tmp/mgrpo_tiny [--step 20] \
        [--num_questions 64] [--pass_k 4] [--failures] [--output /tmp/mgrpo_tiny/eval.json]
    python launch/evaluate.py --config configs/repro/co_train.py:runs/repro --workdir /tmp/warm_eval --initial \
        --failures --pass_k 0        # the warm-started agents the config starts from, no RL checkpoint
    ... --split train --offset 900 --num_questions 128   # training questions (here: RL's, after the warm start's)

`--failures` (generated tasks): where each greedy episode first went wrong, by the question's hop chain
(mgrpo_jax.evaluation.FAILURE_DOC: format, answered early, wrong delegation, missed document, wrong fact,
wrong answer).

Use the config the run was trained with (the same overrides too). Questions come from the run's eval files
(config.task.eval_files, or the generated held-out split). The result is written as JSON.
"""
import json
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mgrpo_jax.data.pipeline import questions_and_golds, read_qa_rows  # noqa: E402
from mgrpo_jax.data.synthetic import read_questions_jsonl  # noqa: E402
from mgrpo_jax.evaluation import FAILURE_DOC, Evaluator  # noqa: E402
from mgrpo_jax.experiment import build_experiment  # noqa: E402
from mgrpo_jax.train.run import configure_logging, load_trained  # noqa: E402

config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "The run's workdir (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
flags.DEFINE_integer("num_questions", 64, "Questions to evaluate (the first N after --offset).")
flags.DEFINE_enum("split", "heldout", ["heldout", "train"], "Which questions: the run's eval files (held-out) or "
                  "its training files (e.g. the RL questions after a warm start's, with --offset).")
flags.DEFINE_integer("offset", 0, "Skip the first N questions of the split.")
flags.DEFINE_integer("pass_k", 4, "k for sampled pass@k (0: greedy only).")
flags.DEFINE_string("output", None, "JSON output path; default: <workdir>/eval_step<N>.json.")
flags.DEFINE_bool("failures", False, "Also classify where each greedy episode first went wrong (generated tasks).")
flags.DEFINE_bool("initial", False, "Evaluate the weights the config starts from (random or its checkpoints, e.g. "
                  "a warm start) instead of the run's latest checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    configure_logging()
    f = flags.FLAGS
    if f.initial:
        exp, step = build_experiment(f.config, f.workdir), 0
    else:
        exp, step = load_trained(f.config, f.workdir, f.step)
    files = exp.data.eval_files if f.split == "heldout" else exp.data.train_files
    if not files:
        raise app.UsageError("the config has no eval files (config.task.eval_files) to evaluate on")
    rows, skipped = read_qa_rows(files, on_bad_row=f.config.task.on_bad_row)
    chosen = slice(f.offset, f.offset + f.num_questions)
    questions, golds = questions_and_golds(rows[chosen])
    if not questions:
        raise app.UsageError(f"--offset={f.offset} leaves no question: the {f.split} split has {len(rows)}")
    chains = [q for path in files for q in read_questions_jsonl(path)][chosen] if f.failures else None
    if chains is not None and [q.question for q in chains] != questions:
        raise app.UsageError("--failures needs the split's rows in their file order (no skipped bad rows)")
    evaluator = Evaluator(exp.controller, exp.loop.config.rewards)
    # One set of greedy episodes gives both the accuracy and, with --failures, where each episode failed.
    result = {"step": step, "split": f.split, "offset": f.offset, "skipped_rows": len(skipped),
              **evaluator.run(questions, golds, greedy=True, chains=chains)}
    if f.pass_k > 0:
        result.update(evaluator.run(questions, golds, greedy=False, k=f.pass_k, rng=jax.random.key(f.config.seed)))
    output = f.output or os.path.join(f.workdir, f"eval_step{step}.json")
    with open(output, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    print(json.dumps(result, indent=2))
    if f.failures:
        print("\n".join(f"{k:>28} {result[k]:6.3f}  {FAILURE_DOC[k.split('/')[1].split('@')[0]]}"
                        for k in result if k.startswith("failures/")))
    print(f"written to {output}")


if __name__ == "__main__":
    app.run(main)
