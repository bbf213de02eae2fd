"""One agent's trainer: its mesh, parameters, optimizer, and an update made of programs of fixed shapes.

A batch is packed trajectories (`train.batch.PackedBatch`): micro-batches of one shape `[rows, row_len]`, as
many as the step's tokens need. The update (`build_update_programs`) is three jitted programs, each compiled
once per run whatever the number of micro-batches:

  accumulate(params, acc, micro_batch) -> acc     gradients of the loss *total*, the *denominator*, and
                                                  token-weighted metric sums, added into a donated accumulator;
  apply(params, opt_state, acc, offset) -> ...    one optimizer step with gradients sum(d total) / (sum(denominator)
                                                  + offset), so the update equals the kernels' loss on the whole
                                                  batch, whatever the micro-batching (LESSONS.md, item 4);
  score(params, micro_batch) -> log-probs          the trainer's own log-probs (TIS) and the reference model's (KL).

`ppo_epochs` (mu) repeats accumulate-then-apply. The host only enqueues programs (JAX dispatch is asynchronous),
so several agents' updates still run concurrently on their own devices.

With LoRA adapters in the model (`models.lora`), only the adapters are differentiated, accumulated and
optimized: the gradient, its accumulator and the optimizer state hold adapters only, and the base weights
pass through every program unchanged (bit-identical). A MoE model's router losses (`ModelConfig.router_*_coef`)
are added to each micro-batch's total, weighted by its denominator, and its router statistics are logged
(`moe/...`).

A non-finite loss or gradient skips that optimizer step: parameters and optimizer state stay exactly as they
were, and the skip is counted. An update with no learning signal at all (no loss token, or, for the policy
gradient without KL/entropy terms, only zero advantages) is not dispatched: no optimizer step, no weight decay,
no momentum, no policy-version bump (LESSONS.md, item 20); it is counted as `skipped_empty`. This differs from
a plain AdamW step, which would still move the weights through momentum and decay.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mgrpo_jax.kernels import AGG_MODES, KL_KINDS, aggregate_denominator, aggregate_loss, chunked_token_logprobs, \
    policy_loss
from mgrpo_jax.models import lora as lora_lib
from mgrpo_jax.sharding import DEFAULT_RULES, batch_sharding, born_sharded_opt_state, data_parallel_size, put_batch, \
    with_mesh
from mgrpo_jax.train.batch import PackedBatch, Segment, pack

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
    temperature, top_k, top_p: the sampler's; log-probs are recomputed under the same tempered, filtered
      distribution (the top-k / top-p set is a function of the logits, so the trainer recomputes it exactly; a
      sampled token outside the trainer's set, possible only off-policy, is left out of the loss and counted).
    ppo_epochs: mu, passes over the batch per update (each pass is one optimizer step on the whole batch).
    micro_batch_size: packed rows per micro-batch (a multiple of the mesh's data-parallel size).
    pack_len: tokens per packed row; 0 = the agent's context limit (the experiment resolves it), so that every
      trajectory fits in one row.
    max_len_norm: the constant of `seq-mean-token-sum-norm`; None = the agent's context limit.
    skip_zero_advantage: leave segments whose loss is exactly zero (advantage 0, no KL or entropy term) out of
      the forward and backward passes; their denominator still counts, so the update is unchanged and only
      cheaper. Token-mean metrics (entropy, clip fractions) are then over the trained tokens.
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
    top_k: int = 0
    top_p: float = 1.0
    chunk_size: int = 1024
    ppo_epochs: int = 1
    micro_batch_size: int = 8
    pack_len: int = 0
    skip_zero_advantage: bool = True
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
        if self.pack_len < 0 or self.pack_len == 1:
            raise ValueError(f"loss.pack_len must be 0 (the agent's context limit) or >= 2, got {self.pack_len}")
        if not self.temperature > 0:
            raise ValueError(f"loss.temperature must be > 0 (the sampler's temperature), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"loss needs top_k >= 0 (0 = off) and 0 < top_p <= 1 (the sampler's), got "
                             f"{self.top_k}, {self.top_p}")
        if self.tis_cap is not None and not self.tis_cap >= 1:
            raise ValueError(f"loss.tis_cap must be >= 1 or None, got {self.tis_cap}")


def sequence_logprobs(model, batch, cfg: LossConfig, *, dropout_rng=None, return_aux: bool = False):
    """Per-token log-probs and entropies of tokens[:, 1:] given tokens[:, :-1]: ([N, L-1], [N, L-1]) float32.
    Packed rows: the model attends within each segment only (segment ids) at per-segment positions. With
    `return_aux` a third value, the model's router statistics ({} for a dense model); `dropout_rng` turns on
    LoRA dropout."""
    hidden, aux = model(batch["tokens"][:, :-1], batch["positions"][:, :-1], batch["segment_ids"][:, :-1],
                        return_hidden=True, return_aux=True, dropout_rng=dropout_rng)
    logp, entropy = chunked_token_logprobs(hidden, model.unembedding(), batch["tokens"][:, 1:],
                                           chunk_size=cfg.chunk_size, temperature=cfg.temperature, top_k=cfg.top_k,
                                           top_p=cfg.top_p, return_entropy=True)
    return (logp, entropy, aux) if return_aux else (logp, entropy)


def _with_router_loss(total, denom, metrics, aux):
    """A MoE model's router loss added to the micro-batch's total, weighted by its denominator (so the update's
    loss gains router_loss averaged over micro-batches by denominator), and its statistics as metrics."""
    if not aux:
        return total, denom, metrics
    metrics.update({f"moe/{k}": jax.lax.stop_gradient(v) for k, v in aux.items()})
    return total + aux["router_loss"] * jax.lax.stop_gradient(denom), denom, metrics


def _targets(batch, name: str):
    """A per-token field aligned with the targets tokens[:, 1:]."""
    return batch[name][:, 1:]


def batch_loss(model, batch, cfg: LossConfig):
    """(total, denominator, metrics) of the agent's objective on a packed (micro-)batch (`train.batch` layout).
    A batch with "dropout_seed" ([rows] int32, one value) runs the model's LoRA dropout from that seed."""
    dropout_rng = jax.random.key(batch["dropout_seed"][0]) if "dropout_seed" in batch else None
    logp, entropy, aux = sequence_logprobs(model, batch, cfg, dropout_rng=dropout_rng, return_aux=True)
    mask = _targets(batch, "loss_mask")
    segments, weights = _targets(batch, "segment_ids"), _targets(batch, "weights")
    outside = None
    if cfg.top_k or cfg.top_p < 1:  # a token outside the filtered set has log-prob ~finfo.min: no signal, no loss
        outside = (mask > 0) & (logp < -1e30)
        mask = jnp.where(outside, 0, mask)
    if cfg.objective == "sft":
        return _with_router_loss(*_sft_loss(logp, entropy, mask, weights, segments), aux)
    behaviour = _targets(batch, "old_logp")
    advantages = _targets(batch, "advantages")
    old = behaviour
    if cfg.tis_cap is not None:
        old = _targets(batch, "trainer_old_logp")
        is_weight = jnp.minimum(jnp.exp(old - behaviour), cfg.tis_cap)
        advantages = advantages * jnp.where(mask > 0, is_weight, 0.0)
    total, denom, metrics = policy_loss(
        logp, old, advantages, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
        agg=cfg.agg, max_len=cfg.max_len_norm, weights=weights, segment_ids=segments,
        ref_logp=_targets(batch, "ref_logp") if "ref_logp" in batch else None, kl_coef=cfg.kl_coef,
        kl_kind=cfg.kl_kind, kl_clamp=cfg.kl_clamp, entropy=entropy, entropy_coef=cfg.entropy_coef)
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    metrics["logprob_gap"] = jnp.sum(jnp.abs(jax.lax.stop_gradient(logp) - behaviour) * m) / n
    if outside is not None:
        metrics["outside_filter_frac"] = jnp.sum(outside) / jnp.maximum(jnp.sum(outside) + jnp.sum(m), 1.0)
    return _with_router_loss(total, denom, metrics, aux)


