"""Tables as text, UnifiedSKG/TAPEX style, fitted to a token budget.

    {prefix} ; {title} ; {context} ; col : h1 | h2 row 1 : v1 | v2 row 2 : ...

The text is a space-joined sequence of pieces (prefix, separators, header cells, row labels, cells).
Pieces are whitespace-stripped and SentencePiece never merges across whitespace, so the token ids of
the whole text are the concatenation of the pieces' ids: the budget counted piece by piece is the
length the task's tokenizer will see (checked once more on the final text), and the table denoisers
can mask a cell, a row or a column as an exact run of tokens.

Budget rules: the prefix (e.g. a question) is never cut and the header is always kept, every cell
capped at `max_cell_tokens`; when these alone exceed the budget the result has `fits=False` and
callers skip it. The title and the context are optional: each is capped at `max_context_tokens`,
and together they take at most half of the room left after prefix and header, so rows are not
crowded out. Rows are kept in order while they fit and the rest are dropped whole, never cut
mid-cell.
"""
from __future__ import annotations

import collections
import dataclasses
import weakref
from typing import Optional, Sequence

from ul2lab.data.tables import Table, clean_cell

# Piece kinds.
PREFIX, SEPARATOR, HEADER, ROW_LABEL, CELL = "prefix", "separator", "header", "row_label", "cell"


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str
    kind: str
    row: int = -2   # -1: the header; i ≥ 0: body row i of the source table; -2: outside the table
    col: int = -1   # column of a header or body cell


@dataclasses.dataclass(frozen=True)
class Linearized:
    """A linearized table and what fitting it to the budget cost."""
    pieces: tuple[Piece, ...]
    piece_ids: tuple[tuple[int, ...], ...]  # token ids of each piece (empty without a vocabulary)
    rows_total: int
    rows_kept: int
    cells_capped: int
    context_capped: bool
    fits: bool

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.pieces if p.text)

    @property
    def token_ids(self) -> list[int]:
        return [i for ids in self.piece_ids for i in ids]

    @property
    def truncated(self) -> bool:
        return self.rows_kept < self.rows_total or self.cells_capped > 0 or self.context_capped

    def report(self) -> dict:
        return {"tokens": len(self.token_ids), "rows_total": self.rows_total,
                "rows_kept": self.rows_kept, "rows_dropped": self.rows_total - self.rows_kept,
                "cells_capped": self.cells_capped, "context_capped": self.context_capped,
                "fits": self.fits}


@dataclasses.dataclass(frozen=True)
class LinearizeConfig:
    """Separators and caps (gin-configurable through the task factories that take one)."""
    part_separator: str = ";"          # between prefix, title, context and the table
    header_label: str = "col :"
    row_label: str = "row {i} :"       # {i} counts from 1 in the source table
    cell_separator: str = "|"
    lowercase: bool = False
    max_cell_tokens: int = 32
    max_context_tokens: int = 128
    include_title: bool = True
    include_context: bool = True


_CACHE_SIZE = 1 << 17
# SentencePiece's longest piece by default (max_piece_length); user-defined pieces such as
# "▁<extra_id_99>" are shorter. Text beyond this many characters per token is never reached.
MAX_PIECE_CHARS = 16
_caches: dict[int, tuple[weakref.ref, collections.OrderedDict]] = {}


def _cache_for(vocabulary) -> collections.OrderedDict:
    """Encodings of recent pieces per live vocabulary: questions share tables, tables share cells."""
    entry = _caches.get(id(vocabulary))
    if entry is None or entry[0]() is not vocabulary:  # new, or an id reused after collection
        entry = (weakref.ref(vocabulary, lambda _, key=id(vocabulary): _caches.pop(key, None)),
                 collections.OrderedDict())
        _caches[id(vocabulary)] = entry
    return entry[1]


class _Encoder:
    """Token ids of pieces through a seqio Vocabulary (`encode`); counts words without one."""

    def __init__(self, vocabulary):
        self.vocabulary = vocabulary
        self.cache = _cache_for(vocabulary) if vocabulary is not None else None

    def __call__(self, text: str) -> tuple[int, ...]:
        if not text:
            return ()
        if self.vocabulary is None:
            return tuple(range(len(text.split())))  # stand-in ids: one per word
        ids = self.cache.get(text)
        if ids is None:
            ids = tuple(int(i) for i in self.vocabulary.encode(text))
            self.cache[text] = ids
            if len(self.cache) > _CACHE_SIZE:
                self.cache.popitem(last=False)
        return ids

    def cap(self, text: str, max_tokens: int) -> tuple[str, tuple[int, ...], bool]:
        """Longest word prefix of `text` within `max_tokens` (characters when one word is too long).

        A token covers at most MAX_PIECE_CHARS characters, so only that many per token (plus one
        token) can matter: a longer text (a 50 MB cell) is cut to them before it is tokenized, with
        the same result."""
        limit = MAX_PIECE_CHARS * (max_tokens + 2)
        cut = len(text) > limit
        if cut:
            text = text[:limit]
        ids = self(text)
        if len(ids) <= max_tokens:
            return text, ids, cut
        words = text.split(" ")
        keep = _largest(len(words) - 1, lambda k: len(self(" ".join(words[:k]))) <= max_tokens)
        if keep == 0:
            chars = _largest(len(words[0]) - 1, lambda k: len(self(words[0][:k])) <= max_tokens)
            text = words[0][:chars]
        else:
            text = " ".join(words[:keep])
        return text, self(text), True


