"""scan_layers=True: one scanned layer body with params stacked on a 'layers' axis gives the same
logits, gradients and greedy decodes as the unrolled network with the same weights; remat still
applies inside the scan; Hugging Face export/import and checkpoints convert between the layouts."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from ul2lab.train import checkpoints, partitioning
from ul2lab.interop import hf
from ul2lab.models.decoding import beam_search_predict
from ul2lab.cli.main import main
from ul2lab.models import loss as loss_lib
from ul2lab.models import network
from ul2lab.models.config import preset
from ul2lab.models.decoding import greedy_decode

CONFIG = preset("tiny", num_encoder_layers=2, num_decoder_layers=3)  # different depths per stack
SCANNED = CONFIG.replace(scan_layers=True)


@pytest.fixture(scope="module")
def params():
    return network.init_params(CONFIG, jax.random.PRNGKey(0), input_length=4, target_length=4)


def packed_inputs():
    rng = np.random.default_rng(0)
    enc = rng.integers(2, CONFIG.vocab_size, (2, 12)).astype(np.int32)
    dec = rng.integers(2, CONFIG.vocab_size, (2, 7)).astype(np.int32)
    enc[1, 9:] = 0
    dec[1, 5:] = 0
    enc_seg = np.where(enc > 0, 1 + (np.arange(12) >= 5), 0).astype(np.int32)
    dec_seg = np.where(dec > 0, 1 + (np.arange(7) >= 3), 0).astype(np.int32)
    return dict(encoder_input_tokens=enc, decoder_input_tokens=np.concatenate([np.zeros((2, 1), np.int32),
                                                                                 dec[:, :-1]], 1),
                decoder_target_tokens=dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)


def test_scanned_params_are_the_unrolled_ones_stacked(params):
    scanned = network.abstract_params(SCANNED)  # the tree init_params(SCANNED) builds
    stacked = network.stack_layers(params)
    shapes = functools.partial(jax.tree_util.tree_map, jnp.shape)
    assert shapes(nn.meta.unbox(scanned)) == shapes(stacked)
    assert stacked["decoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (3, 128, 64)
    roundtrip = network.unstack_layers(stacked)
    flat, back = traverse_util.flatten_dict(params), traverse_util.flatten_dict(roundtrip)
    assert set(flat) == set(back)
    for key in flat:
        np.testing.assert_array_equal(flat[key], back[key])
    with pytest.raises(ValueError, match="already stacked"):
        network.stack_layers(stacked)
    with pytest.raises(ValueError, match="already unrolled"):
        network.unstack_layers(params)


def test_logits_and_gradients_equal_the_unrolled_network(params):
    batch = packed_inputs()
    stacked = network.stack_layers(params)

    def loss(config, p):
        logits = network.Transformer(config).apply({"params": p}, **batch)
        weights = (batch["decoder_target_tokens"] > 0).astype(jnp.float32)
        targets = batch["decoder_target_tokens"]
        return loss_lib.compute_weighted_cross_entropy(logits, targets, weights)[0], logits

    loss_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)
    (l1, logits1), g1 = loss_and_grad(CONFIG, params)
    # with a remat policy inside the scan: recomputation must not change the numbers either
    remat = SCANNED.replace(remat_policy="dots_with_no_batch_dims_saveable")
    (l2, logits2), g2 = loss_and_grad(remat, stacked)
    np.testing.assert_allclose(logits2, logits1, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    flat1 = traverse_util.flatten_dict(g1)
    flat2 = traverse_util.flatten_dict(network.unstack_layers(g2))
    assert set(flat1) == set(flat2)
    for key in flat1:
        np.testing.assert_allclose(flat2[key], flat1[key], atol=1e-5, rtol=1e-4, err_msg="/".join(key))


def test_remat_runs_inside_the_scan(params):
    batch = packed_inputs()
    stacked = network.stack_layers(params)
    config = SCANNED.replace(remat_policy="dots_with_no_batch_dims_saveable")
    grad = jax.grad(lambda p: network.Transformer(config).apply({"params": p}, **batch).sum())
    jaxpr = str(jax.make_jaxpr(grad)(stacked))
    assert jaxpr.count("scan[") >= 4  # encoder and decoder, forward and backward
    # the checkpointed layer body sits inside the scans' bodies (one per stack), not around them
    assert jaxpr.count("remat") >= 2 and jaxpr.index("scan[") < jaxpr.index("remat")
    no_remat = str(jax.make_jaxpr(jax.grad(
        lambda p: network.Transformer(SCANNED).apply({"params": p}, **batch).sum()))(stacked))
    assert "remat" not in no_remat


def test_layers_axis_is_replicated_by_the_rules():
    boxed = network.abstract_params(SCANNED)
    specs = partitioning.params_logical_specs(boxed)
    assert specs["encoder"]["layers"]["attention"]["query"]["kernel"] == P("layers", "embed", "heads", "kv")
    mesh = partitioning.create_mesh(data=2, model=4)
    shardings = partitioning.params_shardings(boxed, mesh, partitioning.standard_logical_axis_rules())
    assert shardings["encoder"]["layers"]["attention"]["query"]["kernel"].spec == P(None, None, "model", None)
    assert shardings["decoder"]["layers"]["mlp"]["wo"]["kernel"].spec == P(None, "model", None)


def test_greedy_and_beam_search_with_scanned_cache_equal_unrolled(params):
    tokens = jnp.asarray(packed_inputs()["encoder_input_tokens"])
    stacked = network.stack_layers(params)
    unrolled = greedy_decode(params, CONFIG, tokens, max_decode_length=6)
    np.testing.assert_array_equal(greedy_decode(stacked, SCANNED, tokens, max_decode_length=6), unrolled)
    # beam search reorders cache rows (axis 0): the scanned cache is stored batch-first for it
    beams, scores, _ = beam_search_predict(params, CONFIG, tokens, 6, beam_size=3)
    beams_scanned, scores_scanned, _ = beam_search_predict(stacked, SCANNED, tokens, 6, beam_size=3)
    np.testing.assert_array_equal(beams_scanned, beams)
    np.testing.assert_allclose(scores_scanned, scores, rtol=1e-5)


def test_scanned_checkpoint_exports_to_hf_and_imports_back_stacked(params, tmp_path):
    stacked = jax.tree_util.tree_map(np.asarray, network.stack_layers(params))
    checkpoints.save_params(str(tmp_path / "ckpt"), stacked, SCANNED)
    assert main(["export-hf", "--checkpoint_dir", str(tmp_path / "ckpt"),
                 "--output_dir", str(tmp_path / "hf")]) == 0
    config, imported = hf.load(str(tmp_path / "hf"))
    assert not config.scan_layers and "layers_2" in imported["decoder"]
    flat, back = traverse_util.flatten_dict(params), traverse_util.flatten_dict(imported)
    assert set(flat) == set(back)
    for key in flat:
        np.testing.assert_array_equal(back[key], np.asarray(flat[key]))
    config, restacked = hf.load(str(tmp_path / "hf"), scan_layers=True)
    assert config == SCANNED
    for a, b in zip(jax.tree_util.tree_leaves(restacked), jax.tree_util.tree_leaves(stacked)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_adafactor_updates_each_scanned_layer_as_its_own_tensor(params):
    """t5x's Adafactor factors, clips and scales by the parameter's RMS per tensor, and unrolled
    layers are separate tensors: a few steps of scanned training match the unrolled run's."""
    import optax
    from test_train_step import packed_batch

    from ul2lab.train import optimizers
    from ul2lab.train import step as train_step_lib

    batch = packed_batch(0, batch_size=4, length=16)

    def train(config, p, optimizer, steps=4):
        step_fn = jax.jit(train_step_lib.make_train_step(network.Transformer(config), optimizer,
                                                         lambda step: 0.05, z_loss=0.0))
        state = train_step_lib.init_state(config, optimizer, 0, p)
        losses = []
        for _ in range(steps):
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
        return losses, state.params

    # factor the tiny model's 64 x 128 matrices too, as t5x does for real widths
    adafactor = optimizers.make_optimizer("adafactor", 0.05, min_dim_size_to_factor=32)
    unrolled, unrolled_params = train(CONFIG.replace(dropout_rate=0.0), params, adafactor)
    scanned, scanned_params = train(SCANNED.replace(dropout_rate=0.0), network.stack_layers(params), adafactor)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-6)
    assert unrolled[-1] < unrolled[0] - 0.1  # it trained (on the same batch)
    flat1 = traverse_util.flatten_dict(unrolled_params)
    flat2 = traverse_util.flatten_dict(network.unstack_layers(scanned_params))
    for key in flat1:
        np.testing.assert_allclose(flat2[key], flat1[key], atol=1e-5, rtol=1e-5, err_msg="/".join(key))
    # the same optimizer applied to each stack as one tensor trains differently (what t5x's
    # Adafactor would do to stacked params): this test can tell
    whole_stack = optax.adafactor(0.05, decay_rate=0.8, min_dim_size_to_factor=32, eps=1e-30)
    stacked, _ = train(SCANNED.replace(dropout_rate=0.0), network.stack_layers(params), whole_stack)
    assert np.max(np.abs(np.asarray(stacked) - unrolled)) > 1e-4
