"""`banpick failure-probe`: accuracy gain of each candidate expert on the failure set, then the key experts.

Section 4.2: evaluate the unmodified model on a task set; the problems it gets wrong are the failure
set. Each candidate expert of the domain (the profile's `candidates`) is then forced in with the
chosen Pick strategy, alone, and the failure set is evaluated again; its gain is the fraction of
the failure set it turns right. Key experts come from KL and gain together:

    key(e)  <=>  fixed(e) >= min_fixed                      (it turns at least this many failures right)
            and  KL(e) >= the kl_quantile-quantile of KL over the probed candidates
                                                           (a substantial distribution shift, 4.2)
    then, by gain (ties: larger KL), at most max_per_layer per layer and max_key in all (0: no cap).

`--kl-quantile 0` drops the KL condition (gain alone; no kl-scan needed). The gain counts only
failures fixed, not successes broken; `eval` measures the whole task set.

Resumable per candidate: after the baseline and after every candidate, the counts go to a sidecar next
to the profile, stamped with the model, the tasks and these settings; a rerun resumes after the last
candidate done. The profile is written once, at the end.
"""

from __future__ import annotations

import copy
from typing import Unpack
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from banpick_cli.passes.resume import Partial, Sidecar, run_fingerprint
from banpick_cli.stages.common import ModelArgs, check_model_first, lifecycle, open_for_update, provenance, store
from banpick_cli.evaluation.harness import EvalOptions, check_code_sandbox, TaskRun, require_answers, run_tasks
from banpick_cli.checks import at_least, domain_name, expert_choice, number, one_of
from banpick_cli.errors import BanpickError, ProfileError
from banpick_cli.models.loading import LoadedModel, load_model
from banpick_cli.paths import DEMO_MODEL_NAME
from banpick_cli.profile.format import RoutingProfile, ensure_writable
from banpick_cli.progress import ProgressEvent, ProgressFn, silent
from banpick_cli.tasks.registry import TaskSet, load_task_set

STRATEGIES = ("A", "B", "C", "D", "E")


class EmptyFailureSet(BanpickError):
    """The model answers every task right: nothing to probe (exit 1, profile untouched)."""


@dataclass(frozen=True)
class FailureProbeSettings:
    """Settings of one `failure-probe` run; recorded in the profile's provenance. Validated here."""

    domain: str
    task: str
    limit: int | None = None
    offset: int = 0
    strategy: str = "C"
    range_factor: float = 2.0
    candidates: str = "mask"  # as kl-scan's: "mask" (the profile's candidates), "top-N" (most used per layer), "all"
    probe_top: int = 0  # probe only each layer's N candidates of largest KL (0: every candidate)
    min_fixed: int = 1
    kl_quantile: float = 0.5
    max_per_layer: int = 2
    max_key: int = 0
    options: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self) -> None:
        domain_name(self.domain)
        one_of("--strategy", self.strategy, STRATEGIES)
        number("--range-factor", self.range_factor, low=0, low_open=True)
        expert_choice("--candidates", self.candidates)
        at_least((("--probe-top", self.probe_top, 0), ("--min-fixed", self.min_fixed, 1),
                  ("--max-per-layer", self.max_per_layer, 1), ("--max-key", self.max_key, 0)))
        number("--kl-quantile", self.kl_quantile, low=0, high=1)


@dataclass
class FailureProbeResult:
    """What a probe produced: the failure set, each candidate's count of failures fixed, the key experts."""

    profile: RoutingProfile
    path: Path
    domain: str
    task_set: str
    tasks: int
    baseline_correct: int
    failure_set: list[str]
    fixed: torch.Tensor  # int64 [M, E]: failures turned right; -1 where not probed
    key_experts: torch.Tensor  # bool [M, E]
    kl_floor: float | None
    wall_s: float
    resumed: int = 0  # candidates taken from a sidecar
    stale_sidecar: bool = False

    @property
    def gain(self) -> torch.Tensor:
        """Returns the accuracy gain on the failure set [M, E] (float32, NaN where not probed)."""
        return accuracy_gain(self.fixed, len(self.failure_set))


def accuracy_gain(fixed: torch.Tensor, failures: int) -> torch.Tensor:
    """Returns fixed / failures as float32 [M, E], NaN where a candidate was not probed (fixed < 0)."""
    gain = fixed.float() / max(failures, 1)
    return torch.where(fixed >= 0, gain, torch.full_like(gain, float("nan")))


