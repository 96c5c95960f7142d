"""Table-aware denoisers: whole units masked, exact reconstruction, rates, lengths."""
import collections
import random

import numpy as np
import pytest
import seqio
import tensorflow as tf

from ul2lab.data import linearize as lin
from ul2lab.data import objectives
from ul2lab.data import table_objectives
from ul2lab.data import tables

from conftest import TABLE_WORDS as WORDS


@pytest.fixture(scope="module")
def vocabulary(table_vocabulary):
    return table_vocabulary
LENGTHS = {"inputs": 160, "targets": 96}




def random_tables(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        width = rng.randint(1, 5)
        cell = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 1, 1, 2, 4])))
        out.append(tables.make_table([f"h{j} {cell()}" for j in range(width)],
                                     [[cell() or "x" for _ in range(width)]
                                      for _ in range(rng.randint(1, 12))],
                                     title=cell(), source=f"t{i}"))
    return out


def denoise(vocabulary, table_list, rates=None, lengths=LENGTHS, seed=7, mask_fractions=None):
    features = {k: seqio.Feature(vocabulary) for k in ("inputs", "targets")}
    ds = tf.data.Dataset.from_tensor_slices({"table": [t.to_json() for t in table_list]})
    ds = table_objectives.linearize_tables(ds, lengths, features)
    with seqio.utils.map_seed_manager(seed):
        ds = table_objectives.table_denoise(ds, lengths, features, denoiser_rates=rates,
                                            mask_fractions=mask_fractions)
    return list(ds.as_numpy_iterator())


def masked_spans(targets, first_sentinel):
    """The token runs after each sentinel in the targets, in order."""
    spans, current = [], None
    for t in targets:
        if first_sentinel - 100 < t <= first_sentinel:
            current = []
            spans.append(current)
        else:
            current.append(int(t))
    return [s for s in spans if s]


def unit_runs(linearized, denoiser):
    """Every maskable unit of a denoiser as the token runs it covers."""
    units = table_objectives.unit_ids(linearized)[denoiser]
    ids = np.asarray(linearized.token_ids)
    runs = collections.defaultdict(list)
    for u in np.unique(units[units >= 0]):
        positions = np.flatnonzero(units == u)
        for run in np.split(positions, np.flatnonzero(np.diff(positions) > 1) + 1):
            runs[int(u)].append(ids[run].tolist())
    return runs


@pytest.mark.parametrize("denoiser", table_objectives.DENOISERS)
def test_masked_units_are_whole_and_reconstruct_the_table(vocabulary, denoiser):
    table_list = random_tables(25, seed=table_objectives.DENOISERS.index(denoiser))
    first = objectives.sentinel_id(vocabulary)
    mode = list(vocabulary.encode(objectives.MODE_TOKENS["R" if denoiser == "cell" else "X"]))
    examples = denoise(vocabulary, table_list, rates={denoiser: 1.0})
    assert len(examples) == 25  # every table has a body row that fits the targets
    budget = LENGTHS["inputs"] - 8
    by_text = {lin.linearize(t, vocabulary, budget).text: t for t in table_list}
    for ex in examples:
        linearized = lin.linearize(by_text[ex["table_text"].decode()], vocabulary, budget)
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        assert inputs[:len(mode)] == mode
        assert targets[0] == first  # <extra_id_0>, the highest id, opens the targets
        rebuilt = objectives.reconstruct_from_spans(inputs[len(mode):], targets, first, 100)
        assert rebuilt.tolist() == linearized.token_ids
        # Each masked run is one whole unit run (a cell, a row's content, a column's cell).
        runs = unit_runs(linearized, denoiser)
        all_runs = [r for rs in runs.values() for r in rs]
        spans = masked_spans(targets, first)
        assert spans and all(span in all_runs for span in spans)
        if denoiser == "column":  # a masked column loses its header and all of its cells
            masked_units = {u for u, rs in runs.items() if rs[0] in spans}
            for u in masked_units:
                assert all(r in spans for r in runs[u] if r)
        assert len(inputs) + 1 <= LENGTHS["inputs"] and len(targets) + 1 <= LENGTHS["targets"]


