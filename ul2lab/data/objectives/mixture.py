"""UL2's Mixture-of-Denoisers as one seqio preprocessor.

The path of a document, top to bottom (`mixture_of_denoisers`):

  tokens ──► blocks of `documents_per_block` documents, concatenated (empty ones counted)
         ──split──► segments; each segment's denoiser is drawn first (by rate), then the
                    segment gets exactly the raw length that denoiser's plan gives at the
                    task's lengths (plan_denoisers; R/X: T5's random_spans_helper, shorter
                    where the vocabulary's sentinels or the denoiser's μ and r require; S:
                    the inputs length)
         ──denoise──► {"inputs": mode tokens + corrupted segment, "targets": ...}

so nothing is ever trimmed: every example fits its lengths once seqio appends EOS
(use `seqio.preprocessors.append_eos_after_trim` after this preprocessor). Text that does
not fill a whole segment at the end of a block is left out and counted in SKIPPED_TEXT,
as are empty documents and documents too short for their denoiser.

Randomness is stateless: seqio.map_over_dataset(num_seeds=1) gives every block a seed for
its denoiser draws and one for its corruption, split per denoiser and row by the stateless
ops of `spans`, so a fixed seqio seed gives the same examples on every run. The segments of
one denoiser in a block are corrupted as one batch (see denoise_segments) for speed.
"""
import dataclasses
import threading
from typing import Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf

from ul2lab.data.objectives import spans


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One denoising objective of the mixture.

    kind: "R" (regular span corruption), "X" (extreme: long spans or high density) or
      "S" (sequential: prefix LM; mean_noise_span_length unused).
    rate: relative frequency in the mixture (normalized over all denoisers).
    mode_token: text prepended to the inputs ("[NLU]", "[NLG]", "[S2S]") or None.
    add_sentinel: S only; end the prefix and start the targets with <extra_id_0>.
    """
    kind: str
    noise_density: float
    mean_noise_span_length: float = 0.0
    rate: float = 1.0
    mode_token: Optional[str] = None
    add_sentinel: bool = False

    def __str__(self):
        if self.kind == "S":
            return f"S({self.noise_density:g})"
        return f"{self.kind}({self.mean_noise_span_length:g}, {self.noise_density:g})"


MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


@gin.configurable(module="ul2lab")
def r_denoiser(mean_noise_span_length=3.0, noise_density=0.15, rate=1.0,
               mode_token=MODE_TOKENS["R"]) -> Denoiser:
    return Denoiser("R", noise_density, mean_noise_span_length, rate, mode_token)


@gin.configurable(module="ul2lab")
def x_denoiser(mean_noise_span_length=32.0, noise_density=0.5, rate=1.0,
               mode_token=MODE_TOKENS["X"]) -> Denoiser:
    return Denoiser("X", noise_density, mean_noise_span_length, rate, mode_token)


@gin.configurable(module="ul2lab")
def s_denoiser(rate=1.0, noise_density=0.25, mode_token=MODE_TOKENS["S"],
               add_sentinel=False) -> Denoiser:
    """The S-denoiser (prefix LM): the suffix is uniform in [1, 2 * noise_density * (L - 1)]
    tokens, so its mean share is noise_density. 0.25 is the UL2 paper's S (μ = L/4, r = 0.25);
    0.5 (suffix uniform over the whole segment) is T5's prefix_lm, UL2's appendix code and U-PaLM's."""
    return Denoiser("S", noise_density, 0.0, rate, mode_token, add_sentinel)


def _r(mu, r, rate=1.0, mode_token=MODE_TOKENS["R"]):
    return Denoiser("R", r, mu, rate, mode_token)


def _x(mu, r, rate=1.0):
    return Denoiser("X", r, mu, rate, MODE_TOKENS["X"])


def _s(r, rate=1.0):
    return Denoiser("S", r, 0.0, rate, MODE_TOKENS["S"])


