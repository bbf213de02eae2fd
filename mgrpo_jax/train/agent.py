"""One agent's trainer: its mesh, parameters, optimizer, and one jitted, donated update of a fixed shape.

The update (`build_train_step`) is one program (purejaxrl style): `ppo_epochs` (mu) iterations, each a
`lax.scan` over micro-batches that accumulates gradients of the loss *totals* and the loss *denominators*,
then one optimizer step with gradients = sum(d total) / sum(denominator). So the loss of the update equals
the kernels' loss on the whole batch, whatever the micro-batching (LESSONS.md, item 4).

A non-finite loss or gradient skips that optimizer step: parameters and optimizer state stay exactly as
they were, and the skip is counted in the metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mgrpo_jax.kernels import AGG_MODES, KL_KINDS, aggregate_loss, chunked_token_logprobs, policy_loss
from mgrpo_jax.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    born_sharded_opt_state,
    jit_sharded_step,
    put_batch,
)

SCHEDULES = ("constant", "cosine", "linear")
OBJECTIVES = ("pg", "sft")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warm-up + schedule. Defaults: the paper code's."""

    learning_rate: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000  # for cosine / linear decay
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule={self.schedule!r} is not supported; choose one of {list(SCHEDULES)}")
        if not self.learning_rate > 0 or self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("optimizer needs learning_rate > 0, warmup_steps >= 0 and total_steps >= 1")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"optimizer.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    else:
        after = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    if not cfg.warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The per-agent objective (MGRPO.md, "Objective") and how one update walks its batch.

    objective: "pg" (default) the clipped policy-gradient loss; "sft" supervised fine-tuning (the warm start):
      the token-mean negative log-likelihood of the loss-masked tokens, rows weighted by `weights`,
      total = sum_b w_b sum_t m_bt (-log p_bt), denominator = sum_b w_b sum_t m_bt. It reads no advantages or
      behaviour log-probs, so the clip, `agg` and `max_len_norm` settings do not apply to it; the KL,
      entropy and TIS terms are errors with it rather than silently dropped.
    temperature: the sampler's; log-probs are recomputed under the same tempered distribution.
    ppo_epochs: mu, passes over the batch per update. micro_batch_size: rows per scanned micro-batch.
    tis_cap: truncated importance sampling (off-policy correction): when set, the ratio is taken against the
      trainer's own log-probs at the start of the update and each token's advantage is scaled by
      min(exp(trainer_old - behaviour), tis_cap).
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = 3.0
    agg: str = "seq-mean-token-mean"
    max_len_norm: int | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    kl_clamp: float | None = 10.0
    entropy_coef: float = 0.0
    temperature: float = 1.0
    chunk_size: int = 1024
    ppo_epochs: int = 1
    micro_batch_size: int = 8
    shuffle_seed: int | None = None
    tis_cap: float | None = None
    objective: str = "pg"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"loss.objective={self.objective!r} is not supported; choose one of {list(OBJECTIVES)}")
        if self.objective == "sft" and (self.kl_coef or self.entropy_coef or self.tis_cap is not None):
            raise ValueError("loss.objective='sft' takes no KL, entropy or TIS term: set loss.kl_coef=0, "
                             "loss.entropy_coef=0 and loss.tis_cap=None")
        if self.agg not in AGG_MODES:
            raise ValueError(f"loss.agg={self.agg!r} is not supported; choose one of {list(AGG_MODES)}")
        if self.kl_kind not in KL_KINDS:
            raise ValueError(f"loss.kl_kind={self.kl_kind!r} is not supported; choose one of {list(KL_KINDS)}")
        if self.ppo_epochs < 1 or self.micro_batch_size < 1 or self.chunk_size < 1:
            raise ValueError("loss.ppo_epochs, loss.micro_batch_size and loss.chunk_size must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"loss.temperature must be > 0 (the sampler's temperature), got {self.temperature}")
        if self.tis_cap is not None and not self.tis_cap >= 1:
            raise ValueError(f"loss.tis_cap must be >= 1 or None, got {self.tis_cap}")


def sequence_logprobs(model, batch, cfg: LossConfig):
    """Per-token log-probs and entropies of tokens[:, 1:] given tokens[:, :-1]: ([N, L-1], [N, L-1]) float32."""
    hidden = model(batch["tokens"][:, :-1], batch["positions"][:, :-1], batch["attention_mask"][:, :-1],
                   return_hidden=True)
    return chunked_token_logprobs(hidden, model.unembedding(), batch["tokens"][:, 1:], chunk_size=cfg.chunk_size,
                                  temperature=cfg.temperature, return_entropy=True)


def batch_loss(model, batch, cfg: LossConfig):
    """(total, denominator, metrics) of the agent's objective on `batch` (any number of rows)."""
    logp, entropy = sequence_logprobs(model, batch, cfg)
    mask = batch["loss_mask"][:, 1:]
    if cfg.objective == "sft":
        return _sft_loss(logp, entropy, mask, batch["weights"])
    behaviour = batch["old_logp"][:, 1:]
    advantages = batch["advantages"]
    old = behaviour
    if cfg.tis_cap is not None:
        old = batch["trainer_old_logp"][:, 1:]
        is_weight = jnp.minimum(jnp.exp(old - behaviour), cfg.tis_cap)
        advantages = advantages[:, None] * jnp.where(mask > 0, is_weight, 0.0)
    total, denom, metrics = policy_loss(
        logp, old, advantages, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
        agg=cfg.agg, max_len=cfg.max_len_norm, weights=batch["weights"],
        ref_logp=batch["ref_logp"][:, 1:] if "ref_logp" in batch else None, kl_coef=cfg.kl_coef,
        kl_kind=cfg.kl_kind, kl_clamp=cfg.kl_clamp, entropy=entropy, entropy_coef=cfg.entropy_coef)
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    metrics["logprob_gap"] = jnp.sum(jnp.abs(jax.lax.stop_gradient(logp) - behaviour) * m) / n
    return total, denom, metrics


def _sft_loss(logp, entropy, mask, weights):
    """Token-mean NLL: (sum_b w_b sum_t m (-logp), sum_b w_b sum_t m, metrics); metrics are token means."""
    total, denom = aggregate_loss(-logp, mask, mode="token-mean", weights=weights)
    m = mask.astype(jnp.float32)
    n = jnp.sum(m)
    safe = jnp.maximum(n, 1.0)
    metrics = {"nll": jnp.sum(-jax.lax.stop_gradient(logp) * m) / safe,
               "entropy_mean": jnp.sum(jax.lax.stop_gradient(entropy) * m) / safe, "num_tokens": n}
    return total, denom, metrics


def build_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: LossConfig, num_rows: int):
    """The pure update `step(params, opt_state, batch) -> (params, opt_state, metrics)` for batches of
    `num_rows` rows (a multiple of cfg.micro_batch_size). Jit it (see `AgentTrainer`)."""
    if num_rows % cfg.micro_batch_size:
        raise ValueError(f"the batch of {num_rows} rows does not divide into micro-batches of "
                         f"{cfg.micro_batch_size}; choose loss.micro_batch_size dividing it")
    n_micro = num_rows // cfg.micro_batch_size

    def micro_batches(batch, epoch):
        if cfg.shuffle_seed is not None:
            order = jax.random.permutation(jax.random.fold_in(jax.random.key(cfg.shuffle_seed), epoch), num_rows)
            batch = jax.tree.map(lambda x: x[order], batch)
        return jax.tree.map(lambda x: x.reshape(n_micro, cfg.micro_batch_size, *x.shape[1:]), batch)

    def accumulate(params, batch, epoch):
        def one(carry, mb):
            grads_sum, total_sum, denom_sum = carry

            def total_of(p):
                total, denom, metrics = batch_loss(nnx.merge(graphdef, p), mb, cfg)
                return total, (denom, metrics)

            (total, (denom, metrics)), grads = jax.value_and_grad(total_of, has_aux=True)(params)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, total_sum + total, denom_sum + denom), metrics

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, total, denom), metrics = jax.lax.scan(one, init, micro_batches(batch, epoch))
        safe = jnp.where(denom > 0, denom, 1.0)
        grads = jax.tree.map(lambda g, p: (g / safe).astype(p.dtype), grads, params)
        # Micro-batch metrics are token means; weight them by their token counts.
        tokens = metrics.pop("num_tokens")
        w = tokens / jnp.maximum(jnp.sum(tokens), 1.0)
        metrics = {k: jnp.sum(v * w) for k, v in metrics.items()}
        metrics["num_tokens"] = jnp.sum(tokens)
        return total / safe, grads, metrics

    def step(params, opt_state, batch):
        if cfg.tis_cap is not None:  # the trainer's own log-probs before this update
            logp, _ = sequence_logprobs(nnx.merge(graphdef, params), batch, cfg)
            batch = {**batch, "trainer_old_logp": jnp.pad(jax.lax.stop_gradient(logp), ((0, 0), (1, 0)))}

        def epoch(carry, index):
            params, opt_state, skipped = carry
            loss, grads, metrics = accumulate(params, batch, index)
            grad_norm = optax.tree.norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
            metrics = {**metrics, "loss": loss, "grad_norm": grad_norm}
            return (keep(new_params, params), keep(new_opt_state, opt_state), skipped + (~ok).astype(jnp.int32)), \
                metrics

        (params, opt_state, skipped), metrics = jax.lax.scan(
            epoch, (params, opt_state, jnp.zeros((), jnp.int32)), jnp.arange(cfg.ppo_epochs))
        # Report the first epoch (on-policy figures: clip fractions, log-prob gap) and the last loss.
        out = {k: v[0] for k, v in metrics.items()}
        out["loss_last_epoch"] = metrics["loss"][-1]
        out["skipped_steps"] = skipped
        return params, opt_state, out

    return step


