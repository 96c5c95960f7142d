"""Table-aware denoisers as seqio preprocessors.

A table travels through tf.data as JSON (`Table.to_json`). `linearize_tables` turns it into token
ids within the task's input length, and records for every token which cell, row and column it
belongs to. `table_denoise` then picks, per example, one of three denoisers and masks whole units:

  cell:    body cells (header kept)            each masked cell   → one sentinel
  row:     the cells of a body row, with their separators (the "row i :" label kept)
  column:  the header cell and every body cell of the column; each of them is a separate run of
           tokens in the linear text, so each gets its own sentinel

Masked runs become sentinels in the inputs and the runs themselves, each after its sentinel, in
the targets, through the span→sentinel functions of `ul2lab.data.objectives` (T5 convention: the first
masked unit is <extra_id_0>, the highest id). Units are always separated by unmasked label or
separator tokens, so no two masked units merge into one span, and inputs + targets rebuild the
linearized table token for token. Mode tokens (UL2's [NLU]/[NLG]) are prepended per denoiser.
The UL2 Mixture-of-Denoisers over the linearized text is `ul2lab.data.objectives.mixture_of_denoisers`
applied to `linearize_tables(..., output_key="targets")` (see tasks/tables.py).

gin: ul2lab.table_denoise.denoiser_rates = {"cell": 2.0, "row": 1.0, "column": 1.0}
     ul2lab.table_denoise.mask_fractions = {"cell": 0.15, "row": 0.2, "column": 0.2}
     ul2lab.LinearizeConfig.max_cell_tokens = 16  (separators, caps, lower-casing; all tasks)
"""
from __future__ import annotations

import collections
import json
from typing import Mapping, Optional

import gin
import numpy as np
import seqio
import tensorflow as tf

from ul2lab.data import linearize as lin
from ul2lab.data import objectives
from ul2lab.data import skips
from ul2lab.data.tables import TableReadError, table_from_json

DENOISERS = ("cell", "row", "column")

# gin: ul2lab.LinearizeConfig.max_cell_tokens = 16, etc.; applies wherever a config is not given.
LinearizeConfig = gin.external_configurable(lin.LinearizeConfig, module="ul2lab")

# Tables skipped by `linearize_tables` (header alone over budget, unreadable JSON), process-wide.
SKIPPED = collections.Counter()


# what the table masks output beside inputs/targets, for inspection and tests: a model's feature
# converter drops them (data/pipeline.py keeps seqio from warning about that on every run)
STATISTICS_FEATURES = ("denoiser", "num_masked", "num_sentinels", "rows_cut_for_sentinels", "table_text")


def body_rows(linearized: lin.Linearized) -> np.ndarray:
    """Per token, the body row it belongs to (0, 1, ... in order; its label and separators too),
    or -1 for what comes before the body (prefix, title, header)."""
    return np.asarray([max(piece.row, -1) for piece, ids in zip(linearized.pieces, linearized.piece_ids)
                       for _ in ids], np.int32)


def unit_ids(linearized: lin.Linearized) -> dict[str, np.ndarray]:
    """Per token, the index of its cell / row / column unit, or -1 where that denoiser keeps it."""
    cells, rows, columns = [], [], []
    cell_index: dict[tuple[int, int], int] = {}
    row_index: dict[int, int] = {}
    for piece, ids in zip(linearized.pieces, linearized.piece_ids):
        in_body = piece.row >= 0 and piece.kind in (lin.CELL, lin.SEPARATOR)
        cell = cell_index.setdefault((piece.row, piece.col), len(cell_index)) \
            if piece.kind == lin.CELL else -1
        row = row_index.setdefault(piece.row, len(row_index)) if in_body else -1
        column = piece.col if piece.kind in (lin.CELL, lin.HEADER) else -1
        cells += [cell] * len(ids)
        rows += [row] * len(ids)
        columns += [column] * len(ids)
    return {"cell": np.asarray(cells, np.int32), "row": np.asarray(rows, np.int32),
            "column": np.asarray(columns, np.int32)}