_UL2_SPAN_DENOISERS = (_r(3, 0.15), _r(8, 0.15), _x(3, 0.5), _x(8, 0.5), _x(64, 0.15), _x(64, 0.5))

# Sources, with the table in README.md ("Denoiser presets"). Mode tokens: UL2 §3.1.3.
PRESETS = {
    # UL2 paper (Tay et al., 2022), §3.1.2 and Table 1: R(3, .15), R(8, .15); X(3, .5), X(8, .5),
    # X(64, .15), X(64, .5); S with μ = L/4, r = 0.25; "all tasks have an approximately equal
    # participation in the mixture"
    "UL2": _UL2_SPAN_DENOISERS + (_s(0.25),),
    # the same seven as the paper's appendix code (`ul2_objective`) builds them: its S-denoiser is
    # T5's prefix_lm with noise_density 0.5 (mean suffix L/2, twice the text's), rates uniform
    "UL2_APPENDIX": _UL2_SPAN_DENOISERS + (_s(0.5),),
    # U-PaLM (Tay et al., 2022b) §3.3, UL2R: 50% S (prefix LM, pivot anywhere), 25% R(3, .15),
    # 25% X, whose spans have "a mean length of 32 or a corruption rate of up to 50%": both forms
    "UL2R": (_s(0.5, 0.5), _r(3, 0.15, 0.25), _x(32, 0.15, 0.125), _x(3, 0.5, 0.125)),
    # T5 (Raffel et al., 2020) §3.1.4 / t5.data.preprocessors.span_corruption: one R, no mode token
    "T5": (_r(3, 0.15, mode_token=None),),
}

DenoisersArg = Union[str, Sequence[Denoiser]]


def resolve_denoisers(denoisers: DenoisersArg,
                      rates: Optional[Mapping[str, float]] = None) -> Tuple[Denoiser, ...]:
    """The denoisers of a preset name or a sequence; `rates` ({str(denoiser): rate}, e.g.
    {"S(0.25)": 0.5}) replaces the rates of the denoisers it names."""
    if isinstance(denoisers, str):
        if denoisers not in PRESETS:
            raise ValueError(f"unknown denoiser preset {denoisers!r}; choose one of {sorted(PRESETS)}"
                             " or pass a list of Denoiser")
        denoisers = PRESETS[denoisers]
    denoisers = tuple(denoisers)
    if rates:
        names = [str(d) for d in denoisers]
        unknown = sorted(set(rates) - set(names))
        if unknown:
            raise ValueError(f"denoiser rates name {unknown}, which are not in the mixture; its "
                             f"denoisers are {names}")
        denoisers = tuple(dataclasses.replace(d, rate=float(rates[str(d)])) if str(d) in rates else d
                          for d in denoisers)
    return denoisers


@dataclasses.dataclass(frozen=True)
class DenoiserPlan:
    """What one denoiser does at the task's lengths (computed when the task's dataset is built).

    raw_length: tokens of text each example takes; inputs_length / targets_length: the most
    tokens its inputs / targets can have, mode tokens and EOS included; max_sentinels: the
    most sentinels one example uses. R/X only: noise_tokens and noise_spans of every example
    (T5's arithmetic for raw_length), longest_raw_length (what T5's random_spans_helper gives
    for the inputs length) with longest_raw_spans, its span count, and shortened_for, why
    raw_length is shorter: "sentinels", "span statistics" or "" when it is not.
    budget_share: inputs_length / the task's inputs length (packing fills the rest of a row).
    """
    denoiser: Denoiser
    probability: float
    mode_ids: Tuple[int, ...]
    raw_length: int
    inputs_length: int
    targets_length: int
    max_sentinels: int
    noise_tokens: int = 0
    noise_spans: int = 0
    longest_raw_length: int = 0
    longest_raw_spans: int = 0
    shortened_for: str = ""
    budget_share: float = 1.0