class AgentTrainer:
    """One agent: parameters and optimizer state sharded on its mesh, and a jitted, donated update.

    `update(batch)` takes a host batch (`train.batch.build_batch`) of exactly `num_rows` rows and returns host
    metrics; it compiles once per run (the batch shape never changes). `dispatch` + `collect` split it so that
    several agents' updates are dispatched back to back and run concurrently on their own devices. `version`
    counts updates: the policy version of trajectories sampled with these parameters.

    A reference model (`ref_params`, same architecture) is required, and run, only when loss.kl_coef > 0.
    """

    def __init__(self, name: str, graphdef: nnx.GraphDef, params: Any, param_shardings: Any,
                 optimizer: OptimizerConfig, loss: LossConfig, num_rows: int, *, ref_params: Any = None,
                 rules=DEFAULT_RULES):
        if loss.kl_coef != 0 and ref_params is None:
            raise ValueError(f"{name}: loss.kl_coef={loss.kl_coef} needs a reference model; pass ref_params "
                             "(e.g. the initial parameters) or set kl_coef=0")
        self.name, self.graphdef, self.loss_config, self.num_rows = name, graphdef, loss, num_rows
        self.optimizer_config = optimizer
        self.params, self.param_shardings = params, param_shardings
        self.ref_params = ref_params if loss.kl_coef != 0 else None  # beta = 0: never loaded, never run
        self.tx = make_optimizer(optimizer)
        self.schedule = make_schedule(optimizer)
        self.opt_state, self.opt_shardings = born_sharded_opt_state(self.tx, params, param_shardings)
        mesh = jax.tree.leaves(param_shardings)[0].mesh
        self.batch_sharding = batch_sharding(mesh, rules)
        self._step = jit_sharded_step(build_train_step(graphdef, self.tx, loss, num_rows), param_shardings,
                                      self.opt_shardings, self.batch_sharding)
        self._ref_logp = jax.jit(lambda p, b: sequence_logprobs(nnx.merge(graphdef, p), b, loss)[0])
        self.version = 0
        self.skipped_steps = 0

    @property
    def compile_count(self) -> int:
        return self._step._cache_size()

    def dispatch(self, batch: dict[str, np.ndarray]):
        """Starts the update on the agent's devices and returns at once (metrics stay on device)."""
        rows = batch["tokens"].shape[0]
        if rows != self.num_rows:
            raise ValueError(f"{self.name}: batch has {rows} rows, the update was built for {self.num_rows}")
        device_batch = put_batch(batch, self.batch_sharding)
        if self.ref_params is not None:
            ref = self._ref_logp(self.ref_params, device_batch)
            device_batch = {**device_batch, "ref_logp": jnp.pad(ref, ((0, 0), (1, 0)))}
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, device_batch)
        return metrics

    def collect(self, device_metrics) -> dict[str, float]:
        """Waits for a dispatched update; returns its metrics as Python floats."""
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        optimizer_steps = self.version * self.loss_config.ppo_epochs
        self.skipped_steps += int(metrics["skipped_steps"])
        self.version += 1
        metrics.update(learning_rate=float(self.schedule(optimizer_steps)), compile_count=self.compile_count,
                       policy_version=self.version)
        return metrics

    def update(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        return self.collect(self.dispatch(batch))
