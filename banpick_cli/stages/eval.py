"""`banpick eval`: accuracy, Avg-TopK and speed of routing methods on task sets, in one run.

The table has the shape of the paper's Tables 2 and 3: one row per method (a swept hyperparameter
gives one row per value: Ban at each lambda, Dynamic at each tau), Avg-TopK, accuracy per task set,
tokens/s and the speed ratio against the baseline measured in the same process, on the same device,
right before. The speed ratio is per position the model computed (prompt and generated positions,
padding and rows that already ended included), so a method whose answers run longer is not counted
slower for that; `time_ratio` in the JSON is the paper's total-time ratio.

`target_avg_topk` compares methods at one expert budget: each budgeted method's knob (Fixed-K's k,
Ban's lambda, Dynamic's tau, DES/ODP's thresholds) is solved on router logits of calibration text
(`evaluation/budget.py`), never on the tasks; each row reports the Avg-TopK it actually ran. Every row
carries its paired comparison with the baseline on the same tasks (`evaluation/stats.py`): the 95%
bootstrap interval of the accuracy change and an exact McNemar p-value.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from banpick_cli.evaluation.harness import check_code_sandbox, MethodRun, require_answers, run_method, run_tasks
from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.models.loading import LoadedModel, check_model, load_model
from banpick_cli.passes.cost import expert_width
from banpick_cli.paths import DEMO_MODEL_NAME
from banpick_cli.progress import ProgressFn, silent
from banpick_cli.runtime.methods import get_method
from banpick_cli.stages.common import lifecycle
from banpick_cli.stages.eval_rows import EvalSettings, domains, expand_rows
from banpick_cli.tasks.registry import TaskSet, load_task_set


@dataclass
class EvalReport:
    """What an eval run produced: one row per method setting, the baseline first."""

    model: str
    profile: str | None
    device: str
    task_sets: list[TaskSet]
    rows: list[MethodRun]
    settings: EvalSettings
    wall_s: float
    notes: list[str] = field(default_factory=list)
    expert_width: int = 0  # the model's expert FFN width: whether speed can show expert compute (the CLI decides)

    @property
    def baseline(self) -> MethodRun:
        return self.rows[0]

    def speedup(self, row: MethodRun) -> float:
        """Returns the row's positions/s over the baseline's (same run, same device)."""
        base = self.baseline.positions_per_s
        return row.positions_per_s / base if base > 0 else 0.0

    def time_ratio(self, row: MethodRun) -> float:
        """Returns baseline time over the row's time (the paper's speedup; confounded by answer length)."""
        return self.baseline.seconds / row.seconds if row.seconds > 0 else 0.0

    def compare(self, row: MethodRun):
        """Returns (over all task sets, per task set): the row's paired comparison with the baseline."""
        from banpick_cli.evaluation.stats import compare_sets

        def outcomes(r: MethodRun) -> dict[str, list[bool]]:
            return {name: [o.correct for o in run.outcomes] for name, run in r.runs.items()}

        return compare_sets(outcomes(self.baseline), outcomes(row))

    def to_dict(self) -> dict[str, Any]:
        """Returns the table as JSON-friendly data (what `--json` prints)."""
        base = self.baseline
        rows = []
        for row in self.rows:
            overall, per_set = self.compare(row)
            results = {}
            for name, run in row.runs.items():
                base_run = base.runs[name]
                results[name] = {
                    "accuracy": round(100 * run.accuracy, 2), "correct": run.correct, "n": len(run.outcomes),
                    "answered": run.answered, "no_answers": run.no_answers(),
                    "delta": round(100 * (run.accuracy - base_run.accuracy), 2),
                    "ci95": per_set[name].to_dict()["ci95"], "p_value": per_set[name].to_dict()["p_value"],
                    "tokens": run.tokens, "seconds": round(run.seconds, 3),
                }
            stats = overall.to_dict()
            rows.append({
                "label": row.label, "method": row.method, "params": row.params, "avg_topk": round(row.avg_topk, 3),
                "unique_experts": round(row.unique_experts, 3),
                "experts_vs_baseline": round(row.avg_topk / base.avg_topk, 3) if base.avg_topk else 0.0,
                "accuracy": stats["accuracy"], "delta": stats["delta"], "ci95": stats["ci95"],
                "p_value": stats["p_value"],
                "tokens": row.tokens, "seconds": round(row.seconds, 3), "tokens_per_s": round(row.tokens_per_s, 1),
                "positions": row.positions, "positions_per_s": round(row.positions_per_s, 1),
                "speedup": round(self.speedup(row), 3), "time_ratio": round(self.time_ratio(row), 3), "results": results, **({"extra": row.extra} if row.extra else {}),
            })
        settings = asdict(self.settings)
        return {
            "model": self.model, "profile": self.profile, "device": self.device, "wall_s": round(self.wall_s, 2),
            "tasks": {t.name: {"source": t.source, "n": len(t.tasks), "domain": t.domain} for t in self.task_sets},
            "task_order": [t.name for t in self.task_sets],  # JSON output sorts keys; this keeps --task's order
            "rows": rows, "settings": settings, "notes": self.notes, "expert_width": self.expert_width,
        }


def run_eval(
    settings: EvalSettings,
    *,
    model: str = DEMO_MODEL_NAME,
    profile: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    loaded: LoadedModel | None = None,
    progress: ProgressFn = silent,
) -> EvalReport:
    """Runs the baseline, then every requested method setting, on every task set; returns the table.

    Task sets, the profile and every routing plan are checked before the first generation, so a
    missing tensor is reported (naming the stage that writes it) before any long run. Ctrl-C or SIGTERM
    raises Interrupted (exit 3): eval saves nothing until its table is done.
    """
    with lifecycle("eval"):
        return _run_eval(settings, model=model, profile=profile, device=device, dtype=dtype, loaded=loaded,
                         progress=progress)


