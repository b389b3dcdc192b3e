"""The embedded demo domains (math, code, general): generators, held-out tasks and calibration text.

Everything is a function of one seed. Held-out tasks are drawn first; calibration and training text
are then drawn from the same generators with every held-out prompt excluded (compared by `TaskSpec.key`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from banpick_cli.demo.corpus.code_domain import CodeDomain
from banpick_cli.demo.corpus.general_domain import GeneralDomain
from banpick_cli.demo.corpus.math_domain import MathDomain
from banpick_cli.demo.corpus.spec import CalibDoc, DomainGenerator, TaskSpec
from banpick_cli.tasks.task import Task, write_tasks

DOMAINS: dict[str, DomainGenerator] = {"math": MathDomain(), "code": CodeDomain(), "general": GeneralDomain()}
DEFAULT_SEED = 0
N_TASKS = 150
N_CALIB = 400


@dataclass(frozen=True)
class DemoCorpus:
    """The held-out tasks and calibration texts of every demo domain, for one seed."""

    seed: int
    tasks: dict[str, tuple[TaskSpec, ...]]
    calib: dict[str, tuple[str, ...]]
    heldout_keys: frozenset[str]


def _rng(seed: int, domain: str, purpose: str) -> random.Random:
    # str seeds hash with sha512 in `random`, so the stream is the same in every process and Python version
    return random.Random(f"banpick-demo:{seed}:{domain}:{purpose}")


def heldout_tasks(domain: str, seed: int, n: int = N_TASKS) -> tuple[TaskSpec, ...]:
    """Returns `n` distinct held-out tasks of a domain (distinct by key)."""
    gen, rng = DOMAINS[domain], _rng(seed, domain, "tasks")
    seen: dict[str, TaskSpec] = {}
    while len(seen) < n:
        spec = gen.task(rng)
        seen.setdefault(spec.key, spec)
    return tuple(seen.values())


def calib_texts(domain: str, seed: int, exclude: frozenset[str], n: int = N_CALIB) -> tuple[str, ...]:
    """Returns `n` calibration documents of a domain, none of which contains an excluded task."""
    gen, rng = DOMAINS[domain], _rng(seed, domain, "calib")
    texts: list[str] = []
    while len(texts) < n:
        doc = gen.calib_doc(rng)
        if not exclude.intersection(doc.keys):
            texts.append(doc.text)
    return tuple(texts)


def build_demo_corpus(seed: int = DEFAULT_SEED, n_tasks: int = N_TASKS, n_calib: int = N_CALIB) -> DemoCorpus:
    """Returns the held-out tasks and calibration text of all domains for `seed`."""
    tasks = {d: heldout_tasks(d, seed, n_tasks) for d in DOMAINS}
    keys = frozenset(spec.key for specs in tasks.values() for spec in specs)
    calib = {d: calib_texts(d, seed, keys, n_calib) for d in DOMAINS}
    return DemoCorpus(seed, tasks, calib, keys)


def training_documents(
    corpus: DemoCorpus, domain: str, seed: int, task_fraction: float = 0.5
) -> Iterator[tuple[str, ...]]:
    """Yields training documents of a domain forever, each as text segments to tokenize separately.

    A task-formatted example is (prompt, completion), tokenized apart so the prompt's tokens match
    what the model sees at evaluation; a calibration-style document is one segment. Held-out tasks
    never appear in either.
    """
    gen, rng = DOMAINS[domain], _rng(seed, domain, "train")
    while True:
        if rng.random() < task_fraction:
            spec = gen.task(rng)
            if spec.key not in corpus.heldout_keys:
                yield (spec.prompt, spec.completion)
        else:
            doc: CalibDoc = gen.calib_doc(rng)
            if not corpus.heldout_keys.intersection(doc.keys):
                yield (doc.text,)


def task_objects(corpus: DemoCorpus, domain: str) -> list[Task]:
    """Returns a domain's held-out tasks as `Task`s with stable ids (`math-0001`, ...)."""
    return [
        Task(id=f"{domain}-{i:04d}", domain=domain, kind=spec.kind, prompt=spec.prompt, answer=spec.answer,
             tests=spec.tests, entry_point=spec.entry_point, choices=spec.choices, form=spec.form)
        for i, spec in enumerate(corpus.tasks[domain], start=1)
    ]


def write_demo_data(out_dir: str | Path, seed: int = DEFAULT_SEED) -> dict[str, dict[str, Path]]:
    """Writes `<out_dir>/<domain>/calib.jsonl` and `tasks.jsonl` for every domain; returns their paths."""
    corpus = build_demo_corpus(seed)
    written = {}
    for domain in DOMAINS:
        folder = Path(out_dir) / domain
        folder.mkdir(parents=True, exist_ok=True)
        calib, tasks = folder / "calib.jsonl", folder / "tasks.jsonl"
        calib.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus.calib[domain]),
                         encoding="utf-8")
        write_tasks(tasks, task_objects(corpus, domain))
        written[domain] = {"calib": calib, "tasks": tasks}
    return written


__all__ = [
    "DEFAULT_SEED", "DOMAINS", "DemoCorpus", "TaskSpec", "build_demo_corpus", "calib_texts", "heldout_tasks",
    "task_objects", "training_documents", "write_demo_data",
]
