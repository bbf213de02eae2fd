"""One process of the two-process M-GRPO test in test_multihost.py (run as a script, never collected).

    MGRPO_COORDINATOR=127.0.0.1:<port> MGRPO_NUM_PROCESSES=2 MGRPO_PROCESS_ID=<i> \
        python tests/multihost_worker.py <out_dir> broadcast|local|decoupled

Each process has 2 fake CPU devices; both agents time-share one mesh over the 4 global devices. The search
tool deliberately answers differently on each host (it names its host in every observation), as a flaky
retriever or per-host files would. With `broadcast` the tools run through `BroadcastToolSet` (process 0 runs
them, every process gets its outcomes); with `local` each process uses its own tools. Two M-GRPO co-training
steps run; the process writes `<out_dir>/result_<i>.json`: the rollouts' digests, whether the observations name
host 0, a hash of the updated parameters, or the DivergenceError that stopped it. `decoupled` only checks that
a decoupled role refuses to start in a multi-process job.
"""
import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hashlib  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mgrpo_jax import sharding  # noqa: E402
from mgrpo_jax.models import ModelConfig, init_model  # noqa: E402
from mgrpo_jax.multihost import BroadcastToolSet, DivergenceError, rollout_digest  # noqa: E402
from mgrpo_jax.rollout.controller import Controller, ControllerConfig, TextCodec, ToolSet  # noqa: E402
from mgrpo_jax.rollout.protocol import ProtocolConfig  # noqa: E402
from mgrpo_jax.rollout.tools import LocalSearch  # noqa: E402
from mgrpo_jax.train.agent import AgentTrainer, LossConfig, OptimizerConfig  # noqa: E402
from mgrpo_jax.train.alignment import AlignmentConfig  # noqa: E402
from mgrpo_jax.train.mgrpo import MGRPOConfig, MGRPOTrainer  # noqa: E402

LEN = 320


class HostSearch(LocalSearch):
    """BM25 search whose every observation names the host that ran it."""

    def run_batch(self, arguments):
        return [o if isinstance(o, BaseException) else f"{o} (host {jax.process_index()})"
                for o in super().run_batch(arguments)]


def main(out_dir: str, mode: str) -> None:
    from rollout_fixtures import ScriptedPolicy, tokenizer, tools, world_and_questions
    from test_trainer import _flaky_sub_script, _questions, _varying_main_script

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert sharding.initialize_distributed()
    pid = jax.process_index()
    if mode == "decoupled":  # a decoupled role started as a multi-process job must refuse, naming the fix
        from ml_collections import ConfigDict

        from mgrpo_jax.train.decoupled import _initialize_single_process
        try:
            _initialize_single_process(ConfigDict({"distributed": None}))
            error = None
        except ValueError as e:
            error = str(e)
        with open(os.path.join(out_dir, f"result_{pid}.json"), "w") as f:
            json.dump({"error": error}, f)
        return
    tok = tokenizer()
    world, _ = world_and_questions()
    runner = ToolSet({**tools(), "search": HostSearch(world.documents)})
    if mode == "broadcast":
        runner = BroadcastToolSet(runner)
    protocol = ProtocolConfig()
    seen = []

    def sub_script(prompt):  # searches once, then reports (or breaks the format) at random
        if "<information>" not in prompt.split("<|im_start|>assistant\n", 1)[1]:
            return "<search>founder</search>"
        seen.append(prompt)
        return flaky(prompt)

    flaky = _flaky_sub_script(1)
    controller = Controller(
        config=ControllerConfig(max_main_context=LEN, max_sub_context=LEN, max_observation_tokens=24,
                                max_main_turns=5, max_delegations=3),
        codec=TextCodec(tok, 24),
        main_policy=ScriptedPolicy(tok, _varying_main_script(0), max_new_tokens=8, max_prompt_tokens=LEN),
        main_protocol=protocol.main(), tools=runner,
        sub_policy=ScriptedPolicy(tok, sub_script, max_new_tokens=8, max_prompt_tokens=LEN),
        sub_protocol=protocol.sub())
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    meshes = sharding.make_agent_meshes({"main": {"devices": 4, "fsdp": 4}, "sub": {"shared_with": "main"}})
    trainers = {}
    for i, role in enumerate(("main", "sub")):
        graphdef, params, shardings = sharding.born_sharded(lambda i=i: init_model(cfg, seed=i), meshes[role])
        trainers[role] = AgentTrainer(role, graphdef, params, shardings, OptimizerConfig(learning_rate=1e-3),
                                      LossConfig(micro_batch_size=4, chunk_size=64), row_len=LEN,
                                      pad_id=tok.pad_token_id)
    loop = MGRPOTrainer(MGRPOConfig(mode="co_train", num_rollouts=4, alignment=AlignmentConfig(d_max=2)), controller,
                        trainers)
    result = {"digests": [], "error": None}
    try:
        for step in range(2):
            out = loop.step(*_questions(step))
            result["digests"].append(rollout_digest(out.rollouts).hex())
    except DivergenceError as e:
        result["error"] = str(e)
    result["observations_name_host_0"] = bool(seen) and all("(host 0)" in p for p in seen)
    if result["error"] is None:
        flat = multihost_utils.process_allgather([trainers["main"].params, trainers["sub"].params], tiled=True)
        h = hashlib.sha256()
        for leaf in jax.tree.leaves(flat):
            h.update(np.asarray(leaf).tobytes())
        result["params_sha256"] = h.hexdigest()
        result["versions"] = [trainers["main"].version, trainers["sub"].version]
    with open(os.path.join(out_dir, f"result_{pid}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
