"""The two routes a user takes to UL2 20B both end in a run of gin/models/ul2_20b.gin, tested with tiny
stand-ins of the same layouts through the same code:

  Hugging Face  google/ul2's layout: config.json without tie_word_embeddings (tied, T5Config's default),
                feed_forward_proj "gated-silu", a decoder final norm whose weight is all ones (ul2_20b.gin
                has no decoder norm scale) -> `import-hf` -> INITIAL_CHECKPOINT_PATH of a ul2_20b.gin run.
  t5x           the README's "Coming from t5x" route: the release's layout (tied: no logits_dense, no
                decoder_norm scale, wi_0/wi_1) -> `import-t5x` with the model's gin -> the run -> `export-t5x`.

The model is ul2_20b.gin's own bindings with tiny dims (preset.<field> overrides, as the gin file says).
"""
import json
import os

import jax
import numpy as np
import pytest
from flax import serialization, traverse_util

from test_t5x import _cli, _reshaped_like_t5x
from test_trainer import make_config, synthetic_batches
from ul2lab.models.network import Transformer, init_params
from ul2lab.runs.train import load_train_config
from ul2lab.train import checkpoints
from ul2lab.train import loop as trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

UL2_GIN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "gin", "models", "ul2_20b.gin")
TINY = dict(vocab_size=512, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=2,
            num_decoder_layers=2, dropout_rate=0.0, dtype="float32")


def _tiny_ul2_gin(tmp_path):
    """gin/models/ul2_20b.gin with tiny dims: its own bindings, then preset.<field> overrides."""
    path = tmp_path / "ul2_20b_tiny.gin"
    path.write_text(f"include {UL2_GIN!r}\n" + "".join(f"preset.{k} = {v!r}\n" for k, v in TINY.items()))
    return str(path)


def _model(gin_file, tmp_path):
    config = load_train_config([gin_file, "runs/pretrain_ul2.gin"], [f"MODEL_DIR = {str(tmp_path / 'unused')!r}", "TRAIN_STEPS = 10"])
    model = config.model
    assert model.mlp_activations == ("silu", "linear") and model.logits_via_embedding
    assert not model.decoder_norm_use_scale  # what the real ul2_20b.gin says
    return model


def _batch(vocab):
    rng = np.random.RandomState(0)
    encoder = rng.randint(3, vocab, (2, 20))
    encoder[1, 13:] = 0
    targets = rng.randint(3, vocab, (2, 12))
    targets[1, 8:] = 0
    decoder_inputs = np.concatenate([np.zeros((2, 1), np.int64), targets[:, :-1]], axis=1)
    return encoder, decoder_inputs, targets


def _logits(model, params, batch):
    encoder, decoder_inputs, targets = batch
    return np.asarray(Transformer(model).apply({"params": params}, encoder, decoder_inputs, targets))


def _hf_logits(hf_model, batch):
    encoder, decoder_inputs, _ = batch
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder != 0),
                        decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()


def _continues(model, checkpoint_dir, run_dir):
    """The checkpoint's params restore into `model` and training continues from its step."""
    start = checkpoints.all_steps(checkpoint_dir)[-1]
    result = trainer.train(make_config(run_dir, model=model, train_steps=start + 2, checkpoint_period=2,
                                       initial_checkpoint_path=str(checkpoint_dir), async_checkpoints=False),
                           synthetic_batches())
    assert [r["step"] for r in result["history"]] == [start + 1, start + 2]
    assert all(np.isfinite(r["loss"]) for r in result["history"])


