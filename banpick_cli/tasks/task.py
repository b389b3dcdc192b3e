"""A held-out task (math, code or multiple choice) and its JSON-lines file format."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from banpick_cli.checks import missing_file
from banpick_cli.errors import DataError

KINDS = ("math", "code", "mc")
_FIELDS = {"id", "domain", "kind", "prompt", "answer", "tests", "entry_point", "choices", "form"}


@dataclass(frozen=True)
class Task:
    """One problem with a checkable answer; `tests`/`entry_point` for code, `choices` for mc."""

    id: str
    domain: str
    kind: str
    prompt: str
    answer: str
    tests: str | None = None
    entry_point: str | None = None
    choices: tuple[str, ...] | None = None
    form: str | None = None  # the generator's template family, when the task is generated

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"task {self.id}: kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        if self.kind == "code" and not (self.tests and self.entry_point):
            raise DataError(f"task {self.id}: a code task needs 'tests' and 'entry_point'")
        if self.kind == "mc" and not (self.choices and 2 <= len(self.choices) <= 26):
            raise DataError(f"task {self.id}: a multiple-choice task needs 2 to 26 'choices'")

    def to_record(self) -> dict:
        """Returns the task as one JSON-lines record, leaving out fields it does not use."""
        record = {k: v for k, v in asdict(self).items() if v is not None}
        if self.choices is not None:
            record["choices"] = list(self.choices)
        return record


def load_tasks(path: str | Path) -> list[Task]:
    """Returns the tasks of a JSON-lines file, one object per line, in file order."""
    path = Path(path)
    from banpick_cli.data.loading import check_utf8_text

    problem = missing_file("task file", path)
    if problem:
        raise DataError(problem)
    try:
        check_utf8_text(path)  # binary or non-UTF-8 files: one line naming the byte, not a traceback
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    tasks = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{path}:{number}: a JSON {type(raw).__name__}, not a task object")
        missing = {"id", "domain", "kind", "prompt", "answer"} - set(raw)
        unknown = set(raw) - _FIELDS
        if missing or unknown:
            raise DataError(f"{path}:{number}: missing {sorted(missing)} / unknown {sorted(unknown)} field(s)")
        if raw.get("choices") is not None:
            raw["choices"] = tuple(raw["choices"])
        tasks.append(Task(**raw))
    if not tasks:
        raise DataError(f"{path}: no tasks")
    return tasks


def write_tasks(path: str | Path, tasks: list[Task]) -> None:
    """Writes tasks as JSON lines (the format `load_tasks` reads)."""
    from banpick_cli.outputs import write_text_atomic

    lines = [json.dumps(t.to_record(), ensure_ascii=False) for t in tasks]
    write_text_atomic(path, "\n".join(lines) + "\n")
