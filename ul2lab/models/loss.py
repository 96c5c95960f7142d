"""Token cross-entropy with t5x's z-loss, label smoothing and loss normalization.

Semantics follow t5x's `utils.compute_weighted_cross_entropy` and
`get_loss_normalizing_factor_and_weights` (basic cases), so t5x gin values for
`z_loss`, `label_smoothing` and `loss_normalizing_factor` mean the same here.
"""
from typing import Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

# t5x's named normalizing factors we support (its SpecialLossNormalizingFactor values)
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
NUM_TOTAL_TARGET_TOKENS = "NUM_TOTAL_TARGET_TOKENS"

LossNormalizingFactor = Union[None, float, int, str]


def cross_entropy_with_logits(logits, soft_targets, z_loss: float):
    """Per-token (loss incl. z-loss, z-loss); z-loss = z_loss * logsumexp(logits)^2 keeps logits near 0."""
    log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    loss = -jnp.sum(soft_targets * (logits - log_z), axis=-1)
    total_z_loss = z_loss * jnp.square(jnp.squeeze(log_z, -1))
    return loss + total_z_loss, total_z_loss


def compute_weighted_cross_entropy(logits, targets, weights=None, label_smoothing: float = 0.0,
                                   z_loss: float = 1e-4,
                                   loss_normalizing_factor: Optional[float] = None
                                   ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(summed loss, summed z-loss, weight sum) over [batch, length] targets.

    With label smoothing the target puts 1 - label_smoothing on the true token and
    spreads the rest over the others; the constant entropy of that target is
    subtracted so a perfect model still scores 0 (as t5x).
    """
    logits = logits.astype(jnp.float32)
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = (1.0 - confidence) / (vocab_size - 1)
    normalizing_constant = -(confidence * np.log(confidence)
                             + (vocab_size - 1) * low_confidence * np.log(low_confidence + 1e-20))
    soft_targets = jax.nn.one_hot(targets, vocab_size) * (confidence - low_confidence) + low_confidence
    total_loss, total_z_loss = cross_entropy_with_logits(logits, soft_targets, z_loss)
    total_loss = total_loss - normalizing_constant
    weight_sum = jnp.asarray(np.prod(targets.shape), jnp.float32)
    if weights is not None:
        weights = weights.astype(jnp.float32)
        total_loss = total_loss * weights
        total_z_loss = total_z_loss * weights
        weight_sum = jnp.sum(weights)
    if loss_normalizing_factor is not None:
        total_loss = total_loss / loss_normalizing_factor
        total_z_loss = total_z_loss / loss_normalizing_factor
    return jnp.sum(total_loss), jnp.sum(total_z_loss), weight_sum


def get_loss_normalizing_factor_and_weights(loss_normalizing_factor: LossNormalizingFactor,
                                            batch: Mapping[str, jax.Array]):
    """(numeric factor or None, loss weights) for a batch, as t5x resolves its named factors.

    None: losses are summed. A number: the sum is divided by it (T5's pretraining
    gin uses 233472 = 2048 sequences * 114 targets, a fixed per-step scale that does
    not depend on how full a packed batch is). NUM_REAL_TARGET_TOKENS:
    divide by the number of weighted target tokens. NUM_TOTAL_TARGET_TOKENS: by
    batch * target length.
    """
    weights = batch.get("decoder_loss_weights")
    if weights is None:
        weights = (batch["decoder_target_tokens"] > 0).astype(jnp.float32)
    if loss_normalizing_factor is None or not isinstance(loss_normalizing_factor, str):
        return loss_normalizing_factor, weights  # a number (or an array: a factor already measured)
    name = str(loss_normalizing_factor).upper()
    if name == NUM_REAL_TARGET_TOKENS:
        return jnp.sum(weights.astype(jnp.float32)), weights
    if name == NUM_TOTAL_TARGET_TOKENS:
        return float(np.prod(batch["decoder_target_tokens"].shape)), weights
    raise ValueError(f"loss_normalizing_factor {loss_normalizing_factor!r} is not supported; use None, "
                     f"a number, {NUM_REAL_TARGET_TOKENS!r} or {NUM_TOTAL_TARGET_TOKENS!r}")


def loss_fn(logits, batch: Mapping[str, jax.Array], z_loss: float = 1e-4, label_smoothing: float = 0.0,
            loss_normalizing_factor: LossNormalizingFactor = None) -> dict:
    """The loss of a batch, as t5x's EncoderDecoderModel.loss_fn; training, evaluation and tests all use it.

    Returns sums over the batch: {"loss" (incl. z-loss, divided by the normalizing factor),
    "z_loss", "correct" (weighted argmax hits), "weights" (weighted target tokens)}. The factor is
    a t5x name, a number, or an array already measured on a larger batch (microbatching).
    """
    factor, weights = get_loss_normalizing_factor_and_weights(loss_normalizing_factor, batch)
    targets = batch["decoder_target_tokens"]
    loss, total_z_loss, weight_sum = compute_weighted_cross_entropy(
        logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss, loss_normalizing_factor=factor)
    correct, _ = compute_weighted_accuracy(logits, targets, weights)
    return {"loss": loss, "z_loss": total_z_loss, "correct": correct, "weights": weight_sum}


def compute_weighted_accuracy(logits, targets, weights=None) -> Tuple[jax.Array, jax.Array]:
    """(number of weighted tokens whose argmax is the target, weight sum)."""
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    if weights is None:
        return jnp.sum(correct), jnp.asarray(np.prod(targets.shape), jnp.float32)
    weights = weights.astype(jnp.float32)
    return jnp.sum(correct * weights), jnp.sum(weights)
