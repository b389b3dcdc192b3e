"""Math domain: arithmetic and short word problems whose final number a scorer can check."""

from __future__ import annotations

import random
from dataclasses import dataclass

from banpick_cli.demo.corpus.spec import CalibDoc, TaskSpec

NAMES = (
    ("Anna", "She"), ("Ben", "He"), ("Carla", "She"), ("David", "He"), ("Emma", "She"), ("Felix", "He"),
    ("Grace", "She"), ("Hugo", "He"), ("Iris", "She"), ("Jack", "He"), ("Lena", "She"), ("Max", "He"),
    ("Nora", "She"), ("Omar", "He"), ("Paula", "She"), ("Sam", "He"), ("Tina", "She"), ("Victor", "He"),
)
ITEMS = ("apples", "pens", "marbles", "books", "stickers", "cookies", "coins", "cards", "shells", "balloons",
         "pencils", "stamps", "eggs", "candies", "toy cars", "flowers")
GAIN = ("buys {n} more", "finds {n} more", "gets {n} more from a friend", "picks up {n} more", "wins {n} more")
LOSS = ("gives away {n}", "loses {n}", "sells {n}", "gives {n} to a friend", "uses {n}")

DIRECT = {
    "+": ("What is {a} + {b}?", "Compute {a} + {b}.", "Find the sum of {a} and {b}.", "What is {a} plus {b}?",
          "Add {a} and {b}."),
    "-": ("What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?", "Subtract {b} from {a}.",
          "Find the difference of {a} and {b}."),
    "*": ("What is {a} * {b}?", "Compute {a} * {b}.", "What is {a} times {b}?", "Find the product of {a} and {b}.",
          "Multiply {a} by {b}."),
}

# Relative frequency of each form in the held-out tasks and the task-formatted training examples.
# The demo model learns the one-digit and one-step forms almost perfectly; two-digit subtraction,
# two-digit products and three-number chains are where it still fails (the failure set).
TASK_FORMS = {
    "add1": 0.5, "sub1": 0.5, "mul1": 1.0, "add21": 0.75, "sub21": 1.0, "add22": 1.0, "sub22": 1.5,
    "mul21": 1.5, "chain": 1.5, "word1": 1.0, "word2": 1.0, "wordmul": 1.0, "worddiv": 0.75,
}


@dataclass(frozen=True)
class Problem:
    """A question, the worked steps that solve it, and its final number."""

    form: str
    question: str
    work: str
    answer: int


def worked_steps(a: int, op: str, b: int) -> str:
    """Returns the worked steps for `a op b`, splitting two-digit sums and differences into easy steps.

    One-digit facts and products are stated at once; with a two-digit number the ones are done first
    and then the tens ("47 + 8" is "7 + 8 = 15. 40 + 15 = 55."), as a pupil would write it.
    """
    if a < 10 and b < 10:
        return f"{a} {op} {b} = {eval(f'{a} {op} {b}')}."  # noqa: S307 (two ints and an operator of ours)
    tens, ones = a // 10 * 10, a % 10
    if op == "*":  # a two-digit number times a digit: tens and ones apart, then the sum
        return f"{tens} * {b} = {tens * b}. {ones} * {b} = {ones * b}. {tens * b} + {ones * b} = {a * b}."
    if op == "+":
        if b < 10:
            return f"{ones} + {b} = {ones + b}. {tens} + {ones + b} = {a + b}."
        b_tens, b_ones = b // 10 * 10, b % 10
        return (f"{ones} + {b_ones} = {ones + b_ones}. {tens} + {b_tens} = {tens + b_tens}. "
                f"{tens + b_tens} + {ones + b_ones} = {a + b}.")
    if b >= 10:
        b_tens = b // 10 * 10
        first = f"{a} - {b_tens} = {a - b_tens}."
        return first if b == b_tens else first + " " + worked_steps(a - b_tens, "-", b % 10)
    if a < 10 or ones == 0:
        return f"{a} - {b} = {a - b}."
    if ones >= b:
        return f"{ones} - {b} = {ones - b}. {tens} + {ones - b} = {a - b}."
    return f"{tens} - {b} = {tens - b}. {tens - b} + {ones} = {a - b}."


def _direct(rng: random.Random, form: str, op: str, a: int, b: int) -> Problem:
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = rng.choice(DIRECT[op]).format(a=a, b=b)
    return Problem(form, question, worked_steps(a, op, b), value)


def _chain(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 60), rng.randint(10, 39)
    c = rng.randint(2, 9)
    question = rng.choice(("What is {a} + {b} - {c}?", "Compute {a} + {b} - {c}.",
                           "Add {a} and {b}, then subtract {c}.")).format(a=a, b=b, c=c)
    work = worked_steps(a, "+", b) + " " + worked_steps(a + b, "-", c)
    return Problem("chain", question, work, a + b - c)