def probe_candidates(profile: RoutingProfile, settings: FailureProbeSettings) -> list[tuple[int, int]]:
    """Returns the (moe layer, expert) pairs to probe, layer by layer, in expert order."""
    from banpick_cli.stages.kl_scan import KLScanSettings, scanned_experts

    # The same choice of experts as kl-scan's --candidates, from the same function.
    candidates = scanned_experts(profile, KLScanSettings(domain=settings.domain, candidates=settings.candidates))
    if settings.probe_top:
        kl = profile.domain(settings.domain).kl
        ranked = torch.where(candidates & ~kl.isnan(), kl, torch.full_like(kl, float("-inf")))
        keep = torch.zeros_like(candidates)
        for layer in range(candidates.shape[0]):
            n = min(settings.probe_top, int(torch.isfinite(ranked[layer]).sum()))
            if n:
                keep[layer, torch.topk(ranked[layer], n).indices] = True
        candidates = candidates & keep
    return [(int(m), int(e)) for m, e in candidates.nonzero().tolist()]


def choose_key_experts(
    fixed: torch.Tensor, kl: torch.Tensor | None, settings: FailureProbeSettings
) -> tuple[torch.Tensor, float | None]:
    """Returns (key experts bool [M, E], the KL floor used or None) by the rule in the module docstring."""
    probed = fixed >= 0
    eligible = probed & (fixed >= settings.min_fixed)
    floor = None
    if settings.kl_quantile > 0:
        if kl is None:
            raise ProfileError(f"choosing key experts by KL needs 'domain/{settings.domain}/kl': run "
                               f"`banpick kl-scan --domain {settings.domain}` first (or --kl-quantile 0 for gain alone)")
        scanned = probed & ~kl.isnan()
        if not bool(scanned.any()):
            raise ProfileError(f"kl-scan has no KL for the probed candidates of '{settings.domain}': rerun "
                               f"`banpick kl-scan --domain {settings.domain}` (or --kl-quantile 0)")
        floor = float(torch.quantile(kl[scanned].double(), settings.kl_quantile))
        eligible &= scanned & (kl >= floor)
    key_kl = torch.zeros_like(fixed, dtype=torch.float64) if kl is None else torch.nan_to_num(kl.double(), nan=0.0)
    order = sorted(((int(fixed[m, e]), float(key_kl[m, e]), -m, -e) for m, e in eligible.nonzero().tolist()),
                   reverse=True)
    key = torch.zeros_like(eligible)
    per_layer: dict[int, int] = {}
    for _, _, neg_m, neg_e in order:
        m, e = -neg_m, -neg_e
        if per_layer.get(m, 0) >= settings.max_per_layer:
            continue
        if settings.max_key and int(key.sum()) >= settings.max_key:
            break
        key[m, e] = True
        per_layer[m] = per_layer.get(m, 0) + 1
    return key, floor


def forced_profile(profile: RoutingProfile, domain: str, layer: int, expert: int, settings: FailureProbeSettings) -> RoutingProfile:
    """Returns an in-memory copy of the profile whose only key expert in `domain` is (layer, expert)."""
    probe = copy.copy(profile)
    probe.tensors = dict(profile.tensors)
    probe.settings = dict(profile.settings)
    probe.domain(domain).set_pick({"strategy": settings.strategy, "range_factor": settings.range_factor})
    key = torch.zeros(profile.shape, dtype=torch.bool)
    key[layer, expert] = True
    probe.domain(domain).put("key_experts", key)
    return probe