@gin.configurable(module="ul2lab")
def linearize_tables(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                     output_features: Mapping[str, seqio.Feature], *,
                     config: Optional[lin.LinearizeConfig] = None,
                     reserved_tokens: int = 8, length_key: str = "inputs",
                     output_key: str = "tokens") -> tf.data.Dataset:
    """{"table": JSON} → {output_key: ids, "cell_unit"/"row_unit"/"column_unit", "body_row",
    "table_text", ...}.

    The budget is `sequence_length[length_key] - reserved_tokens` (room for a mode token and EOS).
    Tables whose header alone exceeds it, or whose JSON is unreadable, are dropped, counted in
    `SKIPPED` and logged with their source.
    """
    vocabulary = output_features["targets"].vocabulary  # inputs and targets share it
    config = config or LinearizeConfig()
    budget = sequence_length[length_key] - reserved_tokens
    if budget <= 0:
        raise ValueError(f"sequence length {sequence_length[length_key]} for {length_key!r} leaves no "
                         f"room for a table after {reserved_tokens} reserved tokens")

    def py_linearize(table_json):
        try:
            table = table_from_json(json.loads(table_json.decode("utf-8")), "table")
        except (ValueError, TableReadError) as e:
            skips.skipped("tables that cannot be decoded", str(e), SKIPPED, "unreadable")
            table = None
        if table is not None:
            result = lin.linearize(table, vocabulary, budget, config=config)
            if not result.fits:
                skips.skipped("tables whose header alone exceeds the token budget",
                              f"{table.source} (budget {budget} tokens)",
                              SKIPPED, "header_over_budget")
        if table is None or not result.fits:
            empty = np.zeros([0], np.int32)
            return empty, empty, empty, empty, empty, b"", False, False
        units = unit_ids(result)
        return (np.asarray(result.token_ids, np.int32), units["cell"], units["row"], units["column"],
                body_rows(result), result.text.encode("utf-8"), True, result.truncated)

    def fn(ex):
        outs = tf.numpy_function(py_linearize, [ex["table"]],
                                 [tf.int32] * 5 + [tf.string, tf.bool, tf.bool], stateful=False)
        tokens, cell, row, column, body_row, text, fits, truncated = outs
        for t in (tokens, cell, row, column, body_row):
            t.set_shape([None])
        for t in (text, fits, truncated):
            t.set_shape([])
        ex = dict(ex)
        ex.update({output_key: tokens, "cell_unit": cell, "row_unit": row, "column_unit": column,
                   "body_row": body_row, "table_text": text, "fits": fits,
                   "table_truncated": truncated})
        return ex

    dataset = dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.filter(lambda ex: ex["fits"])


def _check_rates(rates: Mapping[str, float], what: str):
    unknown = set(rates) - set(DENOISERS)
    if unknown:
        raise ValueError(f"{what} names unknown table denoisers {sorted(unknown)}; "
                         f"use {list(DENOISERS)}")
    if any(r < 0 for r in rates.values()) or sum(rates.values()) <= 0:
        raise ValueError(f"{what} must be non-negative and not all zero, got {dict(rates)}")


