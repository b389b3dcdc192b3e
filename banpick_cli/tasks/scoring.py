"""Answer extraction and checking for math (final number) and multiple choice (one letter)."""

from __future__ import annotations

import re

from banpick_cli.tasks.math_equiv import as_number, math_equal

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def boxed_answers(text: str) -> list[str]:
    """Returns the contents of every `\\boxed{...}` (or `\\fbox{...}`), nested braces included, in order."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append(text[start:i])
                break
    return found


def extract_math_answer(text: str) -> str | None:
    """Returns the final answer of a worked solution, or None.

    Looks, in order, for the last `\\boxed{...}`, the last "The answer is N", and the last number in the text.
    """
    boxed = boxed_answers(text)
    if boxed:
        return boxed[-1].strip()
    stated = _ANSWER_IS.findall(text)
    if stated:
        return stated[-1]
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def numbers_equal(predicted: str | None, expected: str) -> bool:
    """Returns whether two numeric strings have the same value ("12" == "12.0" == "24/2")."""
    if predicted is None:
        return False
    a, b = as_number(predicted), as_number(expected)
    return a is not None and b is not None and a == b


def score_math(completion: str, answer: str) -> tuple[bool, str | None]:
    """Returns (correct, extracted answer) for a math completion (numeric or normalised-LaTeX equality)."""
    predicted = extract_math_answer(completion)
    return math_equal(predicted, answer), predicted


def extract_choice(text: str, choices: tuple[str, ...] | None = None) -> str | None:
    """Returns the option letter a completion commits to, or None.

    The first standalone capital letter among the options wins ("B", " B.", "(B)", "The answer is B");
    if there is none, an option's whole text at the start of the completion counts as its letter
    (the demo model answers multiple choice with the option's text).
    """
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices) if choices else 4]
    # An explicit "answer is (B)" / "Answer: B" wins over a stray capital earlier in the text.
    stated = re.findall(rf"(?i:answer)(?: (?i:is)|:)\s*:?\s*\(?([{letters}])(?![A-Za-z])", text)
    if stated:
        return stated[-1]
    found = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    if found:
        return found.group(1)
    if choices:
        # whole option text only ("car" is not "carrot"); the longest wins ("a piece of cake" over "a piece")
        head = text.strip().lower()
        matches = [i for i, c in enumerate(choices) if re.match(re.escape(c.strip().lower()) + r"(?![a-z0-9])", head)]
        if matches:
            return letters[max(matches, key=lambda i: len(choices[i].strip()))]
    return None


def score_mc(completion: str, answer: str, choices: tuple[str, ...] | None = None) -> tuple[bool, str | None]:
    """Returns (correct, extracted letter) for a multiple-choice completion."""
    predicted = extract_choice(completion, choices)
    return predicted == answer.strip().upper(), predicted


_STOP_LINE = re.compile(r"^\S", re.MULTILINE)


def code_body(completion: str) -> str:
    """Returns the function body a completion writes: everything before the first unindented line."""
    stop = _STOP_LINE.search(completion)
    return completion[: stop.start()] if stop else completion


_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def code_program(prompt: str, completion: str, tests: str, entry_point: str | None = None) -> str:
    """Returns the program that checks a code completion: prompt, body, then the unit tests.

    When the completion writes the whole function itself (`def <entry_point>(` at the top level,
    possibly inside a ```python fence; MBPP-style prompts, or a chat model restating a HumanEval
    signature), the program is the prompt's import lines, that code, then the tests.
    """
    if entry_point:
        fenced = _FENCE.search(completion)
        code = (fenced.group(1) if fenced else completion).split("[DONE]")[0]  # MBPP's end marker
        if re.search(rf"^def {re.escape(entry_point)}\s*\(", code, re.MULTILINE):
            imports = "".join(line + "\n" for line in prompt.splitlines() if line.startswith(("import ", "from ")))
            return imports + code.rstrip() + "\n\n\n" + tests.strip() + "\n"
    return prompt + code_body(completion).rstrip() + "\n\n\n" + tests.strip() + "\n"