# A plan keeps every R/X example within these relative errors of its denoiser's r and μ.
# T5's random_spans_helper only maximizes the raw length, and its rounding can move the mean
# span far from μ (X(64, .15) at inputs 512: one span of 90 tokens); a shorter raw length
# whose own rounding lands near μ keeps the denoiser what it says it is.
NOISE_DENSITY_TOLERANCE = 0.01
MEAN_SPAN_TOLERANCE = 0.05


def _validate(denoisers: Sequence[Denoiser]) -> None:
    if not denoisers:
        raise ValueError("the denoiser mixture is empty; give at least one Denoiser or a preset")
    names = ", ".join(f"{d}: {d.rate:g}" for d in denoisers)
    rates = [d.rate for d in denoisers]
    if any(not np.isfinite(r) or r < 0 for r in rates):
        raise ValueError(f"denoiser rates must be finite and non-negative; got {names}")
    if sum(rates) <= 0:
        raise ValueError(f"denoiser rates are all zero ({names}); give at least one a positive rate")
    for d in denoisers:
        if d.kind not in ("R", "X", "S"):
            raise ValueError(f"denoiser kind must be 'R', 'X' or 'S', got {d.kind!r}")
        if not 0 < d.noise_density < 1 or (d.kind == "S" and d.noise_density > 0.5):
            raise ValueError(f"{d}: noise_density must be in (0, 1) (at most 0.5 for S), "
                             f"got {d.noise_density}")
        if d.kind != "S" and not d.mean_noise_span_length > 0:
            raise ValueError(f"{d}: mean_noise_span_length must be positive")


def _extra_ids_hint(needed: int) -> str:
    return (f"give the vocabulary at least {needed} sentinels: `ul2lab vocab --extra_ids {needed}` "
            f"(a model that carries them), or seqio.SentencePieceVocabulary(path, "
            f"extra_ids={needed}) for a model without <extra_id_N> pieces")


def _span_raw_length(d: Denoiser, budget: int, sentinels: int,
                     density_tolerance: Optional[float], span_tolerance: Optional[float]):
    """(raw length, T5's longest raw length) of an R/X denoiser with `budget` inputs tokens.

    The longest raw length whose example needs at most `sentinels` spans and whose noise density
    and mean span are within the tolerances of r and μ (None: no such condition); when no length
    meets the tolerances, the one closest to them (the longest among equals).
    """
    longest, _ = spans.random_spans_helper(budget, d.noise_density, d.mean_noise_span_length)
    # tf.round works in float32: step back if that differs from T5's float64 helper
    while spans.span_corruption_lengths(longest, d.noise_density,
                                        d.mean_noise_span_length)[0] > budget:
        longest -= 1
    best, best_error = None, None
    for raw in range(longest, 1, -1):
        noise, count = spans.noise_counts(raw, d.noise_density, d.mean_noise_span_length)
        if count > sentinels:
            continue
        error = 0.0
        if density_tolerance is not None:
            error = max(error, abs(noise / raw - d.noise_density) / (d.noise_density * density_tolerance))
        if span_tolerance is not None:
            error = max(error, abs(noise / count - d.mean_noise_span_length)
                        / (d.mean_noise_span_length * span_tolerance))
        if error <= 1.0:
            return raw, longest
        if best_error is None or error < best_error:
            best, best_error = raw, error
    return best, longest


