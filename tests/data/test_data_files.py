"""Bad calibration and task files: one line that names the file and what is wrong, never a traceback."""

from __future__ import annotations

import json

import pytest

from banpick_cli.data import get_domain, load_calibration_text
from banpick_cli.data.loading import check_data_file, root_cause
from banpick_cli.errors import DataError
from banpick_cli.tasks.registry import load_task_set

BINARY = bytes(range(256)) * 8
CASES = {
    "empty.jsonl": (b"", "is empty"),
    "empty.txt": (b"", "is empty"),
    "empty.csv": (b"", "is empty"),
    "blank.txt": (b"\n  \n\t\n", "holds no text"),
    "latin1.jsonl": ('{"text": "café"}\n'.encode("latin-1"), r"not UTF-8 text \(byte 0xe9 on line 1\)"),
    "latin1.txt": ("ok\nnaïve\n".encode("latin-1"), r"not UTF-8 text \(byte 0xef on line 2\)"),
    "latin1.csv": ("text\ncafé\n".encode("latin-1"), "not UTF-8 text"),
    "binary.txt": (BINARY, "is a binary file"),
    "binary.csv": (BINARY, "is a binary file"),
    "binary.jsonl": (BINARY, "is a binary file"),
    "binary.parquet": (BINARY, "is not a parquet file"),
    "numbers.json": (b"[1, 2, 3]", r"item 1 is a JSON int \(1\), not a record"),
    "scalar.json": (b'"just text"', "a single JSON str, not records"),
    "empty-list.json": (b"[]", "an empty JSON list"),
    "list-line.jsonl": (b'{"text": "a"}\n[1, 2]\n', r"line 2 is a JSON list"),
    "garbage.jsonl": (b'{"text": "a"}\nnot json\n', "line 2 is not JSON"),
    "numbers-field.jsonl": (b'{"text": 5}\n{"text": 6}\n', "field 'text' holds int values"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_calibration_file_is_one_line(tmp_path, name):
    content, message = CASES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_calibration_text(get_domain("math"), str(path), samples=8, seed=0)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_good_files_still_load(tmp_path):
    lines = tmp_path / "lines.json"  # JSON lines in a .json file, as datasets reads them
    lines.write_text('{"text": "a b"}\n{"text": "c d"}\n')
    assert sorted(load_calibration_text(get_domain("math"), str(lines), samples=8, seed=0).texts) == ["a b", "c d"]
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"text": "é x"}, {"text": "y"}]))
    assert sorted(load_calibration_text(get_domain("math"), str(records), samples=8, seed=0).texts) == ["y", "é x"]
    assert check_data_file(records) == "json"


def test_root_cause_reaches_the_innermost_reason():
    try:
        try:
            raise ValueError("the real reason\nmore")
        except ValueError as inner:
            raise RuntimeError("An error occurred while generating the dataset") from inner
    except RuntimeError as outer:
        assert root_cause(outer) == "the real reason"


@pytest.mark.parametrize("name", ["latin1.jsonl", "binary.jsonl", "empty.jsonl", "list-line.jsonl"])
def test_bad_task_file_is_one_line(tmp_path, name):
    content, _ = CASES[name]
    path = tmp_path / name
    path.write_bytes(content)
    for spec in (f"math={path}", str(path), f"gsm8k={path}"):
        with pytest.raises(DataError) as err:
            load_task_set(spec)
        assert "\n" not in str(err.value) and str(path) in str(err.value), str(err.value)


def test_fewer_texts_than_asked_is_noted(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": f"t {i}"}) + "\n" for i in range(5)))
    text = load_calibration_text(get_domain("math"), str(path), samples=99999999999999999999, seed=0)
    assert len(text.texts) == 5
    assert text.notes == (f"{path} has 5 non-empty texts, fewer than the 99999999999999999999 asked for (--samples); using all 5",)
    assert load_calibration_text(get_domain("math"), str(path), samples=5, seed=0).notes == ()
