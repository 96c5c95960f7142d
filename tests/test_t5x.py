"""t5x and Mesh TensorFlow checkpoints: t5x's own test checkpoint imports and runs as transformers does,
round trips are bit-identical, t5x's Adafactor state resumes training, bad input is one line.

The t5x checkpoint is t5x's `testdata/test_t5_tiny.checkpoint_0` (tests/fixtures/t5x, Apache-2.0): a
msgpack file with inline arrays of t5x's examples/t5 tiny model (2+2 layers, d_model 8, 4 heads of 3,
gated-GELU, untied head) and its Adafactor state. Other checkpoints are written here in t5x's and
Mesh TensorFlow's naming from random arrays.
"""
import io
import os
import shutil
from contextlib import redirect_stderr

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from ul2lab.cli.main import main
from ul2lab.interop import convert, t5x, t5x_files
from ul2lab.models.config import T5Config
from ul2lab.models.network import Transformer, init_params
from ul2lab.train import checkpoints

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "t5x", "test_t5_tiny.checkpoint_0")
# what t5x's examples/t5/t5_1_1/tiny.gin says and the arrays do not: the MLP activations
TINY_GIN = "network.T5Config.mlp_activations = ('gelu', 'linear')\nnetwork.T5Config.dropout_rate = 0.0\n"


def _t5x_model_dir(root, step=0, gin=TINY_GIN, source=FIXTURE):
    """A t5x MODEL_DIR holding `source` as checkpoint_<step>/checkpoint and t5x's saved config.gin."""
    step_dir = os.path.join(str(root), f"checkpoint_{step}")
    os.makedirs(step_dir)
    shutil.copyfile(source, os.path.join(step_dir, "checkpoint"))
    if gin is not None:
        with open(os.path.join(str(root), "config.gin"), "w") as f:
            f.write(gin)
    return str(root)


def _fixture_tree():
    with open(FIXTURE, "rb") as f:
        return serialization.msgpack_restore(f.read())


def _cli(argv):
    """(exit code, stderr) of `ul2lab argv`."""
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _ul2lab_logits(config, params, encoder, decoder_inputs, targets):
    config = config.replace(dtype="float32")
    return np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(encoder),
                                                jnp.asarray(decoder_inputs), jnp.asarray(targets)))


def _tokens(vocab, seed=0):
    """Encoder and decoder inputs, row 1 padded in both."""
    rng = np.random.RandomState(seed)
    encoder = rng.randint(2, vocab, (2, 24))
    encoder[1, 15:] = 0
    targets = rng.randint(2, vocab, (2, 18))
    targets[1, 11:] = 0
    decoder_inputs = np.concatenate([np.zeros((2, 1), np.int64), targets[:, :-1]], axis=1)
    return encoder, decoder_inputs, targets


def _hf_logits(model, encoder, decoder_inputs):
    """transformers' logits of `model` (or of the model in directory `model`)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if isinstance(model, str):
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model)
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder != 0),
                     decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()


def _reshaped_like_t5x(name, array):
    """t5x's 2-D attention kernels: (embed, heads*kv) for query/key/value, (heads*kv, embed) for out."""
    if array.ndim == 3 and name.endswith("/out/kernel"):
        return array.reshape(-1, array.shape[-1])
    if array.ndim == 3:
        return array.reshape(array.shape[0], -1)
    return array


# ----------------------------------------------------------------------------- t5x's own checkpoint

@pytest.fixture(scope="module")
def imported_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixture")
    model_dir = _t5x_model_dir(root / "t5x")
    out = str(root / "ul2lab")
    assert main(["import-t5x", "--checkpoint_dir", model_dir, "--output_dir", out]) == 0
    return model_dir, out