def _largest(high: int, ok) -> int:
    """Largest k in [0, high] with ok(k), for ok monotone decreasing and ok(0) true."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    return low


def linearize(table: Table, vocabulary=None, max_tokens: Optional[int] = None, *,
              prefix: str = "", config: LinearizeConfig = LinearizeConfig()) -> Linearized:
    """Linearizes `table` (after `prefix`, e.g. a question) within `max_tokens` of `vocabulary`."""
    enc = _Encoder(vocabulary)
    norm = (lambda s: clean_cell(s).lower()) if config.lowercase else clean_cell
    budget = float("inf") if max_tokens is None else max_tokens
    separator = (Piece(config.part_separator, SEPARATOR), enc(config.part_separator))
    cells_capped = 0

    def row_parts(values: Sequence[str], row: int, kind: str) -> list[tuple[Piece, tuple]]:
        nonlocal cells_capped
        label = config.header_label if row == -1 else config.row_label.format(i=row + 1)
        parts = [(Piece(label, ROW_LABEL, row), enc(label))]
        for j, value in enumerate(values):
            if j:
                parts.append((Piece(config.cell_separator, SEPARATOR, row), enc(config.cell_separator)))
            text, ids, capped = enc.cap(norm(value), config.max_cell_tokens)
            cells_capped += capped
            parts.append((Piece(text, kind, row, j), ids))
        return parts

    def size(parts) -> int:
        return sum(len(ids) for _, ids in parts)

    # Required: the prefix (never cut) and the header (cells capped like any cell).
    question = norm(prefix)
    if len(question) > MAX_PIECE_CHARS * (budget + 2):  # more tokens than the budget: cannot fit
        question = question[:int(MAX_PIECE_CHARS * (budget + 2))]
    prefix_parts = [(Piece(question, PREFIX), enc(question)), separator] if question else []
    header_parts = row_parts(table.header, -1, HEADER)
    used = size(prefix_parts) + size(header_parts)
    fits = used <= budget

    # Optional: title and context, each capped, together within half the room the rows could use.
    context_parts, context_capped = [], False
    room = (budget - used) // 2 if fits else 0
    texts = [norm(table.title) if config.include_title else "",
             norm(table.context) if config.include_context else ""]
    for text in filter(None, texts):
        cap = min(config.max_context_tokens, room - len(separator[1]))
        text, ids, capped = enc.cap(text, cap) if cap > 0 else ("", (), True)
        context_capped |= capped
        if text:
            context_parts += [(Piece(text, PREFIX), ids), separator]
            room -= len(ids) + len(separator[1])
    used += size(context_parts)

    # Rows in order while they fit; the first that does not ends the table (rows stay contiguous).
    body_parts, rows_kept = [], 0
    for i, row in enumerate(table.rows if fits else ()):
        capped_before = cells_capped
        parts = row_parts(row, i, CELL)
        if used + size(parts) > budget:
            cells_capped = capped_before
            break
        body_parts += parts
        used += size(parts)
        rows_kept += 1

    parts = prefix_parts + context_parts + header_parts + body_parts
    result = Linearized(tuple(p for p, _ in parts), tuple(ids for _, ids in parts),
                        len(table.rows), rows_kept, cells_capped, context_capped, fits)
    if vocabulary is not None and fits and max_tokens is not None:
        # The piece-wise count is the whole text's count for a whitespace-splitting SentencePiece
        # model; a vocabulary that merges across spaces would break that, so say so loudly.
        actual = len(vocabulary.encode(result.text))
        if actual != len(result.token_ids):
            raise ValueError(
                f"the vocabulary tokenizes the linearized table of {table.source or 'a table'} into "
                f"{actual} tokens but its pieces into {len(result.token_ids)}; table linearization "
                "needs a SentencePiece model trained with split_by_whitespace=true (the default)")
    return result
