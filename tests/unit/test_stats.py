"""Wilson intervals against a direct computation, their edge cases, and the summary helpers."""

from __future__ import annotations

import math

import pytest

from safeft.stats import Z95, Rate, add_intervals, put_rate, rate_in, wilson


def wilson_by_quadratic(k: int, n: int, z: float) -> tuple[float, float]:
    """The interval from its definition: the p with (k/n - p)^2 = z^2 p (1 - p) / n, solved as a quadratic."""
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k, n", [(12, 100), (1, 7), (50, 100), (3, 119), (118, 119), (1, 2), (999, 1000)])
@pytest.mark.parametrize("z", [Z95, 1.0, 2.576])
def test_matches_the_definition(k, n, z):
    assert wilson(k, n, z) == pytest.approx(wilson_by_quadratic(k, n, z), abs=1e-12)


def test_a_hand_checked_value_and_the_printed_form():
    low, high = wilson(12, 100)
    assert round(low, 4) == 0.0700 and round(high, 4) == 0.1981
    assert str(Rate(12, 100)) == "12.0 % [7.0, 19.8] (n=100)"
    assert Rate(12, 100).format(digits=2) == "12.00 % [7.00, 19.81] (n=100)"


def test_edges():
    assert wilson(0, 100)[0] == 0.0 and 0.03 < wilson(0, 100)[1] < 0.04  # 0 of 100 is not "exactly 0"
    assert wilson(100, 100)[1] == 1.0 and wilson(100, 100)[0] == pytest.approx(1 - wilson(0, 100)[1])
    assert wilson(0, 1) == (0.0, pytest.approx(wilson_by_quadratic(0, 1, Z95)[1]))
    lo, hi = wilson(7, 30)
    assert lo < 7 / 30 < hi and wilson(23, 30) == pytest.approx((1 - hi, 1 - lo))  # symmetric in k <-> n-k
    assert wilson(50, 1000)[1] - wilson(50, 1000)[0] < wilson(5, 100)[1] - wilson(5, 100)[0]  # narrows with n


@pytest.mark.parametrize(
    "k, n, match",
    [(0, 0, "n >= 1"), (-1, 10, "0 <= k <= n"), (11, 10, "0 <= k <= n"), (1.5, 10, "integer"), (True, 2, "integer")],
)
def test_bad_counts_raise(k, n, match):
    with pytest.raises(ValueError, match=match):
        wilson(k, n)


def test_rate_with_no_data_says_so_and_never_invents_an_interval():
    r = Rate(0, 0)
    assert r.format() == "– (n=0)" and math.isnan(r.value) and all(math.isnan(x) for x in r.ci)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        Rate(3, 2)


def test_rate_of_recovers_the_count_or_refuses():
    assert Rate.of(0.12, 100) == Rate(12, 100) and Rate.of(1 / 3, 3) == Rate(1, 3)
    with pytest.raises(ValueError, match="not k/100"):
        Rate.of(0.125, 100)  # a mean score, not a share of 100 items


def test_put_rate_and_add_intervals():
    e = put_rate({}, "asr", 12, 100)
    assert e == {"asr": 0.12, "asr_ci": list(wilson(12, 100)), "n": 100}
    put_rate(e, "refusal_rate", 88, 100)
    assert e["refusal_rate_ci"] == list(wilson(88, 100))
    with pytest.raises(ValueError, match="already has n=100"):
        put_rate(e, "hs", 1, 50)
    s = {"asr": 0.25, "answer_nll": 1.6, "n": 8, "judge": "x"}
    add_intervals(s, ["asr", "absent"])
    assert s["asr_ci"] == list(wilson(2, 8)) and set(s) == {"asr", "asr_ci", "answer_nll", "n", "judge"}
    with pytest.raises(ValueError, match="not k/8"):
        add_intervals(s, ["answer_nll"])  # a mean, not a rate: no made-up interval
    with pytest.raises(ValueError, match="has no 'n'"):
        add_intervals({"asr": 0.5}, ["asr"])
    assert rate_in({"asr": 0.25, "n": 8}, "asr") == Rate(2, 8) and rate_in({"n": 8}, "asr") is None
    # a judge that left 2 of 8 unanswered rated the other 6: the rate is k of 6, not of 8
    assert rate_in({"asr": 0.5, "n": 8, "n_error": 2, "n_answered": 6}, "asr") == Rate(3, 6)