def _run_eval(settings: EvalSettings, *, model: str, profile: str | Path | None, device: str, dtype: str,
              loaded: LoadedModel | None, progress: ProgressFn) -> EvalReport:
    from banpick_cli.profile.format import new_profile, read_profile
    from banpick_cli.runtime import build_plan

    start = time.perf_counter()
    task_sets = _distinct([load_task_set(spec, limit=settings.limit, offset=settings.offset) for spec in settings.tasks])
    check_code_sandbox(task_sets, settings.options)
    needing = [m for m in settings.methods if get_method(m).needs_profile]
    if profile is None and needing:
        raise ProfileError(f"method(s) {', '.join(needing)} need a routing profile: pass --profile "
                           "(made by `banpick profile`, `kl-scan`, `layer-sensitivity`, `failure-probe`)")
    if settings.target_avg_topk is not None:  # whatever the methods: a budget this model cannot run is refused
        from banpick_cli.evaluation.budget import check_target

        if loaded is not None:
            k_base = loaded.routing.top_k
        else:
            _, config, adapter = check_model(model)
            k_base = adapter.routing_config(config).top_k
        check_target(settings.target_avg_topk, k_base)
    if loaded is None:
        loaded = load_model(model, device=device, dtype=dtype)
    # Methods that read no profile tensor (dynamic, DES, ODP, RICE) still go through the runtime's
    # plan, which checks shapes against a profile: an empty one of this model stands in.
    prof = (read_profile(profile, fingerprint=loaded.fingerprint) if profile is not None
            else new_profile(loaded.identity, loaded.fingerprint))
    notes: list[str] = []
    rows = expand_rows(settings, loaded, prof, task_sets, notes)
    specs = loaded.router_specs()
    for label, method, overrides, _ in rows:  # pre-flight: every plan builds, or we stop here
        for domain in domains(settings, method, task_sets):
            build_plan(prof, specs, method, domain, **{k: v for k, v in overrides.items() if k != "key_tokens"},
                       **({"key_tokens": lambda n: None} if "key_tokens" in get_method(method).required else {}))
    if settings.warmup:  # the first generate call pays one-off costs; keep them out of the baseline's time
        run_tasks(loaded, task_sets[0], settings.options, tasks=task_sets[0].tasks[: settings.options.batch_size])
    results = []
    for label, method, overrides, session in rows:
        with session() as state:  # per-row state: ODP's key-token hooks; nothing for the others
            run = run_method(loaded, prof, method, task_sets, settings.options, label=label, domain=settings.domain,
                             overrides={**overrides, **state.get("overrides", {})}, progress=progress)
            if "report" in state:
                run.extra.update(state["report"]())
        results.append(run)
    if settings.repeats > 1:
        _time_again(settings, loaded, prof, rows, task_sets, results)
    for name, run in results[0].runs.items():
        require_answers(run, "baseline")
    target = settings.target_avg_topk
    for row in results[1:]:
        if target is not None and "target_avg_topk" in row.extra and abs(row.avg_topk - target) > 0.2:
            notes.append(f"{row.label}: ran {row.avg_topk:.2f} experts per token on the tasks, more than 0.2 from the "
                         f"target {target:g} it reached on the calibration text ({row.extra['expected_avg_topk']:.2f})")
    for row in results[1:]:
        for name, run in row.runs.items():
            if run.no_answers():
                notes.append(f"{row.label} on {name}: no task answered in the expected form (shown as n/a, not 0%)")
    return EvalReport(loaded.identity.name_or_path if model == DEMO_MODEL_NAME else model,
                      str(profile) if profile else None, str(loaded.device), task_sets, results, settings,
                      time.perf_counter() - start, notes, expert_width=expert_width(loaded.model.config))


def _time_again(settings: EvalSettings, loaded: LoadedModel, prof, rows, task_sets: list[TaskSet],
                results: list[MethodRun]) -> None:
    """Reruns every method settings.repeats - 1 more times, round-robin, and keeps each run's median
    positions/s (as its seconds): background load then falls on every method alike. Accuracy stays the
    first pass's (greedy decoding gives the same answers every pass)."""
    rates: list[dict[str, list[float]]] = [{name: [run.positions_per_s] for name, run in r.runs.items()} for r in results]
    for _ in range(settings.repeats - 1):
        for i, (label, method, overrides, session) in enumerate(rows):
            with session() as state:
                again = run_method(loaded, prof, method, task_sets, settings.options, label=label,
                                   domain=settings.domain, overrides={**overrides, **state.get("overrides", {})})
            for name, run in again.runs.items():
                rates[i][name].append(run.positions_per_s)
    for result, rate in zip(results, rates):
        for name, run in result.runs.items():
            median = statistics.median(rate[name])
            run.seconds = run.positions / median if median > 0 else run.seconds
        result.extra["timing_passes"] = settings.repeats


def _distinct(task_sets: list[TaskSet]) -> list[TaskSet]:
    """Returns the task sets with distinct names: files of the same name get their folder's ("math/tasks")."""
    import dataclasses

    names = [t.name for t in task_sets]
    out = []
    for i, t in enumerate(task_sets):
        if names.count(t.name) > 1:
            folder = Path(t.source).parent.name if Path(t.source).exists() else ""
            t = dataclasses.replace(t, name=f"{folder}/{t.name}" if folder else f"{t.name}#{i + 1}")
        out.append(t)
    if len({t.name for t in out}) < len(out):
        raise BadSetting("--task: the same task set is given twice")
    return out