def _google_ul2_layout(directory, model):
    """A tiny transformers T5 saved as google/ul2 is: gated-silu, tied, decoder final norm all ones, and
    config.json without tie_word_embeddings."""
    torch.manual_seed(0)
    hf_config = transformers.T5Config(vocab_size=model.vocab_size, d_model=model.emb_dim, d_kv=model.head_dim,
                                      d_ff=model.mlp_dim, num_layers=model.num_encoder_layers,
                                      num_decoder_layers=model.num_decoder_layers, num_heads=model.num_heads,
                                      feed_forward_proj="gated-silu", dropout_rate=0.0)
    hf_model = transformers.T5ForConditionalGeneration(hf_config)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "layer_norm" in name and name != "decoder.final_layer_norm.weight":
                p.add_(0.2 * torch.randn_like(p))
        hf_model.decoder.final_layer_norm.weight.fill_(1.0)
    hf_model.save_pretrained(directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        saved = json.load(f)
    for key in ("tie_word_embeddings", "scale_decoder_outputs"):
        saved.pop(key, None)
    with open(path, "w") as f:
        json.dump(saved, f)
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(directory).eval()


def test_google_ul2_from_hugging_face_continues_under_ul2_20b_gin(tmp_path):
    model = _model(_tiny_ul2_gin(tmp_path), tmp_path)
    hf_model = _google_ul2_layout(str(tmp_path / "google_ul2"), model)
    imported = str(tmp_path / "imported")
    code, err = _cli(["import-hf", "--hf_dir", str(tmp_path / "google_ul2"), "--output_dir", imported])
    assert code == 0, err

    # the import loads as the gin's model (no decoder norm scale: the HF one was all ones) ...
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    _, params, _ = checkpoints.load_params(imported, abstract_params=abstract)
    assert "decoder_norm" not in params["decoder"] or "scale" not in params["decoder"]["decoder_norm"]
    batch = _batch(model.vocab_size)
    reference = _hf_logits(hf_model, batch)
    valid = batch[2] != 0
    assert np.abs(_logits(model, params, batch) - reference)[valid].max() <= 1e-4
    assert np.abs(reference).max() > 1.0
    # ... and a run of it continues from the import
    _continues(model, imported, tmp_path / "run")


def _ul2_release_layout(root, model, step):
    """A t5x msgpack checkpoint as the UL2 20B release lays it out (tied, no decoder_norm scale,
    gated-SiLU wi_0/wi_1, 2-D attention kernels) with the arrays of `model` at random init."""
    params = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, init_params(model, jax.random.PRNGKey(3))),
                                        sep="/")
    rng = np.random.default_rng(0)
    target = {}
    for name, array in params.items():
        array = np.asarray(array, np.float32)
        if name.endswith("/scale"):
            array = array + 0.2 * rng.standard_normal(array.shape).astype(np.float32)
        target[name] = _reshaped_like_t5x(name, array)
    assert "decoder/logits_dense/kernel" not in target and "decoder/decoder_norm/scale" not in target
    tree = {"version": 3, "optimizer": {"target": traverse_util.unflatten_dict(target, sep="/"),
                                        "state": {"step": np.asarray(step, np.int32)}}}
    step_dir = os.path.join(str(root), f"checkpoint_{step}")
    os.makedirs(step_dir)
    with open(os.path.join(step_dir, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(tree))
    return step_dir, target


def test_ul2_release_from_t5x_continues_under_ul2_20b_gin_and_exports_back(tmp_path):
    gin_file = _tiny_ul2_gin(tmp_path)
    model = _model(gin_file, tmp_path)
    step_dir, target = _ul2_release_layout(tmp_path / "ul220b", model, step=2650)
    imported = str(tmp_path / "imported")
    # the README's command, with the tiny model's gin standing in for --model ul2_20b
    code, err = _cli(["import-t5x", "--checkpoint_dir", step_dir, "--output_dir", imported, "--gin_file", gin_file])
    assert code == 0, err
    saved_model, _ = checkpoints.read_config(imported)
    assert not saved_model.decoder_norm_use_scale and saved_model.logits_via_embedding
    assert saved_model.mlp_activations == model.mlp_activations

    abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    _, params, _ = checkpoints.load_params(imported, abstract_params=abstract)
    flat = traverse_util.flatten_dict(params, sep="/")
    assert sorted(flat) == sorted(target)
    for name, array in flat.items():
        assert _reshaped_like_t5x(name, np.asarray(array)).tobytes() == target[name].tobytes(), name

    # its logits are transformers' (export-hf of the import), then the run continues and goes back to t5x
    code, err = _cli(["export-hf", "--checkpoint_dir", imported, "--output_dir", str(tmp_path / "hf")])
    assert code == 0, err
    hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "hf")).eval()
    batch = _batch(model.vocab_size)
    valid = batch[2] != 0
    assert np.abs(_logits(model, params, batch) - _hf_logits(hf_model, batch))[valid].max() <= 1e-4

    _continues(model, imported, tmp_path / "run")
    code, err = _cli(["export-t5x", "--checkpoint_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "back")])
    assert code == 0, err
    assert os.path.isdir(tmp_path / "back" / "checkpoint_2652")