def plan_denoisers(denoisers: DenoisersArg, sequence_length: Mapping[str, int], vocabulary,
                   *, mode_token_ids: Optional[Mapping[str, Sequence[int]]] = None,
                   input_feature_key: str = "inputs",
                   noise_density_tolerance: Optional[float] = NOISE_DENSITY_TOLERANCE,
                   mean_span_tolerance: Optional[float] = MEAN_SPAN_TOLERANCE
                   ) -> Tuple[DenoiserPlan, ...]:
    """Lengths of every denoiser with a positive rate; ValueError if the lengths cannot fit.

    Mode tokens are tokenized by `vocabulary` unless mode_token_ids maps the mode text to
    dedicated ids; they count against the inputs length. An R/X example never needs more spans
    than the vocabulary has sentinels (spans.sentinel_count): where T5's longest raw segment would,
    the plan takes a shorter one, so μ and r stay exact and the inputs are shorter than the feature
    length (packing fills the row); likewise where T5's rounding would move the noise density or
    the mean span out of the tolerances (None: keep T5's length when the sentinels allow it).
    """
    denoisers = resolve_denoisers(denoisers)
    _validate(denoisers)
    if not sequence_length or input_feature_key not in sequence_length or \
            "targets" not in sequence_length:
        raise ValueError(f"the mixture of denoisers needs sequence lengths for "
                         f"{input_feature_key!r} and 'targets', got {sequence_length}")
    inputs_budget = sequence_length[input_feature_key]
    targets_budget = sequence_length["targets"]
    sentinels = spans.sentinel_count(vocabulary)
    total_rate = sum(d.rate for d in denoisers)
    plans = []
    for d in denoisers:
        if d.rate == 0:
            continue
        if d.mode_token is None:
            mode_ids = ()
        elif mode_token_ids and d.mode_token in mode_token_ids:
            mode_ids = tuple(int(i) for i in mode_token_ids[d.mode_token])
        else:
            mode_ids = tuple(int(i) for i in vocabulary.encode(d.mode_token))
        budget = inputs_budget - len(mode_ids)  # what is left for the corrupted text and EOS
        extra = {}
        if d.kind == "S":
            if d.add_sentinel and sentinels == 0:
                raise ValueError(f"denoiser {d} (add_sentinel) ends its prefix with <extra_id_0> but "
                                 f"the vocabulary {vocabulary} has no sentinel ids; {_extra_ids_hint(1)}")
            # the prefix (at most raw - 1 tokens) [+ sentinel] + EOS fills the inputs budget
            raw = budget - int(d.add_sentinel)
            inputs_length = len(mode_ids) + raw - 1 + int(d.add_sentinel) + 1
            targets_length = int(d.add_sentinel) + raw - 1 + 1
            max_sentinels = int(d.add_sentinel)
        else:
            if sentinels == 0:
                raise ValueError(f"denoiser {d} marks spans with sentinel ids but the vocabulary "
                                 f"{vocabulary} has none; {_extra_ids_hint(100)}")
            raw, longest = (None, 0) if budget < 3 else _span_raw_length(
                d, budget, sentinels, noise_density_tolerance, mean_span_tolerance)
            if raw is not None:
                inputs_without_mode, targets_length = spans.span_corruption_lengths(
                    raw, d.noise_density, d.mean_noise_span_length)
                inputs_length = len(mode_ids) + inputs_without_mode
                noise, max_sentinels = spans.noise_counts(raw, d.noise_density,
                                                          d.mean_noise_span_length)
                needed = spans.noise_counts(longest, d.noise_density, d.mean_noise_span_length)[1]
                reason = "" if raw == longest else (
                    "sentinels" if needed > sentinels else "span statistics")
                extra = dict(noise_tokens=noise, noise_spans=max_sentinels, longest_raw_length=longest,
                             longest_raw_spans=needed, shortened_for=reason)
        if raw is None or raw < 2:
            raise ValueError(f"denoiser {d} has no room for text at inputs length {inputs_budget} "
                             f"(mode tokens take {len(mode_ids)}); raise sequence_length"
                             f"[{input_feature_key!r}]")
        plans.append(DenoiserPlan(d, d.rate / total_rate, mode_ids, raw, inputs_length,
                                  targets_length, max_sentinels,
                                  budget_share=inputs_length / inputs_budget, **extra))
    too_long = [p for p in plans if p.targets_length > targets_budget]
    if too_long:
        needs = ", ".join(f"{p.denoiser} needs {p.targets_length}" for p in too_long)
        raise ValueError(
            f"the task's targets length {targets_budget} is too short at inputs length "
            f"{inputs_budget}: {needs}; set sequence_length['targets'] to at least "
            f"{max(p.targets_length for p in too_long)} or drop those denoisers")
    _report(plans, sequence_length, input_feature_key, sentinels)
    return tuple(plans)


