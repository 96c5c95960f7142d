"""seqio metric functions `fn(targets, predictions) -> dict` for the table tasks.

Scores follow T5's convention: percentages, 100.0 = every example right.

`wikitq_denotation_accuracy` implements the definition of WikiTableQuestions' official evaluator
(`evaluator.py` of release 1.0.2), written here from its documented rules:
  * an answer is a list of values, compared as sets: sizes must be equal and every gold value must
    match some predicted value;
  * a string becomes a number if Python's int()/float() reads it (not NaN/inf; the evaluator is
    Python 2, so "1_000" is not a number), else a date if it is `yyyy-mm-dd` with `xx` for
    unknown fields (a year alone becomes a number), else a string;
  * gold value T matches predicted value P when their normalized strings are equal, or both are
    numbers within 1e-6, or both are dates with equal (year, month, day);
  * normalization: diacritics removed, smart quotes and dashes made ASCII, trailing citation marks
    ([..], •♦†‡*#+) and trailing parentheticals removed, outer quotes removed (repeated until
    stable), final period removed, whitespace collapsed, lower-cased.
Gold numbers and dates: the official script reads them from the dataset's CoreNLP-tagged files
(`tagged/data/*.tagged`, column `targetCanon`, one value per answer); predictions are never
canonicalized. When the task finds those files the gold is exactly that (GoldAnswers.canon) and
the score is the official one. Without them `canonical_gold_value` guesses the tagging on the
gold side (thousands separators, ordinals, small number words, dates with month names) — a
fallback: it disagrees with the tagged gold on ~2.6% of questions (units such as "17 years" or
"48.4%" are numbers in the tagged gold), and the metric reports how many questions used it.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Optional, Sequence, Union

# ------------------------------------------------------------------------- WikiTQ values

_CITATION = re.compile(r"((?<!^)\[[^\]]*\]|\[\d+\]|[•♦†‡*#+])*$")
_PARENTHETICAL = re.compile(r"(?<!^)( \([^)]*\))*$")
_OUTER_QUOTES = re.compile(r'^"([^"]*)"$')


def normalize_answer(text: str) -> str:
    """The official evaluator's string normalization (see the module docstring)."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) != "Mn")
    text = re.sub(r"[‘’´`]", "'", text)
    text = re.sub(r"[“”]", '"', text)
    text = re.sub(r"[‐‑‒–—−]", "-", text)
    while True:
        before = text
        text = _CITATION.sub("", text.strip())
        text = _PARENTHETICAL.sub("", text.strip())
        text = _OUTER_QUOTES.sub(r"\1", text.strip())
        if text == before:
            break
    if text.endswith("."):
        text = text[:-1]
    return re.sub(r"\s+", " ", text).lower().strip()


def _as_number(text: str):
    if "_" in text:  # Python 3 reads "1_000" as 1000; the official (Python 2) evaluator does not
        return None
    try:
        return int(text)
    except (ValueError, TypeError):
        pass
    try:
        amount = float(text)
    except (ValueError, TypeError):
        return None
    return None if amount != amount or amount in (float("inf"), float("-inf")) else amount


def _as_date(text: str):
    """(year, month, day) from `yyyy-mm-dd` with `xx` placeholders (-1), else None."""
    fields = text.lower().split("-")
    if len(fields) != 3:
        return None
    try:
        year = -1 if fields[0] in ("xx", "xxxx") else int(fields[0])
        month = -1 if fields[1] == "xx" else int(fields[1])
        day = -1 if fields[2] == "xx" else int(fields[2])
    except ValueError:
        return None
    if (year, month, day) == (-1, -1, -1) or not (month == -1 or 1 <= month <= 12) \
            or not (day == -1 or 1 <= day <= 31):
        return None
    return year, month, day


