"""Answer verifiers and the unbiased Pass@K estimator of the evaluation harness."""

import itertools
import math

import pytest

from actreplay_ext.tools import verify


@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{ {a}+{b} }", "{a}+{b}"),
    ("\\boxed {7}", "7"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
    ("\\boxed{2} and a broken \\boxed{", "2"),
])
def test_last_boxed(text, expected):
    assert verify.last_boxed(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("42", 42.0), ("-3.5", -3.5), ("1,000", 1000.0), ("3/4", 0.75), ("\\frac{3}{4}", 0.75),
    ("$12$", 12.0), ("50%", 0.5), ("2e3", 2000.0), (".5", 0.5),
    ("x = 4", None), ("", None), ("1/0", None), ("four", None),
])
def test_parse_number(text, expected):
    assert verify.parse_number(text) == expected


def test_last_number_takes_the_final_one():
    assert verify.last_number("first 3 apples, then 1,250 pears; total -7.5") == -7.5
    assert verify.last_number("nothing numeric") is None


@pytest.mark.parametrize("response,answer,kind,ok", [
    ("the sum is \\boxed{7}", "7", "auto", True),
    ("the sum is \\boxed{7.00001}", "7", "numeric", True),   # within the relative tolerance
    ("the sum is \\boxed{7.01}", "7", "numeric", False),
    ("I think 3 ... no, 8", "8", "numeric", True),           # no box: the last number
    ("\\boxed{8} is wrong, 7 is right", "7", "numeric", False),  # the boxed answer wins
    ("\\boxed{0.5}", "1/2", "auto", True),
    ("\\boxed{\\text{Paris}}", "paris", "auto", True),
    ("Paris", "paris", "boxed", False),                       # boxed text required
])
def test_verify(response, answer, kind, ok):
    assert verify.verify(response, answer, kind=kind) is ok


@pytest.mark.parametrize("response,answer,ok", [
    ("The answer is (B).", "B", True),
    ("\\boxed{C}", "B", False),
    ("\\boxed{B}", "2", True),        # the answer given as the option's text
    ("A seems close but B.", "B", True),
    ("E", "B", False),                # E is not one of the four options
    ("I cannot tell", "B", False),
])
def test_verify_choices(response, answer, ok):
    assert verify.verify(response, answer, choices=["3", "2", "5", "4"]) is ok


def test_verify_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        verify.verify("x", "1", kind="fuzzy")
    with pytest.raises(ValueError, match="needs a numeric answer"):
        verify.verify("x", "Paris", kind="numeric")
    with pytest.raises(ValueError, match="neither an option letter nor one of the choices"):
        verify.verify("A", "seven", choices=["1", "2"])
    with pytest.raises(ValueError, match="needs the row's choices"):
        verify.verify("A", "A", kind="choice")


def brute_force_pass_at_k(n, c, k):
    """The probability that a random k-subset of n samples, c of them correct, holds one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_subset_probability(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert verify.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_matches_binomials():
    n, c, k = 200, 13, 50
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert verify.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert verify.pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="need 0 <= c <= n and 1 <= k <= n"):
        verify.pass_at_k(n, c, k)


@pytest.mark.parametrize("response, answer, choices, ok", [
    ("The point is (3,4).", "34", None, False),       # a pair, not the number 34
    (r"\boxed{1,2}", "12", None, False),              # commas only as thousands separators
    (r"\boxed{1,200}", "1200", None, True),
    ("The result is 5-3", "-3", None, False),         # a subtraction, not -3
    ("so the answer is -3", "-3", None, True),
    ("The answer is B. A quick check confirms.", "B", ["w", "x", "y", "z"], True),   # "A" the article
    ("It is (C). I am sure.", "C", list("abcdefghij"), True),                       # "I" the pronoun
    ("Option A is right", "A", ["w", "x", "y", "z"], True),
])
def test_numbers_and_letters_the_heuristics_once_misread(response, answer, choices, ok):
    assert verify.verify(response, answer, choices) is ok


def test_malformed_thousands_are_not_numbers():
    assert verify.parse_number("1,000,0") is None and verify.parse_number("1,000,000") == 1e6