def describe_plans(plans: Sequence[DenoiserPlan]) -> str:
    """One line: each denoiser's share, raw length, inputs / targets lengths and budget share."""
    parts = []
    for p in plans:
        text = (f"{p.denoiser} {p.probability:.0%}: raw {p.raw_length} -> inputs {p.inputs_length} "
                f"({p.budget_share:.0%} of the budget), targets {p.targets_length}")
        if p.denoiser.kind != "S":
            text += f", {p.noise_spans} spans"
        if p.shortened_for == "sentinels":
            text += (f" (T5's raw {p.longest_raw_length} would need {p.longest_raw_spans} "
                     "sentinels)")
        elif p.shortened_for:
            text += f" (T5's raw {p.longest_raw_length} shortened to keep r and the mean span)"
        parts.append(text)
    return "; ".join(parts)


_REPORTED = set()  # plans already logged in this process (every dataset build plans again)
_REPORT_LOCK = threading.Lock()


def _report(plans, sequence_length, input_feature_key, sentinels) -> None:
    line = (f"denoiser plan at {input_feature_key} {sequence_length[input_feature_key]} / targets "
            f"{sequence_length['targets']}, {sentinels} sentinels: {describe_plans(plans)}")
    with _REPORT_LOCK:
        if line in _REPORTED:
            return
        _REPORTED.add(line)
    logging.info("%s", line)
    capped = [p for p in plans if p.shortened_for == "sentinels"]
    if capped:
        needed = max(p.longest_raw_spans for p in capped)
        logging.warning(
            "%s %s shorter text than the inputs length allows (inputs %s of %d), because the "
            "vocabulary has %d sentinels; span lengths and noise density stay exact. To fill the "
            "length, %s", ", ".join(str(p.denoiser) for p in capped), "uses" if len(capped) == 1 else "use",
            ", ".join(str(p.inputs_length) for p in capped), sequence_length[input_feature_key],
            sentinels, _extra_ids_hint(needed))


# --------------------------------------------------------------------- skipped text


class SkippedText:
    """Counts of text the mixture could not use, updated while the dataset is read.

    empty_documents: documents with no tokens; short_documents: documents (or, when
    documents are concatenated, whole blocks of them) shorter than the raw length of the
    denoiser drawn for them; unused_tokens: tokens left out (short documents and the
    end of every block that does not fill a whole segment).
    """
    FIELDS = ("empty_documents", "short_documents", "unused_tokens")

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        with self._lock:
            self.counts = {k: 0 for k in self.FIELDS}

    def add(self, field: str, amount: int) -> None:
        with self._lock:
            self.counts[field] += int(amount)

    def __getitem__(self, field):
        return self.counts[field]

    def __repr__(self):
        return f"SkippedText({self.counts})"


SKIPPED_TEXT = SkippedText()  # the default counter of every mixture_of_denoisers pipeline


def _count(counter: SkippedText, field: str, amount, when) -> tf.Tensor:
    """Adds `amount` to counter[field] when `when` is true; returns a tensor to depend on."""

    def add():
        def bump(a):
            counter.add(field, a.numpy())
            return True
        return tf.py_function(bump, [amount], tf.bool)

    return tf.cond(when, add, lambda: tf.constant(True))


# --------------------------------------------------------------------- pipeline steps


