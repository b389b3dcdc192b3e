"""`banpick layer-sensitivity`: what Ban (section 5) needs, measured in one pass over calibration text.

Layer sensitivity W_l: the top-1000 KL when MoE layer l alone keeps only its K_min most preferred of the
K_base experts (the weights follow the model's rule over the kept ones, readings 8-10), every other
layer untouched; L'_l = (W_l - W_min) / (W_max - W_min). Token sensitivity: R = the weight of the
top-k_num experts over that of the top-K_base, per real token and layer (k_num = K_min by default,
reading 2, which is the paper's top-3 at K_min = 3), with R_min and R_max per layer and pooled over all
layers (raw min/max by default; `ratio_percentile` = p gives the p-th and (100-p)-th percentiles), and a
histogram of R per layer. R comes from the unmodified pass that the KL engine runs anyway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Unpack

import torch

from banpick_cli.passes.resume import WindowCheckpoint, digest, previous_output, texts_digest
from banpick_cli.stages.common import (
    ModelArgs, TextSettings, check_ban_knobs, load_inputs, open_for_update, provenance, lifecycle, count_saved, store,
)
from banpick_cli.passes.kl import TOP_TOKENS, KLEngine, LayerPlan, RouteVariant
from banpick_cli.checks import at_least, number, one_of
from banpick_cli.errors import BadSetting
from banpick_cli.profile.format import RoutingProfile, ensure_writable, read_profile
from banpick_cli.progress import ProgressFn, silent
from banpick_cli.routing import BETA, K_MIN, LAM, RouterSpec, keep_top, token_ratio

RATIO_SCOPES = ("layer", "pooled")  # as the runtime reads it (runtime/plan.py)


@dataclass(frozen=True)
class LayerSensitivitySettings(TextSettings):
    """Settings of one `layer-sensitivity` run; recorded verbatim in the profile's provenance."""

    # domain: whose calibration text; default: the profile's only domain
    k_min: int = K_MIN
    lam: float = LAM  # --lambda
    beta: float = BETA
    ratio_k_num: int | None = None  # R's numerator; None: k_min (reading 2), 3: the paper's literal top-3
    ratio_percentile: float = 0.0  # 0: raw min/max (the paper); p: p-th and (100-p)-th percentiles
    ratio_scope: str = "layer"  # which R range Ban uses at inference: per layer, or pooled over layers
    ratio_bins: int = 100
    top_tokens: int = TOP_TOKENS
    hidden_cache_mb: int = 2048
    checkpoint_every: int = 0  # batches per window, each saved to the sidecar; 0: as many as fit hidden_cache_mb
    # The batch-aware step's candidate bound is calibrated for decode batches of this many tokens, on the router
    # logits of the first batch_calib_tokens calibration tokens (evaluation/batch_calib.py).
    batch_calib_size: int = 16
    batch_calib_tokens: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least((("batch_calib_size", self.batch_calib_size, 2), ("batch_calib_tokens", self.batch_calib_tokens, 2),
                  ("--top-tokens", self.top_tokens, 1), ("--ratio-bins", self.ratio_bins, 1),
                  ("--hidden-cache-mb", self.hidden_cache_mb, 0), ("--checkpoint-every", self.checkpoint_every, 0)))
        if self.ratio_k_num is not None:
            number("--ratio-k-num", self.ratio_k_num, low=1, integer=True)
        check_ban_knobs(k_min=self.k_min, lam=self.lam, beta=self.beta)
        number("--ratio-percentile", self.ratio_percentile, low=0, high=50, high_open=True)
        one_of("--ratio-scope", self.ratio_scope, RATIO_SCOPES)

    @property
    def k_num(self) -> int:
        return self.k_min if self.ratio_k_num is None else self.ratio_k_num

    def check_model(self, k_base: int) -> None:
        """Raises BadSetting unless K_min and R's numerator fit a router with top-k = k_base."""
        if not 1 <= self.k_min < k_base:
            raise BadSetting(f"--k-min {self.k_min} must be in [1, {k_base - 1}]: below this model's K_base = {k_base}")
        if self.k_num > k_base:
            raise BadSetting(f"--ratio-k-num {self.k_num} must be <= this model's K_base = {k_base}")


