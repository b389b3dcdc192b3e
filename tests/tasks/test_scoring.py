"""Answer extraction and equivalence (math, multiple choice) and how a code completion becomes a program."""

from __future__ import annotations

import pytest

from banpick_cli.tasks.math_equiv import as_number, math_equal, normalize_answer
from banpick_cli.tasks.scoring import boxed_answers, code_program, extract_choice, extract_math_answer, score_math


@pytest.mark.parametrize("text, expected", [
    ("so x = 3 and \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
    ("first \\boxed{1} then \\boxed{ 42 }", "42"),  # the last box wins
    ("9 * 5 = 45. The answer is 45.", "45"),
    ("The answer is: $1,234. Then 7 more", "1,234"),  # "the answer is" beats the last number
    ("we get 3 apples and 4 pears", "4"),  # last number
    ("no digits here", None),
])
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


def test_boxed_with_unbalanced_braces_is_ignored():
    assert boxed_answers("\\boxed{\\frac{1}{2}") == []


@pytest.mark.parametrize("predicted, reference, equal", [
    ("12", "12.0", True), ("24/2", "12", True), ("\\frac{24}{2}", "12", True), ("\\dfrac72", "3.5", True),
    ("1,234", "1234", True), ("-\\frac{1}{2}", "-0.5", True), ("50\\%", "50", True), ("90^\\circ", "90", True),
    ("\\$18.90", "18.9", True), ("x = 5", "5", True), ("13", "12", False), (None, "1", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True), ("\\text{(C)}", "(C)", True),
    ("3", "(3,\\frac{\\pi}{2})", False), ("", "", False),
])
def test_math_equal(predicted, reference, equal):
    assert math_equal(predicted, reference) is equal


def test_numbers_are_exact_fractions():
    assert as_number("0.1") + as_number("0.2") == as_number("0.3")
    assert as_number("\\frac{1}{0}") is None
    assert normalize_answer(" $\\dfrac{1}{2}$. ") == "\\frac{1}{2}"


def test_score_math_reports_the_extracted_answer():
    assert score_math("The answer is 7/2", "3.5") == (True, "7/2")
    assert score_math("nothing", "3") == (False, None)


@pytest.mark.parametrize("text, expected", [
    (" C", "C"), ("(B) because", "B"), ("A cat sat. The answer is D", "D"), ("Answer: B", "B"),
    ("the answer is a cat", None), ("truck", "C"),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, ("shirt", "pink", "truck", "bed")) == expected


PROMPT = 'import math\n\n\ndef area(r):\n    """Return the area of a circle."""\n'
TESTS = "assert abs(area(1) - math.pi) < 1e-9"


def test_code_program_body_under_the_prompt():
    program = code_program(PROMPT, "    return math.pi * r * r\n\nprint('junk after the body')\n", TESTS, "area")
    assert program == PROMPT + "    return math.pi * r * r" + "\n\n\n" + TESTS + "\n"


def test_code_program_whole_function_in_a_fence():
    completion = "Here it is:\n```python\ndef area(r):\n    return math.pi * r ** 2\n```\nDone."
    program = code_program(PROMPT, completion, TESTS, "area")
    assert program == "import math\ndef area(r):\n    return math.pi * r ** 2\n\n\n" + TESTS + "\n"
