"""The training loop's cadence predicate (ul2lab.train.hooks.itstime): every N-th step and the last."""
import pytest

from ul2lab.train.hooks import itstime


@pytest.mark.parametrize("every, last, expected", [
    (3, 10, [3, 6, 9, 10]),   # the last step counts even off the period
    (5, 10, [5, 10]),         # the last step on the period: once
    (1, 4, [1, 2, 3, 4]),
    (None, 4, [4]),           # no period: the last step only
    (0, 4, [4]),
    (20, 4, [4]),             # a period longer than the run
])
def test_itstime_is_every_nth_step_and_the_last(every, last, expected):
    assert [step for step in range(1, last + 1) if itstime(step, every, last)] == expected


def test_itstime_counts_from_step_zero_not_from_the_resumed_step():
    # a run resumed at step 4 with a period of 3 logs at 6 and 9 (t5x's global periods), not at 7
    assert [step for step in range(5, 11) if itstime(step, 3, 10)] == [6, 9, 10]
