"""Research fidelity of the objectives: no ordinary id where a sentinel belongs, on the text MoD,
the table MoD, the table denoisers and T5's span corruption, at any length and with either
sentinel layout; every example's spans are T5's count for its own raw length, and each
denoiser's noise density and mean span are within 1% and 5% of its r and μ.

Fast path: the mixture reads token ids directly (no tokenizer), one synthetic document of random
ordinary ids, so every example is a consecutive cut of it and must rebuild it exactly.
"""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from ul2lab.data import objectives as O
from ul2lab.data import vocab

EXAMPLES_PER_PRESET = 2_000


@pytest.fixture(scope="module")
def embedded_vocabulary(ul2lab_cache_dir):
    """The embedded corpus's vocabulary: 4,000 pieces + seqio's 100 extra ids."""
    return vocab.embedded_vocabulary()


@pytest.fixture(scope="module")
def pieces_vocabulary(tiny_vocabulary, tmp_path_factory):
    """A model that carries its 100 sentinels as pieces (T5's .100extra layout), loaded with
    extra_ids=0, as `ul2lab vocab --extra_ids 100` writes it."""
    with open(tiny_vocabulary.sentencepiece_model_file, "rb") as f:
        model = vocab.add_sentinel_pieces(f.read(), 100)
    path = tmp_path_factory.mktemp("pieces") / "sp.model"
    path.write_bytes(model)
    loaded = vocab.sentencepiece_vocabulary(str(path))
    assert loaded.extra_ids == 0 and O.sentinel_count(loaded) == 100
    return loaded


def _stream(vocabulary, length, seed):
    lowest_sentinel = vocabulary.vocab_size - O.sentinel_count(vocabulary)
    return np.random.default_rng(seed).integers(3, lowest_sentinel, length).astype(np.int32)


