"""Pretraining objectives as seqio preprocessors: T5 span corruption and UL2's Mixture of Denoisers.

Public API (stable; other modules and gin files use these names)

  Preprocessor (seqio Task, after seqio.preprocessors.tokenize, before
  seqio.preprocessors.append_eos_after_trim; documents' tokens in "targets"):
    mixture_of_denoisers(dataset, sequence_length, output_features, denoisers="UL2", *,
                         mode_token_ids=None, merge_examples_to_reduce_padding=True,
                         documents_per_block=128, input_feature_key="inputs",
                         denoiser_feature_key=None, skipped_text=None)
        gin: ul2lab.mixture_of_denoisers.denoisers = "UL2R"
             ul2lab.mixture_of_denoisers.rates = {"S(0.25)": 0.5}   (any denoiser's weight)

  Denoisers and presets:
    Denoiser(kind, noise_density, mean_noise_span_length, rate, mode_token, add_sentinel)
    r_denoiser(μ, r, rate), x_denoiser(μ, r, rate), s_denoiser(rate, noise_density=0.25,
        add_sentinel=False)
    PRESETS["UL2" | "UL2_APPENDIX" | "UL2R" | "T5"] (sources: README "Denoiser presets"),
    MODE_TOKENS {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}, resolve_denoisers(denoisers, rates)
    plan_denoisers(denoisers, sequence_length, vocabulary) -> DenoiserPlan per denoiser
        (raw_length, inputs_length, targets_length, mode_ids, probability, noise_spans,
        budget_share, shortened_for); never more spans than the vocabulary's sentinels (a
        shorter raw segment instead); raises ValueError naming the targets length a denoiser
        needs, the extra ids to give the vocabulary, or bad rates. describe_plans(plans): one line.
    SKIPPED_TEXT / SkippedText: counts of empty documents, too-short documents and
        unused tokens, updated as the dataset is read.

  T5-exact primitives (TF graph ops; same seeds → same output as t5.data.preprocessors):
    random_spans_helper, random_spans_noise_mask, random_prefix_noise_mask,
    noise_span_to_unique_sentinel, nonnoise_span_to_unique_sentinel, sentinel_id (= vocab_size - 1),
    sentinel_count (seqio extra ids + <extra_id_N> pieces of the model), noise_counts,
    span_corruption_lengths (lengths in float32, as the masks count), reconstruct_from_spans
    and batched forms over rows of one length: random_spans_noise_mask_batch,
    random_prefix_noise_mask_batch, replace_noise_spans

  Pipeline steps (for preprocessors that build their own documents, e.g. tables):
    concatenate_documents → split_into_segments (one element per
    block: ragged segments + drawn denoiser indices) → denoise_segments (one example each)
"""
from ul2lab.data.objectives.mixture import (
    Denoiser, DenoiserPlan, MEAN_SPAN_TOLERANCE, MODE_TOKENS, NOISE_DENSITY_TOLERANCE, PRESETS,
    SKIPPED_TEXT, SkippedText, concatenate_documents, denoise_segments, describe_plans,
    mixture_of_denoisers, plan_denoisers, r_denoiser, resolve_denoisers, s_denoiser,
    split_into_segments, x_denoiser)
from ul2lab.data.objectives.spans import (
    nonnoise_span_to_unique_sentinel, noise_span_to_unique_sentinel, random_prefix_noise_mask,
    random_prefix_noise_mask_batch, random_spans_helper, random_spans_noise_mask,
    random_spans_noise_mask_batch, reconstruct_from_spans, replace_noise_spans, noise_counts,
    sentinel_count, sentinel_id, span_corruption_lengths)

__all__ = [
    "Denoiser",
    "DenoiserPlan",
    "MEAN_SPAN_TOLERANCE",
    "MODE_TOKENS",
    "NOISE_DENSITY_TOLERANCE",
    "PRESETS",
    "SKIPPED_TEXT",
    "SkippedText",
    "concatenate_documents",
    "denoise_segments",
    "describe_plans",
    "mixture_of_denoisers",
    "plan_denoisers",
    "r_denoiser",
    "resolve_denoisers",
    "s_denoiser",
    "split_into_segments",
    "x_denoiser",
    "nonnoise_span_to_unique_sentinel",
    "noise_span_to_unique_sentinel",
    "random_prefix_noise_mask",
    "random_prefix_noise_mask_batch",
    "random_spans_helper",
    "random_spans_noise_mask",
    "random_spans_noise_mask_batch",
    "reconstruct_from_spans",
    "replace_noise_spans",
    "noise_counts",
    "sentinel_count",
    "sentinel_id",
    "span_corruption_lengths",
]
