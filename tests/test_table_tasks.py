"""Table seqio tasks on small datasets written here in WikiTQ's, TabFact's and JSONL formats."""
import json
import logging
import random

import gin
import pytest
import seqio

from ul2lab.data import skips, vocab
from ul2lab_tasks import tables as table_tasks

LENGTHS = {"inputs": 256, "targets": 64}


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    # Nothing here should train the embedded vocabulary; if something did, it stays in tmp.
    monkeypatch.setenv("UL2LAB_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    rng = random.Random(0)
    words = ("which team won year city gold silver rank total points notes entailed refuted "
             "bangkok thailand athens beijing col row the of and café 東京").split()
    docs = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 3000)}"
            for _ in range(2000)]
    path = vocab.train_sentencepiece(docs, 300, str(tmp_path_factory.mktemp("vocab") / "sp"),
                                     num_threads=1)
    return seqio.SentencePieceVocabulary(path, extra_ids=100)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write(root / "wikitq/csv/200-csv/0.csv",
          '"Year","City","Notes"\n"2004","Athens","Summer"\n"2008","Beijing","\\"Bird\'s nest\\""\n')
    write(root / "wikitq/csv/200-csv/1.csv",
          '"Rank","Nation"\n"1","Thailand"\n"2","Bangkok, Thailand"\n"3","Zürich"\n')
    questions = [
        ("nt-0", "which city hosted in 2004?", "csv/200-csv/0.csv", "Athens"),
        ("nt-1", "which years?", "csv/200-csv/0.csv", "2004|2008"),
        ("nt-2", "where is rank 2?", "csv/200-csv/1.csv", "Bangkok, Thailand"),
        ("nt-3", "what is the a\\pb pipe?", "csv/200-csv/1.csv", "x\\py"),
        ("nt-4", "a question on a lost table", "csv/204-csv/99.csv", "gone"),
    ]
    write(root / "wikitq/data/random-split-1-dev.tsv",
          "id\tutterance\tcontext\ttargetValue\n" + "".join("\t".join(q) + "\n" for q in questions))
    write(root / "tabfact/all_csv/1-1.html.csv", "team#points\narsenal#3\nchelsea#1\n")
    write(root / "tabfact/val_examples.json", json.dumps({
        "1-1.html.csv": [["arsenal have 3 points", "chelsea have 3 points"], [1, 0], "league"],
        "1-404.html.csv": [["lost statement"], [1], "missing"]}))
    return root


@pytest.fixture(scope="module")
def qa_tasks(vocabulary, data_dir):
    wikitq = table_tasks.register_wikitq_task("test_wikitq", str(data_dir), vocabulary)
    tabfact = table_tasks.register_tabfact_task("test_tabfact", str(data_dir), vocabulary)
    mixture = table_tasks.register_table_eval_mixture("test_table_eval",
                                                      (wikitq.name, tabfact.name))
    return wikitq, tabfact, mixture


def examples(task, split="validation", lengths=LENGTHS):
    return list(task.get_dataset(lengths, split=split, shuffle=False).as_numpy_iterator())


def test_wikitq_examples_and_missing_table_is_skipped_counted_and_logged(qa_tasks, caplog):
    wikitq = qa_tasks[0]
    before = table_tasks.SKIPPED["wikitq_missing_table"]
    skips.reset()
    with caplog.at_level(logging.WARNING):
        got = examples(wikitq)
        examples(wikitq)  # read again (every epoch and evaluation does): counted, not said again
    assert [e["id"].decode() for e in got] == ["nt-0", "nt-1", "nt-2", "nt-3"]
    assert table_tasks.SKIPPED["wikitq_missing_table"] == before + 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "csv/204-csv/99.csv" in warnings[0], warnings
    assert "2 WikiTQ questions whose table file is missing or unreadable" in skips.summary()
    first = got[0]
    assert first["inputs_pretokenized"].decode() == (
        "which city hosted in 2004? ; col : Year | City | Notes "
        "row 1 : 2004 | Athens | Summer row 2 : 2008 | Beijing | \"Bird's nest\"")
    assert [a.decode() for a in got[1]["answers"]] == ["2004", "2008"]
    assert got[1]["targets_pretokenized"].decode() == "2004, 2008"
    assert [a.decode() for a in got[3]["answers"]] == ["x|y"]  # \p unescaped
    assert got[3]["question"].decode() == "what is the a|b pipe?"
    for e in got:
        assert e["inputs"][-1] == 1 and len(e["inputs"]) <= LENGTHS["inputs"]


def test_tabfact_labels_and_missing_table(qa_tasks):
    before = table_tasks.SKIPPED["tabfact_missing_table"]
    got = examples(qa_tasks[1])
    assert [e["targets_pretokenized"].decode() for e in got] == ["entailed", "refuted"]
    assert got[0]["inputs_pretokenized"].decode().startswith(
        "arsenal have 3 points ; league ; col : team | points row 1 : arsenal | 3")
    assert table_tasks.SKIPPED["tabfact_missing_table"] == before + 1


