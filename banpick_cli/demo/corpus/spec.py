"""The shape every demo-domain generator produces: one task instance, before it gets an id."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class TaskSpec:
    """One generated task: the prompt, the checkable answer and the text a model should write."""

    kind: str  # "math" | "code" | "mc"
    form: str  # the generator's template family, for per-form accuracy breakdowns
    prompt: str
    answer: str
    completion: str  # the training target that follows `prompt` (ends without the EOS token)
    tests: str | None = None
    entry_point: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        """Returns the identity used to keep held-out tasks out of calibration and training text."""
        return normalise_key(self.prompt)

    @property
    def text(self) -> str:
        """Returns prompt and completion as one training document."""
        return self.prompt + self.completion


@dataclass(frozen=True)
class CalibDoc:
    """One calibration-style document and the keys of every task prompt written inside it."""

    text: str
    keys: tuple[str, ...] = ()


class DomainGenerator(Protocol):
    """What `banpick_cli.demo.corpus` needs from a domain: task instances and calibration prose."""

    name: str
    kind: str

    def task(self, rng: random.Random) -> TaskSpec: ...

    def calib_doc(self, rng: random.Random) -> CalibDoc: ...


def normalise_key(prompt: str) -> str:
    """Returns a prompt with case and whitespace folded, so trivial variants count as the same task."""
    return " ".join(prompt.lower().split())