class AnswerValue:
    """A WikiTQ answer value: kind 'number' (amount), 'date' (y, m, d) or 'string', plus the
    normalized original string that every kind also matches on."""

    def __init__(self, original: str, canonical: str | None = None):
        canonical = canonical or original
        self.normalized = normalize_answer(original)
        self.kind, self.key = "string", self.normalized
        amount = _as_number(canonical)
        ymd = None if amount is not None else _as_date(canonical)
        if ymd is not None and ymd[1] == ymd[2] == -1:
            amount, ymd = ymd[0], None  # a year alone is a number
        if amount is not None:
            self.kind = "number"
            self.key = int(amount) if abs(amount - round(amount)) < 1e-6 else float(amount)
        elif ymd is not None:
            self.kind, self.key = "date", ymd

    def matches(self, predicted: "AnswerValue") -> bool:
        if self.normalized == predicted.normalized:
            return True
        if self.kind == predicted.kind == "number":
            return abs(self.key - predicted.key) < 1e-6
        if self.kind == predicted.kind == "date":
            return self.key == predicted.key
        return False

    def _identity(self):
        return self.kind, self.key if self.kind != "string" else self.normalized

    def __eq__(self, other):
        return isinstance(other, AnswerValue) and self._identity() == other._identity()

    def __hash__(self):
        return hash(self._identity())

    def __repr__(self):
        return f"AnswerValue({self.kind}, {self.key!r}, {self.normalized!r})"


_MONTHS = {m: i + 1 for i, m in enumerate(
    "january february march april may june july august september october november december"
    .split())}
_MONTHS.update({m[:3]: i for m, i in list(_MONTHS.items())})
_MONTHS["sept"] = 9
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_MONTH = r"(?P<month>[a-z]+)\.?"


def canonical_gold_value(text: str) -> str | None:
    """A CoreNLP-like canonical form of a gold answer (`12467`, `2004-01-05`), or None.

    Stands in for the tagged `targetCanon` column the official evaluator reads: numbers written
    with thousands separators, ordinals (`1st`), number words up to twelve, and dates with month
    names (`January 5, 2004`, `5 January 2004`, `Jan. 2004`, `January 5`).
    """
    t = text.strip().lower()
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", t):
        return t.replace(",", "")
    m = re.fullmatch(r"(\d+)(st|nd|rd|th)", t)
    if m:
        return m.group(1)
    if t in _NUMBER_WORDS:
        return str(_NUMBER_WORDS[t])
    for pattern in (rf"{_MONTH} (?P<day>\d{{1,2}}),? (?P<year>\d{{4}})",
                    rf"(?P<day>\d{{1,2}}) {_MONTH},? (?P<year>\d{{4}})",
                    rf"{_MONTH},? (?P<year>\d{{4}})",
                    rf"{_MONTH} (?P<day>\d{{1,2}})",
                    rf"(?P<day>\d{{1,2}}) {_MONTH}"):
        m = re.fullmatch(pattern, t)
        if m and m.group("month") in _MONTHS:
            fields = m.groupdict()
            year = fields.get("year") or "xx"
            day = f"{int(fields['day']):02d}" if fields.get("day") else "xx"
            return f"{year}-{_MONTHS[fields['month']]:02d}-{day}"
    return None


@dataclasses.dataclass(frozen=True)
class GoldAnswers:
    """One question's gold as a task keeps it for scoring (its postprocessor's target).

    canon: the tagged `targetCanon` values, one per answer (the official gold); None when the
      tagged files are absent (canonical_gold_value then guesses them: the heuristic fallback).
    scorable: False for a question the task could not put in its inputs (question and header over
      the inputs length); it counts as wrong, as a question without an answer does officially.
    """
    answers: tuple
    canon: Optional[tuple] = None
    scorable: bool = True


def gold_values(answers: Sequence[str], canon: Optional[Sequence[str]] = None) -> set[AnswerValue]:
    """The gold set: with `canon` exactly the official evaluator's (its to_value(original, canon)),
    else the heuristic canonical_gold_value."""
    if canon is not None:
        if len(canon) != len(answers):
            raise ValueError(f"{len(answers)} gold answers but {len(canon)} tagged targetCanon values: "
                             f"{list(answers)} / {list(canon)}")
        return {AnswerValue(a, c) for a, c in zip(answers, canon)}
    return {AnswerValue(a, canonical_gold_value(a)) for a in answers}


def predicted_values(answers: Sequence[str]) -> set[AnswerValue]:
    return {AnswerValue(a) for a in answers}


def denotation_correct(gold: Sequence[str], predicted: Sequence[str],
                       canon: Optional[Sequence[str]] = None) -> bool:
    """The official check: equal set sizes and every gold value matches a predicted value."""
    gold_set, predicted_set = gold_values(gold, canon), predicted_values(predicted)
    return len(gold_set) == len(predicted_set) and all(
        any(g.matches(p) for p in predicted_set) for g in gold_set)


def split_answers(text: str, separator: str = ", ") -> list[str]:
    return text.split(separator) if text else [""]


