"""T5-exact span primitives and UL2's Mixture-of-Denoisers preprocessor."""
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from ul2lab.data import objectives as O
from conftest import first_documents

LENGTHS = {"inputs": 512, "targets": 512}


# ----------------------------------------------------------------------- span lengths


@pytest.mark.parametrize("mean_span, density, expected", [
    (3, 0.15, (568, 114)), (8, 0.15, (588, 100)), (64, 0.15, (600, 92)),
    (3, 0.5, (766, 512)), (8, 0.5, (908, 512)), (64, 0.5, (1006, 512))])
def test_random_spans_helper_length_table(mean_span, density, expected):
    assert O.random_spans_helper(512, density, mean_span) == expected


def _within_tolerances(raw, d):
    noise, spans = O.noise_counts(raw, d.noise_density, d.mean_noise_span_length)
    return (abs(noise / raw - d.noise_density) <= O.NOISE_DENSITY_TOLERANCE * d.noise_density and
            abs(noise / spans - d.mean_noise_span_length) <= O.MEAN_SPAN_TOLERANCE * d.mean_noise_span_length)


def test_plans_fill_the_lengths_unless_sentinels_or_span_statistics_forbid(tiny_vocabulary):
    plans = O.plan_denoisers("UL2", LENGTHS, tiny_vocabulary)
    assert len(plans) == 7 and abs(sum(p.probability for p in plans) - 1) < 1e-9
    assert O.sentinel_count(tiny_vocabulary) == 100
    for plan in plans:
        d = plan.denoiser
        assert plan.mode_ids == tuple(tiny_vocabulary.encode(O.MODE_TOKENS[d.kind]))
        assert plan.inputs_length <= 512 and plan.targets_length <= 512
        assert plan.budget_share == plan.inputs_length / 512
        if d.kind == "S":
            assert plan.inputs_length == 512 and plan.shortened_for == ""
            continue
        budget = 512 - len(plan.mode_ids)
        longest = O.random_spans_helper(budget, d.noise_density, d.mean_noise_span_length)[0]
        assert plan.longest_raw_length == longest  # T5's raw length for what the mode tokens leave
        noise, spans = O.noise_counts(plan.raw_length, d.noise_density, d.mean_noise_span_length)
        assert (plan.noise_tokens, plan.noise_spans, plan.max_sentinels) == (noise, spans, spans)
        assert spans <= 100 and _within_tolerances(plan.raw_length, d)
        if plan.raw_length == longest:
            assert plan.shortened_for == ""
            # and two more raw tokens would overflow the inputs (one more, at T5's density-0.5 rule)
            assert O.span_corruption_lengths(longest + 2, d.noise_density,
                                             d.mean_noise_span_length)[0] > budget
        else:  # every longer raw length needs too many sentinels or misses r or μ
            assert plan.shortened_for in ("sentinels", "span statistics")
            for raw in range(plan.raw_length + 1, longest + 1):
                too_many = O.noise_counts(raw, d.noise_density, d.mean_noise_span_length)[1] > 100
                assert too_many or not _within_tolerances(raw, d)
    by_name = {str(p.denoiser): p for p in plans}
    # T5's helper at 512 would give X(3, .5) 126 spans and X(64, .15) one span of ~89 tokens
    assert by_name["X(3, 0.5)"].shortened_for == "sentinels" and by_name["X(3, 0.5)"].noise_spans == 100
    assert by_name["X(3, 0.5)"].longest_raw_spans > 100
    assert by_name["X(64, 0.15)"].shortened_for == "span statistics"
    assert by_name["R(3, 0.15)"].shortened_for == by_name["X(8, 0.5)"].shortened_for == ""
    t5 = O.plan_denoisers("T5", LENGTHS, tiny_vocabulary)[0]  # T5's own lengths, unchanged
    assert (t5.raw_length, t5.inputs_length, t5.targets_length) == (568, 512, 114)
    # without the span-statistics rule only the sentinels shorten a plan
    loose = O.plan_denoisers("UL2", LENGTHS, tiny_vocabulary, noise_density_tolerance=None,
                             mean_span_tolerance=None)
    assert [p.shortened_for for p in loose] == ["", "", "sentinels", "", "", "", ""]


def test_plan_errors_name_the_extra_ids_to_give(tiny_vocabulary):
    bare = seqio.SentencePieceVocabulary(tiny_vocabulary.sentencepiece_model_file, extra_ids=0)
    with pytest.raises(ValueError, match=r"R\(3, 0.15\) marks spans with sentinel ids .* has none; "
                                         r"give the vocabulary at least 100 sentinels: `ul2lab vocab "
                                         r"--extra_ids 100`"):
        O.plan_denoisers("T5", LENGTHS, bare)
    s_only = [O.s_denoiser(add_sentinel=True)]
    with pytest.raises(ValueError, match="extra_ids 1"):
        O.plan_denoisers(s_only, LENGTHS, bare)
    assert O.plan_denoisers([O.s_denoiser()], LENGTHS, bare)[0].max_sentinels == 0


