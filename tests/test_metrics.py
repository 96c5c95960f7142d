"""Metrics. The WikiTQ cases are hand-made from the official evaluator's documented rules."""
import pytest
import sacrebleu as sacrebleu_package

from ul2lab.data import metrics


@pytest.mark.parametrize("gold,predicted,correct", [
    # numbers: int/float forms are equal; within 1e-6 is equal
    (["2004"], "2004.0", True),
    (["2004"], "2004.0000001", True),
    (["2004"], "2005", False),
    (["3.5"], "3.50", True),
    (["12,467"], "12467", True),            # gold tagged as a number, as CoreNLP would
    (["12,467"], "12,467", True),           # and the raw strings are equal
    (["1st"], "1", True),                   # ordinal gold → number
    (["two"], "2", True),
    # sets: order and duplicates do not matter; sizes must agree
    (["Morocco", "France", "Spain"], "Spain, morocco, France", True),
    (["Morocco", "France", "Spain"], "Spain, Morocco", False),
    (["Morocco", "France"], "Spain, Morocco, France", False),
    (["a", "a"], "a", True),
    # dates: month-name gold ↔ yyyy-mm-dd prediction; fields must all agree
    (["January 5, 2004"], "2004-01-05", True),
    (["5 January 2004"], "2004-01-05", True),
    (["January 2004"], "2004-01-xx", True),
    (["January 5, 2004"], "2004-01-06", False),
    (["January 5"], "xx-01-05", True),
    (["January 5"], "2004-01-05", False),   # xx-01-05 ≠ 2004-01-05 (exact on all fields)
    (["January 5, 2004"], "january  5, 2004", True),  # or equal as normalized strings
    # strings: case, whitespace, quotes, dashes, diacritics, footnotes, parentheticals, period
    (["Wolfe Tones"], "  wolfe   TONES ", True),
    (["“Thriller”"], '"thriller"', True),
    (["1990–1995"], "1990-1995", True),
    (["Zürich"], "zurich", True),
    (["Athens[1]"], "athens", True),
    (["Athens†"], "athens", True),
    (["Mercury (planet)"], "mercury", True),
    (["St. Louis."], "st. louis", True),
    (["(Mercury)"], "mercury", False),      # a leading parenthetical is not removed
    (["Wolfe Tones"], "Wolfe", False),
    # answers that contain the ", " separator: the whole prediction is tried as one value
    (["Bangkok, Thailand"], "Bangkok, Thailand", True),
    (["Bangkok", "Thailand"], "Bangkok, Thailand", True),
    (["The Royal School, Armagh", "Portora"], "Portora, The Royal School, Armagh", True),
    (["The Royal School, Armagh", "Portora"], "The Royal School, Portora", False),
    (["The Royal School, Armagh", "Portora"], "The Royal School, Armagh", False),
])
def test_wikitq_denotation_accuracy_follows_the_official_rules(gold, predicted, correct):
    score = metrics.wikitq_denotation_accuracy([gold], [predicted])
    assert score == {"denotation_accuracy": 100.0 if correct else 0.0, "gold_official_tagged": 0,
                     "gold_heuristic_fallback": 1, "dropped_for_length_counted_wrong": 0}


def test_normalization_matches_the_documented_steps():
    assert metrics.normalize_answer(' “Hello”  World [1] (film) ') == '"hello" world'
    assert metrics.normalize_answer('"quoted"') == "quoted"
    assert metrics.normalize_answer("Ébauche*#") == "ebauche"
    # final period removed once, after the repeated steps
    assert metrics.normalize_answer("Inc. (USA).") == "inc. (usa)"


def test_denotation_accuracy_averages_and_checks_lengths():
    score = metrics.wikitq_denotation_accuracy(
        [["1"], ["a", "b"], "x, y", ["2004"]], ["1.0", "b, a", "y, x", "2003"])
    assert score["denotation_accuracy"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="1 targets but 2 predictions"):
        metrics.wikitq_denotation_accuracy([["a"]], ["a", "b"])


def test_tagged_gold_is_the_official_gold_and_unscorable_questions_count_wrong():
    # the tagged canon decides, not the heuristic: "17 years" is the number 17 in the tagged gold
    tagged = metrics.GoldAnswers(("17 years",), ("17.0",))
    assert metrics.wikitq_denotation_accuracy([tagged], ["17"])["denotation_accuracy"] == 100.0
    assert metrics.wikitq_denotation_accuracy([["17 years"]], ["17"])["denotation_accuracy"] == 0.0
    # a string canon keeps the string: "New Year's Day" tagged xxxx-01-01 matches the date form
    holiday = metrics.GoldAnswers(("New Year's Day",), ("xxxx-01-01",))
    assert metrics.wikitq_denotation_accuracy([holiday], ["xx-01-01"])["denotation_accuracy"] == 100.0
    dropped = metrics.GoldAnswers(("Athens",), None, scorable=False)
    score = metrics.wikitq_denotation_accuracy([tagged, dropped, ["Athens"]], ["17", "Athens", "athens"])
    assert score == {"denotation_accuracy": pytest.approx(200 / 3), "gold_official_tagged": 1,
                     "gold_heuristic_fallback": 2, "dropped_for_length_counted_wrong": 1}
    with pytest.raises(ValueError, match="2 gold answers but 1 tagged"):
        metrics.wikitq_denotation_accuracy([metrics.GoldAnswers(("a", "b"), ("a",))], ["a, b"])


def test_python2_number_reading():
    # the official evaluator runs on Python 2, whose int()/float() do not read "1_000"
    assert metrics.wikitq_denotation_accuracy([["1000"]], ["1_000"])["denotation_accuracy"] == 0.0
    assert metrics.wikitq_denotation_accuracy([["1_000"]], ["1_000"])["denotation_accuracy"] == 100.0


def test_accuracy():
    assert metrics.accuracy(["entailed", "refuted", "entailed"],
                            ["entailed", "entailed", "entailed"]) == {
                                "accuracy": pytest.approx(200 / 3)}
    gold = [metrics.GoldAnswers(("entailed",)), metrics.GoldAnswers(("refuted",), scorable=False)]
    assert metrics.accuracy(gold, ["entailed", "refuted"]) == {
        "accuracy": 50.0, "dropped_for_length_counted_wrong": 1}


def test_sacrebleu_agrees_with_the_package():
    targets = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    predictions = ["the cat sat on a mat today", "a quick brown fox jumps over the dog"]
    expected = sacrebleu_package.corpus_bleu(predictions, [targets]).score
    assert metrics.sacrebleu(targets, predictions)["bleu"] == pytest.approx(expected)
    assert 0 < expected < 100
    assert metrics.sacrebleu(targets, targets)["bleu"] == pytest.approx(100.0)
