"""The paper's comparisons at laptop scale (MGRPO.md, last section), shared by the configs in this folder.

The task (configs/warm_start_tiny.py's world, agents and contexts): a generated world of `ENTITIES` entities and
`QUESTIONS` 1-2-hop questions, split three ways by head entity (data/task.py, `task.rl_fraction`):
the warm start demonstrates questions about one set of heads, RL trains on questions about a second set, and
held-out evaluation asks about a third. RL therefore trains on the distribution it is scored on: heads that the
warm start never saw, whose names the agents must copy rather than recall.

The warm start (launch/warm_start.py) is supervised fine-tuning on demonstrations of a mixed-quality teacher
(train/demonstrations.py): in the core setting, with probability `SHORTCUT` the main teacher answers with what
it last read instead of delegating the last hop; in the bottleneck setting, the sub teacher instead reports a
name from the search results without reading, with the same probability. Each epoch draws the shortcuts afresh,
so the warm-started agents learn the mixture, not which question took the shortcut: on new questions they sample
both behaviours, and with a shortcut rate above one half greedy decoding mostly takes the shortcut. The shortcuts
never earn the reward; RL has to find that out, and greedy accuracy rises when it flips the agents' preference.
Each setting then gets the same RL budget: `TOTAL_STEPS` steps of Q x K main episodes, with greedy evaluation of
the held-out questions and of the first RL questions every `EVAL_EVERY` steps (the curves) and before the first
step.

    warm start     its settings                                       one model per ...
    multi          co_train, co_train_no_alignment, main_only,        role (main, sub)
                   co_train_lora, co_train_dynamic
    single         single_agent                                       one agent with the tools, as many
                                                                      parameters as main + sub together,
                                                                      SFT to a comparable fit (SINGLE_EPOCHS)
    shared         shared_model                                       both roles in one model
    weak_sub       bottleneck_co_train, bottleneck_main_only,         role; the sub-agent's teacher, not the
                   bottleneck_co_train_dynamic,                       main agent's, takes the shortcuts
                   bottleneck_main_only_dynamic
    single_weak_sub  bottleneck_single_agent                          as single, with weak_sub's shortcuts

`launch/repro.py` runs the warm starts, every setting for every seed, and writes docs/results/ (core) and
docs/results/<group>/ (ablations, lora, dynamic). The configs take the repro root as their argument (`--config
configs/repro/co_train.py:runs/repro`); an RL config finds its warm start at <root>/warm_<kind>/warm_start/. The
launch scripts put the repository root on sys.path, which is how these files import this one.
"""
import os

from ml_collections import ConfigDict

from configs import warm_start_tiny

DEFAULT_ROOT = "runs/repro"

# -- the task ----------------------------------------------------------------------------------------------------
# warm_start_tiny's world (250 entities, 1500 questions; a 1000-entity world with a fresh sample of questions each
# epoch reached 1.6% held-out accuracy in the same SFT budget: the tiny agents recall names they were shown in
# any role, they barely copy unfamiliar ones), split three ways by head entity.
ENTITIES = 250
QUESTIONS = 1500
HELD_OUT_FRACTION = 0.15  # of the questions (by head entity): ~230 held-out questions, 128 evaluated
RL_FRACTION = 0.25  # ~375 RL questions; the rest (~900) are the warm start's

# -- the warm start ----------------------------------------------------------------------------------------------
QUESTIONS_PER_EPOCH = 0  # every warm-start question, every epoch
SHORTCUT = 0.6  # the weak agent's teacher's shortcut rate: above one half, greedy decoding takes the shortcut
# Which teacher takes shortcuts: the main agent's in the core setting (the sub-agent is a competent specialist),
# the sub-agent's in the bottleneck setting (the main agent is; only training the sub-agent removes them).
# A single agent plays both roles: it gets the same rates at the same decision points.
SHORTCUTS = {"core": {"main": SHORTCUT, "sub": 0.0}, "bottleneck": {"main": 0.0, "sub": SHORTCUT}}
SINGLE_MODEL = {"hidden_size": 128, "num_layers": 9}  # 1.46M parameters: main + sub (2 x 0.72M)
# The single agent's SFT runs longer than the two agents' 10 epochs: in 10 it ended at NLL 0.34 (still falling
# 0.40 -> 0.34 in the last epoch) against the main agent's 0.046 and the sub-agent's 0.0065, greedy held-out
# accuracy 0%, pass@8 0.8%: a baseline that had not learnt its protocol (the "fair baselines": a
# comparable fit). Its demonstrations are as long as a main and a sub episode together and hold both roles'
# decisions, so it takes more passes to the same fit.
SINGLE_EPOCHS = 24
SINGLE_EVAL_EVERY_EPOCHS = 4

