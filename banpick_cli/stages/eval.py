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

from banpick_cli.evaluation.harness import EvalOptions, check_code_sandbox, MethodRun, require_answers, run_method, run_tasks
from banpick_cli.checks import at_least, number, one_of
from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.models.loading import LoadedModel, check_model, load_model
from banpick_cli.passes.cost import expert_width
from banpick_cli.paths import DEMO_MODEL_NAME
from banpick_cli.progress import ProgressFn, silent
from banpick_cli.runtime.methods import Method, get_method, names
from banpick_cli.stages.common import check_ban_knobs, lifecycle
from banpick_cli.tasks.registry import TaskSet, load_task_set

PICK_STRATEGIES = ("A", "B", "C", "D", "E")
# Hyperparameters eval computes from calibration text (or per row) when a method requires them.
CALIBRATED = ("thresholds", "cognitive_experts", "key_tokens")


@dataclass(frozen=True)
class EvalSettings:
    """Settings of one `eval` run; every list flag is a tuple here. Validated at construction."""

    tasks: tuple[str, ...]
    methods: tuple[str, ...] = ("baseline",)
    domain: str | None = None
    lambdas: tuple[float, ...] = ()  # empty: the profile's setting, else the routing core's default
    k_min: int | None = None
    taus: tuple[float, ...] = (0.7, 0.8, 0.9)  # appendix E.1: dynamic routing at each
    ks: tuple[int, ...] = ()  # fixed-k: one row per k
    target_avg_topk: float | None = None  # matched budgets: solve each budgeted method's knob for this Avg-TopK
    strategy: str | None = None  # Pick: override the profile's strategy
    range_factor: float | None = None
    limit: int | None = None
    offset: int = 0
    calib_data: str | None = None  # DES medians / RICE nPMI: default the tasks' domains' calibration text
    calib_samples: int = 64
    odp_protect: float = 0.02
    rice_markers: tuple[str, ...] = ()
    rice_factor: float = 2.0
    rice_top: int = 2
    warmup: bool = True
    repeats: int = 1  # timing passes; each method's tokens/s is the median (passes interleave the methods)
    batch_aware: bool = False  # also each pruning row with the batch-aware step after it ("+batch")
    options: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise BadSetting("--task: give at least one task set")
        known = names()
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise BadSetting(f"--method: unknown {', '.join(unknown) or '(none)'}; known: {', '.join(known)}")
        for lam in self.lambdas:
            check_ban_knobs(lam=lam)
        for tau in self.taus:
            number("--tau", tau, low=0, high=1, low_open=True)
        if self.k_min is not None:
            check_ban_knobs(k_min=self.k_min)
        if self.strategy is not None:
            one_of("--strategy", self.strategy, PICK_STRATEGIES)
        if self.range_factor is not None:
            number("--range-factor", self.range_factor, low=0, low_open=True)
        at_least((("--calib-samples", self.calib_samples, 1), ("--rice-top", self.rice_top, 1),
                  ("--repeats", self.repeats, 1)))
        number("--odp-protect", self.odp_protect, low=0, high=1)
        number("--rice-factor", self.rice_factor, low=0, low_open=True)
        for k in self.ks:
            number("--k", k, low=1, integer=True)
        if self.target_avg_topk is not None:
            number("--target-avg-topk", self.target_avg_topk, low=1)
            for flag, given in (("--lambda", self.lambdas), ("--k", self.ks)):
                if given:
                    raise BadSetting(f"{flag} and --target-avg-topk both set the budget: give one")
        else:  # a method whose budget knob has no default and no calibration needs its sweep flag
            for name in self.methods:
                knob = get_method(name).knob
                if knob is not None and knob.name in get_method(name).required and knob.name not in CALIBRATED \
                        and not self.sweep(knob.name):
                    raise BadSetting(f"--method {name} needs {knob.flag or knob.name} (e.g. {knob.flag} 4,5,6) or "
                                     "--target-avg-topk")

    def sweep(self, knob: str) -> tuple[Any, ...]:
        """Returns the values eval's list flag gives a budget knob (--lambda, --tau, --k): one row each."""
        return {"lam": self.lambdas, "tau": self.taus, "k": self.ks}.get(knob, ())

    def given(self) -> dict[str, Any]:
        """Returns the hyperparameters the flags set for every method that accepts them (None: not given)."""
        found = {"k_min": self.k_min, "strategy": self.strategy, "range_factor": self.range_factor,
                 "factor": self.rice_factor}
        return {k: v for k, v in found.items() if v is not None}


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
    rows = _expand(settings, loaded, prof, task_sets, notes)
    specs = loaded.router_specs()
    for label, method, overrides, _ in rows:  # pre-flight: every plan builds, or we stop here
        for domain in _domains(settings, method, task_sets):
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


