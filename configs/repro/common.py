"""The paper's comparisons at laptop scale (MGRPO.md, last section), shared by the configs in this folder.

Every comparison starts from a warm start (supervised fine-tuning on teacher demonstrations,
`launch/warm_start.py`) on the first `warm_start.max_questions` training questions of configs/warm_start_tiny.py's
task, and RL trains on the remaining ones (`task.skip_train_questions`): questions whose answers the agents have
never been shown. Each setting gets the same RL budget: `TOTAL_STEPS` steps of Q x K main episodes.

    warm start   kind     one model per ...             used by
    multi        co_train  role (main, sub)               co_train, co_train_no_alignment, main_only
    shared       shared_model  both roles in one model    shared_model
    single       single_agent  one agent with the tools   single_agent

`launch/repro.py` runs the warm starts, every setting for every seed, and writes docs/results/. The configs take
the repro root as their argument (`--config configs/repro/co_train.py:runs/repro`); an RL config finds its warm
start at <root>/warm_<kind>/warm_start/. The launch scripts put the repository root on sys.path, which is how
these files import this one.
"""
import os

from ml_collections import ConfigDict

from configs import warm_start_tiny

DEFAULT_ROOT = "runs/repro"
TOTAL_STEPS = 30
QUERIES_PER_STEP = 8  # Q; with K = 4 rollouts each, 32 main episodes per step and 960 per run
WARM_START_OF = {"co_train": "multi", "co_train_no_alignment": "multi", "main_only": "multi",
                 "shared_model": "shared", "single_agent": "single"}
WARM_START_MODE = {"multi": "co_train", "shared": "shared_model", "single": "single_agent"}


def warm_start_config(kind: str) -> ConfigDict:
    """The task, agents and controller of warm start `kind`, with its SFT block. RL configs of that kind build on
    exactly this (the checkpoints were trained on these contexts)."""
    if kind not in WARM_START_MODE:
        raise ValueError(f"warm start kind {kind!r} is not one of {list(WARM_START_MODE)}")
    c = warm_start_tiny.get_config()
    c.mode = WARM_START_MODE[kind]
    if kind == "shared":
        # One model serves both roles, so its sampler needs the sub-agent's longer prompt buckets too. Its SFT
        # takes one pass over main + sub demonstrations per epoch: about the tokens the two models of "multi" see.
        # Its update takes both agents' rows in one batch, of one length.
        c.controller.max_main_context = c.controller.max_sub_context
        main_buckets = tuple(c.agents.main.sampler.prompt_buckets)
        c.agents.main.sampler.prompt_buckets = main_buckets + (tuple(c.agents.sub.sampler.prompt_buckets)[-1],)
        c.warm_start.repeat = {"main": 1}
        c.agents.main.loss.pack_len = 2 * c.controller.max_main_context
    elif kind == "single":
        # The single agent searches and reads every hop itself: two tool turns per hop plus the answer, and the raw
        # observations (up to 128 tokens each) stay in its context. One pass per epoch, about the SFT tokens of
        # "multi" (its rows are long).
        c.controller.max_main_turns = 2 * max(c.task.hops) + 2
        c.controller.max_main_context = 768
        c.agents.main.sampler.prompt_buckets = (192, 384, 768 - c.agents.main.sampler.max_new_tokens)
        c.warm_start.repeat = {"main": 1}
        c.agents.main.loss.pack_len = 2 * c.controller.max_main_context
    return c


def rl_config(mode: str, root: str = DEFAULT_ROOT) -> ConfigDict:
    """RL in `mode` from its warm start under `root` (see the module docstring)."""
    kind = WARM_START_OF[mode]
    c = warm_start_config(kind)
    c.mode = "co_train" if mode == "co_train_no_alignment" else mode
    c.task.skip_train_questions = c.warm_start.max_questions
    c.total_steps = TOTAL_STEPS
    c.mgrpo.num_queries = QUERIES_PER_STEP
    c.eval_every = 0  # held-out greedy accuracy at the end (the start is the warm start's own evaluation)
    c.checkpoint.save_interval_steps = TOTAL_STEPS
    warm = os.path.join(root, f"warm_{kind}", "warm_start")
    c.tokenizer.path = os.path.join(warm, "main")
    c.agents.main.checkpoint = os.path.join(warm, "main")
    c.agents.sub.checkpoint = os.path.join(warm, "sub") if kind == "multi" else ""
    for role in ("main", "sub"):
        # A pilot of co_train (same questions each step, 17 steps): 3e-4 collected more reward than 1e-3.
        c.agents[role].optimizer.learning_rate = 3e-4
        c.agents[role].sampler.batch_size = 32  # one sampler call per turn for the Q x K main episodes
    if mode == "co_train_no_alignment":
        # No trajectory alignment: missing sub-agent slots stay empty (masked) instead of being filled with
        # duplicates or sibling rollouts' trajectories.
        c.mgrpo.alignment.pad_mode = "mask"
        c.mgrpo.alignment.fill_empty_from_siblings = False
    return c
