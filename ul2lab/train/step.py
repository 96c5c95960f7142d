"""One optimizer step of an encoder-decoder: loss, gradients (optionally over microbatches), update.

Imports only jax/flax/optax. The trainer (ul2lab.train.loop) builds the jitted step once with
`build_train_step` and calls it on global (sharded) batches; the state is donated so parameters and optimizer
moments are updated in place.

Loss normalization follows t5x (ul2lab.models.loss): the summed token cross entropy (plus
z-loss) is divided by `loss_normalizing_factor`, a number, None (plain sum), or one of the t5x
names "NUM_REAL_TARGET_TOKENS" (the default here: a per-token mean) and "NUM_TOTAL_TARGET_TOKENS".
The factor is measured on the whole batch before it is split into microbatches, so the
accumulated gradient equals the full-batch gradient, not an average of per-microbatch means.
"""
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ul2lab.models import loss as loss_lib
from ul2lab.models import network
from ul2lab.models.config import T5Config

INPUT_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                  "encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. Params and optimizer state are float32 whatever the compute dtype."""
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any              # unboxed parameter tree
    opt_state: Any
    rng: jax.Array           # raw uint32 key data; dropout key of step s is fold_in(rng, s)
    # consecutive steps whose loss or gradients were non-finite (their updates were skipped); the
    # host reads it only when it logs or saves, so there is no device->host sync per step
    nonfinite_streak: jax.Array = None


def init_state(config: T5Config, optimizer: optax.GradientTransformation, seed: int,
               params: Any = None) -> TrainState:
    """A fresh state (params random unless given); jit it with out_shardings to build it sharded."""
    params_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    if params is None:
        params = network.init_params(config, params_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=dropout_rng,
                      nonfinite_streak=jnp.zeros((), jnp.int32))


def make_loss_fn(model: nn.Module, z_loss: float, label_smoothing: float):
    """loss_fn(params, batch, factor, dropout_rng) -> (loss, sums) for one (micro)batch: the model's
    logits through ul2lab.models.loss.loss_fn, the one loss of training, evaluation and tests."""

    def loss_fn(params, batch, factor, dropout_rng):
        inputs = {k: batch[k] for k in INPUT_FEATURES if k in batch}
        logits = model.apply({"params": params}, **inputs, enable_dropout=dropout_rng is not None,
                             rngs=None if dropout_rng is None else {"dropout": dropout_rng})
        sums = loss_lib.loss_fn(logits, batch, z_loss=z_loss, label_smoothing=label_smoothing,
                                loss_normalizing_factor=factor)
        return sums["loss"], sums

    return loss_fn


def loss_and_grads(loss_fn, params, batch, factor, dropout_rng, num_microbatches: int):
    """Summed loss pieces and gradients, over the whole batch or accumulated over microbatches."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if num_microbatches <= 1:
        return grad_fn(params, batch, factor, dropout_rng)[::-1]
    batch_size = batch["decoder_target_tokens"].shape[0]
    if batch_size % num_microbatches:
        raise ValueError(f"batch size {batch_size} is not divisible by num_microbatches {num_microbatches}")
    # (B, ...) -> (M, B/M, ...) with microbatch i = rows i, i+M, i+2M, ...: strided, so each
    # microbatch keeps rows on every data-parallel shard and no rows move between devices
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape((batch_size // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(carry, inputs):
        index, microbatch = inputs
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        grads, sums = grad_fn(params, microbatch, factor, rng)
        return jax.tree_util.tree_map(jnp.add, carry, (sums, grads)), None

    zeros = (jax.eval_shape(lambda: loss_fn(params, jax.tree_util.tree_map(lambda x: x[0], micro),
                                            factor, dropout_rng)[1]),
             params)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), zeros)
    (sums, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_microbatches), micro))
    return sums, grads


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    learning_rate: Callable[[jax.Array], jax.Array], *,
                    num_microbatches: int = 1, z_loss: float = 1e-4, label_smoothing: float = 0.0,
                    loss_normalizing_factor: loss_lib.LossNormalizingFactor = "NUM_REAL_TARGET_TOKENS",
                    use_dropout: Optional[bool] = None, max_consecutive_nonfinite: Optional[int] = None):
    """train_step(state, batch) -> (state, metrics), not yet jitted (see `jit_train_step`).

    A step whose loss or gradient norm is not finite leaves params and optimizer state unchanged
    (metrics["skipped_updates"] = 1) but still advances the step and the data. Once
    `max_consecutive_nonfinite` such steps come in a row, every later step is skipped too, so the
    state stays the last good one until the host notices (state.nonfinite_streak) and stops.
    """
    loss_fn = make_loss_fn(model, z_loss, label_smoothing)
    use_dropout = model.config.dropout_rate > 0 if use_dropout is None else use_dropout

    def train_step(state: TrainState, batch: dict):
        dropout_rng = jax.random.fold_in(state.rng, state.step) if use_dropout else None
        # measured on the whole batch, so microbatches add up to exactly the full-batch loss
        factor, _ = loss_lib.get_loss_normalizing_factor_and_weights(loss_normalizing_factor, batch)
        sums, grads = loss_and_grads(loss_fn, state.params, batch, factor, dropout_rng, num_microbatches)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        # a finite gradient can still give a non-finite update (a NaN learning rate, an optimizer's 0/0)
        apply = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        streak = state.nonfinite_streak
        if streak is None:  # a state made before the field existed
            streak = jnp.zeros((), jnp.int32)
        if max_consecutive_nonfinite is not None:
            apply &= streak < max_consecutive_nonfinite
        # select, not lax.cond: the update is computed anyway, and where keeps buffers donated in place
        params, opt_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(apply, new, old), (params, opt_state), (state.params, state.opt_state))
        streak = jnp.where(apply, 0, streak + 1).astype(jnp.int32)
        metrics = {"loss": sums["loss"], "z_loss": sums["z_loss"],
                   "accuracy": sums["correct"] / jnp.maximum(sums["weights"], 1.0),
                   "target_tokens": sums["weights"],
                   "grad_norm": grad_norm,
                   "skipped_updates": 1.0 - apply.astype(jnp.float32),
                   "learning_rate": learning_rate(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             nonfinite_streak=streak), metrics

    return train_step


def jit_train_step(train_step, state_shardings, batch_shardings):
    """The step jitted with explicit shardings; the old state is donated (its buffers reused)."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def build_train_step(model_config: T5Config, optimizer: optax.GradientTransformation,
                     learning_rate: Callable[[jax.Array], jax.Array], state_shardings, batch_shardings,
                     **loss_options):
    """The trainer's jitted step for a model config: `make_train_step` (loss_options are its
    keyword arguments: num_microbatches, z_loss, ...) jitted by `jit_train_step`."""
    return jit_train_step(make_train_step(network.Transformer(model_config), optimizer, learning_rate,
                                          **loss_options), state_shardings, batch_shardings)


def make_eval_step(model: nn.Module, z_loss: float = 0.0, label_smoothing: float = 0.0):
    """eval_step(params, batch) -> sums over the batch {"loss" (token cross entropy + z-loss, summed),
    "z_loss", "correct", "weights"}, no dropout: summed over any number of batches and divided by
    "weights", they give the validation loss and token accuracy of t5x's training_eval."""
    loss_fn = make_loss_fn(model, z_loss=z_loss, label_smoothing=label_smoothing)

    def eval_step(params, batch):
        _, sums = loss_fn(params, batch, None, None)  # factor None: summed, normalized by the caller
        return sums

    return eval_step
