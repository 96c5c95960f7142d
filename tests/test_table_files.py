"""Table corpora streamed from disk (ul2lab.data.table_files): CSV / TSV / JSONL / Parquet, a directory
or a glob, malformed files and lines skipped and counted, splits and host shards that partition the
corpus, and a pipeline whose position can be checkpointed. Memory at 10x the corpus: bench/table_stream.py."""
import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf

from ul2lab.data import table_files, tables


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for i in range(6):
        write(root / f"csv/{i}.csv", f'"city","rank"\n"Zürich {i}","{i}"\n')
    write(root / "tsv/a.tsv", "name\tpoints\nAnn\t3\n")
    write(root / "bad/empty.csv", "")                      # no header: skipped file
    write(root / "bad/quote.csv", '"a","b\n"1","2"\n')     # broken quoting: skipped file
    lines = [json.dumps({"header": ["n", "sq"], "rows": [[str(i), str(i * i)]], "id": f"j{i}"}) for i in range(40)]
    lines.insert(7, "{not json")                            # skipped line
    lines.insert(20, json.dumps({"header": ["x"]}))          # no rows: skipped line
    write(root / "jsonl/shard-0.jsonl", "\n".join(lines) + "\n")
    (root / "parquet").mkdir()
    records = [{"header": ["team", "won"], "rows": [[f"t{i}", str(i)]], "title": f"season {i}", "context": "",
                "id": f"p{i}"} for i in range(25)]
    pq.write_table(pa.Table.from_pylist(records), root / "parquet/tables.parquet", row_group_size=10)
    pq.write_table(pa.table({"nation": ["A", "B"], "gold": [3, 1]}), root / "parquet/one_table.parquet")
    write(root / "parquet/broken.parquet", "PAR1 not really")  # skipped file
    return root


def read_all(source, split, **kwargs):
    return [(ex["source"].decode(), json.loads(ex["table"])) for ex in
            source.get_dataset(split, shuffle=False, **kwargs).as_numpy_iterator()]


def test_every_format_is_read_and_bad_input_is_skipped_and_counted(corpus, monkeypatch):
    monkeypatch.setattr(table_files, "JSONL_CHUNK_BYTES", 300)  # many chunks: lines cut across chunk borders
    stats = collections.Counter()
    source = table_files.TableFilesSource(str(corpus), stats=stats)
    got = read_all(source, "train") + read_all(source, "validation")
    ids = sorted(i for i, _ in got)
    expected = sorted([f"csv/{i}.csv" for i in range(6)] + ["tsv/a.tsv", "parquet/one_table.parquet"]
                      + [f"j{i}" for i in range(40)] + [f"p{i}" for i in range(25)])
    assert ids == expected  # every table once: no JSONL line lost or read twice at a chunk border
    # counted at each read, as ul2lab.data.tables.iter_tables does: the two bad CSV files and the two bad
    # JSONL lines once per split read, the broken Parquet file once when the files are listed
    assert stats["skipped_files"] == 2 * 2 + 1 and stats["skipped_lines"] == 2 * 2
    by_id = dict(got)
    assert by_id["parquet/one_table.parquet"]["header"] == ["nation", "gold"]
    assert by_id["parquet/one_table.parquet"]["rows"] == [["A", "3"], ["B", "1"]]
    assert by_id["p3"]["title"] == "season 3" and by_id["j5"]["rows"] == [["5", "25"]]
    assert by_id["csv/2.csv"]["rows"] == [["Zürich 2", "2"]]
    assert len(source.list_shards("train")) > 10  # CSV files, JSONL chunks, Parquet row groups


def test_splits_and_host_shards_partition_the_corpus(corpus):
    source = table_files.TableFilesSource(str(corpus))
    train, validation = read_all(source, "train"), read_all(source, "validation")
    assert validation and not {i for i, _ in train} & {i for i, _ in validation}
    hosts = [read_all(source, "train", shard_info=seqio.ShardInfo(i, 3)) for i in range(3)]
    assert sorted(i for host in hosts for i, _ in host) == sorted(i for i, _ in train)
    assert all(hosts)
    shuffled = source.get_dataset("train", shuffle=True, seed=4)
    assert sorted(ex["source"] for ex in shuffled.as_numpy_iterator()) == sorted(i.encode() for i, _ in train)


def test_a_glob_selects_files_and_no_match_is_a_clear_error(corpus, tmp_path):
    source = table_files.TableFilesSource(str(corpus / "csv" / "*.csv"))
    got = read_all(source, "train") + read_all(source, "validation")
    assert sorted(i for i, _ in got) == [f"{i}.csv" for i in range(6)]
    with pytest.raises(tables.TableReadError, match=r"no table files at .*nothing.*\.csv, \.tsv, \.jsonl or \.parquet"):
        table_files.TableFilesSource(str(tmp_path / "nothing")).units()