def test_shortened_plans_are_reported_in_one_line(tiny_vocabulary, caplog):
    import logging
    with caplog.at_level(logging.INFO):
        plans = O.plan_denoisers("UL2R", {"inputs": 1000, "targets": 1000}, tiny_vocabulary)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "X(3, 0.5) uses shorter text" in warnings[0] and "--extra_ids 248" in warnings[0]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 and O.describe_plans(plans) in info[0]
    x3 = next(p for p in plans if str(p.denoiser) == "X(3, 0.5)")
    assert f"raw {x3.raw_length} -> inputs {x3.inputs_length} ({x3.budget_share:.0%}" in info[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):  # planned again (every dataset build): not logged again
        O.plan_denoisers("UL2R", {"inputs": 1000, "targets": 1000}, tiny_vocabulary)
    assert not caplog.records


def test_presets_and_gin_rates():
    assert [str(d) for d in O.PRESETS["UL2"]] == [
        "R(3, 0.15)", "R(8, 0.15)", "X(3, 0.5)", "X(8, 0.5)", "X(64, 0.15)", "X(64, 0.5)", "S(0.25)"]
    assert len({d.rate for d in O.PRESETS["UL2"]}) == 1  # equal participation (UL2 §3.1.2)
    assert [str(d) for d in O.PRESETS["UL2_APPENDIX"]][:6] == [str(d) for d in O.PRESETS["UL2"]][:6]
    assert str(O.PRESETS["UL2_APPENDIX"][6]) == "S(0.5)"
    assert {str(d): d.rate for d in O.PRESETS["UL2R"]} == {
        "S(0.5)": 0.5, "R(3, 0.15)": 0.25, "X(32, 0.15)": 0.125, "X(3, 0.5)": 0.125}
    assert [d.mode_token for d in O.PRESETS["UL2R"]] == ["[S2S]", "[NLU]", "[NLG]", "[NLG]"]
    assert O.PRESETS["T5"][0].mode_token is None
    reweighted = O.resolve_denoisers("UL2", {"S(0.25)": 6.0, "X(64, 0.5)": 0.0})
    assert {str(d): d.rate for d in reweighted}["S(0.25)"] == 6.0
    with pytest.raises(ValueError, match=r"\['S\(0.5\)'\], which are not in the mixture"):
        O.resolve_denoisers("UL2", {"S(0.5)": 1.0})


def test_gin_sets_any_weight(tiny_vocabulary):
    import gin
    docs = _token_documents(tiny_vocabulary, first_documents(40))
    features = {k: seqio.Feature(tiny_vocabulary, add_eos=True) for k in ("inputs", "targets")}
    with gin.unlock_config():
        gin.parse_config('ul2lab.mixture_of_denoisers.rates = {"R(3, 0.15)": 0.0, "X(3, 0.5)": 0.0}')
    try:
        with seqio.utils.map_seed_manager(1):
            ds = O.mixture_of_denoisers(docs, LENGTHS, features, "UL2R", denoiser_feature_key="d")
        chosen = {int(ex["d"]) for ex in ds.as_numpy_iterator()}
    finally:
        gin.clear_config()
    assert chosen == {0, 1}  # the plans of S(0.5) and X(32, 0.15): the zero-rate ones are gone


# ----------------------------------------------------------------------- noise masks


def _mask_statistics(denoiser, lengths, rows_per_length, seed=0):
    """Noise tokens, noise spans and first-token noise of every mask of the batched op the
    mixture uses: rows_per_length independent masks for each length."""
    noise, spans, first = [], [], []
    for i, length in enumerate(lengths):
        seeds = tf.constant([[seed, 2 * i], [seed, 2 * i + 1]])
        mask = O.random_spans_noise_mask_batch(rows_per_length, int(length), denoiser.noise_density,
                                               seeds, denoiser.mean_noise_span_length).numpy()
        starts = mask & ~np.pad(mask[:, :-1], [[0, 0], [1, 0]])
        noise.append(mask.sum(1))
        spans.append(starts.sum(1))
        first.append(mask[:, 0])
    return np.concatenate(noise), np.concatenate(spans), np.concatenate(first)


@pytest.mark.parametrize("denoiser", [d for d in O.PRESETS["UL2"] if d.kind != "S"] +
                         [O.PRESETS["UL2R"][2]], ids=str)