# -- RL ----------------------------------------------------------------------------------------------------------
TOTAL_STEPS = 100
QUERIES_PER_STEP = 4  # Q; with K = NUM_ROLLOUTS rollouts each: 32 main episodes per step
NUM_ROLLOUTS = 8
LEARNING_RATE = 3e-4  # a pilot of co_train: 1e-3 rose to 16% held-out by step 10, then fell to 5% by step 60
EVAL_EVERY = 10
# co_train_lora: adapters on every projection; an adapter's step is larger than a full weight's (the usual LoRA
# practice: about ten times the full fine-tune's rate).
LORA_RANK = 8
LORA_LEARNING_RATE = 3e-3
SUB_SAMPLER_BATCH = 16
# A prefill that admits few prompts (a refill beside running rows, the last turns) runs over a block of this many
# rows instead of all of them (SamplerConfig.prefill_rows): bench/sampler.py --warm-start, same episodes, 38%
# fewer prefill token slots; rollout 4.83 -> 3.54 s per batch with other runs sharing the cores, no measurable
# change on a quiet machine (the 2 cores are then as busy with a small block as with a full one).
PREFILL_ROWS = {"main": (8, 16), "sub": (4, 8)}
# Prefill and decode attend the cache in tiles of this many slots up to its filled extent (SamplerConfig.attention
# "auto", attention_block), not densely over all of its 192 / 384 slots; see bench/sampler.py --warm-start.
SAMPLER_ATTENTION_BLOCK = 128
# The *_dynamic settings: DAPO's dynamic sampling (mgrpo.dynamic_sampling): queries whose 8 main rewards are all
# equal leave the update and fresh RL questions are rolled out in their place, up to this many rollout batches of
# Q queries per step. At the start of RL about half of the main groups are all-equal (79% in the bottleneck
# setting), so a step keeps rolling out until its Q groups carry signal, or fills with all-equal ones.
DYNAMIC_MAX_ROUNDS = 4
# The *_judge settings: the sub-agent's reward also scores its own report (mgrpo.rewards.sub_judge="facts": its
# answer against the world's fact for the sub-task it was given), weighted JUDGE_WEIGHT beside the shared outcome
# (R_S = 0.1 + 0.9 c_k + JUDGE_WEIGHT * judge): a sub-agent that reads and reports right earns more than one
# that guesses, even in a group whose main agent fails every rollout (the shared outcome alone is then flat).
JUDGE_WEIGHT = 0.5
# The *_delegation settings: the main agent's reward also scores how faithfully it delegated each hop
# (mgrpo.rewards.main_judge="delegation": each hop's sub-question against the one it should have written about the
# subject it knew, a near copy of a name earning partial credit), weighted DELEGATION_WEIGHT beside the outcome
# (R_M = 0.1 + 0.9 c + DELEGATION_WEIGHT * judge). The main agent's all-equal groups are groups where no rollout
# succeeds and every one misnames an unseen subject; how close each copy comes differs between rollouts.
DELEGATION_WEIGHT = 0.5
EVAL_QUESTIONS = 128  # held-out
EVAL_RL_QUESTIONS = 64  # the first RL questions, beside held-out