def _sft_loss(logp, entropy, mask, weights, segments):
    """Token-mean NLL: (sum w m (-logp), sum w m, metrics); metrics are token means."""
    total, denom = aggregate_loss(-logp, mask, mode="token-mean", weights=weights, segment_ids=segments)
    m = mask.astype(jnp.float32)
    n = jnp.sum(m)
    safe = jnp.maximum(n, 1.0)
    metrics = {"nll": jnp.sum(-jax.lax.stop_gradient(logp) * m) / safe,
               "entropy_mean": jnp.sum(jax.lax.stop_gradient(entropy) * m) / safe, "num_tokens": n}
    return total, denom, metrics


@dataclasses.dataclass(frozen=True)
class UpdatePrograms:
    """The pure functions of one agent's update (see the module docstring); `AgentTrainer` jits them.

    accumulate(params, acc, micro_batch) -> acc; apply(params, opt_state, acc, denominator_offset) ->
    (params, opt_state, metrics); score(params, micro_batch) -> [rows, row_len] float32 log-probs (column 0 is
    0: nothing predicts the first token); zero_acc(params, micro_batch) -> an accumulator of zeros.
    With `trainable` (an nnx filter, e.g. `lora.TRAINABLE`) the gradients, the accumulator and the optimizer
    (whose state must be built on `trainable_part(params)`) cover only those parameters.
    """

    accumulate: Any
    apply: Any
    score: Any
    zero_acc: Any