def _domains(settings: EvalSettings, method: str, task_sets: list[TaskSet]) -> list[str | None]:
    if not get_method(method).takes_domain:
        return [None]
    if settings.domain:
        return [settings.domain]
    missing = [t.name for t in task_sets if t.domain is None]
    if missing:
        raise BadSetting(f"task(s) {', '.join(missing)} mix domains: pass --domain for method '{method}'")
    return sorted({t.domain for t in task_sets})


def _expand(settings: EvalSettings, loaded: LoadedModel, profile, task_sets: list[TaskSet], notes: list[str]):
    """Returns [(label, method, overrides, session)], baseline first; a session sets up per-row state.

    Each method's rows follow its record: at a target budget, one row with its knob solved; else one row
    per value of its knob's sweep flag (--lambda, --tau, --k), else one row. Hyperparameters the flags give
    go to every method that accepts them; required ones eval can compute (CALIBRATED) are computed.
    """
    from contextlib import nullcontext

    def plain():
        return nullcontext({})

    rows: list[tuple[str, str, dict[str, Any], Any]] = [("baseline", "baseline", {}, plain)]
    calib: dict[str, Any] = {}
    target = settings.target_avg_topk

    def budget(method: str, overrides: dict[str, Any], session=plain):
        """Returns (label, overrides, session) of `method` at the target budget, solved on calibration text."""
        from banpick_cli.evaluation.budget import balanced, collect_router_logits, solve_budget

        if "logits" not in calib and get_method(method).knob.search != "layer_mix":  # each domain's tokens weigh the same
            calib["logits"] = balanced([collect_router_logits(loaded, texts, batch_size=settings.options.batch_size)
                                        for texts in _calib_texts_by_domain(settings, loaded, task_sets).values()])
        domain = _domains(settings, method, task_sets)[0]
        solved = solve_budget(method, target, loaded.router_specs(), calib.get("logits"), profile, domain=domain,
                              overrides=overrides)
        notes.extend(solved.notes)
        if domain is not None and len(_domains(settings, method, task_sets)) > 1:
            notes.append(f"{solved.label}: knob solved with domain {domain}'s key experts")
        record = {"target_avg_topk": target, "expected_avg_topk": round(solved.expected, 3)}
        return solved.label, {**overrides, **solved.overrides}, _reporting(session, record)

    for method in dict.fromkeys(settings.methods):
        record = get_method(method)
        if record.rules is None:  # the model's own routing: the baseline row
            continue
        accepted = set(record.params())
        given = {k: v for k, v in settings.given().items() if k in accepted}
        knob = record.knob
        solving = target is not None and knob is not None
        computed, session = _calibrated(settings, loaded, task_sets, record, calib, notes,
                                        skip=knob.name if solving else None)
        if solving:
            label, overrides, session = budget(method, {**given, **computed}, session)
            rows.append((label, method, overrides, session))
            continue
        if target is not None:
            notes.append(f"{method} has no expert budget: it runs at its own Avg-TopK")
        values = settings.sweep(knob.name) if knob is not None else ()
        if values:
            for value in values:
                rows.append((knob.label(record.label, value), method, {**given, **computed, knob.name: value}, session))
        else:
            rows.append((record.row_label({**settings.given(), **given}), method, {**given, **computed}, session))
    if settings.batch_aware:  # each pruning row again, the batch-aware step after it, right beside it
        twins = []
        for label, method, overrides, session in rows:
            twins.append((label, method, overrides, session))
            if get_method(method).knob is not None:
                twins.append((f"{label}+batch", method, {**overrides, "batch_aware": True}, session))
        rows = twins
    return rows