def test_the_stream_can_be_checkpointed_mid_file(corpus, tmp_path):
    dataset = table_files.TableFilesSource(str(corpus)).get_dataset("train", shuffle=True, seed=1)
    iterator = iter(dataset)
    for _ in range(9):
        next(iterator)
    saved = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "position"))
    rest = [ex["source"].numpy() for ex in iterator]
    again = iter(dataset)
    tf.train.Checkpoint(iterator=again).read(saved).assert_consumed()
    assert [ex["source"].numpy() for ex in again] == rest and rest


def test_register_table_corpus_task_streams_a_directory(corpus, table_vocabulary):
    from ul2lab_tasks import tables as table_tasks

    mixture = table_tasks.register_table_corpus_task("stream_corpus", str(corpus), vocabulary=table_vocabulary)
    before = table_tasks.SKIPPED["skipped_files"]  # after the listing (the broken Parquet file)
    examples = list(seqio.get_mixture_or_task("stream_corpus_mask").get_dataset(
        {"inputs": 64, "targets": 64}, split="train", shuffle=False, seed=0).as_numpy_iterator())
    assert len(examples) > 40 and all(e["inputs"][-1] == 1 for e in examples)
    assert table_tasks.SKIPPED["skipped_files"] == before + 2
    assert mixture == "stream_corpus_ul2"


def test_csv_outside_wikitq_is_rfc4180_with_its_byte_order_mark_stripped(tmp_path):
    # Excel's "CSV UTF-8" starts with a BOM; paths and "50\% off" keep their backslashes; WikiTQ's own
    # layout (csv/<batch>-csv/<n>.csv) keeps its backslash-escaped dialect
    root = tmp_path / "corpus"
    (root / "mine").mkdir(parents=True)
    (root / "mine/paths.csv").write_bytes('\ufeff"path","note"\n"C:\\new\\table","50\\% off"\n"say ""hi""",x\n'
                                          .encode("utf-8"))
    write(root / "csv/204-csv/7.csv", '"a","b"\n"say \\"hi\\"","back\\\\slash"\n')
    source = table_files.TableFilesSource(str(root), validation_every=10**9)  # every table in train
    got = dict(read_all(source, "train"))
    assert got["mine/paths.csv"]["header"] == ["path", "note"]
    assert got["mine/paths.csv"]["rows"] == [["C:\\new\\table", "50\\% off"], ['say "hi"', "x"]]
    assert got["csv/204-csv/7.csv"]["rows"] == [['say "hi"', "back\\slash"]]


def test_nested_json_and_parquet_cells_read_as_json(tmp_path):
    root = tmp_path / "corpus"
    line = {"header": ["flag", "point", "tags"], "rows": [[True, {"x": 1}, ["a", "b"]], {"flag": False, "point": None}],
            "id": "j"}
    write(root / "t.jsonl", json.dumps(line) + "\n")
    pq.write_table(pa.table({"ok": [True, False], "where": [{"x": 1, "y": "é"}, {"x": 2, "y": "b"}],
                             "tags": [["a"], []]}), root / "one.parquet")
    got = dict(read_all(table_files.TableFilesSource(str(root), validation_every=10**9), "train"))
    assert got["j"]["rows"] == [["true", '{"x": 1}', '["a", "b"]'], ["false", "", ""]]
    assert got["one.parquet"]["rows"] == [["true", '{"x": 1, "y": "é"}', '["a"]'], ["false", '{"x": 2, "y": "b"}', "[]"]]


@pytest.mark.parametrize("file_name, held_in", [("t0.csv", "train"), ("t34.csv", "validation")])
def test_a_single_table_corpus_trains_or_is_refused_with_the_true_reason(tmp_path, table_vocabulary, file_name,
                                                                          held_in):
    # `ul2lab train`'s check of the data (pipeline.check_yields_examples) refused a one-table corpus as
    # "documents shorter than the denoisers need" at any length (training repeats the source, so the
    # table is concatenated across epochs), and one whose table went to validation as "yields no
    # records, check the files"
    import zlib

    from ul2lab.data import pipeline
    from ul2lab_tasks import tables as table_tasks
    assert table_files._in_split(file_name, held_in, 20)  # noqa: SLF001  the file's split by its hash
    write(tmp_path / "tables" / file_name, "city,rank\nZurich,1\nBern,2\nBasel,3\n")
    name = f"one_table_{zlib.crc32(file_name.encode())}"
    mixture = table_tasks.register_table_corpus_task(name, str(tmp_path / "tables"), vocabulary=table_vocabulary)
    lengths = {"inputs": 512, "targets": 512}
    try:
        if held_in == "train":
            pipeline.check_yields_examples(mixture, lengths)  # no error: training can use the table
        else:
            with pytest.raises(ValueError, match=r"every record of its source went to another split \(1 in split "
                                                 r"'validation'.*none to 'train'; add data"):
                pipeline.check_yields_examples(mixture, lengths)
    finally:
        seqio.MixtureRegistry.remove(mixture)
        for suffix in ("_mask", "_mod"):
            seqio.TaskRegistry.remove(name + suffix)
