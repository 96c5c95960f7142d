"""The T5 network: t5x parameter names, packing, padding, dropout, dtypes, attention paths."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from ul2lab.models.config import T5Config
from ul2lab.models.network import Transformer, abstract_params, init_params
from ul2lab.models import layers
from ul2lab.train.partitioning import params_logical_specs

VOCAB, EMB, HEADS, KV, MLP = 64, 32, 4, 8, 48


def tiny(**overrides) -> T5Config:
    # one layer per stack keeps XLA compiles short; depth is covered by the tree tests
    fields = dict(vocab_size=VOCAB, emb_dim=EMB, num_heads=HEADS, num_encoder_layers=1,
                  num_decoder_layers=1, head_dim=KV, mlp_dim=MLP, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16, dtype="float32")
    fields.update(overrides)
    return T5Config(**fields)


def expected_tree(cfg: T5Config) -> dict:
    """path -> (shape, logical axes), written out from t5x's network.py naming."""
    qkv = ((EMB, HEADS, KV), ("embed", "heads", "kv"))
    out = ((HEADS, KV, EMB), ("heads", "kv", "embed"))
    scale = ((EMB,), ("embed",))
    wi_names = ["wi"] if len(cfg.mlp_activations) == 1 else [f"wi_{i}" for i in range(len(cfg.mlp_activations))]
    tree = {"token_embedder/embedding": ((VOCAB, EMB), ("vocab", "embed")),
            "encoder/relpos_bias/rel_embedding": ((HEADS, 8), ("heads", "relpos_buckets")),
            "decoder/relpos_bias/rel_embedding": ((HEADS, 8), ("heads", "relpos_buckets")),
            "encoder/encoder_norm/scale": scale}

    def attention(prefix):
        for part in ("query", "key", "value"):
            tree[f"{prefix}/{part}/kernel"] = qkv
        tree[f"{prefix}/out/kernel"] = out

    def mlp(prefix):
        for name in wi_names:
            tree[f"{prefix}/mlp/{name}/kernel"] = ((EMB, MLP), ("embed", "mlp"))
        tree[f"{prefix}/mlp/wo/kernel"] = ((MLP, EMB), ("mlp", "embed"))

    for i in range(cfg.num_encoder_layers):
        p = f"encoder/layers_{i}"
        tree[f"{p}/pre_attention_layer_norm/scale"] = scale
        tree[f"{p}/pre_mlp_layer_norm/scale"] = scale
        attention(f"{p}/attention")
        mlp(p)
    for i in range(cfg.num_decoder_layers):
        p = f"decoder/layers_{i}"
        for norm in ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm", "pre_mlp_layer_norm"):
            tree[f"{p}/{norm}/scale"] = scale
        attention(f"{p}/self_attention")
        attention(f"{p}/encoder_decoder_attention")
        mlp(p)
    if cfg.decoder_norm_use_scale:
        tree["decoder/decoder_norm/scale"] = scale
    if not cfg.logits_via_embedding:
        tree["decoder/logits_dense/kernel"] = ((EMB, VOCAB), ("embed", "vocab"))
    return tree