def _calibrated(settings: EvalSettings, loaded: LoadedModel, task_sets: list[TaskSet], record: Method,
                calib: dict[str, Any], notes: list[str], *, skip: str | None):
    """Returns (hyperparameters, session) for what `record` requires and eval computes (CALIBRATED), but `skip`."""
    from contextlib import nullcontext

    computed: dict[str, Any] = {}
    session = lambda: nullcontext({})  # noqa: E731
    needs = [name for name in record.required if name in CALIBRATED and name != skip]
    if "thresholds" in needs:  # DES medians on calibration text, shared by every method that needs them
        if "des" not in calib:
            calib["des"] = _des_thresholds(settings, loaded, task_sets)
        computed["thresholds"] = calib["des"]
    if "cognitive_experts" in needs:
        from banpick_cli.passes.baseline_params import rice_cognitive_experts

        experts, _ = rice_cognitive_experts(loaded, _calib_texts(settings, loaded, task_sets),
                                            settings.rice_markers or None, top=settings.rice_top)
        where = [(int(m), int(e)) for m, e in experts.nonzero().tolist()]
        notes.append(f"{record.name} cognitive experts (moe layer, expert): " + ", ".join(f"L{m}E{e}" for m, e in where))
        computed["cognitive_experts"] = experts
    if "key_tokens" in record.required:  # chosen per batch by hooks that live as long as the row runs
        session = _odp_session(loaded, settings.odp_protect)
    return computed, session


def _reporting(session, record: dict[str, Any]):
    """Returns `session` with `record` added to what its row reports (its `extra`)."""
    from contextlib import contextmanager

    @contextmanager
    def wrapped():
        with session() as state:
            report = state.get("report")
            yield {**state, "report": lambda: {**(report() if report else {}), **record}}

    return wrapped


def _odp_session(loaded: LoadedModel, protect: float):
    from contextlib import contextmanager

    from banpick_cli.passes.baseline_params import odp_session

    @contextmanager
    def session():
        with odp_session(loaded, protect) as provider:
            state = {"overrides": {"key_tokens": provider}}
            state["report"] = lambda: {"odp_key_tokens": provider.protected, "odp_routed": provider.routed}
            yield state

    return session


def _calib_texts(settings: EvalSettings, loaded: LoadedModel, task_sets: list[TaskSet]) -> list[str]:
    """Returns calibration text for DES/RICE: --calib-data, else each task domain's own (embedded for the demo)."""
    return [text for texts in _calib_texts_by_domain(settings, loaded, task_sets).values() for text in texts]


def _calib_texts_by_domain(settings: EvalSettings, loaded: LoadedModel, task_sets: list[TaskSet]) -> dict[str, list[str]]:
    """Returns {domain: calibration texts}, --calib-samples shared out over the domains."""
    from banpick_cli.data import get_domain, load_calibration_text
    from banpick_cli.errors import DataError

    names = [settings.domain] if settings.domain else sorted({t.domain for t in task_sets if t.domain})
    if not names:
        raise DataError("DES/RICE need calibration text: pass --calib-data or --domain")
    demo = loaded.identity.name_or_path == DEMO_MODEL_NAME
    share = [settings.calib_samples // len(names) + (i < settings.calib_samples % len(names)) for i in range(len(names))]
    texts: dict[str, list[str]] = {}
    for name, n in zip(names, share):
        if n:
            texts[name] = load_calibration_text(get_domain(name), settings.calib_data, samples=n, seed=0,
                                                use_embedded=demo).texts
    return texts


def _des_thresholds(settings: EvalSettings, loaded: LoadedModel, task_sets: list[TaskSet]):
    from banpick_cli.passes.baseline_params import des_calibration

    return des_calibration(loaded, _calib_texts(settings, loaded, task_sets), batch_size=settings.options.batch_size)