class RatioStats:
    """Router observer: R per real token at every MoE layer -> min, max, histogram (and values for percentiles)."""

    def __init__(self, specs: list[RouterSpec], k_num: int, k_base: int, bins: int, keep_values: bool):
        layers = len(specs)
        self.specs, self.k_num, self.k_base, self.bins = specs, k_num, k_base, bins
        self.min = torch.full((layers,), float("inf"), dtype=torch.float32)
        self.max = torch.full((layers,), float("-inf"), dtype=torch.float32)
        self.hist = torch.zeros(layers, bins, dtype=torch.int64)  # [moe_layers, bins] over [0, 1]
        self.values: list[list[torch.Tensor]] | None = [[] for _ in specs] if keep_values else None

    def __call__(self, position: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        if logits.shape[0] == 0:
            return
        r = token_ratio(logits, self.specs[position], self.k_num, self.k_base).cpu()  # [T] float32
        self.min[position] = torch.minimum(self.min[position], r.min())
        self.max[position] = torch.maximum(self.max[position], r.max())
        self.hist[position] += torch.bincount((r * self.bins).long().clamp(0, self.bins - 1), minlength=self.bins)
        if self.values is not None:
            self.values[position].append(r)

    def state(self) -> dict[str, torch.Tensor]:
        """Returns everything observed so far as tensors (for a sidecar); `load` takes it back.

        Kept values are saved per layer in observation order; their percentiles sort them anyway."""
        found = {"ratio_min": self.min, "ratio_max": self.max, "ratio_hist": self.hist}
        if self.values is not None:
            found.update({f"ratio_values/{p}": _cat(v) for p, v in enumerate(self.values)})
        return found

    def load(self, state: dict[str, torch.Tensor]) -> bool:
        """Restores `state()`; returns False (and changes nothing) when it is not of these statistics."""
        want = self.state()
        if set(state) != set(want) or state["ratio_hist"].shape != self.hist.shape:
            return False
        self.min, self.max, self.hist = state["ratio_min"].clone(), state["ratio_max"].clone(), state["ratio_hist"].clone()
        if self.values is not None:
            self.values = [[state[f"ratio_values/{p}"].float()] for p in range(len(self.values))]
        return True

    def ranges(self, percentile: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Returns (R_min [layers], R_max [layers], pooled R_min, pooled R_max)."""
        if percentile == 0 or self.values is None:
            return self.min.clone(), self.max.clone(), float(self.min.min()), float(self.max.max())
        q = percentile / 100
        per_layer = [torch.cat(v) for v in self.values]
        lo = torch.tensor([_quantile(v, q) for v in per_layer], dtype=torch.float32)
        hi = torch.tensor([_quantile(v, 1 - q) for v in per_layer], dtype=torch.float32)
        pooled = torch.cat(per_layer)
        return lo, hi, _quantile(pooled, q), _quantile(pooled, 1 - q)


class LogitSample:
    """Router observer: the router logits of the first `tokens` real tokens at every MoE layer, in the pass's
    order (so an interrupted and resumed run keeps the same tokens: `state`/`load` go in the sidecar)."""

    def __init__(self, specs: list[RouterSpec], tokens: int):
        self.tokens, self.experts = tokens, specs[0].num_experts
        self.rows: list[list[torch.Tensor]] = [[] for _ in specs]
        self.count = [0] * len(specs)

    def __call__(self, position: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        need = self.tokens - self.count[position]
        if need > 0 and logits.shape[0]:
            x = logits[:need, : self.experts].float().cpu()
            self.rows[position].append(x)
            self.count[position] += x.shape[0]

    def logits(self) -> tuple[torch.Tensor, ...]:
        """Returns float32 [N, E] per MoE layer."""
        return tuple(torch.cat(r) if r else torch.zeros(0, self.experts) for r in self.rows)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"batch_logits/{p}": x for p, x in enumerate(self.logits())}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.rows = [[state[f"batch_logits/{p}"].float()] for p in range(len(self.rows))]
        self.count = [int(r[0].shape[0]) for r in self.rows]


def batch_calibration(prof: RoutingProfile, specs: list[RouterSpec], sample: LogitSample, ban: dict,
                      tensors: dict[str, torch.Tensor], size: int) -> dict | None:
    """Returns the batch-aware step's settings (`profile.batch`), calibrated after Ban's routing as this run
    measured it, or None when the calibration text has fewer tokens than one batch."""
    import copy

    from banpick_cli.evaluation.batch_calib import calibrate_candidates
    from banpick_cli.evaluation.budget import CalibrationLogits
    from banpick_cli.runtime.plan import build_plan

    logits = sample.logits()
    if logits[0].shape[0] < size:
        return None
    measured = copy.copy(prof)
    measured.tensors, measured.settings = dict(prof.tensors), copy.deepcopy(prof.settings)
    for part, tensor in tensors.items():
        measured.ban.put(part, tensor)
    measured.ban.set_settings(ban)
    plan = build_plan(measured, specs, "ban")
    sample_of = CalibrationLogits(logits, f"first {logits[0].shape[0]} calibration tokens of layer-sensitivity")
    return calibrate_candidates(specs, sample_of, plan, batch_size=size).to_settings()


def _cat(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float32)


def _quantile(x: torch.Tensor, q: float) -> float:
    """Returns the q-quantile with linear interpolation (numpy's default), for any size of x."""
    s = x.double().sort().values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def k_min_variant(spec: RouterSpec, k_min: int) -> RouteVariant:
    """Returns a layer's routing cut to its K_min most preferred experts (weights by the model's rule)."""
    return lambda logits: keep_top(logits, spec, k_min).as_router_output()


def normalised(w: torch.Tensor) -> torch.Tensor:
    """Returns L' = (W - W_min) / (W_max - W_min); all zeros when every layer has the same W."""
    span = w.max() - w.min()
    return (w - w.min()) / span if span > 0 else torch.zeros_like(w)


@dataclass
class LayerSensitivityResult:
    """What a `layer-sensitivity` run produced (tensors are [moe_layers])."""

    profile: RoutingProfile
    path: Path
    domain: str
    layer_kl: torch.Tensor
    layer_sensitivity: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    ratio_hist: torch.Tensor
    ban: dict
    layers_resumed: int  # layers taken over from a finished run of the same measurement (W not recomputed)
    layers_scanned: int
    tokens: int
    wall_s: float
    notes: list[str]
    windows: int = 0  # windows of batches in all (each loads every decoder layer once)
    windows_resumed: int = 0  # windows taken over from an interrupted run's sidecar


def resolve_domain(settings: LayerSensitivitySettings, profile: RoutingProfile | None) -> str:
    """Returns the domain whose text to use: --domain, else the profile's only domain."""
    if settings.domain:
        return settings.domain
    domains = profile.domains() if profile is not None else []
    if len(domains) == 1:
        return domains[0]
    have = f"the profile has domains {', '.join(domains)}" if domains else "the profile has no domain yet"
    raise BadSetting(f"--domain is needed to choose the calibration text ({have})")


def run_layer_sensitivity(settings: LayerSensitivitySettings, *, profile: str | Path, out: str | Path | None = None,
                          restart: bool = False, progress: ProgressFn = silent, **model: Unpack[ModelArgs]) -> LayerSensitivityResult:
    """Measures W_l, L'_l and the R statistics, saving the sums of each finished window of batches beside
    `out` (default `profile`).

    `profile` may not exist yet (a new profile is made). A rerun with the same model, data and settings
    resumes after the last finished window; `restart=True` discards them. Bad input fails before any work.
    """
    source, out = Path(profile), Path(out or profile)
    ensure_writable(out)
    existing = read_profile(source) if source.exists() else None
    if existing is not None:
        settings.check_model(existing.model.k_base)
    settings = replace(settings, domain=resolve_domain(settings, existing))
    domain, text, loaded = load_inputs(settings, **model)
    k_base = loaded.routing.top_k
    settings.check_model(k_base)
    prof = open_for_update(source, loaded)
    previous = previous_output(out, source, loaded.fingerprint)

    engine = KLEngine(loaded, text.texts, seq_len=settings.seq_len, batch_size=settings.batch_size,
                      top_tokens=settings.top_tokens, stack=1, hidden_cache_mb=settings.hidden_cache_mb,
                      window_batches=settings.checkpoint_every, progress=progress)
    stage = "layer-sensitivity"
    run = digest(dict(stage=stage, model=loaded.fingerprint, data=texts_digest(text.texts), seq_len=settings.seq_len,
                      top_tokens=engine.top_tokens, k_min=settings.k_min, dtype=str(next(loaded.model.parameters()).dtype)))
    layers = prof.shape[0]
    done_before = previous or prof
    finished = None  # W of a completed run of the same identity: not recomputed (R always is, in the one pass)
    if not restart and done_before.recorded(stage).get("run") == run and done_before.ban.has("layer_kl"):
        finished = done_before.ban.layer_kl.clone()
    specs = loaded.router_specs()
    plans = [] if finished is not None else [LayerPlan(p, (k_min_variant(specs[p], settings.k_min),)) for p in range(layers)]
    ratios = RatioStats(specs, settings.k_num, k_base, settings.ratio_bins, keep_values=settings.ratio_percentile > 0)
    # The sidecar holds per-batch sums and R's statistics: the batches, R's numerator and bins, and whether
    # values are kept decide it beyond the run identity.
    checkpoint = WindowCheckpoint(out, stage, "", digest(dict(
        run=run, batch_size=settings.batch_size, k_num=settings.k_num, bins=settings.ratio_bins,
        values=settings.ratio_percentile > 0, w=finished is None)), restart=restart)
    sample = LogitSample(specs, settings.batch_calib_tokens)
    resume, saved = checkpoint.resume(len(plans))
    if resume is not None:
        ours = {k: v for k, v in saved.items() if k.startswith("batch_logits/")}
        if len(ours) != len(specs) or not ratios.load({k: v for k, v in saved.items() if k not in ours}):
            resume, checkpoint.stale, checkpoint.windows = None, True, 0
        else:
            sample.load(ours)

    start = time.perf_counter()
    with lifecycle(stage, out, count_saved(lambda: checkpoint.windows, lambda: engine.windows_resumed + engine.windows,
                                           "windows")):
        found = engine.run(plans, observers=[ratios, sample], resume=resume,
                           on_window=lambda sums: checkpoint.save(sums, {**ratios.state(), **sample.state()}))
    wall = time.perf_counter() - start

    w = finished if finished is not None else torch.stack([found[p][0] for p in range(layers)]).float()
    sensitivity = normalised(w)
    r_min, r_max, pooled_min, pooled_max = ratios.ranges(settings.ratio_percentile)
    ban = {
        "k_base": k_base, "k_min": settings.k_min, "lam": settings.lam, "beta": settings.beta,
        "ratio_k_num": settings.k_num, "ratio_scope": settings.ratio_scope, "ratio_percentile": settings.ratio_percentile,
        "ratio_min_global": pooled_min, "ratio_max_global": pooled_max, "ratio_bins": settings.ratio_bins,
        "top_tokens": engine.top_tokens,
    }
    record = provenance(
        stage, settings, loaded, dataset=text.source, split=text.split, samples=len(text.texts), tokens=engine.tokens,
        seq_len=settings.seq_len, seed=settings.seed, wall_s=round(wall, 3), run=run, top_tokens=engine.top_tokens,
        layers_resumed=0 if plans else layers, windows=engine.windows_resumed + engine.windows,
        windows_resumed=engine.windows_resumed, layer_loads=sum(engine.layer_loads), stream=loaded.streamed is not None,
    )

    measured = {"layer_kl": w, "layer_sensitivity": sensitivity, "ratio_min": r_min, "ratio_max": r_max,
                "ratio_hist": ratios.hist}
    batch = batch_calibration(prof, specs, sample, ban, measured, settings.batch_calib_size)
    notes_batch = [] if batch is not None else [
        f"the batch-aware step was not calibrated: fewer than {settings.batch_calib_size} calibration tokens"]

    def change(p: RoutingProfile) -> None:
        for part, tensor in measured.items():
            p.ban.put(part, tensor)
        p.ban.set_settings(ban)
        if batch is not None:
            p.batch.set_settings(batch)
        p.record(stage, None, record)

    prof = store(out, prof, loaded, change)
    checkpoint.finish()
    notes = [*text.notes, *engine.notes, *notes_batch]
    if checkpoint.stale:
        notes.append("discarded the saved windows of an earlier layer-sensitivity run with other settings, data or model")
    return LayerSensitivityResult(prof, out, domain.name, w, sensitivity, r_min, r_max, ratios.hist, ban,
                                  0 if plans else layers, len(plans), engine.tokens, wall, notes,
                                  windows=engine.windows_resumed + engine.windows, windows_resumed=engine.windows_resumed)

