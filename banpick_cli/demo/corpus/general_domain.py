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
    if form == "capital":
        country, right, wrong = _relation(rng, CAPITALS)
        return f"What is the capital of {country}?", right, wrong
    if form == "country_of":
        inverse = {v: k for k, v in CAPITALS.items()}
        city, right, wrong = _relation(rng, inverse)
        return f"{city} is the capital of which country?", right, wrong
    if form == "opposite":
        word, right, wrong = _relation(rng, OPPOSITES)
        return f"What is the opposite of {word}?", right, wrong
    if form == "sound":
        animal, right, wrong = _relation(rng, SOUNDS)
        return f"What sound does {_article(animal)} make?", right, wrong
    if form == "young":
        animal, right, wrong = _relation(rng, YOUNG)
        return f"What is a baby {animal} called?", right, wrong
    if form == "color_of":
        thing, right, wrong = _relation(rng, COLOR_OF)
        return f"What color is {thing}?", right, wrong
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
    if kind == 1:
        country = rng.choice(list(CAPITALS))
        return rng.choice((f"The capital of {country} is {CAPITALS[country]}.",
                           f"{CAPITALS[country]} is the capital city of {country}.",
                           f"Many people visit {CAPITALS[country]}, the capital of {country}."))
    if kind == 2:
        word = rng.choice(list(OPPOSITES))
        return rng.choice((f"The opposite of {word} is {OPPOSITES[word]}.",
                           f"{word.capitalize()} and {OPPOSITES[word]} are opposites."))
    if kind == 3:
        animal = rng.choice(list(SOUNDS))
        return rng.choice((f"{_article(animal).capitalize()} says {SOUNDS[animal]}.",
                           f"The sound {_article(animal)} makes is a {SOUNDS[animal]}."))
    if kind == 4:
        animal = rng.choice(list(YOUNG))
        return rng.choice((f"A baby {animal} is called {_article(YOUNG[animal])}.",
                           f"{_article(YOUNG[animal]).capitalize()} is a young {animal}."))
    if kind == 5:
        thing = rng.choice(list(COLOR_OF))
        return f"{thing[0].upper() + thing[1:]} is {COLOR_OF[thing]}."
    job = rng.choice(list(WORKPLACE))
    return rng.choice((f"{_article(job).capitalize()} works at {_article(WORKPLACE[job])}.",
                       f"You can meet {_article(job)} at the {WORKPLACE[job]}."))


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