def test_noise_density_and_span_length_over_10000_examples(denoiser):
    # 10,000 masks: 100 rows at each of 100 segment lengths around those a 512-token input
    # uses (568..1006 raw tokens); at one fixed length T5's rounding would dominate the mean
    lengths = np.random.default_rng(0).integers(256, 1025, 100)
    noise, spans, first = _mask_statistics(denoiser, lengths, 100)
    lengths = np.repeat(lengths, 100)
    assert len(noise) == 10_000
    assert abs(noise.sum() / lengths.sum() - denoiser.noise_density) <= 0.01 * denoiser.noise_density
    assert abs(noise.sum() / spans.sum() - denoiser.mean_noise_span_length) <= \
        0.05 * denoiser.mean_noise_span_length
    assert not first.any()  # every mask starts with non-noise
    # each mask has exactly T5's count of noise tokens and spans for its length
    counts = np.array([O.span_corruption_lengths(n, denoiser.noise_density,
                                                 denoiser.mean_noise_span_length)
                       for n in lengths])
    np.testing.assert_array_equal(lengths - noise + spans + 1, counts[:, 0])
    np.testing.assert_array_equal(noise + spans + 1, counts[:, 1])


def test_prefix_lm_pivot_is_uniform_over_10000_examples():
    length = 506
    ds = tf.data.Dataset.from_tensor_slices(tf.random.stateless_uniform(
        [10_000, 2, 2], [5, 1], maxval=2**31 - 1, dtype=tf.int32))
    ds = ds.map(lambda seeds: tf.reduce_sum(tf.cast(
        O.random_prefix_noise_mask(length, 0.5, seeds), tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE).batch(10_000)
    prefix = next(iter(ds)).numpy()
    assert prefix.min() == 1 and prefix.max() == length - 1  # pivot anywhere in [1, L - 1]
    standard_error = (length - 2) / np.sqrt(12 * len(prefix))
    assert abs(prefix.mean() - length / 2) < 4 * standard_error
    counts = np.bincount(prefix, minlength=length)[1:]
    assert counts.max() < 60  # no pivot favoured (expected count ~20 each)


# ----------------------------------------------------------------------- the mixture


def _token_documents(vocabulary, docs):
    features = {"targets": seqio.Feature(vocabulary)}
    ds = tf.data.Dataset.from_tensor_slices({"targets": docs})
    return seqio.preprocessors.tokenize(ds, features)


def _mixture(vocabulary, docs, denoisers="UL2", lengths=LENGTHS, seed=7, **kwargs):
    features = {k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")}
    with seqio.utils.map_seed_manager(seed):
        ds = O.mixture_of_denoisers(_token_documents(vocabulary, docs), lengths, features,
                                    denoisers, denoiser_feature_key="denoiser", **kwargs)
    ds = seqio.preprocessors.append_eos_after_trim(ds, features, sequence_length=lengths)
    return list(ds.as_numpy_iterator())


@pytest.fixture(scope="module")
def documents():
    return first_documents(300)


@pytest.fixture(scope="module")
def wide_vocabulary(tiny_vocabulary):
    # X(3, 0.5) needs 126 sentinels at inputs length 512 for T5's raw length: with 200 extra ids
    # the plan keeps that length (with 100 it is shortened; test_objective_fidelity.py)
    return seqio.SentencePieceVocabulary(tiny_vocabulary.sentencepiece_model_file, extra_ids=200)


@pytest.fixture(scope="module")
def ul2_examples(wide_vocabulary, documents):
    return _mixture(wide_vocabulary, documents, documents_per_block=1000)


def test_examples_fit_end_with_eos_and_reconstruct_the_text(wide_vocabulary, documents,
                                                            ul2_examples):
    tiny_vocabulary = wide_vocabulary
    plans = O.plan_denoisers("UL2", LENGTHS, tiny_vocabulary)
    first_sentinel = tiny_vocabulary.vocab_size - 1
    eos = tiny_vocabulary.eos_id
    # the tokens the pipeline reads (TF's SentencePiece op may break ties, e.g. "000", unlike
    # the Python tokenizer, so the reference comes from the same op)
    stream = np.concatenate([d["targets"] for d in
                             _token_documents(tiny_vocabulary, documents).as_numpy_iterator()])
    rebuilt = []
    for ex in ul2_examples:
        plan = plans[ex["denoiser"]]
        inputs, targets = ex["inputs"], ex["targets"]
        assert len(inputs) <= plan.inputs_length <= 512 and len(targets) <= plan.targets_length
        assert inputs[-1] == eos and targets[-1] == eos
        mode = len(plan.mode_ids)
        assert tuple(inputs[:mode]) == plan.mode_ids
        inputs, targets = inputs[mode:-1], targets[:-1]
        if plan.denoiser.kind == "S":
            assert first_sentinel not in targets  # prefix LM: no sentinel by default
            segment = np.concatenate([inputs, targets])
        else:
            assert targets[0] == first_sentinel  # <extra_id_0> opens every R/X target
            segment = O.reconstruct_from_spans(inputs, targets, first_sentinel, 200)
        assert len(segment) == plan.raw_length  # each denoiser takes exactly its raw length
        rebuilt.append(segment)
    rebuilt = np.concatenate(rebuilt)
    # the examples are consecutive cuts of the text: nothing lost inside, only the tail left out
    np.testing.assert_array_equal(rebuilt, stream[:len(rebuilt)])
    assert len(stream) - len(rebuilt) < max(p.raw_length for p in plans)
    assert {ex["denoiser"] for ex in ul2_examples} == set(range(7))


def test_same_seed_same_examples_other_seed_other_examples(wide_vocabulary, documents,
                                                           ul2_examples):
    again = _mixture(wide_vocabulary, documents, documents_per_block=1000)
    assert len(again) == len(ul2_examples)
    for a, b in zip(again, ul2_examples):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = _mixture(wide_vocabulary, documents, documents_per_block=1000, seed=8)
    assert any(len(a["inputs"]) != len(b["inputs"]) or (a["inputs"] != b["inputs"]).any()
               for a, b in zip(other, ul2_examples))


# 0.1% critical values of the chi-squared distribution
CHI2_CRITICAL_0_001 = {2: 13.816, 3: 16.266, 6: 22.458}


@pytest.mark.parametrize("preset", ["UL2", "UL2R"])
def test_denoiser_frequencies_match_rates(tiny_vocabulary, preset):
    plans = O.plan_denoisers(preset, LENGTHS, tiny_vocabulary)
    # long token blocks: the drawn denoisers, cut exactly as the mixture cuts text
    blocks = tf.data.Dataset.from_tensors({"targets": tf.range(2_000_000, dtype=tf.int32),
                                           "num_documents": 1, "num_empty_documents": 0}).repeat(4)
    with seqio.utils.map_seed_manager(1234):
        ds = O.split_into_segments(blocks, plans, O.SkippedText())
    chosen = np.concatenate([b["denoiser"] for b in ds.as_numpy_iterator()])
    assert len(chosen) > 10_000
    observed = np.bincount(chosen, minlength=len(plans))
    expected = len(chosen) * np.array([p.probability for p in plans])
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_CRITICAL_0_001[len(plans) - 1], (observed, expected)


def test_dedicated_mode_ids_and_prefix_sentinel(tiny_vocabulary, documents):
    mode_ids = {"[NLU]": [5], "[NLG]": [6], "[S2S]": [7]}
    denoisers = [O.r_denoiser(3, 0.15), O.s_denoiser(add_sentinel=True)]
    examples = _mixture(tiny_vocabulary, documents[:60], denoisers, mode_token_ids=mode_ids)
    first_sentinel = tiny_vocabulary.vocab_size - 1
    for ex in examples:
        assert ex["inputs"][0] == (5 if ex["denoiser"] == 0 else 7)
        assert ex["targets"][0] == first_sentinel
        if ex["denoiser"] == 1:  # the prefix ends with the sentinel that opens the targets
            assert ex["inputs"][-2] == first_sentinel
            # mode, sentinel twice and EOS twice around the 510 raw tokens
            assert len(ex["inputs"]) + len(ex["targets"]) == 510 + 5
    assert {ex["denoiser"] for ex in examples} == {0, 1}


# ----------------------------------------------------------------------- bad input


def test_empty_and_short_documents_are_skipped_and_counted(tiny_vocabulary, documents):
    long_docs = [d for d in documents if len(tiny_vocabulary.encode(d)) >= 568][:5]
    short_docs = ["a short note", "x " * 100]
    docs = long_docs[:2] + ["", short_docs[0]] + long_docs[2:] + ["", short_docs[1]]
    counter = O.SkippedText()
    examples = _mixture(tiny_vocabulary, docs, "T5", skipped_text=counter,
                        merge_examples_to_reduce_padding=False)
    assert counter["empty_documents"] == 2
    assert counter["short_documents"] == 2
    used = 568 * len(examples)
    total = sum(len(tiny_vocabulary.encode(d)) for d in docs)
    assert counter["unused_tokens"] == total - used
    assert len(examples) == sum(len(tiny_vocabulary.encode(d)) // 568 for d in long_docs)
    # concatenated, the short documents fill segments; empty ones are still counted
    merged = O.SkippedText()
    examples = _mixture(tiny_vocabulary, docs, "T5", skipped_text=merged)
    assert merged["empty_documents"] == 2 and merged["short_documents"] == 0
    assert merged["unused_tokens"] == total - 568 * len(examples) < 568


@pytest.mark.parametrize("rates, message", [
    ((1.0, -0.5), "non-negative"), ((0.0, 0.0), "all zero")])
def test_bad_rates_are_a_clear_error(tiny_vocabulary, rates, message):
    denoisers = [O.r_denoiser(3, 0.15, rate=rates[0]), O.x_denoiser(32, 0.5, rate=rates[1])]
    with pytest.raises(ValueError, match=message) as e:
        O.plan_denoisers(denoisers, LENGTHS, tiny_vocabulary)
    assert "R(3, 0.15)" in str(e.value) and "X(32, 0.5)" in str(e.value)


def test_targets_too_short_fails_when_the_dataset_is_built(tiny_vocabulary):
    features = {k: seqio.Feature(tiny_vocabulary, add_eos=True) for k in ("inputs", "targets")}
    docs = _token_documents(tiny_vocabulary, ["some text"])
    with pytest.raises(ValueError) as e:
        O.mixture_of_denoisers(docs, {"inputs": 512, "targets": 128}, features, "UL2")
    plans = O.plan_denoisers("UL2", {"inputs": 512, "targets": 512}, tiny_vocabulary)
    need = max(p.targets_length for p in plans)
    assert f"X(64, 0.5) needs {plans[5].targets_length}" in str(e.value)
    assert f"at least {need}" in str(e.value) and "R(3, 0.15)" not in str(e.value)
    with pytest.raises(ValueError, match="R\\(3, 0.15\\) needs 114; set sequence_length\\['targets'\\] "
                       "to at least 114"):
        O.mixture_of_denoisers(docs, {"inputs": 512, "targets": 100}, features, "T5")


# ----------------------------------------------------------------------- parity with T5


@pytest.fixture(scope="module")
def t5_preprocessors():
    if os.environ.get("CI"):  # CI installs tests/requirements-peers.txt: parity must run there
        import t5.data.preprocessors
        return t5.data.preprocessors
    return pytest.importorskip("t5.data.preprocessors")


def test_random_spans_helper_matches_t5(t5_preprocessors):
    for inputs_length in (64, 100, 128, 511, 512, 1024, 2048):
        for density in (0.1, 0.15, 0.25, 0.5):
            for mean_span in (1.0, 2.5, 3.0, 8.0, 32.0, 64.0):
                for extra_inputs, extra_targets in ((1, 1), (1, 0), (2, 1)):
                    assert O.random_spans_helper(inputs_length, density, mean_span, extra_inputs,
                                                 extra_targets) == \
                        t5_preprocessors.random_spans_helper(inputs_length, density, mean_span,
                                                             extra_inputs, extra_targets)


def test_masks_and_sentinels_match_t5(t5_preprocessors, tiny_vocabulary):
    rng = np.random.default_rng(3)
    first_sentinel = O.sentinel_id(tiny_vocabulary)
    assert first_sentinel == t5_preprocessors.sentinel_id(tiny_vocabulary)
    for _ in range(40):
        length = int(rng.integers(2, 1200))
        density = float(rng.choice([0.15, 0.3, 0.5]))
        mean_span = float(rng.choice([3.0, 8.0, 32.0, 64.0]))
        seeds = tf.constant(rng.integers(0, 2**31 - 1, (2, 2)), tf.int32)
        tokens = tf.constant(rng.integers(3, 500, length), tf.int32)
        ours = O.random_spans_noise_mask(length, density, seeds, mean_span)
        theirs = t5_preprocessors.random_spans_noise_mask(length, density, seeds, mean_span)
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(
            O.noise_span_to_unique_sentinel(tokens, ours, first_sentinel),
            t5_preprocessors.noise_span_to_unique_sentinel(tokens, theirs, tiny_vocabulary, seeds=None))
        np.testing.assert_array_equal(
            O.nonnoise_span_to_unique_sentinel(tokens, ours, first_sentinel),
            t5_preprocessors.nonnoise_span_to_unique_sentinel(tokens, theirs, tiny_vocabulary, seeds=None))
        prefix_density = min(density, 0.5)
        np.testing.assert_array_equal(
            O.random_prefix_noise_mask(length, prefix_density, seeds),
            t5_preprocessors.random_prefix_noise_mask(length, prefix_density, seeds))
