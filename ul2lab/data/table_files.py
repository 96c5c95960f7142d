"""A corpus of table files on disk, streamed: a seqio data source that never holds the corpus in memory.

`TableFilesSource(path)` reads the table files under a directory (or matching a glob): CSV / TSV
(one table per file, as ul2lab.data.tables reads them), JSONL (one JSON table per line) and Parquet
(a file with a `rows` column holds one table per row, with `header`, `title`, `context`, `id`
columns as in JSONL; any other Parquet file is one table, its columns the header).

The corpus is cut into work units, listed from file names, sizes and Parquet footers only:
a CSV/TSV file, a JSONL byte range of `JSONL_CHUNK_BYTES` (a line belongs to the range it starts
in), a Parquet row group (or a whole one-table Parquet file). The tf.data pipeline maps units to
their tables a few at a time, so memory holds a few units, whatever the corpus size; the pipeline
is made of TensorFlow's own ops (a unit list, a stateless numpy_function, unbatch), so its
iterator can be checkpointed (ul2lab.data.host_batches). Units are also the source's shards:
each host reads its own units (seqio ShardInfo), and seqio's Beam cache job reads one unit per
work item.

A file or line that cannot be read as a table is skipped, logged and counted in `stats`
("skipped_files", "skipped_lines"), as ul2lab.data.tables.iter_tables does. Every
`validation_every`-th table, by a stable hash of where it is (file, unit, position), forms the
"validation" split, the rest "train".
"""
from __future__ import annotations

import collections
import glob
import json
import logging
import os
import random
import re
import zlib
from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from ul2lab.data import tables

JSONL_CHUNK_BYTES = 4 << 20
PATTERNS = ("**/*.csv", "**/*.tsv", "**/*.jsonl", "**/*.parquet")
WHOLE_FILE = -1
_PARALLEL_UNITS = 4  # units read at once: the memory bound, whatever the corpus size


def list_files(path: str, patterns: Sequence[str] = PATTERNS) -> list[str]:
    """Sorted table files under a directory (by `patterns`), or matching a glob."""
    if os.path.isdir(path):
        found = {p for pattern in patterns for p in glob.glob(os.path.join(path, pattern), recursive=True)}
    else:
        found = set(glob.glob(os.path.expanduser(path), recursive=True))
    files = sorted(p for p in found if os.path.isfile(p))
    if not files:
        raise tables.TableReadError(
            f"no table files at {path} (looked for {', '.join(patterns)}" + ("" if os.path.isdir(path) else
                                                                             " as a glob") +
            "); give a directory or glob of .csv, .tsv, .jsonl or .parquet files")
    return files