@gin.configurable(module="ul2lab")
def table_denoise(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                  output_features: Mapping[str, seqio.Feature], *,
                  denoiser_rates: Optional[Mapping[str, float]] = None,
                  mask_fractions: Optional[Mapping[str, float]] = None,
                  mode_tokens: Optional[Mapping[str, str]] = None) -> tf.data.Dataset:
    """Masks whole cells, rows or columns of `linearize_tables` output (see the module docstring).

    denoiser_rates: relative frequency of each denoiser (default equal).
    mask_fractions: share of that denoiser's non-empty units masked, at least one (default
      0.15 of cells, 0.2 of rows, 0.2 of columns); units are taken in random order while the targets
      fit `sequence_length["targets"]`.
    mode_tokens: text prepended to the inputs per denoiser, tokenized by the vocabulary
      (default UL2's: cell → "[NLU]", row and column → "[NLG]"); "" for none.
    """
    denoiser_rates = dict(denoiser_rates or {d: 1.0 for d in DENOISERS})
    mask_fractions = {"cell": 0.15, "row": 0.2, "column": 0.2, **(mask_fractions or {})}
    mode_tokens = {"cell": objectives.MODE_TOKENS["R"], "row": objectives.MODE_TOKENS["X"],
                   "column": objectives.MODE_TOKENS["X"], **(mode_tokens or {})}
    _check_rates(denoiser_rates, "table denoiser_rates")
    _check_rates(mask_fractions, "table mask_fractions")
    vocabulary = output_features["targets"].vocabulary
    first_sentinel = objectives.sentinel_id(vocabulary)
    sentinels = objectives.sentinel_count(vocabulary)
    if sentinels < 2:  # one masked unit and the text around it need two
        raise ValueError(f"the table denoisers mark masked units with sentinel ids but the vocabulary "
                         f"{vocabulary} has {sentinels}; give it extra ids: `ul2lab vocab --extra_ids "
                         "100`, or seqio.SentencePieceVocabulary(path, extra_ids=100)")
    # Targets hold, per masked unit, its tokens and a sentinel, plus a closing sentinel and EOS.
    targets_budget = sequence_length["targets"] - 2
    if targets_budget < 2:
        raise ValueError(f"target length {sequence_length['targets']} is too short to hold one masked "
                         "table cell; use at least 4")
    logits = tf.math.log(tf.constant([float(denoiser_rates.get(d, 0.0)) for d in DENOISERS]))
    fractions = tf.constant([float(mask_fractions[d]) for d in DENOISERS])
    modes = tf.ragged.constant([[int(i) for i in vocabulary.encode(mode_tokens[d])]
                                if mode_tokens[d] else [] for d in DENOISERS], dtype=tf.int32)

    def units_to_mask(fraction, num_units):
        return tf.maximum(1, tf.cast(tf.round(fraction * tf.cast(num_units, tf.float32)), tf.int32))

    def rows_that_fit(unit, body_row, fraction):
        """How many body rows to keep so that masking `fraction` of the kept units, whichever are
        drawn, needs no more sentinels than the vocabulary has (the same rule as the text
        mixture's plan: a shorter table rather than an ordinary id as a sentinel)."""
        num_rows = tf.reduce_max(tf.concat([body_row, [-1]], 0)) + 1
        width = tf.maximum(tf.reduce_max(tf.concat([unit, [-1]], 0)) + 1, 1)  # units (at least 1)
        # a run (one sentinel) starts where a unit starts; bucket 0: before the body, r + 1: row r
        starts = (unit >= 0) & (unit != tf.pad(unit[:-1], [[1, 0]], constant_values=-1))
        run_unit = tf.boolean_mask(unit, starts)
        run_bucket = tf.boolean_mask(body_row, starts) + 1
        runs = tf.math.unsorted_segment_sum(tf.ones_like(run_unit), run_bucket * width + run_unit,
                                            (num_rows + 1) * width)
        runs = tf.cumsum(tf.reshape(runs, [num_rows + 1, width]), axis=0)  # [rows kept, unit]
        count = units_to_mask(fraction, tf.reduce_sum(tf.cast(runs > 0, tf.int32), axis=1))
        # the most runs `count` units can have; +1: the text after the last masked unit
        most = tf.cumsum(tf.sort(runs, axis=1, direction="DESCENDING"), axis=1)
        needed = tf.gather(most, tf.minimum(count, width) - 1, batch_dims=1) + 1
        return tf.reduce_sum(tf.cast(needed <= sentinels, tf.int32)) - 1, num_rows

    @seqio.map_over_dataset(num_seeds=2)
    @tf.autograph.experimental.do_not_convert  # graph code already: AutoGraph only slows tracing
    def mask(ex, seeds):
        choice = tf.random.stateless_categorical(logits[None], 1, seeds[0], dtype=tf.int32)[0, 0]
        unit = tf.gather(tf.stack([ex["cell_unit"], ex["row_unit"], ex["column_unit"]]), choice)
        tokens, body_row = ex["tokens"], ex["body_row"]
        kept_rows, num_rows = rows_that_fit(unit, body_row, fractions[choice])
        keep = body_row < kept_rows  # a prefix: the body rows come in order after everything else
        tokens, unit = tf.boolean_mask(tokens, keep), tf.boolean_mask(unit, keep)
        num_units = tf.reduce_max(tf.concat([unit, [-1]], 0)) + 1
        sizes = tf.math.unsorted_segment_sum(tf.ones_like(unit), tf.where(unit >= 0, unit, num_units),
                                             num_units + 1)[:num_units]
        non_empty = sizes > 0
        count = units_to_mask(fractions[choice], tf.reduce_sum(tf.cast(non_empty, tf.int32)))
        scores = tf.random.stateless_uniform([num_units], seeds[1])
        order = tf.argsort(tf.where(non_empty, scores, 2.0))  # empty units last: nothing to predict
        cost = tf.gather(sizes, order) + 1
        take = ((tf.cumsum(cost) <= targets_budget) & (tf.range(num_units) < count)
                & tf.gather(non_empty, order))
        selected = tf.concat([tf.scatter_nd(order[:, None], take, [num_units]), [False]], 0)
        noise_mask = tf.gather(selected, tf.where(unit >= 0, unit, num_units))  # -1: never noise
        inputs = objectives.noise_span_to_unique_sentinel(tokens, noise_mask, first_sentinel)
        targets = objectives.nonnoise_span_to_unique_sentinel(tokens, noise_mask, first_sentinel)
        nonnoise_starts = ~noise_mask & tf.pad(noise_mask[:-1], [[1, 0]], constant_values=True)
        return {"inputs": tf.concat([modes[choice], inputs], 0), "targets": targets,
                "denoiser": choice, "num_masked": tf.reduce_sum(tf.cast(take, tf.int32)),
                "num_sentinels": tf.reduce_sum(tf.cast(nonnoise_starts, tf.int32)),  # in targets
                "rows_cut_for_sentinels": num_rows - tf.maximum(kept_rows, 0),
                "table_text": ex["table_text"]}

    dataset = mask(dataset)
    # A table with no maskable unit (no body rows) teaches nothing here; the MoD side still sees it.
    # Mode tokens longer than linearize_tables' reserve would be trimmed with the EOS: drop such
    # examples rather than cut them. (rows_that_fit keeps every example within the sentinels.)
    return dataset.filter(lambda ex: (ex["num_masked"] > 0)
                          & (tf.size(ex["inputs"]) < sequence_length["inputs"]))