def _word1(rng: random.Random) -> Problem:
    (name, pron), items = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(2, 20)
    if rng.random() < 0.5:
        b = rng.randint(1, 9)
        step, work, value = rng.choice(GAIN).format(n=b), f"{a} + {b} = {a + b}.", a + b
    else:
        b = rng.randint(1, min(9, a))
        step, work, value = rng.choice(LOSS).format(n=b), f"{a} - {b} = {a - b}.", a - b
    question = f"{name} has {a} {items}. {pron} {step}. How many {items} does {name} have now?"
    return Problem("word1", question, work, value)


def _word2(rng: random.Random) -> Problem:
    (name, pron), items = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 15), rng.randint(1, 9)
    c = rng.randint(1, min(9, a + b))
    gain, loss = rng.choice(GAIN).format(n=b), rng.choice(LOSS).format(n=c)
    question = f"{name} has {a} {items}. {pron} {gain} and then {loss}. How many {items} does {name} have now?"
    work = f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}."
    return Problem("word2", question, work, a + b - c)


def _wordmul(rng: random.Random) -> Problem:
    (name, _), items = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    question = rng.choice((
        f"There are {a} boxes with {b} {items} in each box. How many {items} are there in total?",
        f"{name} buys {a} packs of {items}. Each pack has {b} {items}. How many {items} does {name} buy?",
    ))
    return Problem("wordmul", question, f"{a} * {b} = {a * b}.", a * b)


def _worddiv(rng: random.Random) -> Problem:
    (name, _), items = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    question = (f"{name} shares {a * b} {items} equally among {a} friends. "
                f"How many {items} does each friend get?")
    return Problem("worddiv", question, f"{a * b} / {a} = {b}.", b)


def make_problem(rng: random.Random, form: str) -> Problem:
    """Returns one problem of the named form, drawn from `rng`."""
    r = rng.randint
    if form == "add1":
        return _direct(rng, form, "+", r(0, 9), r(0, 9))
    if form == "sub1":
        a = r(1, 18)
        return _direct(rng, form, "-", a, r(max(0, a - 9), min(a, 9)))
    if form == "mul1":
        return _direct(rng, form, "*", r(2, 9), r(2, 9))
    if form == "add21":
        return _direct(rng, form, "+", r(10, 99), r(1, 9))
    if form == "sub21":
        return _direct(rng, form, "-", r(10, 99), r(1, 9))
    if form == "add22":
        return _direct(rng, form, "+", r(10, 99), r(10, 99))
    if form == "sub22":
        a = r(20, 99)
        return _direct(rng, form, "-", a, r(10, a))
    if form == "mul21":
        return _direct(rng, form, "*", r(11, 49), r(2, 9))
    builders = {"word1": _word1, "word2": _word2, "wordmul": _wordmul, "worddiv": _worddiv, "chain": _chain}
    return builders[form](rng)


def task_prompt(question: str) -> str:
    """Returns the prompt a math task shows the model."""
    return f"Question: {question}\nAnswer:"


def _spec(problem: Problem) -> TaskSpec:
    return TaskSpec(
        kind="math", form=problem.form, prompt=task_prompt(problem.question), answer=str(problem.answer),
        completion=f" {problem.work} The answer is {problem.answer}.",
    )


def _explain_addition(rng: random.Random) -> str:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ones, tens = a % 10 + b % 10, (a // 10 + b // 10) * 10
    return (f"To add {a} and {b}, first add the ones: {a % 10} + {b % 10} = {ones}. "
            f"Then add the tens: {a // 10 * 10} + {b // 10 * 10} = {tens}. "
            f"Finally {tens} + {ones} = {tens + ones}, so {a} + {b} = {a + b}.")


def _times_table(rng: random.Random) -> str:
    n = rng.randint(2, 9)
    rows = ", ".join(f"{n} * {k} = {n * k}" for k in range(1, 10))
    return f"The {n} times table: {rows}."


def _counting(rng: random.Random) -> str:
    step, start = rng.randint(2, 10), rng.randint(0, 20)
    seq = ", ".join(str(start + step * k) for k in range(8))
    return f"Counting up by {step} from {start}: {seq}. Each number is {step} more than the one before."


class MathDomain:
    """Arithmetic with one- and two-digit numbers and one- or two-step word problems."""

    name = "math"
    kind = "math"

    def task(self, rng: random.Random) -> TaskSpec:
        form = rng.choices(list(TASK_FORMS), weights=list(TASK_FORMS.values()))[0]
        return _spec(make_problem(rng, form))

    def calib_doc(self, rng: random.Random) -> CalibDoc:
        style = rng.random()
        if style < 0.55:
            # Worked problems in a different wrapper than the task prompt; the keys name the task each one is.
            problems = [make_problem(rng, rng.choice(list(TASK_FORMS))) for _ in range(rng.randint(2, 4))]
            text = "\n".join(f"Problem: {p.question}\nSolution: {p.work} The answer is {p.answer}."
                             for p in problems)
            return CalibDoc(text, tuple(_spec(p).key for p in problems))
        if style < 0.75:
            return CalibDoc(_explain_addition(rng))
        if style < 0.9:
            return CalibDoc(_times_table(rng))
        return CalibDoc(_counting(rng))