def _readings(parts: list[str], gold: set, separator: str, limit: int = 10_000):
    """Ways to regroup `parts` (a prediction split at the separator) into consecutive runs such that
    every run matches some gold value; at most `limit` are tried."""
    budget = [limit]

    def from_(i):
        if i == len(parts):
            yield []
            return
        for j in range(i + 1, len(parts) + 1):
            budget[0] -= 1
            if budget[0] < 0:
                return
            value = separator.join(parts[i:j])
            if any(g.matches(AnswerValue(value)) for g in gold):
                for rest in from_(j):
                    yield [value] + rest

    yield from from_(0)


def prediction_correct(gold: Sequence[str], predicted: str, separator: str = ", ",
                       canon: Optional[Sequence[str]] = None) -> bool:
    """A joined prediction is right when some reading of it as a list denotes the gold set.

    The task joins answers with `separator`, and answers may contain it ("Bangkok, Thailand"), so
    the prediction is read back every way its separators allow: each run of parts must be one gold
    value, and the resulting list must pass the official check. A prediction that is not the gold
    list (in any order, modulo normalization) has no such reading.
    """
    gold_set = gold_values(gold, canon)
    parts = split_answers(predicted, separator)
    if denotation_correct(gold, parts, canon):
        return True
    return any(denotation_correct(gold, reading, canon)
               for reading in _readings(parts, gold_set, separator))


def wikitq_denotation_accuracy(targets: Sequence[Union[str, Sequence[str], GoldAnswers]],
                               predictions: Sequence[Union[str, Sequence[str]]],
                               separator: str = ", ") -> dict:
    """Denotation accuracy (percent) over every question, unscorable ones counted wrong.

    Targets are GoldAnswers (the tasks' form), gold answer lists, or strings split on `separator`;
    predictions are lists, or strings read back as in `prediction_correct`. Also reports how many
    questions were scored against the tagged (official) gold and how many against the heuristic
    fallback, and how many were dropped for length and counted wrong.
    """
    if len(targets) != len(predictions):
        raise ValueError(f"wikitq_denotation_accuracy got {len(targets)} targets but "
                         f"{len(predictions)} predictions; they must pair up one to one")
    correct = tagged = dropped = 0
    for gold, predicted in zip(targets, predictions):
        if not isinstance(gold, GoldAnswers):
            gold = GoldAnswers(tuple(split_answers(gold, separator) if isinstance(gold, str) else gold))
        tagged += gold.canon is not None
        if not gold.scorable:
            dropped += 1
            continue
        if isinstance(predicted, str):
            correct += prediction_correct(gold.answers, predicted, separator, gold.canon)
        else:
            correct += denotation_correct(gold.answers, list(predicted), gold.canon)
    return {"denotation_accuracy": 100.0 * correct / max(len(targets), 1),
            "gold_official_tagged": tagged, "gold_heuristic_fallback": len(targets) - tagged,
            "dropped_for_length_counted_wrong": dropped}


# ------------------------------------------------------------------------- generic

def accuracy(targets: Sequence, predictions: Sequence) -> dict:
    """Exact-match accuracy (percent), e.g. TabFact's `entailed`/`refuted`. A GoldAnswers target
    is its first answer, and counts as wrong when it is not scorable (dropped for length; reported)."""
    if len(targets) != len(predictions):
        raise ValueError(f"accuracy got {len(targets)} targets but {len(predictions)} predictions")
    hits = dropped = 0
    for target, predicted in zip(targets, predictions):
        if isinstance(target, GoldAnswers):
            dropped += not target.scorable
            hits += target.scorable and target.answers[0] == predicted
        else:
            hits += target == predicted
    scores = {"accuracy": 100.0 * hits / max(len(targets), 1)}
    if any(isinstance(t, GoldAnswers) for t in targets):
        scores["dropped_for_length_counted_wrong"] = dropped
    return scores


def sacrebleu(targets: Sequence[str], predictions: Sequence[str]) -> dict:
    """Corpus BLEU from the sacrebleu package (13a tokenization, exponential smoothing), 0-100."""
    import sacrebleu as sb  # data-side optional dependency

    if len(targets) != len(predictions):
        raise ValueError(f"sacrebleu got {len(targets)} targets but {len(predictions)} predictions")
    references = [[t if isinstance(t, str) else t[0] for t in targets]]
    return {"bleu": sb.corpus_bleu(list(predictions), references, smooth_method="exp",
                                   tokenize="13a").score}
