"""General domain: English sentences about a small world, and four-way multiple-choice questions on it."""

from __future__ import annotations

import random

from banpick_cli.demo.corpus.general_facts import (
    ADJECTIVES, CAPITALS, CATEGORIES, COLOR_OF, FEELINGS, OPPOSITES, PEOPLE, PLACES, SOUNDS, WORKPLACE, YOUNG,
)
from banpick_cli.demo.corpus.spec import CalibDoc, TaskSpec

LETTERS = "ABCD"
TASK_FORMS = {
    "member": 1.5, "not_member": 1.5, "category_of": 1.0, "capital": 1.0, "country_of": 0.75, "opposite": 1.0,
    "sound": 0.75, "young": 0.75, "color_of": 0.5, "workplace": 0.75,
}


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _category_of(member: str) -> str:
    return next(label for label, members in CATEGORIES.items() if member in members)


def _outsiders(rng: random.Random, label: str, n: int) -> list[str]:
    labels = rng.sample([x for x in CATEGORIES if x != label], n)
    return [rng.choice(CATEGORIES[x]) for x in labels]


def _relation(rng: random.Random, table: dict[str, str]) -> tuple[str, str, list[str]]:
    key = rng.choice(list(table))
    wrong = rng.sample([v for k, v in table.items() if k != key and v != table[key]], 3)
    return key, table[key], wrong


RELATIONS = {  # form -> (table, the question about a key)
    "capital": (CAPITALS, lambda country: f"What is the capital of {country}?"),
    "country_of": ({v: k for k, v in CAPITALS.items()}, lambda city: f"{city} is the capital of which country?"),
    "opposite": (OPPOSITES, lambda word: f"What is the opposite of {word}?"),
    "sound": (SOUNDS, lambda animal: f"What sound does {_article(animal)} make?"),
    "young": (YOUNG, lambda animal: f"What is a baby {animal} called?"),
    "color_of": (COLOR_OF, lambda thing: f"What color is {thing}?"),
}


def make_question(rng: random.Random, form: str) -> tuple[str, str, list[str]]:
    """Returns (question, right option, three wrong options) of the named form."""
    if form == "member":
        label = rng.choice(list(CATEGORIES))
        return f"Which of the following is {_article(label)}?", rng.choice(CATEGORIES[label]), _outsiders(rng, label, 3)
    if form == "not_member":
        label = rng.choice(list(CATEGORIES))
        return (f"Which of the following is not {_article(label)}?", _outsiders(rng, label, 1)[0],
                rng.sample(CATEGORIES[label], 3))
    if form == "category_of":
        member = rng.choice([m for ms in CATEGORIES.values() for m in ms])
        label = _category_of(member)
        wrong = rng.sample([x for x in CATEGORIES if x != label], 3)
        return f"What is {_article(member) if member.islower() else member}?", _article(label), [_article(w) for w in wrong]
    if form in RELATIONS:  # a question about one entry of a table, its other values the wrong options
        table, ask = RELATIONS[form]
        key, right, wrong = _relation(rng, table)
        return ask(key), right, wrong
    job, right, wrong = _relation(rng, WORKPLACE)
    return f"Where does {_article(job)} work?", _article(right), [_article(w) for w in wrong]


def _spec(rng: random.Random, form: str) -> TaskSpec:
    question, right, wrong = make_question(rng, form)
    choices = [right, *wrong]
    rng.shuffle(choices)
    letter = LETTERS[choices.index(right)]
    lines = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    # The model answers with the option's text and the scorer maps it to its letter: a 4-layer model of
    # this size learns the facts but not, in its training budget, the lookup from an option to its letter.
    return TaskSpec(kind="mc", form=form, prompt=f"Question: {question}\n{lines}\nAnswer:", answer=letter,
                    completion=f" {right}.", choices=tuple(choices))


def _fact(rng: random.Random) -> str:
    """Returns one true sentence about the world, in one of several phrasings."""
    kind = rng.randrange(7)
    if kind == 0:
        label = rng.choice(list(CATEGORIES))
        member = rng.choice(CATEGORIES[label])
        return rng.choice((f"{_article(member).capitalize()} is a kind of {label}.",
                           f"The {member} is {_article(label)}.",
                           f"{member[0].upper() + member[1:]} is one example of {_article(label)}."))
    table, phrasings = FACTS[kind - 1]
    key = rng.choice(list(table))
    said = tuple(say(key, table[key]) for say in phrasings)
    return said[0] if len(said) == 1 else rng.choice(said)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


FACTS = (  # _fact's kinds 1-6: (table, the phrasings of one entry)
    (CAPITALS, (lambda c, city: f"The capital of {c} is {city}.", lambda c, city: f"{city} is the capital city of {c}.",
                lambda c, city: f"Many people visit {city}, the capital of {c}.")),
    (OPPOSITES, (lambda w, o: f"The opposite of {w} is {o}.", lambda w, o: f"{w.capitalize()} and {o} are opposites.")),
    (SOUNDS, (lambda a, s: f"{_article(a).capitalize()} says {s}.", lambda a, s: f"The sound {_article(a)} makes is a {s}.")),
    (YOUNG, (lambda a, y: f"A baby {a} is called {_article(y)}.", lambda a, y: f"{_article(y).capitalize()} is a young {a}.")),
    (COLOR_OF, (lambda t, c: f"{_cap(t)} is {c}.",)),
    (WORKPLACE, (lambda j, w: f"{_article(j).capitalize()} works at {_article(w)}.",
                 lambda j, w: f"You can meet {_article(j)} at the {w}.")),
)


def _story(rng: random.Random) -> str:
    name, pron, poss = rng.choice(PEOPLE)
    place, other = rng.sample(PLACES, 2)
    fruit, animal = rng.choice(CATEGORIES["fruit"]), rng.choice(CATEGORIES["animal"])
    color, drink = rng.choice(CATEGORIES["color"]), rng.choice(CATEGORIES["drink"])
    sentences = [
        f"On a {rng.choice(ADJECTIVES)} morning, {name} went to the {place}.",
        f"{pron} carried {_article(fruit)} in {poss} {color} bag.",
        f"Near the {place}, {name} saw {_article(animal)} and felt {rng.choice(FEELINGS)}.",
        f"Later {pron.lower()} walked to the {other} and drank some {drink}.",
        f"When the day was over, {name} was {rng.choice(FEELINGS)} and went home.",
    ]
    keep = sorted(rng.sample(range(len(sentences)), rng.randint(3, 5)))
    return " ".join(sentences[i] for i in keep)


class GeneralDomain:
    """Facts and short stories about a small world; questions with one right letter of four."""

    name = "general"
    kind = "mc"

    def task(self, rng: random.Random) -> TaskSpec:
        return _spec(rng, rng.choices(list(TASK_FORMS), weights=list(TASK_FORMS.values()))[0])

    def calib_doc(self, rng: random.Random) -> CalibDoc:
        if rng.random() < 0.5:
            return CalibDoc(" ".join(_fact(rng) for _ in range(rng.randint(3, 6))))
        return CalibDoc(_story(rng))