def list_units(files: Sequence[str], stats: collections.Counter) -> list[tuple[str, int]]:
    """(file, part) work units: part is the JSONL chunk or Parquet row group, WHOLE_FILE otherwise."""
    units = []
    for path in files:
        if path.endswith(".jsonl"):
            size = os.path.getsize(path)
            units += [(path, k) for k in range(max(1, -(-size // JSONL_CHUNK_BYTES)))]
        elif path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
                metadata = pq.ParquetFile(path).metadata
            except Exception as e:  # noqa: BLE001  not Parquet, truncated: skipped like any bad file
                stats["skipped_files"] += 1
                logging.warning("Skipping table file %s: not a readable Parquet file (%s)", path, e)
                continue
            if "rows" in metadata.schema.to_arrow_schema().names:
                units += [(path, g) for g in range(metadata.num_row_groups)]
            else:
                units.append((path, WHOLE_FILE))
        else:
            units.append((path, WHOLE_FILE))
    return units


def _in_split(where: str, split: str, validation_every: int) -> bool:
    return (zlib.crc32(where.encode()) % validation_every == validation_every - 1) == (split == "validation")


def _jsonl_lines(path: str, chunk: int):
    """(byte offset, line) of the lines that start in JSONL chunk `chunk`."""
    start, end = chunk * JSONL_CHUNK_BYTES, (chunk + 1) * JSONL_CHUNK_BYTES
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line that started before this chunk belongs to the previous one
        while f.tell() < end:
            offset, line = f.tell(), f.readline()
            if not line:
                break
            yield offset, line


def _parquet_tables(path: str, part: int, rel: str, stats) -> list:
    import pyarrow.parquet as pq
    try:
        if part == WHOLE_FILE:
            frame = pq.read_table(path)
            header = frame.column_names
            rows = zip(*[[tables.json_cell(v) for v in frame.column(name).to_pylist()] for name in header])
            return [(rel, tables.make_table(header, rows, source=rel))]
        records = pq.ParquetFile(path).read_row_group(part).to_pylist()
    except Exception as e:  # noqa: BLE001
        stats["skipped_files"] += 1
        logging.warning("Skipping table file %s (row group %s): %s", path, part, e)
        return []
    found = []
    for i, record in enumerate(records):
        where = f"{rel}#{part}:{i}"
        try:
            found.append((where, tables.table_from_json(record, where)))
        except tables.TableReadError as e:
            stats["skipped_lines"] += 1
            logging.warning("Skipping %s: %s", where, e)
    return found


def read_unit(path: str, part: int, root: str, stats: collections.Counter) -> list:
    """[(where, Table)] of one work unit; what cannot be read is skipped, logged and counted."""
    rel = os.path.relpath(path, root)
    if path.endswith(".parquet"):
        return _parquet_tables(path, part, rel, stats)
    if path.endswith(".jsonl"):
        found = []
        for offset, line in _jsonl_lines(path, part):
            if not line.strip():
                continue
            where = f"{rel}@{offset}"
            try:
                found.append((where, tables.table_from_json(json.loads(line), where)))
            except (UnicodeDecodeError, json.JSONDecodeError, tables.TableReadError) as e:
                stats["skipped_lines"] += 1
                logging.warning("Skipping the line at byte %d of %s: %s", offset, path, e)
        return found
    try:
        return [(rel, tables.read_table_file(path, source=rel))]
    except tables.TableReadError as e:
        stats["skipped_files"] += 1
        logging.warning("Skipping table file: %s", e)
        return []


class TableFilesSource(seqio.DataSource):
    """{"table": one-line JSON, "source": its id} of every table under `path`, streamed (see above)."""

    def __init__(self, path: str, patterns: Sequence[str] = PATTERNS, validation_every: int = 20,
                 stats: Optional[collections.Counter] = None):
        super().__init__(splits=("train", "validation"))
        self.path, self.patterns, self.validation_every = path, tuple(patterns), validation_every
        self.stats = stats if stats is not None else collections.Counter()
        self.root = path if os.path.isdir(path) else os.path.dirname(re.split(r"[*?[]", path)[0]) or "."
        self._units = None

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def units(self) -> list[tuple[str, int]]:
        if self._units is None:  # listed once per process: names, sizes, Parquet footers
            files = list_files(self.path, self.patterns)
            self.stats["files"] += len(files)
            self._units = list_units(files, self.stats)
        return self._units

    def list_shards(self, split: str) -> list[str]:
        return [f"{path}#{part}" for path, part in self.units()]

    def __repr__(self):
        return f"TableFilesSource({self.path!r}, patterns={self.patterns}, validation_every={self.validation_every})"

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached=False,
                    num_epochs=1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; this table corpus has 'train' and 'validation'")
        units = list(self.units())
        if shard_info is not None:
            units = units[shard_info.index::shard_info.num_shards]
        if shuffle:  # the order of units; seqio's shuffle buffer mixes the tables
            random.Random(seed).shuffle(units)
        root, every, stats = self.root, self.validation_every, self.stats

        def read(path, part):
            found = [(where, table) for where, table in read_unit(path.decode(), int(part), root, stats)
                     if _in_split(where, split, every)]
            return (np.array([t.to_json().encode() for _, t in found], dtype=object),
                    np.array([t.source.encode() for _, t in found], dtype=object))

        def to_tables(path, part):
            table, source = tf.numpy_function(read, [path, part], [tf.string, tf.string], stateful=False)
            table.set_shape([None])
            source.set_shape([None])
            return {"table": table, "source": source}

        paths = tf.constant([p for p, _ in units], tf.string, shape=[len(units)])
        parts = tf.constant([k for _, k in units], tf.int64, shape=[len(units)])
        return (tf.data.Dataset.from_tensor_slices((paths, parts))
                .map(to_tables, num_parallel_calls=_PARALLEL_UNITS, deterministic=True)
                .unbatch())
