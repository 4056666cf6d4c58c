"""Answer checking for Pass@K evaluation: the final ``\\boxed{}`` answer,
numbers with a tolerance, multiple-choice letters, and the unbiased Pass@K
estimator (Chen et al. 2021, eq. 1)."""

from __future__ import annotations

import math
import re
import string
from fractions import Fraction
from typing import Optional, Sequence

__all__ = ["last_boxed", "parse_number", "last_number", "choice_letter", "verify", "pass_at_k", "VERIFIERS"]

VERIFIERS = ("auto", "boxed", "numeric", "choice")


def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (nested braces balanced), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


# Commas only as thousands separators (1,250 and 1,000,000; not 1,2 or 1,000,0); a minus sign only where
# no digit or letter comes before it (the "-3" of "5-3" is a subtraction, not a negative number).
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*-?\d+)?%?(?![\d,]*\d)"
                     r"|(?<![\w.])-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def parse_number(text: str) -> Optional[float]:
    """A number written as an integer, decimal (thousands commas allowed),
    scientific, fraction (``3/4``, ``\\frac{3}{4}``) or percentage; None if
    `text` is not exactly one number (after stripping ``$`` and spaces)."""
    t = _FRAC.sub(r"\1/\2", text.strip().strip("$").strip())
    t = t.replace("\\%", "%").replace(" ", "")
    if not t or not _NUMBER.fullmatch(t):
        return None
    percent = t.endswith("%")
    t = t.rstrip("%").replace(",", "")
    try:
        value = float(Fraction(t)) if "/" in t else float(t)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def last_number(text: str) -> Optional[float]:
    """The last number in free text (None if there is none)."""
    found = _NUMBER.findall(_FRAC.sub(r"\1/\2", text))
    for token in reversed(found):
        value = parse_number(token)
        if value is not None:
            return value
    return None


def choice_letter(text: str, n_choices: int) -> Optional[str]:
    """The option letter a response commits to: a boxed letter, else the last
    standalone capital letter among the first `n_choices` (``(B)``, ``B.``,
    ``answer is B``)."""
    letters = string.ascii_uppercase[:n_choices]
    boxed = last_boxed(text)
    if boxed is not None:
        m = re.fullmatch(r"\(?([A-Z])\)?\.?", boxed.replace("\\text{", "").replace("}", "").strip())
        if m and m.group(1) in letters:
            return m.group(1)
    # what the response commits to, most explicit first: "answer is B" / "answer: (B)", then "(B)", then a
    # standalone letter that is not the article "A" or the pronoun "I" opening a sentence's next words
    for pattern in (rf"answer\W{{0,3}}(?:is|:)?\W{{0,3}}\(?([{letters}])\)?(?![A-Za-z])",
                    rf"\(([{letters}])\)",
                    rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])(?!\s+[a-z])"):
        found = re.findall(pattern, text, flags=re.IGNORECASE if pattern.startswith("answer") else 0)
        found = [f for f in found if f in letters]
        if found:
            return found[-1]
    found = re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    return found[-1] if found else None


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\\text{", "").replace("}", "").strip().strip(".").lower())


def verify(response: str, answer: str, choices: Optional[Sequence[str]] = None, kind: str = "auto",
           rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    """Whether `response` gets `answer` right.

    kind="choice" (the default when `choices` is given): the committed option
    letter equals the answer's letter (the answer may be the letter or the
    option's text). "numeric" (the default when `answer` is a number): the
    boxed answer, else the last number of the response, within `rel_tol`
    relative or `abs_tol` absolute. "boxed": the boxed answer equals the answer
    as text (case, spaces and \\text{} ignored) or as a number.
    """
    if kind not in VERIFIERS:
        raise ValueError(f"kind must be one of {VERIFIERS}, got {kind!r}")
    if kind == "auto":
        kind = "choice" if choices else ("numeric" if parse_number(answer) is not None else "boxed")
    if kind == "choice":
        if not choices:
            raise ValueError("kind='choice' needs the row's choices")
        gold = answer.strip().strip("()").strip(".")
        if gold not in string.ascii_uppercase[:len(choices)]:
            texts = [_normal(c) for c in choices]
            if _normal(answer) not in texts:
                raise ValueError(f"answer {answer!r} is neither an option letter nor one of the choices {choices}")
            gold = string.ascii_uppercase[texts.index(_normal(answer))]
        return choice_letter(response, len(choices)) == gold
    boxed = last_boxed(response)
    gold_number = parse_number(answer)
    if kind == "numeric":
        if gold_number is None:
            raise ValueError(f"kind='numeric' needs a numeric answer, got {answer!r}")
        got = parse_number(boxed) if boxed is not None else last_number(response)
        return got is not None and math.isclose(got, gold_number, rel_tol=rel_tol, abs_tol=abs_tol)
    if boxed is None:
        return False
    if gold_number is not None and (got := parse_number(boxed)) is not None:
        return math.isclose(got, gold_number, rel_tol=rel_tol, abs_tol=abs_tol)
    return _normal(boxed) == _normal(answer)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of Pass@k from n samples of which c are correct:
    1 - C(n-c, k) / C(n, k), computed as a product (no large binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