def run_failure_probe(settings: FailureProbeSettings, *, profile: str | Path, progress: ProgressFn = silent,
                      **args: Unpack[ModelArgs]) -> FailureProbeResult:
    """Evaluates the baseline, probes every candidate on the failure set, and updates the profile.

    Raises ProfileError naming the stage to run when the profile lacks the domain's candidates (or
    KL when the rule needs it), EmptyFailureSet when there is nothing to probe, DataError when the
    model answers none of the tasks in the expected form.
    """
    from banpick_cli.runtime import apply

    model, loaded = args.get("model", DEMO_MODEL_NAME), args.get("loaded")
    device, dtype = args.get("device", "auto"), args.get("dtype", "auto")

    path = Path(profile)
    if not path.is_file():
        raise ProfileError(f"profile not found: {path}; run `banpick profile --domain {settings.domain} --out {path}` first")
    ensure_writable(path)
    check_model_first(model, loaded)
    task_set = load_task_set(settings.task, limit=settings.limit, offset=settings.offset)
    check_code_sandbox([task_set], settings.options)
    if loaded is None:
        loaded = load_model(model, device=device, dtype=dtype)
    prof = open_for_update(path, loaded)
    candidates = probe_candidates(prof, settings)
    kl = prof.domain(settings.domain).find("kl")
    if settings.kl_quantile > 0 and kl is None:
        prof.domain(settings.domain).kl  # raises, naming kl-scan, before any generation
    start = time.perf_counter()
    sidecar = Sidecar(path, "failure-probe", settings.domain, run_fingerprint(
        model=loaded.fingerprint, data=task_set.digest, settings=asdict(settings), candidates=candidates,
        dtype=str(next(loaded.model.parameters()).dtype)))
    saved = sidecar.load()
    m, e = prof.shape
    # The failure set is saved first (0 candidates), then after each candidate.
    with lifecycle("failure-probe", path, lambda: None if sidecar.saved is None else
                   f"the failure set and {sidecar.saved} of {len(candidates)} candidates"):
        if saved is not None:
            failure_ids = list(saved.state["failure_set"])
            baseline_correct = int(saved.state["baseline_correct"])
            fixed = saved.tensors["fixed"].clone()
            done = saved.done
        else:
            base = run_tasks(loaded, task_set, settings.options, progress=progress)
            require_answers(base, "failure-probe")
            failure_ids = [o.task_id for o in base.outcomes if not o.correct]
            baseline_correct = base.correct
            if failure_ids:
                # Batches of failures alone pad differently from the full set; a task that flips to right
                # with no expert forced would count as a gain for every candidate, so it leaves the set.
                alone = run_tasks(loaded, task_set, settings.options,
                                  tasks=[t for t in task_set.tasks if t.id in set(failure_ids)])
                failure_ids = [o.task_id for o in alone.outcomes if not o.correct]
            fixed = torch.full((m, e), -1, dtype=torch.int64)
            done = 0
            if not failure_ids:
                raise EmptyFailureSet(
                    f"the model answers all {len(task_set.tasks)} tasks of '{task_set.name}' right: the failure set "
                    "is empty, so there is nothing to probe (use harder or more tasks: --task, --limit, --offset)")
            sidecar.save(Partial(0, {"fixed": fixed}, {"failure_set": failure_ids, "baseline_correct": baseline_correct}))
        failures = [t for t in task_set.tasks if t.id in set(failure_ids)]
        tokens = 0
        for i, (layer, expert) in enumerate(candidates):
            if i < done:
                continue
            forced = forced_profile(prof, settings.domain, layer, expert, settings)
            with apply(loaded, forced, "pick", settings.domain, count_changes=False):
                run: TaskRun = run_tasks(loaded, task_set, settings.options, tasks=failures)
            fixed[layer, expert] = run.correct
            tokens += run.tokens
            sidecar.save(Partial(i + 1, {"fixed": fixed},
                                 {"failure_set": failure_ids, "baseline_correct": baseline_correct}))
            progress(ProgressEvent("probe", i + 1, len(candidates), tokens,
                                   note=f"L{loaded.identity.moe_layers[layer]}E{expert}: {run.correct}/{len(failures)}"))
    key, floor = choose_key_experts(fixed, kl, settings)
    wall = time.perf_counter() - start
    prof = store(path, prof, loaded, lambda p: _store(p, loaded, settings, task_set, failure_ids, baseline_correct, fixed,
                                                      key, floor, wall, len(candidates)), domain=settings.domain)
    sidecar.remove()
    return FailureProbeResult(prof, path, settings.domain, task_set.name, len(task_set.tasks), baseline_correct,
                              failure_ids, fixed, key, floor, wall, resumed=done, stale_sidecar=sidecar.stale)


def _store(prof: RoutingProfile, loaded: LoadedModel, settings: FailureProbeSettings, task_set: TaskSet,
           failure_ids: list[str], baseline_correct: int, fixed: torch.Tensor, key: torch.Tensor,
           floor: float | None, wall: float, probed: int) -> None:
    d = settings.domain
    prof.domain(d).put("accuracy_gain", accuracy_gain(fixed, len(failure_ids)))
    prof.domain(d).put("key_experts", key)
    prof.domain(d).settings["key_experts"] = {"source": "failure-probe"}  # replaces kl-scan's high-KL proposal
    prof.domain(d).set_pick({
        "strategy": settings.strategy,
        "range_factor": settings.range_factor,
        "failure_set": failure_ids,
        "task": task_set.name,
        "rule": {"min_fixed": settings.min_fixed, "kl_quantile": settings.kl_quantile, "kl_floor": floor,
                 "max_per_layer": settings.max_per_layer, "max_key": settings.max_key},
    })
    prof.record("failure-probe", d, provenance(
        "failure-probe", settings, loaded, dataset=task_set.source, split=f"offset {settings.offset}",
        samples=len(task_set.tasks), baseline_correct=baseline_correct, failures=len(failure_ids),
        candidates_probed=probed, key_experts=int(key.sum()), wall_s=round(wall, 3), seed=settings.options.seed,
    ))