def test_denoiser_frequencies_follow_the_rates(vocabulary):
    examples = denoise(vocabulary, random_tables(300, seed=3),
                       rates={"cell": 3.0, "row": 1.0, "column": 0.0})
    counts = collections.Counter(int(ex["denoiser"]) for ex in examples)
    assert counts[2] == 0
    share = counts[0] / len(examples)
    assert abs(share - 0.75) < 0.08, counts


def test_same_seed_same_examples(vocabulary):
    a = denoise(vocabulary, random_tables(10), seed=5)
    b = denoise(vocabulary, random_tables(10), seed=5)
    c = denoise(vocabulary, random_tables(10), seed=6)
    assert [x["inputs"].tolist() for x in a] == [x["inputs"].tolist() for x in b]
    assert [x["inputs"].tolist() for x in a] != [x["inputs"].tolist() for x in c]


def test_bad_rates_are_clear_errors(vocabulary):
    features = {k: seqio.Feature(vocabulary) for k in ("inputs", "targets")}
    ds = tf.data.Dataset.from_tensor_slices({"table": ["{}"]})
    for rates, message in [({"cell": -1.0}, "non-negative"), ({"cell": 0.0}, "not all zero"),
                           ({"cells": 1.0}, "unknown table denoisers")]:
        with pytest.raises(ValueError, match=message):
            table_objectives.table_denoise(ds, LENGTHS, features, denoiser_rates=rates)
    with pytest.raises(ValueError, match="too short"):
        table_objectives.table_denoise(ds, {"inputs": 64, "targets": 3}, features)


def test_tables_over_budget_or_without_rows_are_skipped(vocabulary):
    wide = tables.make_table([f"long header name {i}" for i in range(60)], [["1"] * 60],
                             source="wide-table")
    header_only = tables.make_table(["year", "city"], [])
    before = table_objectives.SKIPPED["header_over_budget"]
    examples = denoise(vocabulary, [wide, header_only] + random_tables(3),
                       rates={"cell": 1.0, "row": 1.0})  # nothing to mask without rows
    assert len(examples) == 3
    assert table_objectives.SKIPPED["header_over_budget"] == before + 1


def test_never_more_spans_than_sentinels_a_shorter_table_instead(vocabulary):
    # the same rule as the text mixture's plan: fewer rows, never an ordinary id as a sentinel
    few = seqio.SentencePieceVocabulary(vocabulary.sentencepiece_model_file, extra_ids=4)
    tall = [tables.make_table(["a", "b"], [[str(i), str(i)] for i in range(n)]) for n in (2, 30)]
    lengths = {"inputs": 400, "targets": 200}
    examples = denoise(few, tall, rates={"column": 1.0}, lengths=lengths)
    # a masked column of 2 rows needs its header, 2 cells and the closing text: 4 sentinels
    assert [int(ex["rows_cut_for_sentinels"]) for ex in examples] == [0, 28]
    mode = len(few.encode(objectives.MODE_TOKENS["X"]))
    first, lowest = few.vocab_size - 1, few.vocab_size - 4
    for ex, table in zip(examples, tall):
        inputs, targets = ex["inputs"][mode:], ex["targets"]
        assert sum(t >= lowest for t in targets) <= 4 and sum(t >= lowest for t in inputs) <= 4
        rebuilt = objectives.reconstruct_from_spans(inputs, targets, first, 4)
        kept = tables.make_table(table.header, table.rows[:2], source=table.source)
        assert rebuilt.tolist() == lin.linearize(kept, few, lengths["inputs"] - 8).token_ids


