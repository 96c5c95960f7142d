"""SentencePiece training with T5 conventions, the `ul2lab vocab` command, the cached vocabulary.

The session fixtures ul2lab_cache_dir and tiny_vocabulary live in tests/conftest.py.
"""
import json
import os

import pytest

from conftest import TINY_VOCAB_SIZE, first_documents
from ul2lab.cli import main as cli
from ul2lab.data import vocab

def test_model_follows_t5_conventions(tiny_vocabulary):
    sp = tiny_vocabulary.tokenizer
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert tiny_vocabulary.vocab_size == TINY_VOCAB_SIZE + 100
    # extra ids count down from the top, as T5's sentinels expect
    assert tiny_vocabulary.decode([tiny_vocabulary.vocab_size - 1]) == "<extra_id_0>"
    # byte fallback: characters never seen in training round-trip, no <unk>
    text = "Ж日本 regression model ✓"
    ids = tiny_vocabulary.encode(text)
    assert sp.unk_id() not in ids
    assert tiny_vocabulary.decode(ids) == text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)


def _write_corpus(tmp_path):
    docs = first_documents(60)
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:30]))
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in docs[30:]:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    return docs


def test_cli_trains_a_loadable_vocabulary(tmp_path, capsys):
    import seqio
    _write_corpus(tmp_path)
    prefix = str(tmp_path / "out" / "spm")
    assert cli.main(["vocab", "--input", str(tmp_path / "*.txt"), "--vocab_size", "400",
                     "--output_prefix", prefix]) == 0
    assert capsys.readouterr().out.strip() == prefix + ".model"
    v = seqio.SentencePieceVocabulary(prefix + ".model", extra_ids=100)
    assert v.vocab_size == 500 and v.eos_id == 1 and v.pad_id == 0
    assert v.decode(v.encode("Description of the data")) == "Description of the data"
    assert len(open(prefix + ".vocab").read().splitlines()) == 400
    # an existing model is never overwritten without --force
    before = open(prefix + ".model", "rb").read()
    assert cli.main(["vocab", "--input", str(tmp_path / "*.txt"), "--vocab_size", "300",
                     "--output_prefix", prefix]) == 2
    assert "--force" in capsys.readouterr().err
    assert open(prefix + ".model", "rb").read() == before


def test_cli_reports_bad_input_plainly(tmp_path, capsys):
    _write_corpus(tmp_path)
    assert cli.main(["vocab", "--input", str(tmp_path / "missing*.txt"), "--vocab_size", "400",
                     "--output_prefix", str(tmp_path / "x")]) == 2
    assert "missing*.txt" in capsys.readouterr().err
    assert cli.main(["vocab", "--input", str(tmp_path / "a.txt"), "--vocab_size", "100",
                     "--output_prefix", str(tmp_path / "x")]) == 2
    assert "vocab_size 100 is too small" in capsys.readouterr().err
    # jsonl files read "text" unless told otherwise: a clear error naming the field
    assert cli.main(["vocab", "--input", str(tmp_path / "b.jsonl"), "--vocab_size", "400",
                     "--output_prefix", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "b.jsonl:1" in err and "'text'" in err and "body" in err
    assert not list(tmp_path.glob("x.*"))
    assert cli.main(["vocab", "--input", str(tmp_path / "b.jsonl"), "--vocab_size", "400",
                     "--jsonl_field", "body", "--output_prefix", str(tmp_path / "x")]) == 0


def test_cached_vocabulary_trains_once_and_keys_on_settings(ul2lab_cache_dir):
    calls = []

    def documents():
        calls.append(1)
        return first_documents(80)

    first = vocab.cached_vocabulary("test_cache", documents, vocab_size=350)
    assert not calls  # building it is free: training waits for first use
    ids = first.encode("the data frame")
    assert len(calls) == 1 and first.vocab_size == 450
    again = vocab.cached_vocabulary("test_cache", documents, vocab_size=350)
    assert again == first and first == again  # one loaded, one not: the same vocabulary to seqio
    assert again.encode("the data frame") == ids and len(calls) == 1  # from the cache
    assert again.sentencepiece_model_file.startswith(ul2lab_cache_dir)
    other = vocab.cached_vocabulary("test_cache", documents, vocab_size=360)
    assert other.vocab_size == 460 and len(calls) == 2  # other settings, other cache entry
    assert other != first


def test_interrupted_training_leaves_no_broken_model(ul2lab_cache_dir, monkeypatch):
    vocabs_dir = os.path.join(ul2lab_cache_dir, "vocabs")

    def leftovers():
        return [f for f in os.listdir(vocabs_dir) if f.startswith("test_interrupted")] \
            if os.path.isdir(vocabs_dir) else []

    def interrupted_write(fd):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the model is being written

    with monkeypatch.context() as m:
        m.setattr(vocab.os, "fsync", interrupted_write)
        with pytest.raises(KeyboardInterrupt):
            vocab.cached_model_path("test_interrupted", lambda: first_documents(60), vocab_size=400)
    assert leftovers() == []  # neither a half-written model nor a temporary file
    path = vocab.cached_model_path("test_interrupted", lambda: first_documents(60),
                                   vocab_size=400)
    assert path.endswith(".model") and os.path.getsize(path) > 0
    assert vocab.cached_model_path("test_interrupted", lambda: 1 / 0, vocab_size=400) == path