def trainable_part(params, trainable=None):
    """(the parameters an update trains, the frozen rest or None) of a model state; `trainable` None: all."""
    if trainable is None:
        return params, None
    return nnx.split_state(params, trainable, ...)


def trainable_filter(params):
    """What an update of a model state trains: its LoRA adapters when it has them (the base frozen), else None
    (everything)."""
    return lora_lib.TRAINABLE if lora_lib.has_adapters(params) else None


def join_trainable(train, frozen):
    """The inverse of `trainable_part`: the whole model state again."""
    return train if frozen is None else nnx.merge_state(train, frozen)


def build_update_programs(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                          cfg: LossConfig, trainable=None) -> UpdatePrograms:
    def accumulate(params, acc, micro):
        train, frozen = trainable_part(params, trainable)

        def total_of(p):
            total, denom, metrics = batch_loss(nnx.merge(graphdef, join_trainable(p, frozen)), micro, cfg)
            return total, (denom, metrics)

        (total, (denom, metrics)), grads = jax.value_and_grad(total_of, has_aux=True)(train)
        tokens = metrics.pop("num_tokens")
        # Micro-batch metrics are token means: accumulate them weighted by their token counts.
        sums = {k: acc["metric_sums"][k] + v * tokens for k, v in metrics.items()}
        return {"grads": jax.tree.map(jnp.add, acc["grads"], grads), "total": acc["total"] + total,
                "denominator": acc["denominator"] + denom, "tokens": acc["tokens"] + tokens, "metric_sums": sums}

    def zero_acc(params, micro):
        shapes = jax.eval_shape(lambda: batch_loss(nnx.merge(graphdef, params), micro, cfg)[2])
        scalar = jnp.zeros((), jnp.float32)
        return {"grads": jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable_part(params, trainable)[0]),
                "total": scalar,
                "denominator": scalar, "tokens": scalar,
                "metric_sums": {k: scalar for k in shapes if k != "num_tokens"}}

    def apply(params, opt_state, acc, denominator_offset):
        params, frozen = trainable_part(params, trainable)
        denom = acc["denominator"] + denominator_offset
        safe = jnp.where(denom > 0, denom, 1.0)
        grads = jax.tree.map(lambda g, p: (g / safe).astype(p.dtype), acc["grads"], params)
        loss = acc["total"] / safe
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        metrics = {k: v / jnp.maximum(acc["tokens"], 1.0) for k, v in acc["metric_sums"].items()}
        metrics.update(num_tokens=acc["tokens"], loss=loss, grad_norm=grad_norm, skipped_steps=(~ok).astype(jnp.int32))
        return join_trainable(keep(new_params, params), frozen), keep(new_opt_state, opt_state), metrics

    def score(params, micro):
        logp, _ = sequence_logprobs(nnx.merge(graphdef, params), micro, cfg)
        return jnp.pad(logp, ((0, 0), (1, 0)))

    return UpdatePrograms(accumulate, apply, score, zero_acc)