def test_t5x_test_checkpoint_maps_every_array_once(imported_fixture):
    _, out = imported_fixture
    config, params, _ = checkpoints.load_params(out)
    assert (config.num_encoder_layers, config.num_decoder_layers, config.emb_dim, config.num_heads,
            config.head_dim, config.mlp_dim, config.vocab_size) == (2, 2, 8, 4, 3, 16, 32128)
    assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding
    target = traverse_util.flatten_dict(_fixture_tree()["optimizer"]["target"], sep="/")
    params = traverse_util.flatten_dict(params, sep="/")
    assert sorted(params) == sorted(target)  # every t5x array used once, nothing left over or made up
    for name, array in params.items():
        expected = np.asarray(target[name], np.float32)
        assert _reshaped_like_t5x(name, array).shape == expected.shape, name
        assert _reshaped_like_t5x(name, array).tobytes() == expected.tobytes(), name
    assert any(a.ndim == 3 for a in params.values())  # the 2-D kernels were reshaped


def test_t5x_test_checkpoint_logits_equal_transformers(imported_fixture, tmp_path):
    _, out = imported_fixture
    hf_dir = str(tmp_path / "hf")
    assert main(["export-hf", "--checkpoint_dir", out, "--output_dir", hf_dir]) == 0
    config, params, _ = checkpoints.load_params(out)
    encoder, decoder_inputs, targets = _tokens(config.vocab_size)
    valid = targets != 0  # padded target positions carry no loss and are masked differently
    reference = _hf_logits(hf_dir, encoder, decoder_inputs)
    ours = _ul2lab_logits(config, params, encoder, decoder_inputs, targets)
    assert np.abs(ours - reference)[valid].max() <= 1e-4
    assert np.abs(reference[valid]).max() > 1e-3  # not all zeros


def test_tensorstore_layout_imports_as_the_msgpack_one(imported_fixture, tmp_path):
    _, out = imported_fixture
    # the fixture's arrays written as t5x writes partitioned arrays: zarr folders named target.<path>,
    # the msgpack file holding their tensorstore specs
    target = traverse_util.flatten_dict(_fixture_tree()["optimizer"]["target"], sep="/")
    lazy = {name: checkpoints.LazyArray(np.shape(a), np.float32, lambda a=a: np.asarray(a, np.float32))
            for name, a in target.items()}
    model_dir = str(tmp_path / "t5x_zarr")
    step_dir = t5x_files.write_checkpoint(model_dir, 0, lazy)
    assert os.path.isdir(os.path.join(step_dir, "target.encoder.layers_0.attention.query.kernel"))
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(TINY_GIN)
    again = str(tmp_path / "ul2lab")
    assert main(["import-t5x", "--checkpoint_dir", step_dir, "--output_dir", again]) == 0
    (config_a, params_a, _), (config_b, params_b, _) = checkpoints.load_params(out), checkpoints.load_params(again)
    assert config_a == config_b
    flat_a, flat_b = (traverse_util.flatten_dict(p, sep="/") for p in (params_a, params_b))
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        assert flat_a[name].tobytes() == flat_b[name].tobytes(), name


def test_orbax_layout_imports_as_the_msgpack_one(imported_fixture, tmp_path):
    import orbax.checkpoint as ocp
    _, out = imported_fixture
    # t5x's OrbaxCheckpointManagerInterface: checkpoint_<step>/state/ holds the train state as an orbax PyTree
    tree = _fixture_tree()["optimizer"]
    state = {"target": tree["target"], "state": {"step": np.asarray(0, np.int32)}}
    step_dir = tmp_path / "t5x" / "checkpoint_0"
    step_dir.mkdir(parents=True)
    ocp.PyTreeCheckpointer().save(str(step_dir / "state"), state)
    (tmp_path / "t5x" / "config.gin").write_text(TINY_GIN)
    again = str(tmp_path / "ul2lab")
    code, err = _cli(["import-t5x", "--checkpoint_dir", str(tmp_path / "t5x"), "--output_dir", again])
    assert code == 0, err
    assert t5x_files.open_checkpoint(str(step_dir)).layout == "orbax"
    flat_a, flat_b = (traverse_util.flatten_dict(checkpoints.load_params(d)[1], sep="/") for d in (out, again))
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        assert flat_a[name].tobytes() == flat_b[name].tobytes(), name


# ----------------------------------------------------------------------------- round trips