WARM_START_OF = {"co_train": "multi", "co_train_no_alignment": "multi", "main_only": "multi", "co_train_lora": "multi",
                 "single_agent": "single", "shared_model": "shared",
                 "bottleneck_co_train": "weak_sub", "bottleneck_main_only": "weak_sub",
                 "bottleneck_single_agent": "single_weak_sub",
                 "co_train_dynamic": "multi", "bottleneck_co_train_dynamic": "weak_sub",
                 "bottleneck_main_only_dynamic": "weak_sub", "co_train_judge": "multi",
                 "bottleneck_co_train_judge": "weak_sub", "co_train_delegation": "multi",
                 "bottleneck_co_train_delegation": "weak_sub"}
WARM_START_MODE = {"multi": "co_train", "shared": "shared_model", "single": "single_agent", "weak_sub": "co_train",
                   "single_weak_sub": "single_agent"}
BOTTLENECK_KINDS = ("weak_sub", "single_weak_sub")
SETTINGS = tuple(WARM_START_OF)
GROUPS = {
    "core": ("co_train", "main_only", "single_agent"),
    # The ablations, beside the core runs they are read against (reused from the same root).
    "ablations": ("co_train", "co_train_no_alignment", "shared_model", "bottleneck_co_train",
                  "bottleneck_main_only", "bottleneck_single_agent"),
    # co_train with LoRA adapters on the same warm start (MoE and LoRA, issue 14): the adapters alone trained.
    "lora": ("co_train", "co_train_lora"),
    # Dynamic sampling beside the runs without it, in both settings.
    "dynamic": ("co_train", "co_train_dynamic", "bottleneck_co_train", "bottleneck_co_train_dynamic",
                "bottleneck_main_only", "bottleneck_main_only_dynamic"),
    # A sub-agent judge in the sub-agent's reward, beside the runs without it, in both settings.
    "judge": ("co_train", "co_train_judge", "main_only", "bottleneck_co_train", "bottleneck_co_train_judge",
              "bottleneck_main_only"),
    # A main-agent judge of its delegations in the main agent's reward, beside the runs without it, both settings.
    "delegation": ("co_train", "co_train_delegation", "main_only", "bottleneck_co_train",
                   "bottleneck_co_train_delegation", "bottleneck_main_only"),
}
SETTING_NOTES = {
    "co_train": "M-GRPO: main + sub trained (2 x 0.72M params)",
    "main_only": "same warm start as co_train; sub frozen",
    "single_agent": f"one agent with the tools, params = main + sub (1.46M), same questions, SFT "
                    f"{SINGLE_EPOCHS} epochs (the others' 10 left it unfit)",
    "co_train_no_alignment": "co_train with missing sub slots masked, no duplicates",
    "co_train_lora": f"co_train training rank-{LORA_RANK} LoRA adapters only (base frozen), lr {LORA_LEARNING_RATE:g}",
    "shared_model": "one 0.72M model plays both roles",
    "bottleneck_co_train": "co_train; the sub teacher, not the main one, took shortcuts",
    "bottleneck_main_only": "bottleneck warm start; sub frozen",
    "bottleneck_single_agent": "single_agent; shortcuts where the sub teacher's are",
    "co_train_dynamic": f"co_train; all-equal groups replaced by fresh queries (<= {DYNAMIC_MAX_ROUNDS} rollout "
                        f"batches per step)",
    "bottleneck_co_train_dynamic": "bottleneck_co_train with dynamic sampling, as co_train_dynamic",
    "bottleneck_main_only_dynamic": "bottleneck_main_only with dynamic sampling, as co_train_dynamic",
    "co_train_judge": f"co_train; sub reward + {JUDGE_WEIGHT:g} x its report's correctness (fact judge)",
    "bottleneck_co_train_judge": "bottleneck_co_train with the fact judge, as co_train_judge",
    "co_train_delegation": f"co_train; main reward + {DELEGATION_WEIGHT:g} x how faithfully it delegated (delegation "
                           "judge)",
    "bottleneck_co_train_delegation": "bottleneck_co_train with the delegation judge, as co_train_delegation",
}
PREAMBLE = {
    "core": "The core comparison (configs/repro/common.py): the same warm-start recipe for every setting, then "
            "the same RL budget. Held-out questions and RL questions start from head entities that the warm "
            "start never demonstrated.",
    "ablations": "The ablations beside the core co_train runs they are read against (trajectory alignment off; "
                 "one shared model), and the bottleneck setting: the sub-agent's warm start is the weak one (its "
                 "teacher, not the main agent's, took shortcuts), so training the main agent alone cannot remove "
                 "the errors and co-training can.",
    "lora": "co_train with LoRA: the same warm start and RL budget as co_train, training rank-8 adapters on every "
            "projection of both agents while their base weights stay frozen.",
    "dynamic": "Dynamic sampling (DAPO): the same warm starts and RL budget in steps, but a step trains only on "
               "queries whose main rewards differ, rolling out fresh RL questions in place of all-equal groups (up "
               f"to {DYNAMIC_MAX_ROUNDS} batches of Q queries per step), beside the runs without it.",
    "judge": "A sub-agent judge (the paper's judge term, here a rule that knows the generated world's facts): "
             f"the sub-agent's reward adds {JUDGE_WEIGHT:g} x whether its report answers the sub-task it was given, "
             "so its groups carry signal when the main agent's outcome does not differ. Same warm starts and RL "
             "budget, beside the runs without it and main_only, in both settings.",
    "delegation": "A main-agent judge (a process reward, here a rule that knows the generated world): the main "
                  f"agent's reward adds {DELEGATION_WEIGHT:g} x how faithfully it delegated each hop of its question "
                  "(the sub-question it should have written about the subject it knew; a near copy of a name earns "
                  "partial credit), so its groups carry signal when no rollout answers right. Same warm starts and "
                  "RL budget, beside the runs without it and main_only, in both settings.",
}