@pytest.mark.parametrize("denoiser", table_objectives.DENOISERS)
def test_tall_tables_with_100_sentinels_keep_every_sentinel_real(vocabulary, denoiser):
    rng = random.Random(1)
    tall = [tables.make_table([f"h{j}" for j in range(width)],
                              [[str(rng.randint(0, 99)) for _ in range(width)] for _ in range(rows)],
                              source=f"tall{rows}x{width}")
            for rows, width in ((150, 1), (300, 2), (40, 3), (500, 1))]
    lengths = {"inputs": 2048, "targets": 1024}
    examples = denoise(vocabulary, tall, rates={denoiser: 1.0}, lengths=lengths,
                       mask_fractions={"cell": 0.5, "row": 0.5})
    assert len(examples) == len(tall)  # none dropped
    first, lowest = vocabulary.vocab_size - 1, vocabulary.vocab_size - 100
    budget = lengths["inputs"] - 8
    mode = len(vocabulary.encode(objectives.MODE_TOKENS["R" if denoiser == "cell" else "X"]))
    for ex, table in zip(examples, tall):
        linearized = lin.linearize(table, vocabulary, budget)
        inputs, targets = ex["inputs"][mode:], ex["targets"]
        marks = targets[targets >= lowest]
        np.testing.assert_array_equal(marks, first - np.arange(len(marks)))  # in order, all real
        rebuilt = objectives.reconstruct_from_spans(inputs, targets, first, 100)
        kept_rows = linearized.rows_kept - int(ex["rows_cut_for_sentinels"])
        kept = lin.linearize(tables.make_table(table.header, table.rows[:kept_rows]), vocabulary, budget)
        assert rebuilt.tolist() == kept.token_ids
    cut = [int(ex["rows_cut_for_sentinels"]) for ex in examples]
    assert any(cut) and cut[2] == 0  # the 40-row table fits whole, the long ones are cut


def test_table_mod_plans_like_the_text_mixture(vocabulary):
    """The table MoD (UL2's mixture over linearized tables, as tasks/tables.py builds it) plans with
    the same rule as text: with 20 sentinels X(3, .5) takes a shorter segment, every mark is real."""
    few = seqio.SentencePieceVocabulary(vocabulary.sentencepiece_model_file, extra_ids=20)
    lengths = {"inputs": 512, "targets": 512}
    features = {k: seqio.Feature(few, add_eos=True) for k in ("inputs", "targets")}
    ds = tf.data.Dataset.from_tensor_slices({"table": [t.to_json() for t in random_tables(200, seed=4)]})
    ds = table_objectives.linearize_tables(ds, lengths, features, output_key="targets", reserved_tokens=0)
    ds = ds.map(lambda ex: {"targets": ex["targets"]})
    with seqio.utils.map_seed_manager(3):
        ds = objectives.mixture_of_denoisers(ds, lengths, features, "UL2", denoiser_feature_key="d")
    plans = objectives.plan_denoisers("UL2", lengths, few)
    assert {str(p.denoiser): p.noise_spans for p in plans}["X(3, 0.5)"] == 20
    first, lowest = few.vocab_size - 1, few.vocab_size - 20
    examples = list(ds.as_numpy_iterator())
    assert {int(ex["d"]) for ex in examples} == set(range(7))
    for ex in examples:
        plan = plans[ex["d"]]
        marks = ex["targets"][ex["targets"] >= lowest]
        assert len(marks) == plan.max_sentinels <= 20
        np.testing.assert_array_equal(marks, first - np.arange(len(marks)))
        np.testing.assert_array_equal(ex["inputs"][ex["inputs"] >= lowest], marks)


def test_packing_is_quiet_about_the_table_statistics_and_not_about_other_features(caplog):
    """seqio's packer warns about every feature outside the lengths; the table masks' statistics are meant
    to be dropped there (a warning on every run of the demo), a feature of the user's is still named."""
    from ul2lab.data import pipeline  # noqa: F401  installs the log filter, as every ul2lab run does
    statistics = {k: 1 for k in table_objectives.STATISTICS_FEATURES if k != "table_text"}
    for extra, warned in ((dict(statistics, table_text="a | b"), False), ({"my_feature": 3}, True)):
        caplog.clear()
        example = dict({"inputs": [5, 6, 7], "targets": [8, 9]}, **extra)
        with caplog.at_level("WARNING"):
            seqio.utils.trim_and_pack_dataset(tf.data.Dataset.from_tensors(example), {"inputs": 8, "targets": 8})
        messages = [r.getMessage() for r in caplog.records if "removed during packing" in r.getMessage()]
        assert bool(messages) == warned, (extra, messages)
        if warned:
            assert "my_feature" in messages[0]
