"""Data report for a downstream table dataset: what the wikitq / tabfact tasks make of it.

  python bench/table_data.py --data_dir ../shared/data/wikitq
  python bench/table_data.py --data_dir ../shared/data/tabfact

Prints one JSON object: questions in the files vs examples produced (missing tables and
question+header over budget are the losses), linearized length in tokens before fitting (mean,
95th percentile) and after, the share of examples truncated (rows dropped, cells or title capped),
and for WikiTQ the share of gold answers found among the cells kept in the linearized table
(compared as WikiTQ values: normalized strings or equal numbers), next to the share found in the
whole table. Tokens are counted with the embedded vocabulary unless --vocab names a
SentencePiece model.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ul2lab.data import linearize as lin  # pylint: disable=g-import-not-at-top
from ul2lab.data import metrics
from ul2lab.data import tables


def _kept_cells(result: lin.Linearized) -> list[str]:
    return [p.text for p in result.pieces if p.kind in (lin.HEADER, lin.CELL)]


def _found(answer: str, cells: list[str]) -> bool:
    gold = metrics.AnswerValue(answer, metrics.canonical_gold_value(answer))
    return any(gold.matches(metrics.AnswerValue(c)) for c in cells)


def report(data_dir: str, vocabulary, inputs_length: int, limit: int | None) -> dict:
    from ul2lab_tasks import tables as table_tasks  # pylint: disable=g-import-not-at-top
    data_dir = os.path.abspath(data_dir)
    if os.path.isdir(os.path.join(data_dir, "data")):
        kind, files = "wikitq", [os.path.join(data_dir, "data", "training.tsv")]
        with open(files[0], encoding="utf-8") as f:
            num_input = sum(1 for _ in f) - 1
        examples = table_tasks.wikitq_examples(files[0], data_dir)
    elif os.path.exists(os.path.join(data_dir, "val_examples.json")):
        kind, files = "tabfact", [os.path.join(data_dir, "val_examples.json")]
        with open(files[0], encoding="utf-8") as f:
            num_input = sum(len(v[0]) for v in json.load(f).values())
        examples = table_tasks.tabfact_examples(files[0], data_dir)
    else:
        raise SystemExit(f"{data_dir} holds neither WikiTQ (data/training.tsv) nor TabFact "
                         "(val_examples.json); pass --data_dir .../wikitq or .../tabfact")

    budget = inputs_length - 1  # EOS
    full_lengths, fitted_lengths, truncated, rows_dropped = [], [], 0, 0
    answers_total = answers_kept = answers_anywhere = 0
    produced = read = 0
    start = time.time()
    for ex in examples:
        read += 1
        if limit is not None and read > limit:
            break
        table = tables.table_from_json(json.loads(ex["table"]), ex["id"])
        full = lin.linearize(table, vocabulary, None, prefix=ex["question"])
        fitted = lin.linearize(table, vocabulary, budget, prefix=ex["question"])
        full_lengths.append(len(full.token_ids))
        if not fitted.fits:
            continue
        produced += 1
        fitted_lengths.append(len(fitted.token_ids))
        truncated += fitted.truncated
        rows_dropped += fitted.rows_total - fitted.rows_kept
        if kind == "wikitq":
            kept, everything = _kept_cells(fitted), _kept_cells(full)
            for answer in ex["answers"]:
                answers_total += 1
                answers_kept += _found(answer, kept)
                answers_anywhere += _found(answer, everything)
    considered = num_input if limit is None else min(limit, num_input)
    out = {
        "dataset": kind, "files": files, "inputs_length": inputs_length,
        "questions_in_files": considered, "examples_produced": produced,
        "skipped": dict(table_tasks.SKIPPED),  # missing tables, malformed lines
        "skipped_over_budget": len(full_lengths) - produced,
        "linearized_tokens_full": {"mean": float(np.mean(full_lengths)),
                                   "p95": float(np.percentile(full_lengths, 95))},
        "linearized_tokens_fitted": {"mean": float(np.mean(fitted_lengths)),
                                     "p95": float(np.percentile(fitted_lengths, 95))},
        "share_truncated": truncated / max(produced, 1),
        "share_over_budget_before_fitting": float(np.mean(np.asarray(full_lengths) > budget)),
        "mean_rows_dropped": rows_dropped / max(produced, 1),
        "seconds": round(time.time() - start, 1),
    }
    if kind == "wikitq":
        out["share_answers_in_linearized_table"] = answers_kept / max(answers_total, 1)
        out["share_answers_in_whole_table"] = answers_anywhere / max(answers_total, 1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="the wikitq/ or tabfact/ folder")
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--vocab", default=None, help="SentencePiece .model (default: embedded)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    args = parser.parse_args()
    if args.vocab:
        import seqio  # pylint: disable=g-import-not-at-top
        vocabulary = seqio.SentencePieceVocabulary(args.vocab, extra_ids=100)
    else:
        from ul2lab.data import vocab  # pylint: disable=g-import-not-at-top
        vocabulary = vocab.embedded_vocabulary()
    print(json.dumps(report(args.data_dir, vocabulary, args.inputs_length, args.limit), indent=1))


if __name__ == "__main__":
    main()
