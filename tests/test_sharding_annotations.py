"""Logical axis annotations + t5x's rules give the expected shardings on 8 forced CPU devices."""
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ul2lab.train import partitioning
from ul2lab.models.config import T5Config
from ul2lab.models.network import Transformer, abstract_params, init_params

CFG = T5Config(vocab_size=64, emb_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
               head_dim=8, mlp_dim=48, relative_attention_num_buckets=8, relative_attention_max_distance=16,
               dtype="float32")


def flat_specs(shardings):
    return {k: v.spec for k, v in traverse_util.flatten_dict(shardings, sep="/").items()}


def test_mesh_fills_minus_one_and_refuses_bad_sizes():
    mesh = partitioning.create_mesh(data=-1, model=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 4}
    with pytest.raises(ValueError, match="8 available devices"):
        partitioning.create_mesh(data=3, model=1)
    with pytest.raises(ValueError, match="at most one"):
        partitioning.create_mesh(data=-1, model=-1)


def test_standard_rules_give_t5x_parameter_specs():
    mesh = partitioning.create_mesh(data=2, model=4)
    specs = flat_specs(partitioning.params_shardings(abstract_params(CFG), mesh,
                                                     partitioning.standard_logical_axis_rules()))
    expected = {
        "token_embedder/embedding": P("model", None),
        "encoder/layers_0/attention/query/kernel": P(None, "model", None),
        "encoder/layers_0/attention/out/kernel": P("model", None, None),
        "encoder/layers_0/mlp/wi_0/kernel": P(None, "model"),
        "encoder/layers_0/mlp/wo/kernel": P("model", None),
        "encoder/layers_0/pre_attention_layer_norm/scale": P(None),
        "encoder/relpos_bias/rel_embedding": P("model", None),
        "decoder/layers_0/encoder_decoder_attention/key/kernel": P(None, "model", None),
        "decoder/logits_dense/kernel": P(None, "model"),
        "decoder/decoder_norm/scale": P(None),
    }
    for path, spec in expected.items():
        assert specs[path] == spec, path


def test_fsdp_rules_shard_embed_over_fsdp():
    mesh = partitioning.create_mesh(data=1, fsdp=-1)
    rules = partitioning.fsdp_logical_axis_rules()
    specs = flat_specs(partitioning.params_shardings(abstract_params(CFG), mesh, rules))
    assert specs["encoder/layers_0/attention/query/kernel"] == P("fsdp", "model", None)
    assert specs["encoder/layers_0/mlp/wo/kernel"] == P("model", "fsdp")
    assert specs["token_embedder/embedding"] == P("model", "fsdp")
    # activations: batch takes fsdp first, so embed stays whole
    assert partitioning.logical_to_mesh_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)


def forward(params, batch):
    return Transformer(CFG).apply({"params": params}, batch["encoder_input_tokens"],
                                  batch["decoder_input_tokens"], batch["decoder_target_tokens"])


@pytest.fixture(scope="module")
def unsharded():
    """(params, batch, logits) on one device, computed once for both meshes."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    batch = {"encoder_input_tokens": rng.randint(1, 64, (8, 12)).astype(np.int32),
             "decoder_input_tokens": rng.randint(1, 64, (8, 10)).astype(np.int32),
             "decoder_target_tokens": rng.randint(1, 64, (8, 10)).astype(np.int32)}
    return params, batch, np.asarray(jax.jit(forward)(params, batch))


@pytest.mark.parametrize("mesh_sizes, rules", [
    (dict(data=2, model=4), partitioning.standard_logical_axis_rules()),
    (dict(data=1, fsdp=8), partitioning.fsdp_logical_axis_rules()),
])
def test_sharded_forward_equals_unsharded(unsharded, mesh_sizes, rules):
    params, batch, expected = unsharded
    mesh = partitioning.create_mesh(**mesh_sizes)
    shardings = partitioning.params_shardings(abstract_params(CFG), mesh, rules)
    sharded_params = jax.device_put(params, shardings)
    global_batch = partitioning.host_batch_to_global(batch, mesh, rules)
    assert global_batch["encoder_input_tokens"].sharding.spec == partitioning.batch_partition_spec(2, rules)
    with partitioning.axis_rules(mesh, rules):
        logits = jax.jit(forward)(sharded_params, global_batch)
        program = jax.jit(forward).lower(sharded_params, global_batch).as_text()
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)
    # the model's logical activation annotations became sharding constraints in the program
    assert program.count("sharding_constraint") >= 10
    assert logits.sharding.is_equivalent_to(
        NamedSharding(mesh, partitioning.logical_to_mesh_spec(("batch", "length", "vocab"), rules)), 3)