def warm_start_config(kind: str) -> ConfigDict:
    """The task, agents and controller of warm start `kind`, with its SFT block. RL configs of that kind build on
    exactly this (the checkpoints were trained on these contexts)."""
    if kind not in WARM_START_MODE:
        raise ValueError(f"warm start kind {kind!r} is not one of {list(WARM_START_MODE)}")
    c = warm_start_tiny.get_config()
    c.mode = WARM_START_MODE[kind]
    c.task.num_entities = ENTITIES
    c.task.num_questions = QUESTIONS
    c.task.heldout_fraction = HELD_OUT_FRACTION
    c.task.rl_fraction = RL_FRACTION
    c.eval_questions = EVAL_QUESTIONS
    ws = c.warm_start
    ws.max_questions = 0  # every warm-start question is in the pool; each epoch samples QUESTIONS_PER_EPOCH
    ws.questions_per_epoch = QUESTIONS_PER_EPOCH
    rates = SHORTCUTS["bottleneck" if kind in BOTTLENECK_KINDS else "core"]
    ws.shortcuts.main, ws.shortcuts.sub = rates["main"], rates["sub"]
    ws.explore_questions = EVAL_QUESTIONS
    ws.explore_k = NUM_ROLLOUTS
    if kind == "shared":
        # One model serves both roles, so its sampler needs the sub-agent's longer prompt buckets too. Its SFT
        # takes one pass over main + sub demonstrations per epoch: about the tokens the two models of "multi" see.
        # Its update takes both agents' rows in one batch, of one length.
        c.controller.max_main_context = c.controller.max_sub_context
        main_buckets = tuple(c.agents.main.sampler.prompt_buckets)
        c.agents.main.sampler.prompt_buckets = main_buckets + (tuple(c.agents.sub.sampler.prompt_buckets)[-1],)
        ws.repeat = {"main": 1}
        c.agents.main.loss.pack_len = 2 * c.controller.max_main_context
    elif kind in ("single", "single_weak_sub"):
        # The single agent searches and reads every hop itself: two tool turns per hop plus the answer, and the raw
        # observations (up to 128 tokens each) stay in its context. One pass per epoch over the same questions; as
        # many parameters as the two agents of "multi" together (a deeper model of the same width).
        c.controller.max_main_turns = 2 * max(c.task.hops) + 2
        c.controller.max_main_context = 768
        c.agents.main.sampler.prompt_buckets = (192, 384, 768 - c.agents.main.sampler.max_new_tokens)
        for key, value in SINGLE_MODEL.items():
            c.agents.main.model[key] = value
        ws.repeat = {"main": 1}
        ws.epochs = SINGLE_EPOCHS
        ws.eval_every_epochs = SINGLE_EVAL_EVERY_EPOCHS
        c.agents.main.loss.pack_len = 2 * c.controller.max_main_context
    return c