ROUND_TRIP = T5Config(vocab_size=96, emb_dim=16, num_heads=2, num_encoder_layers=2, num_decoder_layers=1,
                      head_dim=8, mlp_dim=24, mlp_activations=("silu", "linear"), logits_via_embedding=False,
                      dtype="float32")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_export_then_import_is_bit_identical(tmp_path, scan_layers):
    config = ROUND_TRIP.replace(scan_layers=scan_layers)
    params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(3)))
    source = str(tmp_path / "run")
    checkpoints.save_params(source, params, config, step=1234)
    exported = str(tmp_path / "t5x")
    assert main(["export-t5x", "--checkpoint_dir", source, "--output_dir", exported]) == 0
    step_dir = os.path.join(exported, "checkpoint_1234")
    names = set(t5x_files.open_checkpoint(exported).arrays)
    assert "target/encoder/layers_1/attention/query/kernel" in names  # unrolled, as t5x's network stores them
    assert t5x_files.open_checkpoint(exported).arrays["target/encoder/layers_0/attention/out/kernel"].shape == (16, 16)
    back = str(tmp_path / "back")
    # t5x's saved config.gin (written by export) gives the activations
    assert main(["import-t5x", "--checkpoint_dir", step_dir, "--output_dir", back]) == 0
    imported_config, imported, _ = checkpoints.load_params(back)
    assert checkpoints.all_steps(back) == [1234]
    assert imported_config == config.replace(scan_layers=False)
    flat = traverse_util.flatten_dict(imported, sep="/")
    for path, array in traverse_util.flatten_dict(params, sep="/").items():
        layers = array if scan_layers and "/layers/" in path else None
        if layers is None:
            assert flat[path].tobytes() == np.asarray(array, np.float32).tobytes(), path
            continue
        for i, layer in enumerate(layers):  # ul2lab's scanned stack comes back as t5x's unrolled layers
            name = path.replace("/layers/", f"/layers_{i}/")
            assert flat[name].tobytes() == layer.tobytes(), name


def test_scanned_t5x_checkpoint_imports_as_scan_layers(tmp_path):
    """t5x/flaxformer's scan_layers layout: <stack>/<stack>/... with the layer axis at 1."""
    config = ROUND_TRIP.replace(num_decoder_layers=2)
    params = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(4))),
                                        sep="/")
    t5x_arrays = {}
    for name, array in t5x.export_params({k: checkpoints.LazyArray(v.shape, np.float32, lambda v=v: v)
                                          for k, v in params.items()}).items():
        t5x_arrays[name] = array.load()
    scanned = {}
    for stack, count in (("encoder", 2), ("decoder", 2)):
        per_layer = sorted({n.split("/", 2)[2] for n in t5x_arrays if n.startswith(f"{stack}/layers_")})
        for rest in per_layer:
            layers = [t5x_arrays.pop(f"{stack}/layers_{i}/{rest}") for i in range(count)]
            scanned[f"{stack}/{stack}/{rest}"] = np.stack(layers, axis=1)
    scanned.update(t5x_arrays)
    lazy = {k: checkpoints.LazyArray(v.shape, np.float32, lambda v=v: v) for k, v in scanned.items()}
    step_dir = t5x_files.write_checkpoint(str(tmp_path / "t5x"), 5, lazy)
    out = str(tmp_path / "ul2lab")
    assert main(["import-t5x", "--checkpoint_dir", step_dir, "--output_dir", out,
                 "--gin_file", _gin(tmp_path, "network.T5Config.mlp_activations = ('silu', 'linear')")]) == 0
    imported_config, imported, _ = checkpoints.load_params(out)
    assert imported_config.scan_layers
    ours = traverse_util.flatten_dict(imported, sep="/")
    query = ours["encoder/layers/attention/query/kernel"]
    assert query.shape == (2, 16, 2, 8)
    for i in range(2):
        assert query[i].tobytes() == params[f"encoder/layers_{i}/attention/query/kernel"].tobytes()
    assert ours["token_embedder/embedding"].tobytes() == params["token_embedder/embedding"].tobytes()


def _gin(tmp_path, text):
    path = tmp_path / "model.gin"
    path.write_text(text + "\n")
    return str(path)


# ----------------------------------------------------------------------------- Mesh TensorFlow

