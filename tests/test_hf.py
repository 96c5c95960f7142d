"""Hugging Face interop: logits of ul2lab's network on imported weights equal transformers' T5.

Every model is a random tiny transformers model built here (no downloads); T5 layer-norm
scales are perturbed so a wrongly mapped norm cannot hide behind their all-ones init.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import traverse_util  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from ul2lab.train import checkpoints  # noqa: E402
from ul2lab.interop import hf  # noqa: E402
from ul2lab.cli.main import main  # noqa: E402
from ul2lab.models.network import Transformer, init_params  # noqa: E402
from ul2lab.models.decoding import greedy_decode  # noqa: E402

VOCAB = 320
TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
            # fewer buckets and a shorter max distance than T5's: the lengths below reach the log buckets
            relative_attention_num_buckets=8, relative_attention_max_distance=20)
CASES = {
    # T5.1.1 / Flan-T5: gated-gelu with its own LM head
    "gated_gelu_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, own_lm_head=True),
    # UL2-style gated-silu, tied head with T5's 1/sqrt(d_model) logit scale
    "gated_silu_tied": dict(feed_forward_proj="gated-silu", tie_word_embeddings=True),
    # T5 1.0
    "relu": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # decoder shallower than encoder; untied as transformers>=5 saves T5.1.1 (no lm_head.weight)
    "unequal_depth": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3,
                          num_decoder_layers=1),
}


def _build_hf_model(directory, seed=0, own_lm_head=False, **overrides):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        if own_lm_head:  # transformers ties at init; give the head weights of its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, TINY["d_model"]))
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _build_hf_model(root / name, **kw) for name, kw in CASES.items()}


def _batch():
    """Row 0 full length, row 1 padded (encoder and decoder); lengths past max_distance."""
    rng = np.random.RandomState(0)
    encoder = rng.randint(3, VOCAB, (2, 30))
    encoder[1, 19:] = 0
    targets = rng.randint(3, VOCAB, (2, 25))
    targets[1, 16:] = 0
    decoder_inputs = np.concatenate([np.zeros((2, 1), np.int64), targets[:, :-1]], axis=1)
    return encoder, decoder_inputs, targets


def _hf_logits(model, encoder, decoder_inputs):
    with torch.no_grad():
        return model(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder != 0),
                     decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()


def _our_logits(config, params, encoder, decoder_inputs, targets):
    return np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(encoder),
                                                jnp.asarray(decoder_inputs), jnp.asarray(targets)))


def _load_hf(directory):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(directory).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_logits_equal_transformers(hf_dirs, case):
    config, params = hf.load(hf_dirs[case])
    assert config.dtype == "float32"
    assert config.relative_attention_num_buckets == 8 and config.relative_attention_max_distance == 20
    if case == "unequal_depth":
        assert (config.num_encoder_layers, config.num_decoder_layers) == (3, 1)
    encoder, decoder_inputs, targets = _batch()
    reference = _hf_logits(_load_hf(hf_dirs[case]), encoder, decoder_inputs)
    ours = _our_logits(config, params, encoder, decoder_inputs, targets)
    valid = targets != 0  # padded target positions are masked differently and carry no loss
    assert np.abs(ours - reference)[valid].max() <= 1e-4
    assert np.abs(reference).max() > 1.0  # logits are not trivially small



@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_tree_is_the_networks_tree(hf_dirs, case):
    config, params = hf.load(hf_dirs[case])
    own = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    shapes = lambda tree: {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
    assert shapes(params) == shapes(own)

def test_untied_head_is_its_own_parameter(hf_dirs):
    config, params = hf.load(hf_dirs["gated_gelu_untied"])
    assert not config.logits_via_embedding
    kernel = params["decoder"]["logits_dense"]["kernel"]
    assert kernel.shape == (TINY["d_model"], VOCAB)
    assert not np.array_equal(kernel, params["token_embedder"]["embedding"].T)
    assert hf.load(hf_dirs["gated_silu_tied"])[0].logits_via_embedding


def test_pytorch_bin_directory_loads_the_same_params(hf_dirs, tmp_path):
    source = hf_dirs["gated_gelu_untied"]
    state = load_file(os.path.join(source, hf.SAFE_WEIGHTS))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / hf.TORCH_WEIGHTS)
    with open(os.path.join(source, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    _, expected = hf.load(source)
    _, params = hf.load(str(tmp_path))
    params, expected = (traverse_util.flatten_dict(p, sep="/") for p in (params, expected))
    assert params.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(params[key], value, err_msg=key)



def test_bfloat16_weights_load_as_float32(hf_dirs, tmp_path):
    from safetensors.torch import load_file as load_torch, save_file as save_torch
    source = hf_dirs["relu"]
    state = load_torch(os.path.join(source, hf.SAFE_WEIGHTS))
    save_torch({k: v.bfloat16() for k, v in state.items()}, str(tmp_path / hf.SAFE_WEIGHTS),
               metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(source, "config.json")).read())
    _, params = hf.load(str(tmp_path))
    embedding = params["token_embedder"]["embedding"]
    assert embedding.dtype == np.float32
    np.testing.assert_array_equal(embedding, state["shared.weight"].bfloat16().float().numpy())

@pytest.mark.parametrize("case", ["gated_gelu_untied", "unequal_depth"])
def test_import_export_roundtrip_through_cli(hf_dirs, tmp_path, case):
    source = hf_dirs[case]
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "exported")
    assert main(["import-hf", "--hf_dir", source, "--output_dir", ckpt]) == 0
    assert checkpoints.read_config(ckpt)[0] == hf.load(source)[0]
    assert main(["export-hf", "--checkpoint_dir", ckpt, "--output_dir", out]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(os.listdir(out))

    # bit-identical tensors; an untied head that transformers>=5 left out (== shared) is written out
    original, exported = (load_file(os.path.join(d, hf.SAFE_WEIGHTS)) for d in (source, out))
    original_head = original.get("lm_head.weight", original["shared.weight"])
    assert set(exported) - set(original) <= {"lm_head.weight"}
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].tobytes() == tensor.tobytes(), name
    np.testing.assert_array_equal(exported["lm_head.weight"], original_head)

    before, after = (transformers.AutoConfig.from_pretrained(d) for d in (source, out))
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
                  "feed_forward_proj", "relative_attention_num_buckets", "relative_attention_max_distance",
                  "layer_norm_epsilon", "dropout_rate", "scale_decoder_outputs", "dense_act_fn",
                  "is_gated_act", "pad_token_id", "eos_token_id"):
        assert getattr(after, field) == getattr(before, field), field

    encoder, decoder_inputs, _ = _batch()
    reference = _hf_logits(_load_hf(source), encoder, decoder_inputs)
    np.testing.assert_array_equal(_hf_logits(_load_hf(out), encoder, decoder_inputs), reference)

    # untied both ways: config.json says so (transformers 5.24's T5Config reads the flag as
    # scale_decoder_outputs and then forces tie_word_embeddings=True, warning that it leaves the
    # differing lm_head untied), transformers keeps a head of its own, and import reads it untied
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    exported_model = _load_hf(out)
    if case == "gated_gelu_untied":  # (unequal_depth's head equals the embedding: sharing it is harmless)
        assert exported_model.lm_head.weight.data_ptr() != exported_model.shared.weight.data_ptr()
    np.testing.assert_array_equal(exported_model.lm_head.weight.detach().numpy(), exported["lm_head.weight"])
    assert not hf.load(out)[0].logits_via_embedding


def test_tied_model_exports_without_lm_head(hf_dirs, tmp_path):
    config, params = hf.load(hf_dirs["gated_silu_tied"])
    hf.save(config, params, str(tmp_path))
    exported = load_file(str(tmp_path / hf.SAFE_WEIGHTS))
    original = load_file(os.path.join(hf_dirs["gated_silu_tied"], hf.SAFE_WEIGHTS))
    assert exported.keys() == original.keys()
    encoder, decoder_inputs, _ = _batch()
    np.testing.assert_array_equal(_hf_logits(_load_hf(str(tmp_path)), encoder, decoder_inputs),
                                  _hf_logits(_load_hf(hf_dirs["gated_silu_tied"]), encoder, decoder_inputs))


def test_decoder_norm_without_scale_exports_as_ones(hf_dirs, tmp_path):
    config, params = hf.load(hf_dirs["relu"])
    config = config.replace(decoder_norm_use_scale=False)
    del params["decoder"]["decoder_norm"]
    hf.save(config, params, str(tmp_path))
    exported = load_file(str(tmp_path / hf.SAFE_WEIGHTS))
    np.testing.assert_array_equal(exported["decoder.final_layer_norm.weight"], np.ones(TINY["d_model"]))
    encoder, decoder_inputs, targets = _batch()
    ours = _our_logits(config, params, encoder, decoder_inputs, targets)
    theirs = _hf_logits(_load_hf(str(tmp_path)), encoder, decoder_inputs)
    assert np.abs(ours - theirs)[targets != 0].max() <= 1e-4


def test_greedy_decoding_equals_transformers_generate(hf_dirs, tmp_path):
    config, params = hf.load(hf_dirs["gated_gelu_untied"])
    hf.save(config, params, str(tmp_path))  # its generation_config.json supplies the start token
    rng = np.random.RandomState(1)
    encoder = rng.randint(3, VOCAB, (3, 30))
    encoder[1, 19:] = 0
    encoder[2, 5:] = 0
    ours = np.asarray(greedy_decode(params, config, jnp.asarray(encoder), max_decode_length=20))
    with torch.no_grad():
        theirs = _load_hf(str(tmp_path)).generate(
            input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder != 0), do_sample=False,
            num_beams=1, max_new_tokens=20).numpy()
    assert theirs[:, 0].tolist() == [0, 0, 0]  # decoder start token
    # a random model with its own head emits varied tokens and no EOS: 20 steps really are compared
    assert theirs.shape == (3, 21) and not (theirs[:, 1:] == 1).any()
    assert all(len(set(row)) >= 3 for row in theirs[:, 1:].tolist()) and len(set(theirs.ravel())) >= 10
    np.testing.assert_array_equal(ours, theirs[:, 1:])


def test_sharded_export_loads_in_both_directions(hf_dirs, tmp_path):
    config, params = hf.load(hf_dirs["gated_gelu_untied"])
    hf.save(config, params, str(tmp_path), max_shard_bytes=40_000)  # the embedding alone is 40 KiB
    shards = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))
    assert len(shards) > 2 and hf.SAFE_WEIGHTS not in os.listdir(tmp_path)
    _, reloaded = hf.load(str(tmp_path))
    reloaded, params = (traverse_util.flatten_dict(p, sep="/") for p in (reloaded, params))
    assert reloaded.keys() == params.keys()
    assert all(np.array_equal(reloaded[k], params[k]) for k in params)
    encoder, decoder_inputs, _ = _batch()
    np.testing.assert_array_equal(_hf_logits(_load_hf(str(tmp_path)), encoder, decoder_inputs),
                                  _hf_logits(_load_hf(hf_dirs["gated_gelu_untied"]), encoder, decoder_inputs))


def test_mt5_directory_imports(tmp_path):
    torch.manual_seed(0)
    model = transformers.MT5ForConditionalGeneration(transformers.MT5Config(
        **{**TINY, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})).eval()
    model.save_pretrained(tmp_path)
    config, params = hf.load(str(tmp_path))
    encoder, decoder_inputs, targets = _batch()
    ours = _our_logits(config, params, encoder, decoder_inputs, targets)
    assert np.abs(ours - _hf_logits(model, encoder, decoder_inputs))[targets != 0].max() <= 1e-4


# ------------------------------------------------------------------------------ bad input

def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = (os.stat(path).st_mtime_ns, f.read())
    return out


def _one_line_error(capsys, command):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ul2lab {command}: error: ") and "\n" not in err, err
    return err


def test_non_t5_directory_is_refused(tmp_path, capsys):
    bart = tmp_path / "bart"
    transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)).save_pretrained(bart)
    capsys.readouterr()  # transformers' progress bar
    out = tmp_path / "ckpt"
    assert main(["import-hf", "--hf_dir", str(bart), "--output_dir", str(out)]) == 2
    err = _one_line_error(capsys, "import-hf")
    assert str(bart) in err and "'bart'" in err and "t5" in err
    assert not out.exists()


def test_missing_files_are_refused(hf_dirs, tmp_path, capsys):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(open(os.path.join(hf_dirs["relu"], "config.json")).read())
    assert main(["import-hf", "--hf_dir", str(no_weights), "--output_dir", str(tmp_path / "a")]) == 2
    err = _one_line_error(capsys, "import-hf")
    assert str(no_weights) in err and "model.safetensors" in err

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with open(os.path.join(hf_dirs["relu"], hf.SAFE_WEIGHTS), "rb") as f:
        (no_config / hf.SAFE_WEIGHTS).write_bytes(f.read())
    assert main(["import-hf", "--hf_dir", str(no_config), "--output_dir", str(tmp_path / "b")]) == 2
    assert str(no_config) in _one_line_error(capsys, "import-hf")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_shape_mismatch_is_refused(hf_dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    hf_config = json.load(open(os.path.join(hf_dirs["relu"], "config.json")))
    hf_config["d_ff"] = 48  # weights were saved with d_ff 64
    (bad / "config.json").write_text(json.dumps(hf_config))
    (bad / hf.SAFE_WEIGHTS).write_bytes(open(os.path.join(hf_dirs["relu"], hf.SAFE_WEIGHTS), "rb").read())
    assert main(["import-hf", "--hf_dir", str(bad), "--output_dir", str(tmp_path / "ckpt")]) == 2
    err = _one_line_error(capsys, "import-hf")
    assert "DenseReluDense.wi.weight" in err and "(64, 32)" in err and "(48, 32)" in err


def test_existing_outputs_are_not_overwritten(hf_dirs, tmp_path, capsys):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "exported")
    assert main(["import-hf", "--hf_dir", hf_dirs["relu"], "--output_dir", ckpt]) == 0
    assert main(["export-hf", "--checkpoint_dir", ckpt, "--output_dir", out]) == 0
    capsys.readouterr()
    kept_ckpt, kept_out = _snapshot(ckpt), _snapshot(out)

    # another model into the same checkpoint directory
    assert main(["import-hf", "--hf_dir", hf_dirs["gated_silu_tied"], "--output_dir", ckpt]) == 2
    err = _one_line_error(capsys, "import-hf")
    assert ckpt in err and "--overwrite" in err
    assert main(["export-hf", "--checkpoint_dir", ckpt, "--output_dir", out]) == 2
    err = _one_line_error(capsys, "export-hf")
    assert out in err and "--overwrite" in err
    assert _snapshot(ckpt) == kept_ckpt and _snapshot(out) == kept_out

    # --overwrite replaces both
    assert main(["import-hf", "--hf_dir", hf_dirs["gated_silu_tied"], "--output_dir", ckpt,
                 "--overwrite"]) == 0
    assert checkpoints.read_config(ckpt)[0].mlp_activations == ("silu", "linear")
    assert main(["export-hf", "--checkpoint_dir", ckpt, "--output_dir", out, "--overwrite"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["feed_forward_proj"] == "gated-silu"


# ------------------------------------------------------------------------------ tokenizer files

def _train_sentencepiece(path):
    import sentencepiece as spm
    rng = np.random.RandomState(0)
    syllables = ["ka", "lo", "mi", "tre", "sun", "ba", "ro", "el", "qu", "zi", "pa", "nor", "the", "cat"]
    words = ["".join(rng.choice(syllables, rng.randint(1, 4))) for _ in range(300)]
    sentences = [" ".join(rng.choice(words, rng.randint(3, 12))) for _ in range(500)]
    # T5's conventions: pad 0, eos 1, unk 2, no bos
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(path), vocab_size=200,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{path}.model"), " ".join(sentences[:2])


def test_export_writes_tokenizer_that_transformers_loads_offline(hf_dirs, tmp_path):
    sp, sentence = _train_sentencepiece(tmp_path / "sp")
    # an HF dir that ships its spiece.model: import-hf records it, export-hf writes the tokenizer
    source = tmp_path / "hf_with_vocab"
    _build_hf_model(source, **CASES["relu"])
    (source / hf.SPM_FILE).write_bytes((tmp_path / "sp.model").read_bytes())
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "exported")
    assert main(["import-hf", "--hf_dir", str(source), "--output_dir", ckpt]) == 0
    # the vocabulary is copied into the checkpoint and recorded by that name: the directory is portable
    assert checkpoints.read_config(ckpt)[1]["vocab_path"] == hf.SPM_FILE
    assert (tmp_path / "ckpt" / hf.SPM_FILE).read_bytes() == (tmp_path / "sp.model").read_bytes()
    assert main(["export-hf", "--checkpoint_dir", ckpt, "--output_dir", out]) == 0
    assert {hf.SPM_FILE, "tokenizer_config.json"} <= set(os.listdir(out))

    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = sp.encode(sentence)
    assert len(ids) > 10 and max(ids) > 3
    assert tokenizer(sentence).input_ids == ids + [1]  # T5 appends EOS
    assert tokenizer.decode(ids) == sp.decode(ids)
    # sentinels count down from the top, as seqio's SentencePieceVocabulary(extra_ids=100) adds them
    assert tokenizer("<extra_id_0>").input_ids == [200 + 100 - 1, 1]
    assert tokenizer("<extra_id_99>").input_ids == [200, 1]


def test_exported_tokenizer_gives_seqio_ids_on_any_text(tmp_path):
    """Byte fallback (accents, CJK, emoji, control characters outside the vocabulary) and sentinels:
    transformers' own T5 conversion turned byte fallback off, so `café 😀` became <unk>s there."""
    import seqio
    from ul2lab.data import vocab
    rng = np.random.RandomState(0)
    words = ["".join(rng.choice(list("abcdefghiklmnoprstu"), rng.randint(2, 7))) for _ in range(300)]
    vocab_path = vocab.train_sentencepiece([" ".join(rng.choice(words, 10)) for _ in range(800)], 300,
                                           str(tmp_path / "sp"))
    hf.write_tokenizer(vocab_path, str(tmp_path / "tok"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    seqio_vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=100)
    texts = ["café crème brûlée naïve Zürich", "東京 北京 서울 日本語のテキスト", "😀 🎉👍🏽 family 👨‍👩‍👧",
             "tab\there\x01\x7f bell\x07 nul-free ￿", "<extra_id_0> fills <extra_id_1> and <extra_id_99>",
             "x<extra_id_5>y", "  leading and   inner  spaces ", "ÅÄÖ ﬁ ① Ｆｕｌｌ"]
    for text in texts:
        want = [int(i) for i in seqio_vocab.encode(text)]
        assert tokenizer(text, add_special_tokens=False).input_ids == want, text
        assert tokenizer(text).input_ids == want + [1]  # EOS, as seqio's tasks append it
    byte_pieces = [i for i in seqio_vocab.encode("😀") if 3 <= i < 3 + 256]
    assert byte_pieces  # the emoji is outside this vocabulary: it is spelled in byte pieces, not <unk>
    assert 2 not in tokenizer("café 😀 東京").input_ids


def test_bad_vocabulary_writes_nothing(hf_dirs, tmp_path, capsys):
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "exported"
    not_a_model = tmp_path / "vocab.model"
    not_a_model.write_text("not a sentencepiece model")
    assert main(["import-hf", "--hf_dir", hf_dirs["relu"], "--output_dir", ckpt]) == 0
    capsys.readouterr()
    assert main(["export-hf", "--checkpoint_dir", ckpt, "--output_dir", str(out),
                 "--vocab_path", str(not_a_model)]) == 2
    assert str(not_a_model) in _one_line_error(capsys, "export-hf")
    assert not out.exists() or not os.listdir(out)