def rl_config(mode: str, root: str = DEFAULT_ROOT) -> ConfigDict:
    """RL in `mode` from its warm start under `root` (see the module docstring)."""
    kind = WARM_START_OF[mode]
    c = warm_start_config(kind)
    c.mode = {"co_train_no_alignment": "co_train", "co_train_lora": "co_train", "bottleneck_co_train": "co_train",
              "bottleneck_main_only": "main_only", "bottleneck_single_agent": "single_agent",
              "co_train_dynamic": "co_train", "bottleneck_co_train_dynamic": "co_train",
              "bottleneck_main_only_dynamic": "main_only", "co_train_judge": "co_train",
              "bottleneck_co_train_judge": "co_train", "co_train_delegation": "co_train",
              "bottleneck_co_train_delegation": "co_train"}.get(mode, mode)
    c.total_steps = TOTAL_STEPS
    c.mgrpo.num_queries = QUERIES_PER_STEP
    c.mgrpo.num_rollouts = NUM_ROLLOUTS
    c.eval_every = EVAL_EVERY
    c.eval_train_questions = EVAL_RL_QUESTIONS
    c.checkpoint.save_interval_steps = EVAL_EVERY
    warm = os.path.join(root, f"warm_{kind}", "warm_start")
    c.tokenizer.path = os.path.join(warm, "main")
    c.agents.main.checkpoint = os.path.join(warm, "main")
    c.agents.sub.checkpoint = os.path.join(warm, "sub") if kind in ("multi", "weak_sub") else ""
    for role in ("main", "sub"):
        c.agents[role].optimizer.learning_rate = LEARNING_RATE
        # The main agent: one sampler call per turn for the Q x K episodes. The sub-agent's ~1.4 Q x K episodes per
        # step in calls of 16 rows: 3 calls of 16 pad less than 2 of 32 (bench/train_step.py: its generation
        # took 1.15 s per step against 1.80 s).
        c.agents[role].sampler.batch_size = QUERIES_PER_STEP * NUM_ROLLOUTS if role == "main" else SUB_SAMPLER_BATCH
        c.agents[role].sampler.prefill_rows = PREFILL_ROWS[role]
        c.agents[role].sampler.attention = "auto"
        c.agents[role].sampler.attention_block = SAMPLER_ATTENTION_BLOCK
    if mode == "co_train_lora":
        for role in ("main", "sub"):
            c.agents[role].lora.rank = LORA_RANK
            c.agents[role].lora.alpha = 2.0 * LORA_RANK
            c.agents[role].optimizer.learning_rate = LORA_LEARNING_RATE
    if mode.endswith("_dynamic"):
        c.mgrpo.dynamic_sampling.enabled = True
        c.mgrpo.dynamic_sampling.max_rounds = DYNAMIC_MAX_ROUNDS
    if mode.endswith("_judge"):
        c.mgrpo.rewards.sub_judge = "facts"
        c.mgrpo.rewards.beta_j = JUDGE_WEIGHT
    if mode.endswith("_delegation"):
        c.mgrpo.rewards.main_judge = "delegation"
        c.mgrpo.rewards.alpha_j = DELEGATION_WEIGHT
    if mode == "co_train_no_alignment":
        # No trajectory alignment: missing sub-agent slots stay empty (masked) instead of being filled with
        # duplicates or sibling rollouts' trajectories.
        c.mgrpo.alignment.pad_mode = "mask"
        c.mgrpo.alignment.fill_empty_from_siblings = False
    return c
