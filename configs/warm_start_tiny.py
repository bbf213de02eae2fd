"""The warm start on CPU: tiny_cpu's task and agents, sized so that supervised fine-tuning on generated
demonstrations (`mgrpo_jax.train.warm_start`) reaches roughly 20-40% held-out greedy accuracy on 2 CPU cores
(measured: 28.1% on 128 held-out questions after 10 epochs on the first 900 training questions, format errors
3.1%; 71-75 s per epoch when it has the machine to itself, 25 minutes in all beside two other warm starts),
leaving RL signal and much to gain.

    python launch/warm_start.py --config configs/warm_start_tiny.py --workdir /tmp/mgrpo_warm
    python launch/train.py --config configs/warm_start_tiny.py --workdir /tmp/mgrpo_rl \
        --config.agents.main.checkpoint=/tmp/mgrpo_warm/warm_start/main \
        --config.agents.sub.checkpoint=/tmp/mgrpo_warm/warm_start/sub \
        --config.tokenizer.path=/tmp/mgrpo_warm/warm_start/main --config.task.skip_train_questions=900

RL runs that start from the warm-started agents must use this config's task, tokenizer, controller and
prompts (the checkpoints were trained on exactly these contexts); only `warm_start` is the SFT's own.
Differences from tiny_cpu: larger agents (hidden 128, 4 layers), more questions, short system prompts (the
default prompts are ~140 tokens with the corpus-trained tokenizer, most of every sequence), observations of up
to 128 tokens (64 cut a fifth of the search results and read documents before the fact), a fourth sub-agent
turn (a second search) and per-agent context limits and sampler buckets that fit the demonstrations.
"""
import importlib.util
import os

from ml_collections import ConfigDict


def _tiny_cpu():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_cpu.py")
    spec = importlib.util.spec_from_file_location("mgrpo_configs_tiny_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ConfigDict:
    tiny = _tiny_cpu()
    c = tiny.get_config()
    # 250 entities / 1500 questions: with fewer (150 / 800) the agents memorised names instead of copying them
    # and held-out accuracy stayed at 3-17%; with these, 8 epochs on all ~1275 training questions reached 31% and
    # 10 epochs on the first 900 reached 28% (128 held-out questions).
    c.task.num_entities = 250
    c.task.num_questions = 1500
    c.task.hops = (1, 2)
    c.eval_questions = 128
    c.task.snippet_chars = 20  # titles and ids; the facts are read
    c.controller.max_observation_tokens = 128
    c.controller.max_sub_turns = 4
    c.controller.max_main_context = 192
    c.controller.max_sub_context = 384
    # Prompts of a few tokens: the tags say it all, and every token of a prompt is in every training row.
    c.controller.main_system_prompt = "Use <delegate> or <answer>."
    c.controller.sub_system_prompt = "Use <search>, <read> or <result>."
    c.controller.single_system_prompt = "Use <search>, <read> or <answer>."
    for role, context in (("main", c.controller.max_main_context), ("sub", c.controller.max_sub_context)):
        c.agents[role] = tiny.agent(hidden=128, layers=4)
        # The architecture the warm start was sized with (a plain llama block); qwen3 works as well.
        c.agents[role].model.architecture = "llama"
        c.agents[role].sampler.max_new_tokens = 24
        c.agents[role].sampler.prompt_buckets = (context // 4, context // 2, context - 24)
        c.agents[role].loss.chunk_size = 1024
        # Trajectories run from a third of the context to all of it: rows twice the context hold two or three,
        # where rows of one context would hold one of most (measured: 52-61% of positions real, 80%+ with these).
        c.agents[role].loss.pack_len = 2 * context

    # Supervised warm start (mgrpo_jax.train.warm_start); RL ignores this block.
    c.warm_start = ConfigDict({
        "epochs": 10,
        "batch_size": 16,  # demonstrations per SFT update (the last batch of an epoch may be smaller)
        "micro_batch_size": 4,  # packed rows (of the longest demonstration's length) per micro-batch
        # Training questions to demonstrate (0: all of them). The first 900 of the ~1275; RL (configs/repro/)
        # trains on the rest, questions the agents have never been shown the answer to.
        "max_questions": 900,
        "query": "question",  # the sub-agent teacher's first search: subject | question
        "fallback_query": True,  # search again with the other query when the first misses the document
        "eval_every_epochs": 1,  # held-out greedy evaluation between epochs (0: only at the end)
        "eval_train_questions": 0,  # also evaluate on this many training questions (over/underfitting)
        "repeat": {"main": 2, "sub": 1},  # passes per epoch; the main agent's rows are short
        "optimizer": {"learning_rate": 5e-3, "schedule": "cosine", "warmup_steps": 20, "b1": 0.9, "b2": 0.98,
                      "weight_decay": 0.01, "max_grad_norm": 1.0},
        "questions_per_epoch": 0,  # > 0: each epoch demonstrates a fresh sample of this many questions
        "shortcuts": {"main": 0.0, "sub": 0.0},  # teachers' shortcut probabilities (train/demonstrations.py)
        "agent_epochs": {"main": 0, "sub": 0},  # an agent's SFT stops after this many epochs (0: all)
        "explore_questions": 0,  # after SFT: pass@k, zero-variance groups and entropy on this many RL questions
        "explore_k": 4,
    })
    return c
