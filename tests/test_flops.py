"""Training FLOPs against the issue's T5 figures, and the MFU arithmetic."""
import pytest

from ul2lab.train import flops
from ul2lab.models.config import preset


@pytest.mark.parametrize("name, want", [("t5_1_1_base", 426e9), ("t5_1_1_large", 1.47e12)])
def test_t5_train_flops_per_example_match_issue_figures(name, want):
    got = flops.train_flops_per_example(preset(name), inputs_length=512, targets_length=114)
    assert abs(got - want) / want < 0.01, (name, got)


def test_flops_hand_count_on_a_one_layer_model():
    # 1+1 layers, d=2, 1 head of 2, mlp 3 gated, vocab 5, inputs 4, targets 3: multiply-adds by hand
    cfg = preset("tiny", emb_dim=2, num_heads=1, head_dim=2, mlp_dim=3, vocab_size=5,
                 num_encoder_layers=1, num_decoder_layers=1)
    enc = 4 * (4 * 2 * 2 + 3 * 2 * 3) + 2 * 4 * 4 * 2                   # proj + mlp, scores + sums
    dec = 3 * (4 * 2 * 2 + 3 * 2 * 3) + 2 * 3 * 3 * 2 + 3 * 2 * 2 * 2 + 4 * 2 * 2 * 2 + 2 * 3 * 4 * 2
    logits = 3 * 2 * 5
    assert flops.forward_flops_per_example(cfg, 4, 3) == 2 * (enc + dec + logits)
    assert flops.train_flops_per_step(cfg, 8, 4, 3) == 8 * 3 * 2 * (enc + dec + logits)
    # a T5 1.0 (ungated relu) MLP has two matrices, not three
    relu = cfg.replace(mlp_activations=("relu",))
    assert flops.forward_flops_per_example(cfg, 4, 3) - flops.forward_flops_per_example(relu, 4, 3) \
        == 2 * (4 + 3) * 2 * 3


def test_peak_table_and_mfu():
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
    assert flops.peak_flops_per_device("NVIDIA A100-SXM4-40GB") == 312e12
    assert flops.peak_flops_per_device("TPU v4") == 275e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("TPU v5p") == 459e12
    assert flops.peak_flops_per_device("cpu") is None
    assert flops.peak_flops_per_device("cpu", override=1e12) == 1e12
    with pytest.raises(ValueError, match="must be positive"):
        flops.peak_flops_per_device("cpu", override=0)
    # 8 H100s doing a 426 GFLOP x 256 batch step in 0.5 s
    assert flops.mfu(426e9 * 256, 0.5, 8, 989e12) == pytest.approx(426e9 * 256 / 0.5 / (8 * 989e12))
    assert flops.mfu(1e12, 1.0, 1, None) is None


def test_flops_agree_with_xla_cost_analysis():
    """XLA's own FLOP count of the compiled network (forward, and gradient = forward + backward)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from ul2lab.models.network import Transformer, abstract_params

    # wide enough that matmuls dominate, as in real models (norms/softmax add < 1% here)
    cfg = preset("tiny", emb_dim=256, num_heads=4, head_dim=64, mlp_dim=1024, vocab_size=1024)
    model = Transformer(cfg)
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                    nn.meta.unbox(abstract_params(cfg)))
    batch, inputs_length, targets_length = 2, 64, 32
    enc = jax.ShapeDtypeStruct((batch, inputs_length), jnp.int32)
    dec = jax.ShapeDtypeStruct((batch, targets_length), jnp.int32)

    def forward(p, e, d):
        return model.apply({"params": p}, e, d, d)

    def xla_flops(fn):
        cost = jax.jit(fn).lower(params, enc, dec).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    ours = flops.forward_flops_per_example(cfg, inputs_length, targets_length) * batch
    assert abs(xla_flops(forward) / ours - 1) < 0.03
    grad = jax.grad(lambda p, e, d: jnp.sum(jax.nn.log_softmax(forward(p, e, d))))
    train = flops.train_flops_per_step(cfg, batch, inputs_length, targets_length)
    assert abs(xla_flops(grad) / train - 1) < 0.03