def _mtf_arrays(gated: bool, rng):
    """Variables of a Mesh TF T5 checkpoint as the releases name and shape them (T5.1.1: gated GELU and
    its own logits kernel; T5 1.0: ReLU and logits through the shared embedding)."""
    d, heads, kv, ff, vocab, buckets = 16, 2, 8, 24, 80, 32
    arrays = {"shared/embedding": rng.standard_normal((vocab, d))}

    def attention(prefix, with_bias):
        for m in "qkv":
            arrays[f"{prefix}/{m}"] = rng.standard_normal((d, heads * kv)) * 0.3
        arrays[f"{prefix}/o"] = rng.standard_normal((heads * kv, d)) * 0.3
        if with_bias:
            arrays[f"{prefix}/relative_attention_bias"] = rng.standard_normal((heads, buckets))

    def mlp(prefix):
        for m in (("wi_0", "wi_1") if gated else ("wi",)):
            arrays[f"{prefix}/DenseReluDense/{m}/kernel"] = rng.standard_normal((d, ff)) * 0.3
        arrays[f"{prefix}/DenseReluDense/wo/kernel"] = rng.standard_normal((ff, d)) * 0.3

    norm = "rms_norm" if gated else "layer_norm"
    for block in range(2):
        b = f"encoder/block_{block:03d}"
        attention(f"{b}/layer_000/SelfAttention", block == 0)
        mlp(f"{b}/layer_001")
        for layer in range(2):
            arrays[f"{b}/layer_{layer:03d}/{norm}/scale"] = 1 + 0.2 * rng.standard_normal(d)
        b = f"decoder/block_{block:03d}"
        attention(f"{b}/layer_000/SelfAttention", block == 0)
        attention(f"{b}/layer_001/EncDecAttention", False)
        mlp(f"{b}/layer_002")
        for layer in range(3):
            arrays[f"{b}/layer_{layer:03d}/{norm}/scale"] = 1 + 0.2 * rng.standard_normal(d)
    final = "rms_norm" if gated else "final_layer_norm"
    arrays[f"encoder/{final}/scale"] = 1 + 0.2 * rng.standard_normal(d)
    arrays[f"decoder/{final}/scale"] = 1 + 0.2 * rng.standard_normal(d)
    if gated:
        arrays["decoder/logits/kernel"] = rng.standard_normal((d, vocab)) * 0.2  # logits of a few units
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def _write_tf_checkpoint(prefix, arrays, step):
    tf = pytest.importorskip("tensorflow")
    tensors = dict(arrays)
    # an Adafactor slot and the step, as the releases hold them: not parameters
    tensors["shared/embedding_slot_vr"] = np.zeros(arrays["shared/embedding"].shape[0], np.float32)
    tensors["global_step"] = np.asarray(step, np.int64)
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])


