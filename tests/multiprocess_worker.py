"""One process of the two-process CPU test in test_sharded_update.py (run as a script, never collected).

    MGRPO_COORDINATOR=127.0.0.1:<port> MGRPO_NUM_PROCESSES=2 MGRPO_PROCESS_ID=<i> \
        python tests/multiprocess_worker.py <out_dir>

Each process has 2 fake CPU devices; after `initialize_distributed` the mesh spans the 4 global devices
(fsdp 2 across the processes x tp 2 within each). It runs one sharded AdamW update of a tiny model and writes
`<out_dir>/params_<i>.npz` (the updated params gathered from all processes) and `<out_dir>/result_<i>.json`.
The test imports CONFIG, SEED, make_batch, loss_fn and make_tx from here for its single-device reference.
"""
import os
import sys

if __name__ == "__main__":
    # Before jax is imported: the device count and platform are fixed at backend start-up.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mgrpo_jax import sharding  # noqa: E402
from mgrpo_jax.kernels import chunked_token_logprobs, policy_loss  # noqa: E402
from mgrpo_jax.models import ModelConfig, init_model, positions_from_mask  # noqa: E402

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8)
SEED = 3
BATCH, SEQ = 4, 8


def make_tx() -> optax.GradientTransformation:
    # eps 1e-6 (not 1e-8): Adam's first step is ~lr * g / (|g| + eps), so a larger eps bounds how much float32
    # reduction-order noise on near-zero gradient entries can move a parameter (sharded vs single device).
    return optax.adamw(1e-3, eps=1e-6, weight_decay=0.1)


def make_batch(seed: int, config: ModelConfig = CONFIG, batch: int = BATCH, seq: int = SEQ) -> dict:
    """A random policy-gradient batch of numpy arrays: tokens/targets/attention_mask/loss_mask/old_logp [B, T],
    advantages [B]. Rows are left-padded by 0..2 tokens; the loss covers the second half of each row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    pads = np.arange(batch) % 3
    attention_mask = (np.arange(seq)[None, :] >= pads[:, None]).astype(np.int32)
    loss_mask = attention_mask * (np.arange(seq)[None, :] >= seq // 2)
    return {
        "tokens": tokens[:, :-1], "targets": tokens[:, 1:], "attention_mask": attention_mask,
        "loss_mask": loss_mask.astype(np.float32),
        # around log(1/V) with noise, so some ratios leave the clip range
        "old_logp": (-np.log(config.vocab_size) + 0.3 * rng.standard_normal((batch, seq))).astype(np.float32),
        "advantages": rng.standard_normal(batch).astype(np.float32),
    }


def loss_fn(model, batch: dict):
    """The clipped policy-gradient loss of our kernels on the model's chunked token log-probs. -> (loss, metrics)"""
    mask = batch["attention_mask"]
    hidden = model(batch["tokens"], positions_from_mask(mask), mask, return_hidden=True)
    logp = chunked_token_logprobs(hidden, model.unembedding(), batch["targets"], chunk_size=16)
    total, denom, metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], batch["loss_mask"])
    return total / jnp.maximum(denom, 1.0), metrics


def flat_arrays(tree) -> dict[str, np.ndarray]:
    """{keystr(path): numpy array} for every leaf of a pytree of host or fully addressable arrays."""
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(out_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    assert sharding.initialize_distributed(), "MGRPO_* environment variables were not set"
    assert sharding.initialize_distributed()  # idempotent
    pid = jax.process_index()
    result = {"process_count": jax.process_count(), "global_devices": len(jax.devices()),
              "local_devices": len(jax.local_devices())}

    # Disjoint meshes that split the hosts must be refused with the fix in the message.
    try:
        sharding.make_agent_meshes({"main": {"devices": 2}, "sub": {"devices": 2}})
        result["split_error"] = None
    except ValueError as e:
        result["split_error"] = str(e)

    mesh = sharding.make_agent_meshes({"main": {"devices": 4, "fsdp": 2, "tp": 2}})["main"]
    result["mesh_processes"] = sorted({d.process_index for d in mesh.devices.flat})
    tx = make_tx()
    graphdef, params, param_shardings = sharding.born_sharded(lambda: init_model(CONFIG, SEED), mesh)
    opt_state, opt_shardings = sharding.born_sharded_opt_state(tx, params, param_shardings)
    data = sharding.batch_sharding(mesh)
    update = sharding.make_sharded_update(graphdef, loss_fn, tx, param_shardings, opt_shardings, data)
    params, opt_state, metrics = update(params, opt_state, sharding.put_batch(make_batch(0), data))

    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(params, tiled=True)  # every process gets the global values
    np.savez(os.path.join(out_dir, f"params_{pid}.npz"), **flat_arrays(gathered))
    result["loss"] = float(metrics["loss"].addressable_data(0))  # replicated: every process holds it
    with open(os.path.join(out_dir, f"result_{pid}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