@pytest.mark.parametrize("overrides", [
    dict(num_encoder_layers=2, num_decoder_layers=2),                  # T5.1.1 gated-gelu, untied
    dict(mlp_activations=("silu", "linear"), logits_via_embedding=True),  # UL2 MLP, tied head
    dict(mlp_activations=("relu",), num_encoder_layers=3, num_decoder_layers=1),  # T5 1.0, unequal depth
    dict(mlp_activations=("silu", "linear"), decoder_norm_use_scale=False),   # UL2-20B decoder norm
])
def test_parameter_tree_matches_t5x_names_shapes_and_axes(overrides):
    cfg = tiny(**overrides)
    boxed = abstract_params(cfg)
    shapes = {k: (tuple(v.shape), v.dtype)
              for k, v in traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/").items()}
    axes = {k: tuple(v) for k, v in traverse_util.flatten_dict(
        params_logical_specs(boxed), sep="/").items()}
    expected = expected_tree(cfg)
    assert sorted(shapes) == sorted(expected)
    for path, (shape, logical) in expected.items():
        assert shapes[path] == (shape, jnp.float32), path
        assert axes[path] == logical, path


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
    # jit: eager op-by-op dispatch of a whole transformer is many times slower on CPU
    return jax.jit(Transformer(cfg).apply, static_argnames=("enable_dropout",))


def apply(cfg, params, enc, dec_in, dec_tgt, **kw):
    return np.asarray(_jitted_apply(cfg)({"params": params}, enc, dec_in, dec_tgt, **kw))


@pytest.fixture(scope="module")
def model():
    cfg = tiny()
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def shift_right(targets):
    return np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


def test_packed_examples_equal_separate_examples(model):
    cfg, params = model
    rng = np.random.RandomState(0)
    enc_a, enc_b = rng.randint(2, VOCAB, (1, 5)), rng.randint(2, VOCAB, (1, 6))
    tgt_a, tgt_b = rng.randint(2, VOCAB, (1, 4)), rng.randint(2, VOCAB, (1, 3))
    logits_a = apply(cfg, params, enc_a, shift_right(tgt_a), tgt_a)
    logits_b = apply(cfg, params, enc_b, shift_right(tgt_b), tgt_b)

    pad = lambda x, n: np.pad(x, ((0, 0), (0, n)))
    enc = pad(np.concatenate([enc_a, enc_b], 1), 2)
    tgt = pad(np.concatenate([tgt_a, tgt_b], 1), 2)
    dec_in = pad(np.concatenate([shift_right(tgt_a), shift_right(tgt_b)], 1), 2)
    enc_seg = pad(np.array([[1] * 5 + [2] * 6]), 2)
    dec_seg = pad(np.array([[1] * 4 + [2] * 3]), 2)
    enc_pos = pad(np.array([list(range(5)) + list(range(6))]), 2)
    dec_pos = pad(np.array([list(range(4)) + list(range(3))]), 2)
    packed = apply(cfg, params, enc, dec_in, tgt, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg,
                   encoder_positions=enc_pos, decoder_positions=dec_pos)
    np.testing.assert_allclose(packed[0, :4], logits_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 4:7], logits_b[0], atol=1e-5)


def test_padding_does_not_change_real_logits(model):
    cfg, params = model
    rng = np.random.RandomState(1)
    enc, tgt = rng.randint(2, VOCAB, (1, 7)), rng.randint(2, VOCAB, (1, 5))
    ref = apply(cfg, params, enc, shift_right(tgt), tgt)
    enc_p, tgt_p = np.pad(enc, ((0, 0), (0, 4))), np.pad(tgt, ((0, 0), (0, 3)))
    padded = apply(cfg, params, enc_p, shift_right(tgt_p), tgt_p)
    np.testing.assert_allclose(padded[:, :5], ref, atol=1e-5)
    # and padding really is masked: the same extra positions filled with tokens change the logits
    enc_f = enc_p.copy()
    enc_f[:, 7:] = 5
    assert np.abs(apply(cfg, params, enc_f, shift_right(tgt_p), tgt_p)[:, :5] - ref).max() > 1e-3


def test_dropout_changes_outputs_and_is_deterministic_given_rng(model):
    cfg, params = model
    cfg = cfg.replace(dropout_rate=0.3)
    rng = np.random.RandomState(2)
    enc, tgt = rng.randint(2, VOCAB, (2, 6)), rng.randint(2, VOCAB, (2, 5))
    run = lambda **kw: apply(cfg, params, enc, shift_right(tgt), tgt, **kw)
    off = run()
    np.testing.assert_array_equal(off, run())
    on_1 = run(enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(on_1, run(enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(1)}))
    assert np.abs(on_1 - off).max() > 1e-3
    assert np.abs(on_1 - run(enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(2)})).max() > 1e-3


