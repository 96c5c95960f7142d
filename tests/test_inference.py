"""Beam search, sampling and scoring on a tiny random T5, against brute force and greedy decoding."""
import itertools
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ul2lab.cli import main as cli
from ul2lab.models import decoding as inference
from ul2lab.train import checkpoints
from ul2lab.models import decoding
from ul2lab.models.config import preset
from ul2lab.models.network import Transformer, init_params

EOS = 1


@pytest.fixture(scope="module")
def vocab8():
    """A tiny T5 over 8 tokens: every output of length <= 3 can be enumerated (8^3 = 512)."""
    config = preset("tiny", vocab_size=8)
    params = jax.jit(lambda rng: init_params(config, rng))(jax.random.PRNGKey(3))
    # this random model prefers padding (0); swapping the logit rows of 0 and EOS makes it end
    # sequences often, so the EOS paths are exercised
    kernel = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = kernel[:, jnp.array([1, 0, 2, 3, 4, 5, 6, 7])]
    inputs = jnp.array([[5, 3, 7, 2, 1], [4, 4, 6, 1, 0], [2, 7, 1, 0, 0], [6, 5, 4, 3, 1]], jnp.int32)
    return config, params, inputs


def test_top_p_keeps_the_minimal_nucleus():
    probs = np.array([[0.05, 0.5, 0.15, 0.3], [0.2, 0.35, 0.4, 0.05]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    kept = lambda p: (np.asarray(inference.top_p_filter(logits, p)) > inference.NEG_INF / 2).astype(int)
    np.testing.assert_array_equal(kept(0.3), [[0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(kept(0.45), [[0, 1, 0, 0], [0, 1, 1, 0]])  # 0.4 < 0.45: one more
    np.testing.assert_array_equal(kept(0.6), [[0, 1, 0, 1], [0, 1, 1, 0]])
    np.testing.assert_array_equal(kept(0.85), [[0, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(kept(1.0), np.ones((2, 4), int))
    # kept logits are unchanged
    np.testing.assert_array_equal(np.asarray(inference.top_p_filter(logits, 0.6))[0, [1, 3]],
                                  np.asarray(logits)[0, [1, 3]])


def test_top_k_filter_and_brevity_penalty():
    logits = jnp.array([[0.1, 2.0, -1.0, 0.7, 1.5]])
    kept = np.asarray(inference.top_k_filter(logits, 2)) > inference.NEG_INF / 2
    np.testing.assert_array_equal(kept, [[0, 1, 0, 0, 1]])
    assert np.all(np.asarray(inference.top_k_filter(logits, 0)) == np.asarray(logits))
    np.testing.assert_allclose(float(inference.brevity_penalty(0.6, 7)), (12 / 6) ** 0.6, rtol=1e-6)


def brute_force_outputs(config, params, encoder_input, length, alpha):
    """{output tokens (EOS-terminated or full length): length-penalized score} for one example."""
    seqs = np.array(list(itertools.product(range(config.vocab_size), repeat=length)), np.int32)
    n = len(seqs)
    decoder_input = np.pad(seqs[:, :-1], ((0, 0), (1, 0)))
    # all positions valid: the cached decoder also attends to a generated 0
    forward = jax.jit(Transformer(config).apply)
    logits = forward({"params": params}, np.repeat(encoder_input[None], n, 0), decoder_input, np.ones_like(seqs))
    token_logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), seqs[..., None], -1)[..., 0]
    outputs = {}
    for seq, logp in zip(seqs, token_logp):
        end = list(seq).index(EOS) + 1 if EOS in seq else length
        out = tuple(seq[:end]) + (0,) * (length - end)
        outputs[out] = logp[:end].sum() / ((5 + end) / 6) ** alpha
    return outputs


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_finds_the_best_sequence_by_brute_force(vocab8, alpha):
    config, params, inputs = vocab8
    length, beam = 3, 64  # 64 beams keep every prefix of length 2: the search is exhaustive
    tokens, scores, log_probs = inference.beam_search_predict(params, config, inputs[:2], length,
                                                              beam_size=beam, alpha=alpha)
    for b in range(2):
        outputs = brute_force_outputs(config, params, np.asarray(inputs[b]), length, alpha)
        ranked = sorted(outputs.items(), key=lambda kv: -kv[1])
        assert tuple(np.asarray(tokens[b, 0])) == ranked[0][0]
        np.testing.assert_allclose(np.asarray(scores[b, :5]), [s for _, s in ranked[:5]], rtol=1e-4)
        for k in range(5):  # every returned beam carries its own true score
            np.testing.assert_allclose(float(scores[b, k]), outputs[tuple(np.asarray(tokens[b, k]))], rtol=1e-4)
        assert np.all(np.diff(np.asarray(scores[b])) <= 1e-6)  # best first


def test_beam_size_1_greedy_top_k_1_and_cold_sampling_equal_greedy(vocab8):
    config, params, inputs = vocab8
    length = 6
    greedy = np.asarray(decoding.greedy_decode(params, config, inputs, length))
    beam_tokens, _, beam_logp = inference.beam_search_predict(params, config, inputs, length,
                                                              beam_size=1, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(beam_tokens[:, 0]), greedy)
    top1, top1_logp = inference.sample_predict(params, config, inputs, length, jax.random.PRNGKey(7), top_k=1)
    np.testing.assert_array_equal(np.asarray(top1), greedy)
    cold, _ = inference.sample_predict(params, config, inputs, length, jax.random.PRNGKey(8), temperature=1e-6)
    np.testing.assert_array_equal(np.asarray(cold), greedy)
    np.testing.assert_allclose(np.asarray(top1_logp), np.asarray(beam_logp[:, 0]), rtol=1e-5)
    assert (greedy == EOS).any(axis=1).sum() >= 1  # the EOS path was exercised


@pytest.mark.parametrize("temperature, top_k, top_p", [(2.0, 3, 1.0), (0.5, 0, 0.7)])
def test_sampling_follows_temperature_top_k_and_top_p(temperature, top_k, top_p):
    """Sample many rows from a toy step function with fixed logits; compare frequencies."""
    logits = jnp.array([0.3, -1.0, 2.0, 1.2, 0.0, 1.9], jnp.float32)
    n = 6000

    def step_fn(tokens, cache):
        return jnp.broadcast_to(logits, (tokens.shape[0], logits.shape[0])), cache

    tokens, log_lik = jax.jit(lambda rng: inference.temperature_sample(
        step_fn, (), n, 1, rng, temperature, top_k, top_p, eos_id=99))(jax.random.PRNGKey(0))
    p = np.exp(np.asarray(logits) / temperature)
    p /= p.sum()
    keep = np.zeros(len(p), bool)
    order = np.argsort(-p)
    keep[order[:top_k or len(p)]] = True
    if top_p < 1:  # smallest set of the most likely tokens with probability >= top_p
        keep &= np.isin(np.arange(len(p)), order[:np.searchsorted(np.cumsum(p[order]), top_p) + 1])
    want = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
    freq = np.bincount(np.asarray(tokens[:, 0]), minlength=len(p)) / n
    np.testing.assert_allclose(freq, want, atol=0.025)
    assert keep.sum() in (2, 3) and np.all(freq[~keep] == 0)
    # the score is the unfiltered model's log-probability of the sampled token
    log_softmax = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(np.asarray(log_lik), log_softmax[np.asarray(tokens[:, 0])], rtol=1e-5)


# ---------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from ul2lab.data import vocab
    root = tmp_path_factory.mktemp("infer")
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "an", "or", "el"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(1500)]
    vocab_path = vocab.train_sentencepiece(lines, 300, str(root / "sp"))
    config = preset("tiny")  # vocab 512 >= 300 pieces + 100 extra ids
    params = jax.jit(lambda rng: init_params(config, rng))(jax.random.PRNGKey(0))
    checkpoints.save_params(str(root / "ckpt"), params, config, vocab_path=vocab_path)
    return root, config, params, vocab_path, lines


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write("\n")  # a trailing blank line is ignored


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_infer_predict_and_score_end_to_end(checkpoint, capsys):
    import seqio
    root, config, params, vocab_path, lines = checkpoint
    rows = [{"inputs": lines[i], "targets": lines[i + 10], "id": i} for i in range(3)]
    write_jsonl(root / "in.jsonl", rows)
    ckpt = str(root / "ckpt")

    vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=100)
    predictions = {}
    for name, extra in [("greedy", []), ("beam", ["--beam_size", "2", "--max_input_length", "6"])]:
        out = str(root / "pred.jsonl")
        assert cli.main(["infer", "--checkpoint_dir", ckpt, "--input_file", str(root / "in.jsonl"),
                         "--output_file", out, "--batch_size", "2", "--max_decode_length", "8",
                         "--overwrite", *extra]) == 0
        preds = read_jsonl(out)
        assert [p["id"] for p in preds] == [0, 1, 2]  # one line per input, in order, fields kept
        assert all(isinstance(p["prediction"], str) and p["score"] < 0 for p in preds)
        predictions[name] = [p["prediction"] for p in preds]
    assert "3 of 3 inputs are longer than 6 tokens and were truncated" in capsys.readouterr().err
    # greedy predictions are the network's greedy decoding of each input, alone and unpadded
    for row, got in zip(rows, predictions["greedy"]):
        ids = np.array([list(vocab.encode(row["inputs"])) + [EOS]], np.int32)
        tokens = [int(t) for t in np.asarray(decoding.greedy_decode(params, config, ids, 8))[0]]
        tokens = tokens[:tokens.index(EOS)] if EOS in tokens else tokens
        assert got == vocab.decode([t for t in tokens if t])

    out = str(root / "score.jsonl")
    assert cli.main(["infer", "--checkpoint_dir", ckpt, "--input_file", str(root / "in.jsonl"),
                     "--output_file", out, "--mode", "score", "--batch_size", "2",
                     "--max_decode_length", "4"]) == 0  # scoring never truncates the targets
    scores = [r["score"] for r in read_jsonl(out)]
    # independently: a forward pass over the examples padded to other lengths than the CLI's,
    # summing the log-softmax of each target token
    enc = np.zeros((3, 70), np.int32)
    tgt = np.zeros((3, 90), np.int32)
    for i, row in enumerate(rows):
        ids = list(vocab.encode(row["inputs"])) + [EOS]
        enc[i, :len(ids)] = ids
        ids = list(vocab.encode(row["targets"])) + [EOS]
        tgt[i, :len(ids)] = ids
    dec_in = np.pad(tgt[:, :-1], ((0, 0), (1, 0)))
    logits = np.asarray(jax.jit(Transformer(config).apply)({"params": params}, enc, dec_in, tgt), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = (np.take_along_axis(logp, tgt[..., None], -1)[..., 0] * (tgt > 0)).sum(-1)
    np.testing.assert_allclose(scores, want, rtol=1e-4)


def test_infer_bad_input_is_a_clear_error_and_keeps_files(checkpoint, tmp_path, capsys):
    root, *_ = checkpoint
    ckpt = str(root / "ckpt")
    write_jsonl(tmp_path / "in.jsonl", [{"inputs": "ka lo"}])
    args = ["infer", "--checkpoint_dir", ckpt, "--input_file", str(tmp_path / "in.jsonl")]
    assert cli.main(args + ["--output_file", str(tmp_path / "o.jsonl"), "--mode", "score"]) == 2
    assert 'no text "targets" field' in capsys.readouterr().err
    (tmp_path / "keep.jsonl").write_text("precious\n")
    assert cli.main(args + ["--output_file", str(tmp_path / "keep.jsonl")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "keep.jsonl").read_text() == "precious\n"
    assert cli.main(args + ["--output_file", str(tmp_path / "o.jsonl"), "--beam_size", "3",
                            "--temperature", "1"]) == 2
    assert "choose beam search or sampling" in capsys.readouterr().err
    assert cli.main(["infer", "--checkpoint_dir", str(tmp_path), "--input_file", str(tmp_path / "in.jsonl"),
                     "--output_file", str(tmp_path / "o.jsonl")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_eval_runs_a_seqio_task_with_the_models_predictions_and_scores(checkpoint, tmp_path, capsys):
    import seqio
    import tensorflow as tf
    root, config, params, vocab_path, lines = checkpoint
    vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=100)
    examples = {"inputs": lines[20:25], "targets": lines[30:35]}
    name = "ul2lab_test_eval_task"

    def dataset_fn(split, shuffle_files=False, seed=None):
        return tf.data.Dataset.from_tensor_slices(examples)

    def mean_prediction_chars(targets, predictions):
        return {"mean_prediction_chars": float(np.mean([len(p) for p in predictions]))}

    def mean_log_likelihood(targets, scores):
        return {"mean_log_likelihood": float(np.mean(scores))}

    features = {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=features, metric_fns=[mean_prediction_chars, mean_log_likelihood])
    try:
        out = str(tmp_path / "metrics.json")
        assert cli.main(["eval", "--checkpoint_dir", str(root / "ckpt"), "--mixture_or_task", name,
                         "--feature_lengths", "inputs=64,targets=64", "--max_decode_length", "8",
                         "--batch_size", "4", "--output_file", out]) == 0
        with open(out) as f:
            metrics = json.load(f)[name]
        # the same eval as t5x users write it: gin/runs/eval.gin + macros, metrics into EVAL_OUTPUT_DIR
        capsys.readouterr()
        assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH={root / 'ckpt'}",
                         f"--gin.MIXTURE_OR_TASK_NAME={name}", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
                         "--gin.BATCH_SIZE=4", "--gin.EvalConfig.max_decode_length=8",
                         f"--gin.EVAL_OUTPUT_DIR={tmp_path / 'eval'}"]) == 0
        with open(tmp_path / "eval" / "metrics.json") as f:
            assert json.load(f) == {name: metrics}
        printed = capsys.readouterr().out
        assert f"{name}/mean_log_likelihood: {metrics['mean_log_likelihood']}" in printed
    finally:
        seqio.TaskRegistry.remove(name)

    # the same examples through `ul2lab infer`
    write_jsonl(tmp_path / "in.jsonl", [{"inputs": i, "targets": t} for i, t in zip(*examples.values())])
    common = ["--checkpoint_dir", str(root / "ckpt"), "--input_file", str(tmp_path / "in.jsonl"),
              "--batch_size", "4"]
    assert cli.main(["infer", *common, "--output_file", str(tmp_path / "p.jsonl"), "--max_decode_length", "8"]) == 0
    assert cli.main(["infer", *common, "--output_file", str(tmp_path / "s.jsonl"), "--mode", "score",
                     "--max_decode_length", "64"]) == 0
    predictions = [r["prediction"] for r in read_jsonl(tmp_path / "p.jsonl")]
    scores = [r["score"] for r in read_jsonl(tmp_path / "s.jsonl")]
    assert metrics["mean_prediction_chars"] == pytest.approx(np.mean([len(p) for p in predictions]))
    assert metrics["mean_prediction_chars"] > 0
    assert metrics["mean_log_likelihood"] == pytest.approx(np.mean(scores), rel=1e-4)


def test_infer_through_gin_files_equals_flags_and_flags_win(checkpoint, tmp_path):
    root, config, params, vocab_path, lines = checkpoint
    ckpt = str(root / "ckpt")
    write_jsonl(tmp_path / "in.jsonl", [{"inputs": lines[i], "targets": lines[i + 10]} for i in range(3)])
    flags = ["infer", "--checkpoint_dir", ckpt, "--input_file", str(tmp_path / "in.jsonl"), "--batch_size", "2",
             "--max_decode_length", "8"]
    gin = ["infer", "--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_PATH={ckpt}",
           f"--gin.INPUT_FILE={tmp_path / 'in.jsonl'}", "--gin.BATCH_SIZE=2", "--gin.MAX_DECODE_LENGTH=8"]
    sampling = ["--temperature", "0.7", "--top_k", "5", "--top_p", "0.9", "--seed", "3"]
    runs = {  # name: (flag run, gin run)
        "greedy": (flags, gin),
        "sampling": (flags + sampling,
                     gin + ["--gin.TEMPERATURE=0.7", "--gin.TOP_K=5", "--gin.TOP_P=0.9", "--gin.InferConfig.seed=3"]),
        # an explicit flag wins over the gin file's MODE; a flag also fills a %gin.REQUIRED macro
        "score": (flags + ["--mode", "score"],
                  gin + ["--gin.MODE='predict'", "--mode", "score", "--output_file", str(tmp_path / "gin_score.jsonl")]),
    }
    outputs = {}
    for name, (by_flags, by_gin) in runs.items():
        assert cli.main(by_flags + ["--output_file", str(tmp_path / f"flags_{name}.jsonl")]) == 0
        if "--output_file" not in by_gin:
            by_gin = by_gin + [f"--gin.OUTPUT_FILE={tmp_path / f'gin_{name}.jsonl'}"]
        assert cli.main(by_gin) == 0
        outputs[name] = read_jsonl(tmp_path / f"flags_{name}.jsonl")
        assert read_jsonl(tmp_path / f"gin_{name}.jsonl") == outputs[name]
    assert all("prediction" not in r and r["score"] < 0 for r in outputs["score"])
    # the sampling settings reached the decoder: sampled predictions are not the greedy ones
    assert [r["prediction"] for r in outputs["sampling"]] != [r["prediction"] for r in outputs["greedy"]]


@pytest.mark.parametrize("argv, message", [
    (["eval", "--gin_file=runs/eval.gin", "--gin.CHECKPOINT_PTH={ckpt}", "--gin.MIXTURE_OR_TASK_NAME=t"],
     "gin: the macro CHECKPOINT_PTH is not used by any gin file; did you mean CHECKPOINT_PATH?"),
    (["infer", "--gin_file=runs/infer.gin", "--gin.InferConfig.beam_sise=2", "--checkpoint_dir={ckpt}",
      "--input_file=in.jsonl", "--output_file={out}"],
     "gin: InferConfig has no parameter 'beam_sise'; did you mean beam_size"),
    (["eval", "--gin_file=runs/eval.gin", "--gin.CHECKPOINT_PATH={ckpt}"],
     "required settings MIXTURE_OR_TASK_NAME are not set; pass --gin.MIXTURE_OR_TASK_NAME=... or --mixture_or_task"),
    (["infer", "--gin_file=runs/infer.gin", "--gin.CHECKPOINT_PATH={ckpt}", "--gin.INPUT_FILE=in.jsonl"],
     # OUTPUT_FILE is optional in infer.gin (a task and INFER_OUTPUT_DIR are the other way): checked with INPUT_FILE
     "--output_file (gin OUTPUT_FILE) required with --input_file: pass --output_file ..., or --gin.OUTPUT_FILE=..."),
    (["infer", "--gin_file=runs/infer.gin", "--gin.CHECKPOINT_PATH={ckpt}", "--gin.INPUT_FILE=in.jsonl",
      "--gin.OUTPUT_FILE={out}", "--gin.MODE='scores'"],
     "--mode (InferConfig.mode) 'scores' is invalid; use predict or score"),
    (["infer", "--checkpoint_dir={ckpt}", "--input_file=in.jsonl"],
     "--output_file (gin OUTPUT_FILE) required with --input_file: pass --output_file ..., or --gin.OUTPUT_FILE=... "
     "with --gin_file=gin/runs/infer.gin"),
])
def test_eval_and_infer_gin_mistakes_are_one_line_errors(checkpoint, tmp_path, capsys, argv, message):
    root, *_ = checkpoint
    out = tmp_path / "out.jsonl"
    argv = [a.format(ckpt=root / "ckpt", out=out) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
