"""launch/train.py for the decoupled tests, with two scripted stand-ins for skills a random tiny model lacks:
the main job's main agent delegates on its first turn (so that sub-agent records flow through the store), and
the sub job's service answers every other row of a batch with a well-formed <result> (so that the sub-agent's
rewards vary within a query group and its advantages and gradients are not all zero). Everything else (the
sub-agent's generations over HTTP, both trainers, the store, checkpoints) is the real thing.

    python tests/decoupled_worker.py --config ... --workdir ... --role main|sub [--config.key=value ...]
"""
import os
import runpy
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mgrpo_jax.train.decoupled as decoupled  # noqa: E402
from mgrpo_jax.rollout.sampler import Sample  # noqa: E402


class DelegateFirst:
    """Wraps the main agent's real policy: a prompt with no observation yet gets a scripted delegation."""

    def __init__(self, inner, tokenizer):
        self.inner, self.tok = inner, tokenizer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def version(self):
        return self.inner.version

    def update(self, params, version):
        self.inner.update(params, version)

    def generate(self, prompts, rng, stop_sequences):
        real = self.inner.generate(prompts, rng, stop_sequences)
        out = []
        for prompt, sample in zip(prompts, real):
            text = self.tok.decode(prompt, skip_special_tokens=False)
            if "<information>" in text.split("<|im_start|>assistant\n")[-1]:
                out.append(sample)
                continue
            ids = np.asarray(self.tok.encode("<delegate>who</delegate>", add_special_tokens=False), np.int32)
            out.append(Sample(ids, np.full(len(ids), -1.0, np.float32), "stop"))
        return out


class ResultEveryOtherRow:
    """Wraps the sub job's real sampler: rows 0, 2, 4, ... of each batch get a scripted <result>."""

    def __init__(self, inner, tokenizer):
        self.inner = inner
        self.ids = np.asarray(tokenizer.encode("<result>found</result>", add_special_tokens=False), np.int32)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, params, prompts, rng, stop_sequences=()):
        real = self.inner.generate(params, prompts, rng, stop_sequences)
        return [Sample(self.ids, np.full(len(self.ids), -1.0, np.float32), "stop") if i % 2 == 0 else s
                for i, s in enumerate(real)]


_build = decoupled.build_experiment


def build_experiment(config, workdir, **kwargs):
    exp = _build(config, workdir, **kwargs)
    if kwargs.get("role") == "main":
        exp.controller.main_policy = DelegateFirst(exp.controller.main_policy, exp.tokenizer)
    if kwargs.get("role") == "sub":
        policy = exp.agents["sub"].policy
        policy.sampler = ResultEveryOtherRow(policy.sampler, exp.tokenizer)
    return exp


decoupled.build_experiment = build_experiment

# DECOUPLED_CRASH_AT_ACK=n: the process dies (like SIGKILL: no cleanup, no flush) at its n-th store ack, i.e.
# after a checkpoint was saved and before the groups it holds were acked.
_crash_at = int(os.environ.pop("DECOUPLED_CRASH_AT_ACK", "0"))
if _crash_at:
    from mgrpo_jax.train.store import TrajectoryStore

    _ack, _calls = TrajectoryStore.ack, [0]

    def ack(self, claim):
        _calls[0] += 1
        if _calls[0] == _crash_at:
            print(f"decoupled_worker: crashing at ack {_crash_at}", flush=True)
            os._exit(137)
        return _ack(self, claim)

    TrajectoryStore.ack = ack
sys.argv = [os.path.join(ROOT, "launch", "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