def concatenate_documents(dataset, documents_per_block: int, feature_key="targets"):
    """Blocks of up to documents_per_block documents' tokens, end to end (T5 style).

    Each block also carries how many documents it holds and how many of them were empty.
    """
    if documents_per_block == 1:
        return dataset.map(
            lambda f: {feature_key: f[feature_key], "num_documents": 1,
                       "num_empty_documents": tf.cast(tf.equal(tf.size(f[feature_key]), 0), tf.int32)},
            num_parallel_calls=tf.data.AUTOTUNE)

    @tf.autograph.experimental.do_not_convert
    def concat(features):
        # padded_batch is much faster than ragged_batch; padding is 0 (<pad>), never a text token
        tokens = features[feature_key]
        is_token = tf.not_equal(tokens, 0)
        document_lengths = tf.reduce_sum(tf.cast(is_token, tf.int32), axis=1)
        return {feature_key: tf.boolean_mask(tokens, is_token),
                "num_documents": tf.shape(tokens)[0],
                "num_empty_documents": tf.reduce_sum(tf.cast(document_lengths == 0, tf.int32))}

    dataset = dataset.map(lambda f: {feature_key: f[feature_key]},
                          num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.padded_batch(documents_per_block).map(concat,
                                                         num_parallel_calls=tf.data.AUTOTUNE)


def split_into_segments(dataset, plans: Sequence[DenoiserPlan], counter: SkippedText,
                        feature_key="targets"):
    """Cuts every block into segments, each of the raw length of a denoiser drawn by rate.

    Denoisers are drawn in sequence for the block; segments are cut while the next drawn
    denoiser's raw length still fits, and the rest of the block is left out (counted).
    Each output element is one block: {"targets": [segments, None] ragged, "denoiser": [segments]}.
    """
    raw_lengths = tf.constant([p.raw_length for p in plans], tf.int32)
    log_probs = tf.math.log(tf.constant([[p.probability for p in plans]], tf.float32))
    shortest = min(p.raw_length for p in plans)

    @seqio.map_over_dataset(num_seeds=1)
    @tf.autograph.experimental.do_not_convert  # graph code already: AutoGraph only slows tracing
    def split(features, seed):
        tokens = features[feature_key]
        num_tokens = tf.size(tokens)
        num_draws = num_tokens // shortest + 1  # always one more draw than segments fit
        choices = tf.cast(tf.random.stateless_categorical(log_probs, num_draws, seed)[0], tf.int32)
        ends = tf.cumsum(tf.gather(raw_lengths, choices))
        num_segments = tf.reduce_sum(tf.cast(ends <= num_tokens, tf.int32))
        choices = choices[:num_segments]
        lengths = tf.gather(raw_lengths, choices)
        used = tf.reduce_sum(lengths)
        num_empty = features["num_empty_documents"]
        counted = [_count(counter, "empty_documents", num_empty, num_empty > 0),
                   _count(counter, "short_documents", features["num_documents"] - num_empty,
                          tf.logical_and(tf.equal(num_segments, 0), num_tokens > 0)),
                   _count(counter, "unused_tokens", num_tokens - used, used < num_tokens)]
        with tf.control_dependencies(counted):
            segments = tf.RaggedTensor.from_row_lengths(tokens[:used], lengths)
        return {feature_key: segments, "denoiser": choices}

    return split(dataset)


def denoise_segments(dataset, plans: Sequence[DenoiserPlan], first_sentinel_id: int, *,
                     input_feature_key="inputs", feature_key="targets",
                     denoiser_feature_key: Optional[str] = None):
    """Applies each segment's denoiser and prepends its mode tokens; one example per segment.

    Works a block at a time: all segments of one denoiser in a block share a length, so they
    are corrupted together as one [segments, raw_length] batch (far fewer TF ops per example
    than one call per segment); examples come out in the order the segments were cut.
    """
    inputs_width = max(p.inputs_length for p in plans)  # EOS included: one spare column
    targets_width = max(p.targets_length for p in plans)
    sentinel = tf.constant(first_sentinel_id, tf.int32)

    def span_corruption(plan, tokens, seeds):
        d, batch_size = plan.denoiser, tf.shape(tokens)[0]
        noise = spans.random_spans_noise_mask_batch(batch_size, plan.raw_length, d.noise_density,
                                                    seeds, d.mean_noise_span_length)
        # every segment of this denoiser has the same number of kept tokens
        inputs_length, targets_length = (n - 1 for n in spans.span_corruption_lengths(
            plan.raw_length, d.noise_density, d.mean_noise_span_length))
        replaced, keep = spans.replace_noise_spans(tokens, noise, sentinel)
        inputs = tf.reshape(tf.boolean_mask(replaced, keep), [batch_size, inputs_length])
        replaced, keep = spans.replace_noise_spans(tokens, tf.logical_not(noise), sentinel)
        targets = tf.reshape(tf.boolean_mask(replaced, keep), [batch_size, targets_length])
        return (inputs, tf.fill([batch_size], inputs_length),
                targets, tf.fill([batch_size], targets_length))

    def prefix_lm(plan, tokens, seeds):
        d, batch_size = plan.denoiser, tf.shape(tokens)[0]
        prefix = tf.reduce_sum(tf.cast(spans.random_prefix_noise_mask_batch(
            batch_size, plan.raw_length, d.noise_density, seeds), tf.int32), axis=1)
        columns = tf.range(plan.raw_length + 1)[None]
        padded = tf.pad(tokens, [[0, 0], [0, 1]])
        # inputs: the prefix (left-aligned already) [+ sentinel]; targets: [sentinel +] suffix
        suffix = tf.gather(padded, tf.minimum(columns + prefix[:, None], plan.raw_length),
                           batch_dims=1)
        if d.add_sentinel:
            inputs = tf.where(columns == prefix[:, None], sentinel, padded)
            targets = tf.concat([tf.fill([batch_size, 1], sentinel), suffix[:, :-1]], axis=1)
        else:
            inputs, targets = padded, suffix
        extra = int(d.add_sentinel)
        return inputs, prefix + extra, targets, plan.raw_length - prefix + extra

    def denoise_batch(plan, tokens, seed):
        """[n, raw_length] tokens → inputs, targets padded to the widest denoiser, + lengths."""
        seeds = tf.random.experimental.stateless_split(seed, 2)
        corrupt = prefix_lm if plan.denoiser.kind == "S" else span_corruption
        inputs, inputs_length, targets, targets_length = corrupt(plan, tokens, seeds)
        if plan.mode_ids:
            mode = tf.tile(tf.constant([plan.mode_ids], tf.int32), [tf.shape(tokens)[0], 1])
            inputs = tf.concat([mode, inputs], axis=1)
            inputs_length += len(plan.mode_ids)
        # the valid tokens of a row never pass its plan's lengths, which are within the widths
        inputs = inputs[:, :inputs_width]
        targets = targets[:, :targets_width]
        inputs = tf.pad(inputs, [[0, 0], [0, inputs_width - tf.shape(inputs)[1]]])
        targets = tf.pad(targets, [[0, 0], [0, targets_width - tf.shape(targets)[1]]])
        return inputs, inputs_length, targets, targets_length

    @seqio.map_over_dataset(num_seeds=1)
    @tf.autograph.experimental.do_not_convert  # graph code already: AutoGraph only slows tracing
    def denoise(features, seed):
        segments = tf.cast(features[feature_key], tf.int32)
        choices = features["denoiser"]
        seeds = tf.random.experimental.stateless_split(seed, len(plans))
        parts = []
        for d, plan in enumerate(plans):
            rows = tf.where(tf.equal(choices, d))[:, 0]
            tokens = tf.reshape(tf.gather(segments, rows).flat_values, [-1, plan.raw_length])
            parts.append((rows,) + denoise_batch(plan, tokens, seeds[d]))
        rows, inputs, inputs_length, targets, targets_length = (tf.concat(x, 0) for x in zip(*parts))
        restore = tf.argsort(rows)  # back to the order in which the segments were cut
        out = {
            input_feature_key: tf.RaggedTensor.from_tensor(
                tf.gather(inputs, restore), lengths=tf.gather(inputs_length, restore)),
            feature_key: tf.RaggedTensor.from_tensor(
                tf.gather(targets, restore), lengths=tf.gather(targets_length, restore)),
        }
        if denoiser_feature_key:
            out[denoiser_feature_key] = choices
        return out

    return denoise(dataset).unbatch()


@gin.configurable(module="ul2lab")
def mixture_of_denoisers(dataset: tf.data.Dataset,
                         sequence_length: Mapping[str, int],
                         output_features: Mapping[str, seqio.Feature],
                         denoisers: DenoisersArg = "UL2",
                         *,
                         mode_token_ids: Optional[Mapping[str, Sequence[int]]] = None,
                         merge_examples_to_reduce_padding: bool = True,
                         documents_per_block: int = 128,
                         input_feature_key: str = "inputs",
                         denoiser_feature_key: Optional[str] = None,
                         skipped_text: Optional[SkippedText] = None,
                         rates: Optional[Mapping[str, float]] = None,
                         noise_density_tolerance: Optional[float] = NOISE_DENSITY_TOLERANCE,
                         mean_span_tolerance: Optional[float] = MEAN_SPAN_TOLERANCE
                         ) -> tf.data.Dataset:
    """seqio preprocessor: tokenized documents in "targets" → UL2 denoising examples.

    Place it after seqio.preprocessors.tokenize and before
    seqio.preprocessors.append_eos_after_trim, as T5's span_corruption.

    denoisers: a preset name ("UL2", "UL2_APPENDIX", "UL2R", "T5") or a sequence of Denoiser.
    rates: {denoiser name: rate} replacing the rates of those denoisers, e.g. in gin
      ul2lab.mixture_of_denoisers.rates = {"S(0.25)": 0.5, "X(64, 0.5)": 0.0}.
    mode_token_ids: {mode text: ids} to use dedicated ids instead of tokenizing the mode text.
    merge_examples_to_reduce_padding: concatenate documents_per_block documents before
      cutting segments (T5's default); if False each document is cut on its own and
      documents shorter than their denoiser's raw length are skipped.
    denoiser_feature_key: also output the index of each example's denoiser under this key.
    skipped_text: counter of unused text (default: the module-wide SKIPPED_TEXT).
    noise_density_tolerance / mean_span_tolerance: how far each R/X example's noise density and
      mean span may be from r and μ before the plan shortens the raw segment (plan_denoisers);
      None for T5's raw lengths wherever the vocabulary's sentinels allow them.
    """
    vocabulary = output_features["targets"].vocabulary
    if input_feature_key in output_features and \
            output_features[input_feature_key].vocabulary != vocabulary:
        raise ValueError("the mixture of denoisers builds inputs from the targets' tokens, so "
                         f"{input_feature_key!r} and 'targets' must share one vocabulary")
    plans = plan_denoisers(resolve_denoisers(denoisers, rates), sequence_length, vocabulary,
                           mode_token_ids=mode_token_ids, input_feature_key=input_feature_key,
                           noise_density_tolerance=noise_density_tolerance,
                           mean_span_tolerance=mean_span_tolerance)
    counter = SKIPPED_TEXT if skipped_text is None else skipped_text

    dataset = concatenate_documents(
        dataset, documents_per_block if merge_examples_to_reduce_padding else 1)
    dataset = split_into_segments(dataset, plans, counter)
    return denoise_segments(dataset, plans, spans.sentinel_id(vocabulary),
                            input_feature_key=input_feature_key,
                            denoiser_feature_key=denoiser_feature_key)
