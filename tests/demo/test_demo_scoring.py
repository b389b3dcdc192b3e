"""Answer extraction and the code sandbox on hand-made examples."""

from __future__ import annotations

import time

import pytest

from banpick_cli.evaluation.generate import score_tasks
from banpick_cli.tasks import Task
from banpick_cli.tasks.sandbox import run_python
from banpick_cli.tasks.scoring import code_body, extract_choice, extract_math_answer, numbers_equal, score_math, score_mc


@pytest.mark.parametrize("text, expected", [
    (" 12 + 7 = 19. The answer is 19.", "19"),
    ("so we get \\boxed{42} in the end, not 41", "42"),
    ("The answer is: 1,250 apples", "1,250"),
    ("First 3, then 4, finally 10", "10"),
    ("The answer is -7. Check: 3 - 10 = -7", "-7"),
    ("no number here", None),
])
def test_math_answer_extraction(text, expected):
    assert extract_math_answer(text) == expected


def test_math_numeric_equivalence():
    assert numbers_equal("12.0", "12") and numbers_equal("24/2", "12") and numbers_equal("1,250", "1250")
    assert numbers_equal("$5.", "5")
    assert not numbers_equal("13", "12") and not numbers_equal(None, "1") and not numbers_equal("abc", "1")
    assert score_math(" 5 * 6 = 30. The answer is 30.", "30") == (True, "30")
    # the stated answer wins over a later stray number
    assert score_math(" The answer is 31. (30 was close)", "30") == (False, "31")


@pytest.mark.parametrize("text, letter", [
    (" B", "B"), (" (C) because", "C"), ("The answer is D.", "D"), ("A.", "A"),
    (" Answer: B", "B"), ("", None), (" E", None),
])
def test_choice_letter_extraction(text, letter):
    assert extract_choice(text, ("w", "x", "y", "z")) == letter


def test_choice_text_fallback_and_scoring():
    assert extract_choice(" paris", ("Rome", "Paris", "Oslo", "Lima")) == "B"
    assert extract_choice(" carrot.", ("car", "bus", "carrot", "pea")) == "C"  # not "car"
    assert extract_choice(" a piece of cake.", ("a piece", "a piece of cake", "x", "y")) == "B"
    assert extract_choice(" cars", ("car", "bus", "train", "boat")) is None
    assert score_mc(" B", "B", ("a", "b", "c", "d")) == (True, "B")
    assert score_mc(" C", "B", ("a", "b", "c", "d")) == (False, "C")


def test_code_body_stops_at_first_unindented_line():
    completion = "    return x + 1\n\nprint('junk')\ndef other():\n    pass\n"
    assert code_body(completion) == "    return x + 1\n\n"


def _code_task(tests: str = "assert inc(1) == 2\nassert inc(5) == 6\n") -> Task:
    return Task(id="code-t", domain="code", kind="code", prompt='def inc(x):\n    """Return x plus 1."""\n',
                answer="    return x + 1\n", tests=tests, entry_point="inc")


def test_code_scoring_right_wrong_and_broken():
    task = _code_task()
    right, wrong, broken = score_tasks([task] * 3, ["    return x + 1\n", "    return x + 2\n", "    return (x +\n"])
    assert (right.correct, right.prediction) == (True, "passed")
    assert (wrong.correct, wrong.prediction) == (False, "failed")
    assert (broken.correct, broken.prediction) == (False, "failed")


def test_code_that_loops_forever_is_wrong_and_stopped():
    started = time.perf_counter()
    [outcome] = score_tasks([_code_task()], ["    while True:\n        pass\n"], code_timeout_s=1.0)
    assert (outcome.correct, outcome.prediction) == (False, "timeout")
    assert time.perf_counter() - started < 10


def test_code_that_allocates_too_much_is_wrong():
    [outcome] = score_tasks([_code_task()], ["    return len(bytearray(8 * 1024 ** 3)) + x\n"])
    assert (outcome.correct, outcome.prediction) == (False, "failed")


def test_sandbox_is_isolated_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("BANPICK_SECRET", "1")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = run_python("import os, sys\nassert 'BANPICK_SECRET' not in os.environ\nassert sys.flags.isolated\n")
    assert result.passed, result.stderr_tail
    assert list(tmp_path.iterdir()) == []  # the working directory is gone
    noisy = run_python("print('x' * 10 ** 8)")
    assert noisy.status == "failed"  # output past the file-size limit kills the child