def test_bfloat16_compute_with_float32_params(model):
    cfg, params = model
    rng = np.random.RandomState(3)
    enc, tgt = rng.randint(2, VOCAB, (2, 6)), rng.randint(2, VOCAB, (2, 5))
    ref = apply(cfg, params, enc, shift_right(tgt), tgt)
    bf16 = apply(cfg.replace(dtype="bfloat16"), params, enc, shift_right(tgt), tgt)
    assert bf16.dtype == np.float32  # logits handed to the loss in float32
    diff = np.abs(bf16 - ref).max()
    assert 0 < diff < 0.05 * np.abs(ref).max(), diff  # really computed in bf16, still the same model


def test_fused_attention_path_equals_einsum_path(model, monkeypatch):
    cfg, params = model
    rng = np.random.RandomState(4)
    enc, tgt = rng.randint(2, VOCAB, (2, 9)), rng.randint(2, VOCAB, (2, 6))
    enc[1, 6:], tgt[1, 4:] = 0, 0
    segs = dict(encoder_segment_ids=np.array([[1] * 4 + [2] * 5, [1] * 6 + [0] * 3]),
                decoder_segment_ids=np.array([[1] * 3 + [2] * 3, [1] * 4 + [0] * 2]))
    ref = apply(cfg, params, enc, shift_right(tgt), tgt, **segs)
    # the attention_impl="cudnn" code (bias, mask, layout, scale=1) through jax's XLA backend
    monkeypatch.setattr(layers, "FUSED_ATTENTION_BACKEND", "xla")
    fused = apply(cfg.replace(attention_impl="cudnn"), params, enc, shift_right(tgt), tgt, **segs)
    valid = tgt > 0
    np.testing.assert_allclose(fused[valid], ref[valid], atol=1e-5)
    monkeypatch.setattr(layers, "FUSED_ATTENTION_BACKEND", "no-such-backend")  # proves the path ran
    with pytest.raises(ValueError, match="no-such-backend"):
        apply(cfg.replace(attention_impl="cudnn"), params, enc, shift_right(tgt), tgt)


def test_remat_keeps_logits_and_gradients(model):
    cfg, params = model
    rng = np.random.RandomState(5)
    enc, tgt = rng.randint(2, VOCAB, (2, 6)), rng.randint(2, VOCAB, (2, 5))

    def grads(c):
        f = lambda p: jnp.sum(Transformer(c).apply({"params": p}, enc, shift_right(tgt), tgt) ** 2)
        return jax.jit(jax.value_and_grad(f))(params)

    ref_loss, ref_grads = grads(cfg)
    loss, g = grads(cfg.replace(remat_policy="dots_with_no_batch_dims_saveable"))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, ref_grads)


def test_relative_position_buckets_known_values():
    # bidirectional, 32 buckets: 8 exact offsets per side, keys after the query in the upper half
    rel = np.array([0, -1, -7, -8, -127, -10_000, 1, 7, 10_000], np.int32)
    np.testing.assert_array_equal(layers.relative_position_bucket(rel, True, 32, 128),
                                  [0, 1, 7, 8, 15, 15, 17, 23, 31])
    # causal: keys after the query all share bucket 0; 16 exact offsets back
    rel = np.array([5, 0, -1, -15, -16, -127, -10_000], np.int32)
    np.testing.assert_array_equal(layers.relative_position_bucket(rel, False, 32, 128),
                                  [0, 0, 1, 15, 16, 31, 31])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="remat_policy"):
        tiny(remat_policy="no_such_policy")
    with pytest.raises(ValueError, match="mlp_activations"):
        tiny(mlp_activations=("gelu", "tanh_typo"))


def test_model_modules_import_without_tensorflow_seqio_gin_torch():
    code = ("import sys, ul2lab.models, ul2lab.models.decoding, ul2lab.models.loss, ul2lab.train.partitioning\n"
            "heavy = [m for m in ('tensorflow', 'seqio', 'gin', 'torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
