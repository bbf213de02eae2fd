"""The embedded default: M-GRPO on a generated deep-research task with tiny models, local BM25 search, CPU.

Hardware: one CPU machine (2 cores are enough); main and sub-agent each on their own (fake or real) CPU
device. Runs in minutes. Every key of every config lives here; the other presets start from this one.

    python launch/train.py --config configs/tiny_cpu.py --workdir /tmp/mgrpo_tiny
    python launch/train.py --config configs/tiny_cpu.py --config.mode=main_only --config.total_steps=10 ...
"""
from ml_collections import ConfigDict


def agent(hidden: int = 64, layers: int = 2, devices: int = 1) -> ConfigDict:
    """One agent: its model, mesh, sampler, optimizer and loss."""
    return ConfigDict({
        "checkpoint": "",  # a Hugging Face directory to start from; "" = random init from `model`
        "checkpoint_required": False,  # True (the real-size presets): an empty checkpoint is an error
        "model": {"architecture": "qwen3", "hidden_size": hidden, "intermediate_size": 2 * hidden,
                  "num_layers": layers, "num_heads": 4, "num_kv_heads": 2, "head_dim": hidden // 4,
                  "tie_word_embeddings": True, "param_dtype": "float32", "dtype": "float32",
                  # remat: none|full|dots|dots_no_batch|save_attn_out. attention "auto": on CPU, chunked for the
                  # updates (1.2-1.4x faster than dense here: bench/warm_start.py) and dense for small caches.
                  "remat": "none", "attention": "auto"},
        "mesh": {"devices": devices, "fsdp": devices, "tp": 1},
        # Low-rank adapters (mgrpo_jax/models/lora.py): rank 0 = full fine-tuning; rank > 0 trains adapters only on
        # the targeted projections (q/k/v/o_proj, gate/up/down_proj, experts.gate/up/down_proj), base frozen.
        "lora": {"rank": 0, "alpha": 16.0, "dropout": 0.0,
                 "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                             "experts.gate_proj", "experts.up_proj", "experts.down_proj")},
        "sampler": {"batch_size": 16, "max_new_tokens": 24, "prompt_buckets": (128, 256, 488),
                    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "overflow": "error",
                    # Row blocks a prefill admitting fewer prompts runs over instead of every row (one device).
                    "prefill_rows": (),
                    # How prefill/decode attend the cache: "" = the model's attention; "auto" with a tile of 128
                    # visits only the filled part of the cache (configs/repro/common.py uses it).
                    "attention": "", "attention_block": 512},
        "optimizer": {"learning_rate": 1e-4, "schedule": "constant", "warmup_steps": 0, "total_steps": 1000,
                      "b1": 0.9, "b2": 0.98, "weight_decay": 0.1, "max_grad_norm": 1.0},
        "loss": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0, "agg": "seq-mean-token-mean",
                 "kl_coef": 0.0, "kl_kind": "k3", "entropy_coef": 0.0, "chunk_size": 512,
                 # The sampler's distribution, which the trainer rescores under (must equal agents.<role>.sampler's).
                 "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                 "ppo_epochs": 1,
                 # Trajectories are packed into rows of pack_len tokens (0: the agent's context limit), and
                 # micro_batch_size rows make one micro-batch; a step uses as many micro-batches as it needs.
                 "micro_batch_size": 2, "pack_len": 0},
    })


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.mode = "co_train"  # co_train | main_only | single_agent | shared_model
    c.total_steps = 20
    c.log_every = 1
    c.eval_every = 0  # steps between held-out evaluations (0: only at the end)
    c.eval_questions = 32
    c.eval_train_questions = 0  # also evaluate (greedy) on the first N questions RL trains on, beside held-out

    c.task = ConfigDict({
        "kind": "synthetic",  # synthetic | files
        "world_seed": 0, "num_entities": 80, "num_questions": 400, "hops": (1, 2), "hop_weights": (),
        "heldout_fraction": 0.15,
        "rl_fraction": 0.0,  # > 0: a third split of head entities, the warm start's (data/task.py)
        "train_files": (), "eval_files": (), "corpus_file": "", "retriever_url": "",
        "search_top_k": 2, "snippet_chars": 120, "tool_timeout_s": 10.0,
        "shuffle": True, "on_bad_row": "error",  # error | skip
        "skip_train_questions": 0,  # RL leaves out the first N training questions (a warm start's, see repro/)
        "max_train_questions": 0,  # then trains on the next N only (0: all of them)
    })
    c.tokenizer = ConfigDict({"path": "", "vocab_size": 1024})
    c.protocol = ConfigDict({"delegate": "delegate", "answer": "answer", "search": "search", "read": "read",
                             "result": "result", "observation": "information"})
    c.controller = ConfigDict({"max_main_turns": 4, "max_sub_turns": 3, "max_delegations": 2,
                               "max_main_context": 512, "max_sub_context": 512, "max_observation_tokens": 64,
                               # stop when more than this share of a tool's calls in a step fail (outage)
                               "max_tool_failure_rate": 0.5})
    c.agents = ConfigDict({"main": agent(), "sub": agent()})
    c.mgrpo = ConfigDict({
        "num_queries": 4, "num_rollouts": 4,
        "advantage_scale": "std", "advantage_eps": 1e-6, "advantage_ddof": 0, "sub_group": "per_query",
        "alignment": {"d_max": 2, "pad_mode": "duplicate", "fill_empty_from_siblings": True,
                      "reweight_duplicates": False},
        # sub_judge: "" (none) or "facts" (generated tasks: the sub-agent's answer checked against the world's
        # fact for the sub-task it was given, data.synthetic.FactJudge); its score weighs beta_j in R_S.
        # main_judge: "" (none), "delegation" or "delegation_exact" (generated tasks: how faithfully the main agent
        # delegated each hop, data.synthetic.DelegationJudge); its score weighs alpha_j in R_M.
        "rewards": {"alpha_f": 0.1, "alpha_c": 0.9, "alpha_j": 0.0, "beta_f": 0.1, "beta_m": 0.9, "beta_j": 0.0,
                    "correct": "em", "sub_judge": "", "main_judge": ""},
        # DAPO's dynamic sampling: queries whose K main rewards are all equal are replaced by fresh ones, up to
        # max_rounds rollout batches per step (mgrpo_jax/train/mgrpo.py, DynamicSamplingConfig)
        "dynamic_sampling": {"enabled": False, "max_rounds": 4},
    })
    c.checkpoint = ConfigDict({"save_interval_steps": 10, "max_to_keep": 2})
    # Decoupled mode only (launch/train.py --role main|sub; mgrpo_jax/train/decoupled.py documents each key).
    c.decoupled = ConfigDict({
        "store_url": "",  # "" = sqlite:///<workdir>/store.db; redis://host:6379/0?namespace=<run> across hosts
        "service_host": "127.0.0.1", "service_port": 8765,  # where the sub job's generation service listens
        "service_url": "",  # where the main job reaches it; "" = http://service_host:service_port
        "max_staleness": 4,  # sub-agent policy versions; older records are dropped (and counted)
        "claim_timeout_s": 120.0, "poll_interval_s": 0.5, "service_timeout_s": 120.0, "request_timeout_s": 60.0,
        "batch_window_s": 0.005, "linger_s": 30.0, "idle_exit_s": 0.0,
        "max_pending_groups": 16,  # back-pressure: the main job waits while more groups than this are unclaimed
    })
    return c