def _mixture(vocabulary, stream, preset, lengths):
    features = {k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")}
    ds = tf.data.Dataset.from_tensors({"targets": stream})
    with seqio.utils.map_seed_manager(11):
        ds = O.mixture_of_denoisers(ds, lengths, features, preset, denoiser_feature_key="denoiser")
    return seqio.preprocessors.append_eos_after_trim(ds, features, sequence_length=lengths)


def check_examples(examples, plans, vocabulary, stream, lengths):
    """Every example rebuilds the next cut of `stream`; sentinels are exactly the span markers.
    Returns {denoiser index: [noise tokens, spans, raw tokens, examples]}."""
    first = O.sentinel_id(vocabulary)
    lowest = first - O.sentinel_count(vocabulary) + 1
    totals = {i: [0, 0, 0, 0] for i in range(len(plans))}
    offset = 0
    for ex in examples:
        plan = plans[ex["denoiser"]]
        inputs, targets = ex["inputs"], ex["targets"]
        assert inputs[-1] == targets[-1] == vocabulary.eos_id
        assert len(inputs) <= plan.inputs_length <= lengths["inputs"]
        assert len(targets) <= plan.targets_length <= lengths["targets"]
        assert tuple(inputs[:len(plan.mode_ids)]) == plan.mode_ids
        inputs, targets = inputs[len(plan.mode_ids):-1], targets[:-1]
        in_marks, out_marks = np.flatnonzero(inputs >= lowest), np.flatnonzero(targets >= lowest)
        if plan.denoiser.kind == "S":
            assert len(in_marks) == len(out_marks) == 0
            segment = np.concatenate([inputs, targets])
        else:
            spans = len(in_marks)
            order = first - np.arange(spans)  # <extra_id_0>, <extra_id_1>, ... in both
            np.testing.assert_array_equal(inputs[in_marks], order)
            np.testing.assert_array_equal(targets[out_marks], order)
            assert out_marks[0] == 0 and in_marks[-1] == len(inputs) - 1
            parts = np.split(inputs, in_marks)  # text, then sentinel + text, ..., the last sentinel
            kept = [parts[0]] + [part[1:] for part in parts[1:-1]]
            noise = [part[1:] for part in np.split(targets, out_marks)[1:]]
            segment = np.concatenate([x for pair in zip(kept, noise) for x in pair])
            raw = len(segment)
            # T5's count of noise tokens and spans for this example's own raw length
            assert (len(targets) - spans, spans) == O.noise_counts(
                raw, plan.denoiser.noise_density, plan.denoiser.mean_noise_span_length)
            totals[ex["denoiser"]][:3] = np.add(totals[ex["denoiser"]][:3], (len(targets) - spans, spans, raw))
        totals[ex["denoiser"]][3] += 1
        np.testing.assert_array_equal(segment, stream[offset:offset + len(segment)])
        assert len(segment) == plan.raw_length
        offset += len(segment)
    return totals


@pytest.mark.parametrize("inputs_length", [512, 1024])
@pytest.mark.parametrize("preset", ["UL2", "UL2R", "T5"])
@pytest.mark.parametrize("layout", ["embedded", "pieces"])
def test_sentinels_spans_and_statistics_over_2000_examples(layout, preset, inputs_length, request):
    vocabulary = request.getfixturevalue(f"{layout}_vocabulary")
    lengths = {"inputs": inputs_length, "targets": inputs_length}
    plans = O.plan_denoisers(preset, lengths, vocabulary)
    mean_raw = sum(p.probability * p.raw_length for p in plans)
    stream = _stream(vocabulary, int(EXAMPLES_PER_PRESET * mean_raw * 1.05) + 4096, inputs_length)
    examples = list(_mixture(vocabulary, stream, preset, lengths).as_numpy_iterator())
    assert len(examples) >= EXAMPLES_PER_PRESET
    totals = check_examples(examples, plans, vocabulary, stream, lengths)
    for i, plan in enumerate(plans):
        d = plan.denoiser
        noise, spans, raw, count = totals[i]
        assert count >= 0.5 * plan.probability * len(examples)  # every denoiser is drawn
        if d.kind == "S":
            continue
        assert spans <= count * 100  # never more than the vocabulary's sentinels per example
        assert abs(noise / raw - d.noise_density) <= 0.01 * d.noise_density, (str(d), noise / raw)
        assert abs(noise / spans - d.mean_noise_span_length) <= 0.05 * d.mean_noise_span_length, (
            str(d), noise / spans)


def test_vocabularies_with_more_sentinels_keep_t5s_lengths(tiny_vocabulary, tmp_path):
    """With enough sentinels (here 300 pieces) X(3, .5) at 512 keeps T5's raw length (126 spans)."""
    with open(tiny_vocabulary.sentencepiece_model_file, "rb") as f:
        (tmp_path / "sp.model").write_bytes(vocab.add_sentinel_pieces(f.read(), 300))
    wide = vocab.sentencepiece_vocabulary(str(tmp_path / "sp.model"))
    assert O.sentinel_count(wide) == 300
    x3 = O.plan_denoisers([O.x_denoiser(3, 0.5)], {"inputs": 512, "targets": 512}, wide)[0]
    assert x3.shortened_for == "" and x3.noise_spans == 126
    lengths = {"inputs": 512, "targets": 512}
    stream = _stream(wide, 60 * x3.raw_length, 5)
    examples = list(_mixture(wide, stream, [O.x_denoiser(3, 0.5)], lengths).as_numpy_iterator())
    totals = check_examples(examples, [x3], wide, stream, lengths)
    assert totals[0][1] == 126 * len(examples) and len(examples) >= 55


def test_t5_span_corruption_at_long_inputs_never_reuses_ordinary_ids(tiny_vocabulary):
    """T5's span_corruption at inputs 2048 would make 114 spans with 100 sentinels; the T5 preset
    takes 100 spans of shorter text instead."""
    lengths = {"inputs": 2048, "targets": 512}
    plan = O.plan_denoisers("T5", lengths, tiny_vocabulary)[0]
    assert plan.longest_raw_spans == 114 and plan.noise_spans == 100
    assert plan.shortened_for == "sentinels" and plan.inputs_length < 2048
    stream = _stream(tiny_vocabulary, 30 * plan.raw_length, 9)
    examples = list(_mixture(tiny_vocabulary, stream, "T5", lengths).as_numpy_iterator())
    assert len(examples) == 30
    check_examples(examples, [plan], tiny_vocabulary, stream, lengths)
