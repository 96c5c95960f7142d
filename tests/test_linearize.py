"""Linearization: the format, the token budget, cells never cut by the budget."""
import random

import pytest

from ul2lab.data import linearize as lin
from ul2lab.data import tables

from conftest import TABLE_WORDS as WORDS


@pytest.fixture(scope="module")
def vocabulary(table_vocabulary):
    return table_vocabulary


def random_table(rng: random.Random) -> tables.Table:
    width = rng.randint(1, 6)
    def cell():
        n = rng.choice([0, 1, 1, 2, 3, 40])  # empty cells and very long ones
        return " ".join(rng.choice(WORDS) for _ in range(n))
    rows = [[cell() for _ in range(rng.randint(width - 1, width + 1))]  # ragged
            for _ in range(rng.randint(0, 25))]
    return tables.make_table([cell() for _ in range(width)], rows,
                             title=cell(), context=cell() * rng.randint(0, 3))


def test_format_matches_unifiedskg_style_without_a_vocabulary():
    table = tables.make_table(["Year", "City"], [["2004", "Athens"], ["2008", "Beijing"]],
                              title="Olympics")
    result = lin.linearize(table, prefix="where in 2008?")
    assert result.text == ("where in 2008? ; Olympics ; col : Year | City "
                           "row 1 : 2004 | Athens row 2 : 2008 | Beijing")
    config = lin.LinearizeConfig(part_separator="[SEP]", header_label="<h>", row_label="<r{i}>",
                                 cell_separator="<c>", lowercase=True, include_title=False)
    assert lin.linearize(table, prefix="Q", config=config).text == (
        "q [SEP] <h> year <c> city <r1> 2004 <c> athens <r2> 2008 <c> beijing")


def test_budget_is_never_exceeded_and_rows_are_dropped_whole(vocabulary):
    rng = random.Random(1)
    config = lin.LinearizeConfig(max_cell_tokens=8, max_context_tokens=20)
    checked = 0
    for _ in range(150):
        table = random_table(rng)
        budget = rng.randint(10, 300)
        result = lin.linearize(table, vocabulary, budget, prefix="which year?", config=config)
        if not result.fits:  # only when the question and header alone are over budget
            header_only = lin.linearize(tables.make_table(table.header, []), vocabulary, None,
                                        prefix="which year?", config=config)
            assert len(header_only.token_ids) > budget
            continue
        checked += 1
        ids = list(vocabulary.encode(result.text))
        assert ids == result.token_ids and len(ids) <= budget
        # Every cell is whole, or capped at max_cell_tokens as a prefix of the original.
        kept = [p for p in result.pieces if p.kind in (lin.HEADER, lin.CELL)]
        for piece, piece_ids in zip(result.pieces, result.piece_ids):
            if piece.kind not in (lin.HEADER, lin.CELL):
                continue
            source = table.header[piece.col] if piece.row == -1 else table.rows[piece.row][piece.col]
            assert piece.text == source or (source.startswith(piece.text) and
                                            len(piece_ids) <= config.max_cell_tokens)
        # The header is always there; kept rows are the first rows, each with all its cells.
        assert [p.col for p in kept if p.row == -1] == list(range(table.num_columns))
        body_rows = [p.row for p in kept if p.row >= 0]
        assert sorted(set(body_rows)) == list(range(result.rows_kept))
        assert len(body_rows) == result.rows_kept * table.num_columns
        # Rows are dropped only when the next one would not fit.
        if result.rows_kept < result.rows_total:
            full = lin.linearize(table, vocabulary, None, prefix="which year?", config=config)
            next_row = sum(len(ids) for piece, ids in zip(full.pieces, full.piece_ids)
                           if piece.row == result.rows_kept)
            assert len(result.token_ids) + next_row > budget
    assert checked > 100


def test_report_counts_what_was_dropped(vocabulary):
    table = tables.make_table(["a", "b"], [[f"{i}", "gold " * 20] for i in range(30)],
                              context="the " * 400)
    config = lin.LinearizeConfig(max_cell_tokens=5, max_context_tokens=10)
    result = lin.linearize(table, vocabulary, 120, config=config)
    report = result.report()
    assert report["tokens"] == len(vocabulary.encode(result.text)) <= 120
    assert 0 < report["rows_kept"] < 30 and report["rows_dropped"] == 30 - report["rows_kept"]
    assert report["cells_capped"] == report["rows_kept"]  # each kept "gold gold ..." cell capped
    assert report["context_capped"] and result.truncated
    untouched = lin.linearize(tables.make_table(["a"], [["1"]]), vocabulary, 120)
    assert not untouched.truncated and untouched.report()["rows_dropped"] == 0


def test_context_leaves_room_for_rows(vocabulary):
    table = tables.make_table(["year", "city"], [["2004", "athens"]] * 20,
                              title="gold silver", context="the nation won gold " * 100)
    bare = lin.linearize(tables.make_table(["year", "city"], []), vocabulary, None, prefix="q")
    result = lin.linearize(table, vocabulary, 100, prefix="q")
    before_header = result.pieces.index(lin.Piece("col :", lin.ROW_LABEL, -1))
    context = sum(len(ids) for ids in result.piece_ids[2:before_header])  # after "q ;"
    assert result.context_capped and result.rows_kept >= 2
    assert context <= (100 - len(bare.token_ids)) // 2
    assert result.text.startswith("q ; gold silver ; the nation won gold")


def test_header_over_budget_is_reported_not_cut(vocabulary):
    table = tables.make_table([f"column name {i}" for i in range(30)], [["1"] * 30])
    result = lin.linearize(table, vocabulary, 20)
    assert not result.fits and result.rows_kept == 0
