"""Whether a extracted math answer equals the reference: exact numbers first, then normalised LaTeX.

Numbers compare exactly as fractions ("12" == "12.0" == "24/2" == "\\frac{24}{2}" == "1,2e1" is not
a number). Anything else (intervals, expressions, text answers of MATH-500) compares as a string
after the usual normalisation: `\\left`/`\\right`, spacing commands, `\\text{...}` wrappers, units
of degrees and percent, `\\dfrac`/`\\tfrac`, surrounding `$`, a trailing period and all whitespace
are removed. This is the strict end of what MATH graders do; no symbolic algebra.
"""

from __future__ import annotations

import re
from fractions import Fraction

_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac(\d)(\d)")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")


def normalize_answer(text: str) -> str:
    """Returns a canonical spelling of a short LaTeX answer (see the module docstring)."""
    s = text.strip().rstrip(".").strip().strip("$").strip()
    s = _TEXT.sub(r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\displaystyle"):
        s = s.replace(token, "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\circ", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"[a-zA-Z]\s*=.+", s):  # "x=5" -> "5"
        s = s.split("=", 1)[1]
    return s


def as_number(text: str) -> Fraction | None:
    """Returns the exact value of a numeric answer ("1,234", "-3.5", "7/2", "\\frac{7}{2}", "50\\%"), or None."""
    s = normalize_answer(text)
    frac = _FRAC.fullmatch(s)
    if frac:
        top, bottom = _plain_number(frac.group(1)), _plain_number(frac.group(2))
        if top is None or bottom is None or bottom == 0:
            return None
        return top / bottom
    if s.startswith("-") and _FRAC.fullmatch(s[1:]):
        value = as_number(s[1:])
        return -value if value is not None else None
    return _plain_number(s)


def _plain_number(s: str) -> Fraction | None:
    s = s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(predicted: str | None, reference: str) -> bool:
    """Returns whether an extracted answer matches the reference (exact number, else normalised text)."""
    if predicted is None:
        return False
    a, b = as_number(predicted), as_number(reference)
    if a is not None and b is not None:
        return a == b
    if (a is None) != (b is None) and not _has_letters(reference):
        return False
    return normalize_answer(predicted) == normalize_answer(reference) != ""


def _has_letters(text: str) -> bool:
    return bool(re.search(r"[A-Za-z]", text))
