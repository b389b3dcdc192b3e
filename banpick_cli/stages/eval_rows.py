"""The rows of a `banpick eval` run: its settings (`EvalSettings`) and what they expand into.

One row per method, or per value of its knob's sweep flag (--lambda, --tau, --k), or one row with the knob
solved for `target_avg_topk` on calibration text (`evaluation/budget.py`); the hyperparameters eval
computes for a method (DES thresholds, RICE's cognitive experts, ODP's key tokens) and the per-row
sessions that hold them. `stages/eval.py` runs the rows and builds the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from banpick_cli.evaluation.harness import EvalOptions
from banpick_cli.checks import at_least, number, one_of
from banpick_cli.errors import BadSetting
from banpick_cli.models.loading import LoadedModel
from banpick_cli.paths import DEMO_MODEL_NAME
from banpick_cli.runtime.methods import Method, get_method, names
from banpick_cli.stages.common import check_ban_knobs
from banpick_cli.tasks.registry import TaskSet

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


def domains(settings: EvalSettings, method: str, task_sets: list[TaskSet]) -> list[str | None]:
    """Returns the domains a method's plans are built for: [None] when it takes none, --domain, else the task sets'."""
    if not get_method(method).takes_domain:
        return [None]
    if settings.domain:
        return [settings.domain]
    missing = [t.name for t in task_sets if t.domain is None]
    if missing:
        raise BadSetting(f"task(s) {', '.join(missing)} mix domains: pass --domain for method '{method}'")
    return sorted({t.domain for t in task_sets})


def expand_rows(settings: EvalSettings, loaded: LoadedModel, profile, task_sets: list[TaskSet], notes: list[str]):
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
        domain = domains(settings, method, task_sets)[0]
        solved = solve_budget(method, target, loaded.router_specs(), calib.get("logits"), profile, domain=domain,
                              overrides=overrides)
        notes.extend(solved.notes)
        if domain is not None and len(domains(settings, method, task_sets)) > 1:
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