def test_table_eval_targets_score_perfectly_against_themselves(qa_tasks, vocabulary):
    mixture = qa_tasks[2]
    mixed = list(mixture.get_dataset(LENGTHS, split="validation", shuffle=False)
                 .take(6).as_numpy_iterator())
    assert len(mixed) == 6
    # Through seqio's Evaluator, as `ul2lab eval` runs it: postprocessors, then metric functions.
    evaluator = seqio.Evaluator(mixture.name, seqio.EncDecFeatureConverter(pack=False),
                                eval_split="validation", sequence_length=LENGTHS,
                                use_memory_cache=True)

    def predict_with(make):
        def predict_fn(ds, model_feature_shapes=None):
            del model_feature_shapes
            return [(i, make(ex[1] if isinstance(ex, tuple) else ex))
                    for i, ex in enumerate(ds.as_numpy_iterator())]
        return predict_fn

    perfect, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_with(
        lambda ex: ex["decoder_target_tokens"].tolist()))
    scores = perfect.result()
    assert set(scores) == {"test_wikitq", "test_tabfact"}
    assert scores["test_wikitq"] == {"denotation_accuracy": pytest.approx(100.0), "gold_official_tagged": 0,
                                     "gold_heuristic_fallback": 4, "dropped_for_length_counted_wrong": 0}
    assert scores["test_tabfact"] == {"accuracy": pytest.approx(100.0), "dropped_for_length_counted_wrong": 0}
    nonsense = vocabulary.encode("nonsense") + [1] + [0] * (LENGTHS["targets"] - 1)
    wrong, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_with(
        lambda ex: nonsense[:LENGTHS["targets"]]))
    wrong = wrong.result()
    assert wrong["test_wikitq"]["denotation_accuracy"] == 0.0 and wrong["test_tabfact"]["accuracy"] == 0.0


def test_missing_dataset_is_named_when_requested(tmp_path, vocabulary, monkeypatch):
    task = table_tasks.register_wikitq_task("test_wikitq_absent", str(tmp_path), vocabulary)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "wikitq")):
        task.get_dataset(LENGTHS, split="validation")
    monkeypatch.delenv("UL2LAB_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="UL2LAB_DATA_DIR"):
        table_tasks.table_data_dir()
    monkeypatch.setenv("UL2LAB_DATA_DIR", str(tmp_path / "elsewhere"))
    assert table_tasks.table_data_dir() == str(tmp_path / "elsewhere")


def test_generic_jsonl_table_qa(tmp_path, vocabulary):
    write(tmp_path / "tables/t.csv", '"Name","Age"\n"Ann","31"\n')
    lines = [json.dumps({"question": "who is 31?", "table_file": "tables/t.csv", "answer": "Ann"}),
             json.dumps({"question": "ages?", "table": {"header": ["a"], "rows": [["1"], ["2"]]},
                         "answers": ["1", "2"]}),
             "not json",
             json.dumps({"question": "lost?", "table_file": "tables/none.csv", "answer": "x"})]
    write(tmp_path / "qa.jsonl", "\n".join(lines))
    task = table_tasks.register_table_qa_jsonl_task(
        "test_jsonl_qa", {"validation": str(tmp_path / "qa.jsonl")}, vocabulary)
    before = dict(table_tasks.SKIPPED)
    got = examples(task)
    assert [e["targets_pretokenized"].decode() for e in got] == ["Ann", "1, 2"]
    assert table_tasks.SKIPPED["jsonl_malformed_line"] == before.get("jsonl_malformed_line", 0) + 1
    assert table_tasks.SKIPPED["jsonl_missing_table"] == before.get("jsonl_missing_table", 0) + 1


def test_table_corpus_pretraining_tasks(tmp_path, vocabulary, data_dir):
    mixture_name = table_tasks.register_table_corpus_task("test_corpus", str(data_dir),
                                                          vocabulary=vocabulary)
    lengths = {"inputs": 128, "targets": 128}
    mask = list(seqio.get_mixture_or_task("test_corpus_mask").get_dataset(
        lengths, split="train", shuffle=False, seed=3).as_numpy_iterator())
    assert len(mask) >= 2  # two wikitq tables and the tabfact table (one held out)
    first_sentinel = vocabulary.vocab_size - 1
    for e in mask:
        assert e["targets"][0] == first_sentinel and e["targets"][-1] == 1 and e["inputs"][-1] == 1
        assert len(e["inputs"]) <= 128 and len(e["targets"]) <= 128
    mod = list(seqio.get_mixture_or_task("test_corpus_mod").get_dataset(
        lengths, split="train", shuffle=False, seed=3).as_numpy_iterator())
    assert mod and all(len(e["inputs"]) <= 128 and e["targets"][-1] == 1 for e in mod)
    assert {t.name for t in seqio.get_mixture_or_task(mixture_name).tasks} == {
        "test_corpus_mask", "test_corpus_mod"}


def test_continual_mixture_rates_come_from_gin():
    mixture = seqio.get_mixture_or_task("embedded_continual_tables")
    names = {t.name for t in mixture.tasks}
    assert names == {"embedded_tables_mask", "embedded_tables_mod", "embedded_text_ul2"}
    text_task = seqio.get_mixture_or_task("embedded_text_ul2")
    mask_task = seqio.get_mixture_or_task("embedded_tables_mask")
    assert mixture.get_rate(text_task) == pytest.approx(0.5)
    try:
        gin.bind_parameter("ul2lab.continual_table_rates.text", 2.0)
        gin.bind_parameter("ul2lab.continual_table_rates.tables_mask", 0.75)
        assert mixture.get_rate(text_task) == pytest.approx(2.0)
        assert mixture.get_rate(mask_task) == pytest.approx(0.75)
    finally:
        gin.clear_config()
    with pytest.raises(ValueError, match="not all zero"):
        table_tasks.continual_table_rates(0.0, 0.0, 0.0)


def test_linearization_is_configured_through_gin(qa_tasks):
    try:
        gin.bind_parameter("ul2lab.LinearizeConfig.lowercase", True)
        gin.bind_parameter("ul2lab.LinearizeConfig.cell_separator", "||")
        got = examples(qa_tasks[0])
    finally:
        gin.clear_config()
    assert got[0]["inputs_pretokenized"].decode().startswith(
        "which city hosted in 2004? ; col : year || city || notes row 1 : 2004 || athens")
