"""Code domain: small Python functions from templated families, each task checked by real unit tests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from banpick_cli.demo.corpus.spec import CalibDoc, TaskSpec

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
WORDS = ("hello", "banana", "python", "apple", "river", "orange", "moon", "garden", "table", "code",
         "window", "silver", "tiger", "paper", "music", "level", "rocket", "forest")
LETTERS = "aeiorstnl"
SUFFIXES = ("_x", "ing", "!", "ed", "s", "_end", "123")
GENERIC_NAMES = ("f", "solve", "compute", "helper", "transform", "apply_rule", "process", "calc")


@dataclass(frozen=True)
class Family:
    """A template for one kind of function: its argument, body, docstrings, names and test inputs."""

    form: str
    arg: str  # "x" | "a, b" | "s" | "xs"
    body: str  # one or more lines, each already indented by four spaces; `{k}`, `{c}`, ... are parameters
    docs: tuple[str, ...]
    names: tuple[str, ...]
    params: Callable[[random.Random], dict] = lambda rng: {}


def _k(lo: int, hi: int) -> Callable[[random.Random], dict]:
    def draw(rng: random.Random) -> dict:
        k = rng.randint(lo, hi)
        return {"k": k, "kw": NUMBER_WORDS[k] if k < len(NUMBER_WORDS) else str(k)}
    return draw


def _letter(rng: random.Random) -> dict:
    c, d = rng.sample(LETTERS, 2)
    return {"c": c, "d": d}


def _suffix(rng: random.Random) -> dict:
    return {"w": rng.choice(SUFFIXES)}


R = "    return "
FAMILIES = (
    Family("add_k", "x", R + "x + {k}", ("Return x plus {k}.", "Add {k} to x and return the result.",
           "Return the sum of x and {k}."), ("add_{kw}", "plus_{kw}", "add_{k}"), _k(1, 12)),
    Family("sub_k", "x", R + "x - {k}", ("Return x minus {k}.", "Subtract {k} from x and return the result."),
           ("subtract_{kw}", "minus_{kw}", "sub_{k}"), _k(1, 12)),
    Family("mul_k", "x", R + "x * {k}", ("Return x times {k}.", "Multiply x by {k} and return the result."),
           ("times_{kw}", "multiply_by_{kw}", "mul_{k}"), _k(2, 12)),
    Family("floordiv_k", "x", R + "x // {k}", ("Return x divided by {k}, rounded down.",
           "Return the integer division of x by {k}."), ("div_{kw}", "divide_by_{kw}"), _k(2, 9)),
    Family("mod_k", "x", R + "x % {k}", ("Return the remainder of x divided by {k}.", "Return x modulo {k}."),
           ("mod_{kw}", "remainder_{kw}"), _k(2, 9)),
    Family("square", "x", R + "x * x", ("Return the square of x.", "Return x multiplied by itself."),
           ("square", "squared")),
    Family("is_even", "x", R + "x % 2 == 0", ("Return True if x is even.", "Check whether x is an even number."),
           ("is_even", "even")),
    Family("greater_k", "x", R + "x > {k}", ("Return True if x is greater than {k}.",
           "Check whether x is larger than {k}."), ("greater_than_{kw}", "above_{kw}"), _k(0, 12)),
    Family("max_k", "x", R + "max(x, {k})", ("Return the larger of x and {k}.",
           "Return x, but never less than {k}."), ("at_least_{kw}", "max_{kw}"), _k(0, 12)),
    Family("min_k", "x", R + "min(x, {k})", ("Return the smaller of x and {k}.",
           "Return x, but never more than {k}."), ("at_most_{kw}", "min_{kw}"), _k(0, 12)),
    Family("add_ab", "a, b", R + "a + b", ("Return the sum of a and b.", "Add a and b."), ("add", "plus")),
    Family("mul_ab", "a, b", R + "a * b", ("Return the product of a and b.", "Multiply a and b."),
           ("multiply", "product")),
    Family("sub_ab", "a, b", R + "a - b", ("Return a minus b.", "Subtract b from a."), ("subtract", "difference")),
    Family("max_ab", "a, b", R + "max(a, b)", ("Return the larger of a and b.", "Return the maximum of a and b."),
           ("larger", "maximum")),
    Family("upper", "s", R + "s.upper()", ("Return s in upper case.", "Convert s to capital letters."),
           ("to_upper", "shout")),
    Family("lower", "s", R + "s.lower()", ("Return s in lower case.", "Convert s to small letters."),
           ("to_lower", "quiet")),
    Family("reverse_s", "s", R + "s[::-1]", ("Return s reversed.", "Return the characters of s in reverse order."),
           ("reverse", "backwards")),
    Family("repeat_k", "s", R + "s * {k}", ("Return s repeated {k} times.", "Repeat the string s {k} times."),
           ("repeat_{kw}", "echo_{kw}"), _k(2, 5)),
    Family("first_k", "s", R + "s[:{k}]", ("Return the first {k} characters of s.", "Return the start of s, "
           "{k} characters long."), ("first_{kw}", "head_{kw}"), _k(1, 6)),
    Family("last_k", "s", R + "s[-{k}:]", ("Return the last {k} characters of s.", "Return the end of s, "
           "{k} characters long."), ("last_{kw}", "tail_{kw}"), _k(1, 6)),
    Family("count_c", "s", R + "s.count('{c}')", ("Return how many times '{c}' appears in s.",
           "Count the letter '{c}' in s."), ("count_{c}", "number_of_{c}"), _letter),
    Family("replace_c", "s", R + "s.replace('{c}', '{d}')", ("Return s with every '{c}' replaced by '{d}'.",
           "Replace each '{c}' in s with '{d}'."), ("swap_{c}_{d}", "replace_{c}"), _letter),
    Family("suffix", "s", R + "s + '{w}'", ("Return s followed by '{w}'.", "Append '{w}' to the end of s."),
           ("add_suffix", "append_end"), _suffix),
    Family("length", "s", R + "len(s)", ("Return the number of characters in s.", "Return the length of s."),
           ("length", "size")),
    Family("sum_xs", "xs", R + "sum(xs)", ("Return the sum of the numbers in xs.", "Add up all numbers in xs."),
           ("total", "sum_all")),
    Family("max_xs", "xs", R + "max(xs)", ("Return the largest number in xs.", "Return the maximum of xs."),
           ("largest", "biggest")),
    Family("min_xs", "xs", R + "min(xs)", ("Return the smallest number in xs.", "Return the minimum of xs."),
           ("smallest", "lowest")),
    Family("sorted_xs", "xs", R + "sorted(xs)", ("Return xs sorted from small to large.",
           "Return a sorted copy of xs."), ("sort_list", "in_order")),
    Family("reverse_xs", "xs", R + "xs[::-1]", ("Return xs in reverse order.", "Return the list xs reversed."),
           ("reverse_list", "flip")),
    Family("add_each_k", "xs", R + "[x + {k} for x in xs]", ("Return a list with {k} added to every number in xs.",
           "Add {k} to each element of xs."), ("add_{kw}_each", "shift_{kw}"), _k(1, 9)),
    Family("mul_each_k", "xs", R + "[x * {k} for x in xs]", ("Return a list with every number in xs times {k}.",
           "Multiply each element of xs by {k}."), ("scale_{kw}", "times_{kw}_each"), _k(2, 9)),
    Family("filter_gt_k", "xs", R + "[x for x in xs if x > {k}]", ("Return the numbers in xs greater than {k}.",
           "Keep only the elements of xs that are larger than {k}."), ("above_{kw}", "keep_over_{kw}"), _k(0, 9)),
    Family("filter_even", "xs", R + "[x for x in xs if x % 2 == 0]", ("Return the even numbers in xs.",
           "Keep only the even elements of xs."), ("evens", "keep_even")),
    Family("head_k", "xs", R + "xs[:{k}]", ("Return the first {k} elements of xs.",
           "Return the start of xs, {k} elements long."), ("take_{kw}", "first_{kw}_items"), _k(1, 4)),
    Family("count_gt_k", "xs", "    count = 0\n    for x in xs:\n        if x > {k}:\n            count += 1\n"
           "    return count", ("Return how many numbers in xs are greater than {k}.",
           "Count the elements of xs that are larger than {k}."), ("count_above_{kw}", "how_many_over_{kw}"),
           _k(0, 9)),
    Family("sum_squares", "xs", "    total = 0\n    for x in xs:\n        total += x * x\n    return total",
           ("Return the sum of the squares of the numbers in xs.", "Add up x * x for every x in xs."),
           ("sum_of_squares", "square_total")),
)


def _two_steps(rng: random.Random) -> dict:
    (op1, p1, d1), (op2, p2, d2) = rng.choice(INT_STEPS), rng.choice(INT_STEPS)
    k1, k2 = rng.randint(2, 9), rng.randint(2, 9)
    return {"expr": f"(x {op1} {k1}) {op2} {k2}", "doc1": d1.format(k=k1), "doc2": p2.format(k=k2),
            "name1": p1.split()[0].lower()}


INT_STEPS = (  # (operator, "then ..." phrase, first-step phrase)
    ("+", "add {k}", "Add {k} to x"), ("-", "subtract {k}", "Subtract {k} from x"),
    ("*", "multiply by {k}", "Multiply x by {k}"),
)


def _three_steps(rng: random.Random) -> dict:
    steps = [rng.choice(INT_STEPS) for _ in range(3)]
    ks = [rng.randint(2, 9) for _ in range(3)]
    expr = "x"
    for (op, _, _), k in zip(steps, ks):
        expr = f"({expr} {op} {k})"
    docs = [steps[0][2].format(k=ks[0])] + [step[1].format(k=k) for step, k in zip(steps[1:], ks[1:])]
    return {"expr": expr[1:-1], "doc": f"{docs[0]}, {docs[1]}, then {docs[2]}"}


def _map_filter(rng: random.Random) -> dict:
    (op, _, _), k1, k2 = rng.choice(INT_STEPS), rng.randint(2, 9), rng.randint(3, 12)
    verb = {"+": "plus", "-": "minus", "*": "times"}[op]
    return {"body": f"[x {op} {k1} for x in xs if x > {k2}]",
            "doc": f"Return each number in xs that is greater than {k2}, {verb} {k1}."}


def _filter_agg(rng: random.Random) -> dict:
    agg, agg_doc = rng.choice((("sum", "the sum of"), ("len", "how many of")))
    test, test_doc = rng.choice((("x > {k}", "greater than {k}"), ("x < {k}", "less than {k}"),
                                 ("x % 2 == 0", "even"), ("x != {k}", "not equal to {k}")))
    k = rng.randint(3, 12)
    inner = f"[x for x in xs if {test.format(k=k)}]"
    body = f"{agg}({inner})"
    return {"body": body, "doc": f"{agg_doc} the numbers in xs that are {test_doc.format(k=k)}"}


def _string_steps(rng: random.Random) -> dict:
    k, k2 = rng.randint(1, 5), rng.randint(2, 3)
    first, first_doc = rng.choice((("s[:{k}]", "the first {k} characters of s"),
                                   ("s[-{k}:]", "the last {k} characters of s"), ("s[::-1]", "s reversed")))
    then, then_doc = rng.choice(((".upper()", "in upper case"), (".lower()", "in lower case"),
                                 (" * {k2}", "repeated {k2} times"), (" + '!'", "followed by '!'")))
    return {"expr": first.format(k=k) + then.format(k2=k2), "doc": f"{first_doc.format(k=k)}, {then_doc.format(k2=k2)}"}


# Two- and three-step functions: the same pieces as above, combined; held-out combinations of constants are new.
COMPOSED = (
    Family("int_pipeline", "x", R + "{expr}", ("{doc1}, then {doc2}.", "{doc1} and then {doc2}."),
           ("{name1}_then", "pipeline", "two_steps"), _two_steps),
    Family("filter_agg", "xs", R + "{body}", ("Return {doc}.",), ("select_total", "filtered", "pick"), _filter_agg),
    Family("str_pipeline", "s", R + "{expr}", ("Return {doc}.",), ("reshape", "format_word", "style"),
           _string_steps),
    Family("int_pipeline3", "x", R + "{expr}", ("{doc}.",), ("three_steps", "chain", "pipeline"), _three_steps),
    Family("map_filter", "xs", R + "{body}", ("{doc}",), ("select_map", "filter_map", "pick"), _map_filter),
)


def _example(lo: int, hi: int, op: str) -> Callable[[random.Random], dict]:
    def draw(rng: random.Random) -> dict:
        k, a = rng.randint(lo, hi), rng.randint(1, 12)
        out = {"+": a + k, "-": a - k, "*": a * k}[op]
        xs = [rng.randint(0, 9) for _ in range(2)]
        return {"k": k, "a": a, "out": out, "xs": xs, "ys": [x + k for x in xs]}
    return draw


# The constant is only shown through an example, so writing the body takes arithmetic, not copying.
BY_EXAMPLE = (
    Family("add_k_example", "x", R + "x + {k}", ("Return x plus a fixed number, so that {a} becomes {out}.",),
           ("add_const", "shift"), _example(1, 9, "+")),
    Family("sub_k_example", "x", R + "x - {k}", ("Return x minus a fixed number, so that {a} becomes {out}.",),
           ("sub_const", "lower_by"), _example(1, 9, "-")),
    Family("mul_k_example", "x", R + "x * {k}", ("Return x times a fixed number, so that {a} becomes {out}.",),
           ("scale", "mul_const"), _example(2, 9, "*")),
    Family("add_each_example", "xs", R + "[x + {k} for x in xs]",
           ("Add a fixed number to each element of xs, so that {xs} becomes {ys}.",), ("shift_all", "add_all"),
           _example(1, 9, "+")),
)
FAMILY_BY_FORM = {f.form: f for f in FAMILIES + COMPOSED + BY_EXAMPLE}
# Task-set (and training-example) weights: every simple family once, each composed family four times
# and each by-example family ten times: about a fifth of the tasks composed, two fifths by example.
TASK_WEIGHTS = {**{f.form: 1.0 for f in FAMILIES}, **{f.form: 4.0 for f in COMPOSED},
                **{f.form: 10.0 for f in BY_EXAMPLE}}


def _inputs(rng: random.Random, arg: str) -> tuple:
    if arg == "x":
        return (rng.randint(-20, 60),)
    if arg == "a, b":
        return (rng.randint(-20, 60), rng.randint(-20, 60))
    if arg == "s":
        return (rng.choice(WORDS) if rng.random() < 0.8 else rng.choice(WORDS).title(),)
    return ([rng.randint(0, 20) for _ in range(rng.randint(2, 6))],)


@dataclass(frozen=True)
class Function:
    """One concrete function: its header (signature and docstring), body and test calls."""

    form: str
    name: str
    header: str
    body: str
    tests: str


def make_function(rng: random.Random, family: Family) -> Function:
    """Returns a concrete function of `family` with its expected outputs computed from the reference body."""
    params = family.params(rng)
    name = rng.choice(family.names).format(**params) if rng.random() < 0.7 else rng.choice(GENERIC_NAMES)
    doc = rng.choice(family.docs).format(**params)
    header = f'def {name}({family.arg}):\n    """{doc}"""\n'
    body = family.body.format(**params) + "\n"
    namespace: dict = {}
    exec(header + body, namespace)  # our own reference body, never model output
    for _ in range(20):  # tests whose outputs all agree would pass a constant body
        calls = [_inputs(rng, family.arg) for _ in range(3)]
        if len({repr(namespace[name](*c)) for c in calls}) > 1:
            break
    tests = "\n".join(f"assert {name}({', '.join(map(repr, c))}) == {namespace[name](*c)!r}" for c in calls)
    return Function(family.form, name, header, body, tests + "\n")


def _spec(fn: Function) -> TaskSpec:
    return TaskSpec(kind="code", form=fn.form, prompt=fn.header, answer=fn.body, completion=fn.body,
                    tests=fn.tests, entry_point=fn.name)


SNIPPETS = (
    "numbers = {xs}\ntotal = 0\nfor n in numbers:\n    total += n\nprint(total)\n",
    "words = {ws}\nfor word in words:\n    print(word.upper())\n",
    "values = {xs}\nbig = [v for v in values if v > {k}]\nprint(len(big))\n",
    "count = 0\nwhile count < {k}:\n    count += 1\nprint(count)\n",
    "data = {{'name': '{w}', 'size': {k}}}\nfor key, value in data.items():\n    print(key, value)\n",
    "if {k} % 2 == 0:\n    print('even')\nelse:\n    print('odd')\n",
)


class CodeDomain:
    """Python functions with a signature and docstring; the model writes the body."""

    name = "code"
    kind = "code"

    def task(self, rng: random.Random) -> TaskSpec:
        form = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
        return _spec(make_function(rng, FAMILY_BY_FORM[form]))

    def calib_doc(self, rng: random.Random) -> CalibDoc:
        style = rng.random()
        if style < 0.75:
            fns = [make_function(rng, rng.choice(FAMILIES + COMPOSED + BY_EXAMPLE)) for _ in range(rng.randint(1, 3))]
            parts = [fn.header + fn.body + ("\n" + fn.tests if rng.random() < 0.5 else "") for fn in fns]
            text = ("# " + rng.choice(("helpers", "utilities", "small functions", "examples")) + "\n\n"
                    if rng.random() < 0.3 else "") + "\n\n".join(parts)
            return CalibDoc(text, tuple(_spec(fn).key for fn in fns))
        xs = [rng.randint(0, 20) for _ in range(rng.randint(3, 6))]
        ws = rng.sample(WORDS, 3)
        return CalibDoc(rng.choice(SNIPPETS).format(xs=xs, ws=ws, k=rng.randint(1, 9), w=rng.choice(WORDS)))
