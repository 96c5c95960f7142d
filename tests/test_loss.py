"""Loss against an independent float64 numpy reference of t5x's definitions."""
import jax.numpy as jnp
import numpy as np
import pytest

from ul2lab.models.loss import (compute_weighted_accuracy, compute_weighted_cross_entropy,
                                get_loss_normalizing_factor_and_weights, loss_fn)

BATCH, LENGTH, VOCAB = 3, 5, 11


def reference(logits, targets, weights, label_smoothing, z_loss):
    """Per-token (loss, z-loss) written from the math, in float64."""
    logits = logits.astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    log_probs = logits - log_z[..., None]
    on = 1.0 - label_smoothing
    off = label_smoothing / (VOCAB - 1)
    target_dist = np.full(logits.shape, off)
    np.put_along_axis(target_dist, targets[..., None], on, axis=-1)
    # the smallest achievable cross-entropy (the target's own entropy) is subtracted
    entropy = -(on * np.log(on) + ((VOCAB - 1) * off * np.log(off) if off > 0 else 0.0))
    z = z_loss * log_z ** 2
    loss = -(target_dist * log_probs).sum(-1) - entropy + z
    return loss * weights, z * weights


@pytest.fixture
def batch():
    rng = np.random.RandomState(0)
    logits = rng.normal(0, 3, (BATCH, LENGTH, VOCAB)).astype(np.float32)
    targets = rng.randint(1, VOCAB, (BATCH, LENGTH))
    targets[2, 3:] = 0  # padding
    weights = (targets > 0).astype(np.float32)
    weights[0, 0] = 0.5  # loss weights need not be 0/1
    return logits, targets, weights


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 0.1])
def test_weighted_cross_entropy_matches_reference(batch, label_smoothing, z_loss):
    logits, targets, weights = batch
    loss, total_z, weight_sum = compute_weighted_cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), label_smoothing=label_smoothing,
        z_loss=z_loss)
    ref_loss, ref_z = reference(logits, targets, weights, label_smoothing, z_loss)
    np.testing.assert_allclose(loss, ref_loss.sum(), rtol=1e-5)
    np.testing.assert_allclose(total_z, ref_z.sum(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(weight_sum, weights.sum())


def test_perfect_prediction_scores_zero_with_label_smoothing():
    # logits equal to log of the smoothed target: cross-entropy equals its entropy, so 0 after the constant
    targets = np.array([[3, 7]])
    smooth = np.full((1, 2, VOCAB), 0.1 / (VOCAB - 1))
    np.put_along_axis(smooth, targets[..., None], 0.9, axis=-1)
    loss, _, _ = compute_weighted_cross_entropy(jnp.log(jnp.asarray(smooth, jnp.float32)), jnp.asarray(targets),
                                                label_smoothing=0.1, z_loss=0.0)
    assert abs(float(loss)) < 1e-5


def test_loss_normalizing_factor_semantics(batch):
    logits, targets, weights = batch
    ref_loss, ref_z = reference(logits, targets, weights, 0.0, 1e-4)
    features = {"decoder_target_tokens": jnp.asarray(targets), "decoder_loss_weights": jnp.asarray(weights)}
    for factor, divisor in [(None, 1.0), (233472.0, 233472.0), ("NUM_REAL_TARGET_TOKENS", weights.sum()),
                            ("num_total_target_tokens", BATCH * LENGTH)]:
        sums = loss_fn(jnp.asarray(logits), features, z_loss=1e-4, loss_normalizing_factor=factor)
        loss, z, weight_sum = sums["loss"], sums["z_loss"], sums["weights"]
        np.testing.assert_allclose(sums["correct"], ((logits.argmax(-1) == targets) * weights).sum())
        np.testing.assert_allclose(loss, ref_loss.sum() / divisor, rtol=1e-5)
        np.testing.assert_allclose(z, ref_z.sum() / divisor, rtol=1e-5)
        np.testing.assert_allclose(weight_sum, weights.sum())
    # without decoder_loss_weights every non-padding target counts once
    _, default_weights = get_loss_normalizing_factor_and_weights(None, {"decoder_target_tokens": targets})
    np.testing.assert_array_equal(default_weights, targets > 0)
    with pytest.raises(ValueError, match="AVERAGE_PER_SEQUENCE_TYPO"):
        loss_fn(jnp.asarray(logits), features, loss_normalizing_factor="AVERAGE_PER_SEQUENCE_TYPO")


def test_weighted_accuracy(batch):
    logits, targets, weights = batch
    targets = targets.copy()
    targets[0, :3] = logits[0, :3].argmax(-1)  # at least some correct
    correct, weight_sum = compute_weighted_accuracy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(correct, ((logits.argmax(-1) == targets) * weights).sum(), rtol=1e-6)
    np.testing.assert_allclose(weight_sum, weights.sum())
    assert float(correct) >= 2.5
