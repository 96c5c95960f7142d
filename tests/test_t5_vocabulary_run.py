"""T5's vocabulary paired as T5 and t5x pair it, and the real-scale run file on local stand-ins.

Neither T5's GCS vocabulary nor C4 is reachable offline, so the tests build stand-ins of the same
format: a SentencePiece model with T5's layout (32,000 pieces: pad 0, eos 1, unk 2, byte
fallback, the rest filled with unused pieces; its `.100extra` twin carries <extra_id_99> ...
<extra_id_0> as user-defined pieces at ids 32,000-32,099) and a TFDS-prepared `c4/en:3.1.0`
directory (tfrecord shards, dataset_info.json, features.json, the features tfds's own C4 builder
declares). Then gin/runs/pretrain_ul2.gin itself trains 2 steps on them through `ul2lab train`:
the same gin files and the same c4_ul2 task code, pointed at the stand-ins by
$UL2LAB_T5_VOCABULARY and --tfds_data_dir as a user without GCS would.
"""
import json
import os

import numpy as np
import pytest
import seqio

from conftest import first_documents
from ul2lab.data import objectives as O
from ul2lab.data import vocab

T5_PIECES = 32_000


def _t5_layout_model(documents, directory) -> bytes:
    """A small SentencePiece model grown to T5's 32,000 pieces with UNUSED pieces (never produced
    by encoding, like the rare pieces of cc_all.32000 for this text)."""
    from sentencepiece import sentencepiece_model_pb2
    path = vocab.train_sentencepiece(documents, 800, os.path.join(directory, "small"), num_threads=1)
    with open(path, "rb") as f:
        proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    for i in range(len(proto.pieces), T5_PIECES):
        proto.pieces.add(piece=f"<unused_{i}>", score=0.0, type=unused)
    return proto.SerializeToString()


@pytest.fixture(scope="module")
def t5_standins(tmp_path_factory):
    """{"cc_all.32000": path, "cc_all.32000.100extra": path}: the two public forms of T5's vocabulary."""
    directory = tmp_path_factory.mktemp("t5_vocab")
    model = _t5_layout_model(first_documents(), str(directory))
    paths = {}
    for name, data in (("cc_all.32000", model),
                       ("cc_all.32000.100extra", vocab.add_sentinel_pieces(model, vocab.T5_EXTRA_IDS))):
        (directory / name).mkdir()
        paths[name] = str(directory / name / "sentencepiece.model")
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


@pytest.mark.parametrize("form", ["cc_all.32000", "cc_all.32000.100extra"])
def test_both_forms_of_t5s_vocabulary_pair_as_t5_does(t5_standins, form, monkeypatch):
    monkeypatch.setenv(vocab.T5_VOCABULARY_ENV, t5_standins[form])
    v = vocab.t5_vocabulary()
    assert v.sentencepiece_model_file == t5_standins[form]
    import sentencepiece
    in_file = sentencepiece.SentencePieceProcessor(model_file=t5_standins[form]).get_piece_size()
    assert in_file == (T5_PIECES if form == "cc_all.32000" else T5_PIECES + 100)
    assert v.extra_ids == (100 if form == "cc_all.32000" else 0)  # T5: +100 extra ids, or none
    assert v.vocab_size == 32_100 and O.sentinel_id(v) == 32_099 and O.sentinel_count(v) == 100
    # sentinel order: <extra_id_k> = 32,099 - k, counting down from the top, both forms alike
    for k in (0, 1, 37, 99):
        assert v.decode([32_099 - k]) == f"<extra_id_{k}>"
    assert v.decode([31_999]) != "<extra_id_100>"  # the last ordinary piece is no sentinel
    # ordinary text: the same ids in both forms, all below the sentinels
    text = " ".join(first_documents(3)[2].split()[:60])
    ids = v.encode(text)
    other = vocab.t5_vocabulary(t5_standins["cc_all.32000" if form != "cc_all.32000" else "cc_all.32000.100extra"])
    assert ids == other.encode(text) and max(ids) < 32_000 and v.decode(ids) == text
    # the 32,128-row presets take it; the mixture plans UL2 at 512 within its 100 sentinels
    plans = O.plan_denoisers("UL2", {"inputs": 512, "targets": 512}, v)
    assert max(p.max_sentinels for p in plans) == 100