def _hf_from_mtf(arrays, gated):
    """transformers' T5 built from the same arrays with transformers' own names (Linear weights are
    the transposed kernels)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab, d = arrays["shared/embedding"].shape
    heads, buckets = arrays["encoder/block_000/layer_000/SelfAttention/relative_attention_bias"].shape
    config = transformers.T5Config(vocab_size=vocab, d_model=d, d_kv=arrays["encoder/block_000/layer_000/SelfAttention/q"]
                                   .shape[1] // heads, num_heads=heads, d_ff=24, num_layers=2, num_decoder_layers=2,
                                   relative_attention_num_buckets=buckets, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu" if gated else "relu",
                                   # T5 1.0 scales tied logits by d_model**-0.5, T5.1.1's own head does not
                                   tie_word_embeddings=not gated, scale_decoder_outputs=not gated)
    state = {"shared.weight": arrays["shared/embedding"]}
    norm = "rms_norm" if gated else "layer_norm"
    final = "rms_norm" if gated else "final_layer_norm"
    for stack, layers in (("encoder", ("SelfAttention", "DenseReluDense")),
                          ("decoder", ("SelfAttention", "EncDecAttention", "DenseReluDense"))):
        for block in range(2):
            for index, kind in enumerate(layers):
                mtf = f"{stack}/block_{block:03d}/layer_{index:03d}"
                hf = f"{stack}.block.{block}.layer.{index}"
                state[f"{hf}.layer_norm.weight"] = arrays[f"{mtf}/{norm}/scale"]
                if kind == "DenseReluDense":
                    for m in (("wi_0", "wi_1") if gated else ("wi",)) + ("wo",):
                        state[f"{hf}.DenseReluDense.{m}.weight"] = arrays[f"{mtf}/DenseReluDense/{m}/kernel"].T
                    continue
                for m in "qkvo":
                    state[f"{hf}.{kind}.{m}.weight"] = arrays[f"{mtf}/{kind}/{m}"].T
                if block == 0 and kind == "SelfAttention":
                    state[f"{hf}.{kind}.relative_attention_bias.weight"] = \
                        arrays[f"{mtf}/{kind}/relative_attention_bias"].T
        state[f"{stack}.final_layer_norm.weight"] = arrays[f"{stack}/{final}/scale"]
    model = transformers.T5ForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()},
                                                strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                               "lm_head.weight"}
    if gated:  # transformers may tie the head to the embedding at init; T5.1.1's is its own
        model.lm_head.weight = torch.nn.Parameter(torch.tensor(np.ascontiguousarray(arrays["decoder/logits/kernel"].T)))
    else:
        assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    return model


@pytest.mark.parametrize("gated", [True, False], ids=["t5_1_1", "t5_1_0"])
def test_mtf_checkpoint_logits_equal_transformers(tmp_path, gated):
    arrays = _mtf_arrays(gated, np.random.default_rng(7))
    folder = tmp_path / "mtf"
    folder.mkdir()
    _write_tf_checkpoint(str(folder / "model.ckpt-1000000"), arrays, 1000000)
    out = str(tmp_path / "ul2lab")
    code, err = _cli(["import-mtf", "--checkpoint_dir", str(folder), "--output_dir", out])
    assert code == 0, err
    config, params, _ = checkpoints.load_params(out)
    assert checkpoints.all_steps(out) == [1000000]
    assert config.mlp_activations == (("gelu", "linear") if gated else ("relu",))
    assert config.logits_via_embedding is (not gated)
    flat = traverse_util.flatten_dict(params, sep="/")
    assert len(flat) == len(arrays)  # every parameter once, the slot and step left out
    encoder, decoder_inputs, targets = _tokens(config.vocab_size)
    valid = targets != 0  # padded target positions carry no loss and are masked differently
    reference = _hf_logits(_hf_from_mtf(arrays, gated), encoder, decoder_inputs)
    ours = _ul2lab_logits(config, params, encoder, decoder_inputs, targets)
    assert np.abs(ours - reference)[valid].max() <= 1e-4
    assert np.abs(reference[valid]).max() > 1.0


# ----------------------------------------------------------------------------- t5x's Adafactor state

# embed 256 > heads * kv 128: t5x's factor rules and optax name the attention kernels' moments the other
# way round (t5x: v_row along embed; optax: v_row averaged over the larger dimension)
OPT = T5Config(vocab_size=512, emb_dim=256, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, head_dim=64,
               mlp_dim=512, mlp_activations=("gelu", "linear"), logits_via_embedding=False, dtype="float32")


def _embed_axis(name):
    """The `embed` axis of a t5x 2-D parameter (t5x's standard_logical_factor_rules make it the row)."""
    return 1 if name == "token_embedder/embedding" or name.endswith(("/out/kernel", "/wo/kernel")) else 0


def _t5x_adafactor_checkpoint(root, step, rng):
    """A t5x msgpack checkpoint of OPT with t5x Adafactor moments that are not zero, laid out as t5x's
    default gin (logical factor rules) keeps them: 2-D parameters with both dimensions >= 128 hold v_row
    (one per embed row) and v_col (one per column), the rest v; unused slots are zeros of shape (1,)."""
    params = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, init_params(OPT, jax.random.PRNGKey(5))),
                                        sep="/")
    target, param_states = {}, {}
    for name, array in params.items():
        array = _reshaped_like_t5x(name, np.asarray(array, np.float32))
        target[name] = array
        unused = np.zeros((1,), np.float32)
        if array.ndim == 2 and min(array.shape) >= 128:
            rows = array.shape[_embed_axis(name)]
            cols = array.shape[1 - _embed_axis(name)]
            state = {"v_row": rng.uniform(0.1, 1, rows).astype(np.float32),
                     "v_col": rng.uniform(0.1, 1, cols).astype(np.float32), "v": unused}
        else:
            state = {"v_row": unused, "v_col": unused, "v": rng.uniform(0.1, 1, array.shape).astype(np.float32)}
        param_states[name] = {**state, "m": unused}
    tree = {"version": 3, "optimizer": {
        "target": traverse_util.unflatten_dict(target, sep="/"),
        "state": {"step": np.asarray(step, np.int32),
                  "param_states": traverse_util.unflatten_dict(param_states, sep="/")}}}
    step_dir = os.path.join(str(root), f"checkpoint_{step}")
    os.makedirs(step_dir)
    with open(os.path.join(step_dir, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(tree))
    with open(os.path.join(str(root), "config.gin"), "w") as f:
        f.write("network.T5Config.mlp_activations = ('gelu', 'linear')\nnetwork.T5Config.dtype = 'float32'\n"
                "network.T5Config.dropout_rate = 0.0\n")
    return param_states


def test_t5x_adafactor_state_resumes_training(tmp_path):
    from test_trainer import make_config, synthetic_batches
    from ul2lab.train import loop as trainer
    from ul2lab.train import state as train_state

    param_states = _t5x_adafactor_checkpoint(tmp_path / "t5x", 7, np.random.default_rng(0))
    out = str(tmp_path / "run")
    code, err = _cli(["import-t5x", "--checkpoint_dir", str(tmp_path / "t5x"), "--output_dir", out,
                      "--with_optimizer_state"])
    assert code == 0, err
    config, _ = checkpoints.read_config(out)
    assert config == OPT

    # the moments restore into the trainer's own Adafactor state, one to one, count = t5x's step
    abstract_params = jax.eval_shape(lambda: init_params(OPT, jax.random.PRNGKey(0)))
    abstract_opt = jax.eval_shape(train_state.default_optimizer(lambda count: 0.0).init, abstract_params)
    _, opt_state, run = checkpoints.RunCheckpoints(out, async_save=False).restore(7, abstract_params, abstract_opt)
    assert run["step"] == 7
    # optax's v_row is averaged over the larger dimension (its rows are the smaller one's entries)
    seen = {"v_row": 0, "v_col": 0, "v": 0, "swapped": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        field = next((k for k in keys if k in ("count", "v_row", "v_col", "v")), None)
        if field == "count":  # Adafactor's and the learning-rate schedule's
            assert int(leaf) == 7
            seen["count"] = seen.get("count", 0) + 1
        elif field is not None:
            param = "/".join(k for k in keys if isinstance(k, str) and k not in ("v_row", "v_col", "v"))
            shape = np.shape(param_states[param]["v"]) if field == "v" else None
            expected = param_states[param][field]
            if field != "v" and np.shape(leaf) != np.shape(expected):
                expected = param_states[param]["v_col" if field == "v_row" else "v_row"]
                seen["swapped"] += 1
            assert shape is None or np.shape(leaf) == shape
            np.testing.assert_array_equal(np.asarray(leaf), expected, err_msg=f"{param} {field}")
            seen[field] += 1
    # factored, unfactored, and factored under the other naming all met
    assert seen["v_row"] > 0 and seen["v_col"] > 0 and seen["v"] > 0 and seen["swapped"] > 0
    assert seen["count"] == 2

    result = trainer.train(make_config(out, model=OPT, train_steps=9), synthetic_batches())
    assert result["step"] == 9
    steps = [r["step"] for r in result["history"]]
    assert steps == [8, 9]  # continued from t5x's step, not restarted
    assert all(np.isfinite(r["loss"]) for r in result["history"])


# ----------------------------------------------------------------------------- bad input

def _assert_one_line_error(argv, *words):
    out = argv[argv.index("--output_dir") + 1]
    parent = os.path.dirname(out)
    before = set(os.listdir(parent)) if os.path.isdir(parent) else set()
    code, err = _cli(argv)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not os.path.exists(out)  # nothing written, no temporary folder left beside it
    assert (set(os.listdir(parent)) if os.path.isdir(parent) else set()) == before
    return err


def test_not_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    out = str(tmp_path / "out")
    _assert_one_line_error(["import-t5x", "--checkpoint_dir", str(tmp_path / "notes"), "--output_dir", out],
                           str(tmp_path / "notes"), "not a t5x checkpoint")
    _assert_one_line_error(["import-mtf", "--checkpoint_dir", str(tmp_path / "notes"), "--output_dir", out],
                           str(tmp_path / "notes"), "not a TensorFlow checkpoint")
    _assert_one_line_error(["import-t5x", "--checkpoint_dir", str(tmp_path / "absent"), "--output_dir", out],
                           "does not exist")


def _edited_fixture(tmp_path, edit):
    tree = _fixture_tree()
    edit(tree["optimizer"]["target"])
    source = tmp_path / "edited.msgpack"
    source.write_bytes(serialization.msgpack_serialize(tree))
    return _t5x_model_dir(tmp_path / "t5x", source=str(source))


def test_decoder_only_checkpoint_is_one_line(tmp_path):
    model_dir = _edited_fixture(tmp_path, lambda target: target.pop("encoder"))
    _assert_one_line_error(["import-t5x", "--checkpoint_dir", model_dir, "--output_dir", str(tmp_path / "out")],
                           "checkpoint_0", "decoder-only")


def test_missing_layer_is_one_line(tmp_path):
    model_dir = _edited_fixture(tmp_path, lambda target: target["encoder"].pop("layers_0"))
    _assert_one_line_error(["import-t5x", "--checkpoint_dir", model_dir, "--output_dir", str(tmp_path / "out")],
                           "checkpoint_0", "encoder/layers_0")


def test_missing_parameter_is_one_line(tmp_path):
    model_dir = _edited_fixture(tmp_path, lambda target: target["decoder"]["layers_1"]["mlp"].pop("wo"))
    _assert_one_line_error(["import-t5x", "--checkpoint_dir", model_dir, "--output_dir", str(tmp_path / "out")],
                           "checkpoint_0", "decoder/layers_1/mlp/wo/kernel")


def test_shape_contradicting_model_is_one_line(tmp_path):
    model_dir = _t5x_model_dir(tmp_path / "t5x", gin=None)
    _assert_one_line_error(["import-t5x", "--checkpoint_dir", model_dir, "--output_dir", str(tmp_path / "out"),
                            "--model", "t5_1_1_base"], "checkpoint_0", "preset t5_1_1_base", "emb_dim 8",
                           "768")


def test_truncated_msgpack_file_is_one_line(tmp_path):
    data = open(FIXTURE, "rb").read()
    source = tmp_path / "cut"
    source.write_bytes(data[:len(data) * 3 // 4])
    model_dir = _t5x_model_dir(tmp_path / "t5x", source=str(source))
    _assert_one_line_error(["import-t5x", "--checkpoint_dir", model_dir, "--output_dir", str(tmp_path / "out")],
                           os.path.join("checkpoint_0", "checkpoint"), "truncated", "ends inside parameter target/")


def test_truncated_zarr_chunk_is_one_line(tmp_path):
    target = traverse_util.flatten_dict(_fixture_tree()["optimizer"]["target"], sep="/")
    lazy = {name: checkpoints.LazyArray(np.shape(a), np.float32, lambda a=a: np.asarray(a, np.float32))
            for name, a in target.items()}
    step_dir = t5x_files.write_checkpoint(str(tmp_path / "t5x"), 0, lazy)
    (tmp_path / "t5x" / "config.gin").write_text(TINY_GIN)
    folder = os.path.join(step_dir, "target.decoder.layers_1.mlp.wo.kernel")
    chunk = next(os.path.join(folder, f) for f in os.listdir(folder) if not f.startswith("."))
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) // 2)
    out = str(tmp_path / "out")
    _assert_one_line_error(["import-t5x", "--checkpoint_dir", step_dir, "--output_dir", out],
                           folder, "decoder/layers_1/mlp/wo/kernel")


def test_failed_import_keeps_the_existing_checkpoint(imported_fixture, tmp_path):
    _, good = imported_fixture
    out = str(tmp_path / "kept")
    shutil.copytree(good, out)
    before = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    model_dir = _edited_fixture(tmp_path, lambda target: target["decoder"]["layers_1"]["mlp"].pop("wo"))
    code, err = _cli(["import-t5x", "--checkpoint_dir", model_dir, "--output_dir", out, "--overwrite"])
    assert code == 2 and "decoder/layers_1/mlp/wo/kernel" in err
    after = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["edited.msgpack", "kept", "t5x"]


def test_convert_library_functions_return_their_directories(imported_fixture, tmp_path):
    model_dir, _ = imported_fixture
    out = convert.import_t5x(model_dir, str(tmp_path / "a"))
    assert out == str(tmp_path / "a") and checkpoints.has_checkpoint(out)
    step_dir = convert.export_t5x(out, str(tmp_path / "b"))
    assert step_dir == str(tmp_path / "b" / "checkpoint_0") and os.path.isfile(os.path.join(step_dir, "checkpoint"))


def test_import_records_how_a_flagged_vocabulary_pairs_with_sentinels(imported_fixture, tmp_path, tiny_vocabulary):
    """--vocab_path T5's .100extra file (it carries the sentinels) is 0 extra ids, a plain file 100: without the
    record every reader added 100 more to the .100extra file (32,200 ids against 32,128 rows)."""
    import json

    from ul2lab.data import vocab as vocab_lib
    model_dir, _ = imported_fixture
    plain = tiny_vocabulary.sentencepiece_model_file
    with open(plain, "rb") as f:
        carried = tmp_path / "cc_all.100extra.model"
        carried.write_bytes(vocab_lib.add_sentinel_pieces(f.read(), 100))
    cases = {plain: 100, str(carried): 0,
             "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model": 0,
             "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model": 100}
    for i, (vocab_path, extra_ids) in enumerate(cases.items()):
        out = str(tmp_path / f"out{i}")
        assert main(["import-t5x", "--checkpoint_dir", model_dir, "--output_dir", out, "--vocab_path", vocab_path]) == 0
        with open(os.path.join(out, checkpoints.CONFIG_FILE)) as f:
            assert json.load(f)["extra_ids"] == extra_ids, vocab_path


MTF_OPERATIVE_CONFIG = """\
import mesh_tensorflow.optimize
import mesh_tensorflow.transformer.dataset

# Macros:
# ==============================================================================
d_ff = 2048
d_kv = 64
d_model = 768
dropout_rate = 0.1
num_heads = 12
num_layers = 12

# Parameters for DenseReluDense:
# ==============================================================================
DenseReluDense.activation = ['gelu', 'linear']
DenseReluDense.dropout_rate = %dropout_rate
DenseReluDense.hidden_size = %d_ff

# Parameters for decoder/make_layer_stack:
# ==============================================================================
decoder/make_layer_stack.block_scope = True
decoder/make_layer_stack.layers = \\
    [@mesh_tensorflow.transformer.transformer_layers.SelfAttention,
     @mesh_tensorflow.transformer.transformer_layers.EncDecAttention,
     @mesh_tensorflow.transformer.transformer_layers.DenseReluDense]
decoder/make_layer_stack.num_layers = %num_layers
"""


def test_mtf_operative_config_gives_the_model(tmp_path):
    from ul2lab.interop import model_gin
    fields = model_gin.read(_gin(tmp_path, MTF_OPERATIVE_CONFIG))
    assert fields["mlp_activations"] == ("gelu", "linear")
    assert (fields["emb_dim"], fields["mlp_dim"], fields["head_dim"], fields["num_heads"]) == (768, 2048, 64, 12)
    assert (fields["num_encoder_layers"], fields["num_decoder_layers"], fields["dropout_rate"]) == (12, 12, 0.1)
    t5x_fields = model_gin.read(_gin(tmp_path, "from __gin__ import dynamic_registration\n"
                                               "from t5x.examples.t5 import network\n"
                                               "network.T5Config:\n  mlp_activations = ('silu', 'linear')\n"
                                               "  emb_dim = 4096"))
    assert t5x_fields == {"mlp_activations": ("silu", "linear"), "emb_dim": 4096}
