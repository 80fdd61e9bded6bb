"""The optimizer, the train state and the compiled update step, sharded over a ("data", "fsdp") mesh.

State (a pytree of arrays, what a checkpoint holds): step (int32), params (the trainable float32 master
weights), opt (optax state), ema (the parameters' exponential moving average, or None), key (the run's
base PRNG key data, uint32). The step is pure: state + batch -> new state + metrics (loss, grad_norm,
skipped), with the state donated; the randomness of update s is fold_in(key, s), so it depends on nothing
but the state. An update whose loss or gradient norm is not finite is not applied (metrics "skipped").

Sharding: parameters, EMA, optimizer moments and the frozen parameters are placed by
`sdjax.sharding.param_specs` (replicated, or split over "fsdp" along their largest divisible axis);
batches are split over both mesh axes. XLA inserts the all-gathers and reduce-scatters (FSDP).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sdjax import sharding
from sdjax.xla_options import compiler_options
from train.config import Optim
from train.objective import diffusion_loss, vae_loss


def learning_rate_schedule(config: Optim) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps, then constant or a cosine decay to 0 at `steps` (of a run
    config's `optim`)."""
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(config.steps, warmup + 1), 0.0)
    if warmup > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.constant_schedule(lr)


def make_optimizer(config: Optim) -> optax.GradientTransformation:
    """Global-norm clipping (unless max_grad_norm is 0), then AdamW with the learning-rate schedule."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    if config.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return adamw


def init_state(trainable, key_data, *, optimizer, ema: bool) -> dict[str, Any]:
    """The state at step 0 for float32 trainable parameters."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": trainable,
        "opt": optimizer.init(trainable),
        "ema": jax.tree.map(jnp.copy, trainable) if ema else None,
        "key": jnp.asarray(key_data, jnp.uint32),
    }


def shardings_of(tree, mesh) -> Any:
    """A NamedSharding per leaf by the parameter rule table (works for params and optimizer states)."""
    specs = sharding.param_specs(tree, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_shardings(batch, mesh) -> Any:
    """(accum, b, ...) arrays split over the mesh's batch axes along b."""
    return jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES)), batch)


def _ema_decay(decay: float, step: jax.Array) -> jax.Array:
    """diffusers' EMAModel warm-up: min(decay, (1 + step) / (10 + step))."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state, frozen, batch, *, setup, optimizer) -> tuple[dict, dict]:
    """One optimizer update from `batch` (arrays (grad_accum, b, ...)) -> (new state, metrics).

    Gradients of the summed weighted row losses are accumulated over the micro-batches (`lax.scan`) and
    divided by the number of counted rows, so the update is that of the mean loss over the whole
    effective batch, whatever the micro-batch split or the device count (each row's draws depend on the
    step and its row id only).
    """
    from train.model import assemble

    cfg = setup.config
    loss_fn = vae_loss if cfg.mode == "vae" else diffusion_loss
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])

    def summed_loss(trainable, micro, micro_key):
        params = assemble(setup, trainable, frozen)
        return loss_fn(setup, params, micro, micro_key)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, total, count = carry
        # every row's randomness comes from (step key, its row id), unique in the run: a row draws the same
        # noise and timestep whichever micro-batch it is in, so accumulation equals the large batch
        (loss_sum, n), g = grad_fn(state["params"], micro, key)
        grads = jax.tree.map(jnp.add, grads, g)
        return (grads, total + loss_sum, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, total, count), _ = jax.lax.scan(accumulate, init, batch)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    grad_norm = optax.tree.norm(grads)
    loss = total / count
    # an update from a non-finite loss or gradient is not applied (the parameters, optimizer moments and
    # EMA stay those of the last good step); the host decides whether to stop (Optim.nan_policy)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply_update(kept):
        updates, opt = optimizer.update(grads, kept["opt"], kept["params"])
        params = optax.apply_updates(kept["params"], updates)
        ema = kept["ema"]
        if ema is not None:
            d = _ema_decay(cfg.optim.ema_decay, state["step"])
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        return {"params": params, "opt": opt, "ema": ema}

    kept = {"params": state["params"], "opt": state["opt"], "ema": state["ema"]}
    updated = jax.lax.cond(finite, apply_update, lambda kept: kept, kept)
    new_state = {**state, **updated, "step": state["step"] + 1}
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~finite}
    return new_state, metrics


def compile_step(setup, optimizer, state_shardings, frozen_shardings, batch_example, mesh):
    """`train_step` jitted with explicit shardings and the state donated."""
    step = functools.partial(train_step, setup=setup, optimizer=optimizer)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        compiler_options=compiler_options(),
        in_shardings=(state_shardings, frozen_shardings, batch_shardings(batch_example, mesh)),
        out_shardings=(state_shardings, {"loss": replicated, "grad_norm": replicated, "skipped": replicated}),
        donate_argnums=(0,),
    )