def test_t5_vocabulary_default_is_t5s_public_file_with_100_extra_ids(monkeypatch):
    monkeypatch.delenv(vocab.T5_VOCABULARY_ENV, raising=False)
    v = vocab.t5_vocabulary()
    assert v.sentencepiece_model_file == "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
    assert v.extra_ids == 100  # 32,000 + 100 = 32,100 ids; not opened until the data is read


def _prepare_c4_standin(data_dir: str, documents) -> None:
    """c4/en:3.1.0 as `tfds build` prepares it: one tfrecord shard per split, serialized with the
    features of tfds's C4 builder, plus dataset_info.json / features.json."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    builder = tfds.builder("c4/en:3.1.0", data_dir=data_dir)
    os.makedirs(builder.data_dir)
    splits = []
    for split, texts in (("train", documents[:-20]), ("validation", documents[-20:])):
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name="c4", split=split, filetype_suffix="tfrecord")
        path = os.fspath(template.sharded_filepath(shard_index=0, num_shards=1))
        with tf.io.TFRecordWriter(path) as writer:
            for i, text in enumerate(texts):
                writer.write(builder.info.features.serialize_example(
                    {"text": text, "url": f"https://example.org/{split}/{i}", "content-type": "text/plain",
                     "content-length": str(len(text.encode())), "timestamp": "2019-04-25T12:57:54Z"}))
        splits.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(texts)],
                                          num_bytes=os.path.getsize(path), filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.write_to_directory(builder.data_dir)


def test_pretrain_ul2_gin_trains_2_steps_on_c4_and_t5_vocabulary_standins(t5_standins, tmp_path, monkeypatch):
    import jax

    import ul2lab_tasks.text as text_tasks
    from ul2lab.cli import main as cli

    tfds_dir, model_dir = str(tmp_path / "tfds"), str(tmp_path / "run")
    _prepare_c4_standin(tfds_dir, first_documents(300))
    monkeypatch.setenv(vocab.T5_VOCABULARY_ENV, t5_standins["cc_all.32000"])
    text_tasks.register_c4_ul2()  # what importing ul2lab_tasks does, now with the variable set
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    try:
        # the real run file at its real lengths (512/512, packed) and T5's vocabulary; only the
        # model (tiny, 32,128 rows as T5's presets), the batch and the step count are small
        code = cli.main(["train", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/pretrain_ul2.gin",
                         f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4",
                         "--gin.preset.vocab_size=32128", "--gin.TrainConfig.num_devices=1",
                         "--gin.TrainConfig.log_period=1", f"--tfds_data_dir={tfds_dir}"])
        assert code == 0
        with open(os.path.join(model_dir, "metrics.jsonl")) as f:
            records = [r for r in map(json.loads, f) if "loss" in r]  # training records, not evaluations
        assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
        with open(os.path.join(model_dir, "config.gin")) as f:
            operative = f.read()
        assert "MIXTURE_OR_TASK_NAME = 'c4_ul2'" in operative and "'inputs': 512" in operative
        # what it trained on: C4 stand-in text under the MoD, T5's sentinels at 32,099 downwards
        task = seqio.get_mixture_or_task("c4_ul2")
        assert task.output_features["targets"].vocabulary.vocab_size == 32_100
        examples = list(task.get_dataset({"inputs": 512, "targets": 512}, split="train", shuffle=False,
                                         seed=0).take(40).as_numpy_iterator())
        assert max(int(np.max(e["targets"])) for e in examples) == 32_099
        for e in examples:  # the ids at and above 32,000 are <extra_id_0>, <extra_id_1>, ... in order
            sentinels = [int(i) for i in e["targets"] if i >= 32_000]
            assert sentinels == list(range(32_099, 32_099 - len(sentinels), -1))
            assert [int(i) for i in e["inputs"] if i >= 32_000] == sentinels
    finally:
        seqio.set_tfds_data_dir_override(None)
        monkeypatch.delenv(vocab.T5_VOCABULARY_ENV)
        text_tasks.register_c4_ul2()  # back to T5's public vocabulary for the other tests
