"""Code tasks refuse to start where model-written code cannot be isolated, unless the caller opts in."""

from __future__ import annotations

import pytest

from banpick_cli.errors import SandboxUnavailable
from banpick_cli.evaluation.harness import EvalOptions, check_code_sandbox
from banpick_cli.tasks import sandbox
from banpick_cli.tasks.registry import load_task_set


def _no_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_available", lambda: (False, "user namespaces are disabled"))
    monkeypatch.delenv(sandbox.ALLOW_UNSAFE_ENV, raising=False)


def test_code_tasks_refuse_before_any_generation_and_name_the_flag(monkeypatch):
    _no_isolation(monkeypatch)
    code = load_task_set("code", limit=2)
    with pytest.raises(SandboxUnavailable, match="--allow-unsafe-code") as err:
        check_code_sandbox([code], EvalOptions())
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    check_code_sandbox([code], EvalOptions(allow_unsafe_code=True))  # the opt-in
    check_code_sandbox([load_task_set("math", limit=2)], EvalOptions())  # no code: nothing to isolate


def test_the_opt_in_runs_a_program_where_isolation_is_refused(monkeypatch):
    _no_isolation(monkeypatch)
    with pytest.raises(SandboxUnavailable):
        sandbox.run_tests("assert 1 + 1 == 2\n")
    assert sandbox.run_tests("assert 1 + 1 == 2\n", allow_unsafe=True).passed
