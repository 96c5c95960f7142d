"""The train step: a tiny T5 overfits a fixed batch; 4 microbatches give the full batch's step."""
import jax
import numpy as np
import optax
import pytest

from ul2lab.train import step as ts
from ul2lab.models import network
from ul2lab.models.config import preset

CONFIG = preset("tiny")


def packed_batch(seed: int, batch_size: int = 8, length: int = 32) -> dict:
    """A packed batch as seqio's EncDecFeatureConverter lays it out: two examples per row (segment
    ids 1, 2), padding 0, and rows of different fill so microbatches hold different token counts."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((batch_size, length), np.int32) for k in (
        "encoder_input_tokens", "encoder_segment_ids", "encoder_positions", "decoder_input_tokens",
        "decoder_target_tokens", "decoder_segment_ids", "decoder_positions", "decoder_loss_weights")}
    for row in range(batch_size):
        for prefix in ("encoder", "decoder"):
            first = int(rng.integers(4, length // 2))
            second = int(rng.integers(2, length - first - 2 * (row % 4)))
            start = 0
            for segment, n in ((1, first), (2, second)):
                span = slice(start, start + n)
                tokens = rng.integers(2, CONFIG.vocab_size, n)
                batch[f"{prefix}_segment_ids"][row, span] = segment
                batch[f"{prefix}_positions"][row, span] = np.arange(n)
                if prefix == "encoder":
                    batch["encoder_input_tokens"][row, span] = tokens
                else:
                    batch["decoder_target_tokens"][row, span] = tokens
                    batch["decoder_input_tokens"][row, span] = np.concatenate([[0], tokens[:-1]])
                    batch["decoder_loss_weights"][row, span] = 1
                start += n
    return batch


@pytest.fixture(scope="module")
def model():
    return network.Transformer(CONFIG)


@pytest.fixture(scope="module")
def params():
    return jax.jit(lambda: network.init_params(CONFIG, jax.random.PRNGKey(0)))()


def test_tiny_model_overfits_a_fixed_batch(model, params):
    optimizer = optax.adamw(3e-3)
    state = ts.init_state(CONFIG, optimizer, seed=0, params=params)
    step = jax.jit(ts.make_train_step(model, optimizer, lambda s: 3e-3))
    batch = packed_batch(0)
    losses = []
    for _ in range(80):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 4.0  # about ln(512) at random init
    assert losses[-1] < 0.1, losses[::10]
    assert float(metrics["accuracy"]) > 0.99
    assert int(state.step) == 80
    assert float(metrics["target_tokens"]) == batch["decoder_loss_weights"].sum()


def test_four_microbatches_equal_the_full_batch(model, params):
    batch = packed_batch(1)
    per_micro = batch["decoder_loss_weights"].reshape(-1, 4, batch["decoder_loss_weights"].shape[1]).sum((0, 2))
    assert len(set(per_micro.tolist())) > 1  # a mean of per-microbatch means would differ
    # plain SGD: the parameter change is the gradient itself, so any accumulation error shows
    optimizer = optax.sgd(1.0)
    state = ts.init_state(CONFIG, optimizer, seed=0, params=params)
    results = {}
    for microbatches in (1, 4):
        step = jax.jit(ts.make_train_step(model, optimizer, lambda s: 1.0, num_microbatches=microbatches,
                                          z_loss=1e-4, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS"))
        results[microbatches] = jax.device_get(step(state, batch))
    (full_state, full), (micro_state, micro) = results[1], results[4]
    for name in ("loss", "z_loss", "accuracy", "grad_norm", "target_tokens"):
        np.testing.assert_allclose(micro[name], full[name], rtol=2e-5, err_msg=name)
    delta = lambda s: jax.tree_util.tree_map(lambda a, b: a - b, s.params, state.params)  # noqa: E731
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                           delta(micro_state), delta(full_state))
    assert float(full["grad_norm"]) > 0.1


def test_batch_not_divisible_by_microbatches_is_refused(model):
    optimizer = optax.sgd(1.0)
    state = jax.eval_shape(lambda: ts.init_state(CONFIG, optimizer, seed=0))
    step = ts.make_train_step(model, optimizer, lambda s: 1.0, num_microbatches=3)
    with pytest.raises(ValueError, match="not divisible by num_microbatches 3"):
        jax.eval_shape(step, state, packed_batch(2))