def _has_zero_loss(segment: Segment, cfg: LossConfig) -> bool:
    """The segment's per-token loss is exactly 0, so it adds nothing to the gradient (only to the denominator)."""
    return (cfg.objective == "pg" and segment.advantage == 0 and _static_zero(cfg.kl_coef)
            and _static_zero(cfg.entropy_coef))


def _static_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _loss_tokens(segment: Segment) -> int:
    return int(np.sum(segment.trajectory.loss_mask[1:]))  # the first token never carries loss


@dataclasses.dataclass
class PendingUpdate:
    """A dispatched update: per-epoch device metrics, or nothing when the update was skipped as empty."""

    epoch_metrics: list[dict[str, jax.Array]]
    batch_stats: dict[str, float]


class AgentTrainer:
    """One agent: parameters and optimizer state sharded on its mesh, and its jitted update programs.

    `pack(segments)` lays trajectories out in this agent's fixed micro-batch shape ([loss.micro_batch_size,
    row_len]); `update(batch)` trains on a packed batch and returns host metrics. Every program compiles once
    per run. `dispatch` + `collect` split `update` so that several agents' updates are dispatched back to back
    and run concurrently on their own devices. `version` counts updates: the policy version of trajectories
    sampled with these parameters (an update skipped as empty does not count).

    A reference model (`ref_params`, same architecture) is required, and run, only when loss.kl_coef > 0.
    A model with LoRA adapters trains the adapters alone (module docstring): `opt_state` is the adapters'.
    `dropout_seed`: with LoRA dropout, each micro-batch of each epoch of each update draws its masks from a key
    folded from this seed, the policy version, the epoch and the micro-batch.
    """

    def __init__(self, name: str, graphdef: nnx.GraphDef, params: Any, param_shardings: Any,
                 optimizer: OptimizerConfig, loss: LossConfig, *, row_len: int, pad_id: int = 0,
                 ref_params: Any = None, rules=DEFAULT_RULES, dropout_seed: int | None = None):
        if loss.kl_coef != 0 and ref_params is None:
            raise ValueError(f"{name}: loss.kl_coef={loss.kl_coef} needs a reference model; pass ref_params "
                             "(e.g. the initial parameters) or set kl_coef=0")
        if row_len < 2:
            raise ValueError(f"{name}: row_len must be >= 2, got {row_len}")
        if loss.max_len_norm is None:
            loss = dataclasses.replace(loss, max_len_norm=row_len)
        self.name, self.graphdef, self.loss_config, self.row_len, self.pad_id = name, graphdef, loss, row_len, pad_id
        self.optimizer_config = optimizer
        self.params, self.param_shardings = params, param_shardings
        self.ref_params = ref_params if loss.kl_coef != 0 else None  # beta = 0: never loaded, never run
        self.tx = make_optimizer(optimizer)
        self.schedule = make_schedule(optimizer)
        self.trainable = trainable_filter(params)
        self.dropout_seed = dropout_seed
        train_params, _ = trainable_part(params, self.trainable)
        train_shardings, _ = trainable_part(param_shardings, self.trainable)
        self.opt_state, self.opt_shardings = born_sharded_opt_state(self.tx, train_params, train_shardings)
        mesh = jax.tree.leaves(param_shardings)[0].mesh
        self.batch_sharding = batch_sharding(mesh, rules)
        data_shards = data_parallel_size(self.batch_sharding)
        if loss.micro_batch_size % data_shards:
            raise ValueError(f"{name}: loss.micro_batch_size={loss.micro_batch_size} rows do not split over the "
                             f"mesh's {data_shards} data-parallel shards; make it a multiple of {data_shards}")
        programs = build_update_programs(graphdef, self.tx, loss, self.trainable)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        grad_shardings = train_shardings
        acc_shardings = {"grads": grad_shardings, "total": replicated, "denominator": replicated,
                         "tokens": replicated, "metric_sums": replicated}
        self._acc_shardings = acc_shardings
        # Traced under the mesh (`with_mesh`): activation constraints apply, and MoE layers run expert-parallel.
        on_mesh = lambda fn: with_mesh(fn, mesh)  # noqa: E731
        self._accumulate = jax.jit(on_mesh(programs.accumulate), in_shardings=(param_shardings, acc_shardings,
                                                                               self.batch_sharding),
                                   out_shardings=acc_shardings, donate_argnums=(1,))
        self._apply = jax.jit(on_mesh(programs.apply), in_shardings=(param_shardings, self.opt_shardings,
                                                                     acc_shardings, replicated),
                              out_shardings=(param_shardings, self.opt_shardings, replicated), donate_argnums=(0, 1))
        self._score = jax.jit(on_mesh(programs.score), in_shardings=(param_shardings, self.batch_sharding),
                              out_shardings=self.batch_sharding)
        self._zero_acc = jax.jit(on_mesh(programs.zero_acc), in_shardings=(param_shardings, self.batch_sharding),
                                 out_shardings=acc_shardings)
        self.version = 0
        self.skipped_steps = 0  # optimizer steps refused for a non-finite gradient
        self.skipped_empty = 0  # updates not dispatched: no token carried any loss

    # Counters that a checkpoint carries (checkpoint.agent_state_of), so a resumed run reports what it would have.
    RESUMED_COUNTERS = ("skipped_steps", "skipped_empty")

    @property
    def checkpoint_params(self) -> Any:
        """What a checkpoint holds of the parameters: the adapters alone when the base is frozen (LoRA: the base
        comes back from `agents.<role>.checkpoint`), else all of them."""
        return trainable_part(self.params, self.trainable)[0]

    def load_checkpoint_params(self, params: Any) -> None:
        """The inverse of `checkpoint_params`: restored adapters join the frozen base already loaded."""
        self.params = join_trainable(params, trainable_part(self.params, self.trainable)[1])

    @property
    def compile_count(self) -> int:
        """Compilations of the update's most-compiled program: 1 once it has run, as long as shapes never change."""
        return max(f._cache_size() for f in (self._accumulate, self._apply, self._score, self._zero_acc))

    def pack(self, segments: Sequence[Segment]) -> PackedBatch:
        """Packs `segments` into this agent's micro-batch shape. Segments of weight 0 are dropped; with
        loss.skip_zero_advantage, those whose loss is exactly zero are left out too and only their denominator
        is kept (`PackedBatch.denominator_offset`), so the update is the same, computed on fewer tokens."""
        cfg = self.loss_config
        weighted = [s for s in segments if s.weight > 0]
        skip = [cfg.skip_zero_advantage and _has_zero_loss(s, cfg) for s in weighted]
        kept = [s for s, out in zip(weighted, skip) if not out]
        left_out = [s for s, out in zip(weighted, skip) if out]
        batch = pack(kept, self.row_len, cfg.micro_batch_size, self.pad_id)
        if left_out:
            batch.denominator_offset = float(aggregate_denominator(
                np.array([_loss_tokens(s) for s in left_out], np.float32),
                np.array([s.weight for s in left_out], np.float32), mode="token-mean" if cfg.objective == "sft"
                else cfg.agg, max_len=cfg.max_len_norm))
            batch.skipped_segments = len(left_out)
        return batch

    def dispatch(self, batch: PackedBatch) -> PendingUpdate:
        """Enqueues the update on the agent's devices and returns at once (metrics stay on device). A batch
        without a loss token is not dispatched at all (`skipped_empty`)."""
        if batch.row_len != self.row_len or batch.rows != self.loss_config.micro_batch_size:
            raise ValueError(f"{self.name}: batch micro-batches are [{batch.rows}, {batch.row_len}], the update is "
                             f"built for [{self.loss_config.micro_batch_size}, {self.row_len}]; pack with "
                             "AgentTrainer.pack")
        stats = batch.stats()
        if batch.num_loss_tokens == 0:
            return PendingUpdate([], stats)
        micro = [put_batch(m, self.batch_sharding) for m in batch.micro_batches()]
        if self.loss_config.tis_cap is not None:  # the trainer's own log-probs before this update
            micro = [{**m, "trainer_old_logp": self._score(self.params, m)} for m in micro]
        if self.ref_params is not None:
            micro = [{**m, "ref_logp": self._score(self.ref_params, m)} for m in micro]
        offset = jnp.float32(batch.denominator_offset)
        epochs = []
        for epoch in range(self.loss_config.ppo_epochs):
            if self.dropout_seed is not None:  # LoRA dropout: fresh masks per micro-batch, epoch and update
                micro = [{**m, "dropout_seed": self._dropout_seeds(epoch, i)} for i, m in enumerate(micro)]
            acc = self._zero_acc(self.params, micro[0])
            for m in micro:
                acc = self._accumulate(self.params, acc, m)
            self.params, self.opt_state, metrics = self._apply(self.params, self.opt_state, acc, offset)
            epochs.append(metrics)
        return PendingUpdate(epochs, stats)

    def _dropout_seeds(self, epoch: int, index: int) -> jax.Array:
        seed = np.random.SeedSequence([self.dropout_seed, self.version, epoch, index]).generate_state(1)[0]
        rows = np.full((self.loss_config.micro_batch_size,), seed % 2**31, np.int32)
        return put_batch({"seed": rows}, self.batch_sharding)["seed"]

    def collect(self, pending: PendingUpdate) -> dict[str, float]:
        """Waits for a dispatched update; returns its metrics as Python floats. Reports the first epoch (the
        on-policy figures: clip fractions, log-prob gap) and the last epoch's loss."""
        metrics = dict(pending.batch_stats)
        if not pending.epoch_metrics:
            self.skipped_empty += 1
            metrics.update(skipped_empty=1.0, skipped_empty_total=float(self.skipped_empty), num_tokens=0.0,
                           compile_count=self.compile_count, policy_version=self.version)
            return metrics
        epochs = jax.device_get(pending.epoch_metrics)
        metrics.update({k: float(v) for k, v in epochs[0].items()})
        metrics["loss_last_epoch"] = float(epochs[-1]["loss"])
        metrics["skipped_steps"] = float(sum(int(e["skipped_steps"]) for e in epochs))
        optimizer_steps = self.version * self.loss_config.ppo_epochs
        self.skipped_steps += int(metrics["skipped_steps"])
        self.version += 1
        metrics.update(learning_rate=float(self.schedule(optimizer_steps)), compile_count=self.compile_count,
                       policy_version=self.version, skipped_empty=0.0, skipped_empty_total=float(self.skipped_empty))
        return metrics

    def update(self, batch: PackedBatch) -> dict[str, float]:
        return self.collect(self.dispatch(batch))

