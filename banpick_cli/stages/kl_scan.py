"""`banpick kl-scan`: prune each candidate expert of a domain and measure the top-1000 KL (section 4.2).

"Prune" means the expert does not exist: its score is removed before top-k, so the router picks the
next expert and K stays K_base (reading 26, `prune="refill"`); `prune="drop"` is the alternative, where
tokens that chose the expert run K_base - 1 experts and the others are unchanged. The KL is appendix
B's, averaged over every real token position of the calibration set (reading 25).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Unpack

import torch

from banpick_cli.passes.resume import WindowCheckpoint, digest, mask_digest, previous_output, texts_digest
from banpick_cli.stages.common import ModelArgs, TextSettings, count_saved, lifecycle, load_inputs, provenance, store
from banpick_cli.passes.kl import TOP_TOKENS, KLEngine, LayerPlan, RouteVariant
from banpick_cli.checks import at_least, expert_choice, number, one_of
from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.profile.format import RoutingProfile, check_fingerprint, ensure_writable, read_profile
from banpick_cli.progress import ProgressFn, silent
from banpick_cli.routing import RouterSpec, route, weights_for

PRUNE_MODES = ("refill", "drop")


@dataclass(frozen=True)
class KeyExpertRule:
    """Which scanned candidates kl-scan proposes as key experts: those whose KL stands out.

    An expert is key when its KL is (1) at least `factor` times the median KL of the other scanned
    candidates of its layer (of all the model's other scanned candidates when it is its layer's only
    one; a model with a single candidate proposes none), (2) at least the median KL of all scanned
    candidates of the model, so a layer where every candidate is negligible proposes none, (3) at least
    `min_kl` and above 0; at most `top` per layer, largest KL first (0: no cap). Medians of an even
    count are the mean of the two middle values.
    """

    factor: float = 2.0
    top: int = 2
    min_kl: float = 0.0

    def __post_init__(self) -> None:
        number("--key-factor", self.factor, low=0, low_open=True)
        number("--key-top", self.top, low=0, integer=True)
        number("--key-min-kl", self.min_kl, low=0)

    def choose(self, kl: torch.Tensor) -> torch.Tensor:
        """Returns the key experts (bool [moe_layers, experts]) given KL with NaN where not scanned."""
        scanned = ~torch.isnan(kl)
        key = torch.zeros_like(scanned)
        if not scanned.any():
            return key
        overall = _median(kl[scanned])
        for layer in range(kl.shape[0]):
            experts = scanned[layer].nonzero().flatten().tolist()
            chosen = []
            for e in experts:
                others = kl[layer, [o for o in experts if o != e]]
                if not others.numel():  # alone in its layer: held against every other candidate
                    elsewhere = scanned.clone()
                    elsewhere[layer, e] = False
                    others = kl[elsewhere]
                if not others.numel():
                    continue
                value = float(kl[layer, e])
                if value > 0 and value >= self.factor * _median(others) and value >= overall and value >= self.min_kl:
                    chosen.append((value, e))
            chosen.sort(reverse=True)
            for _, e in chosen[: self.top or None]:
                key[layer, e] = True
        return key


def _median(x: torch.Tensor) -> float:
    s = x.double().sort().values
    n = s.numel()
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


@dataclass(frozen=True)
class KLScanSettings(TextSettings):
    """Settings of one `kl-scan` run; recorded verbatim in the profile's provenance."""

    candidates: str = "mask"  # "mask" (the profile's candidates) | "top-N" (N most used per layer) | "all"
    top_tokens: int = TOP_TOKENS
    prune: str = "refill"  # reading 26; "drop": K_base - 1 for tokens that chose the expert
    stack: int = 0  # candidates of one layer per forward; 0: 8 on a GPU, 2 on a CPU
    hidden_cache_mb: int = 2048
    checkpoint_every: int = 0  # batches per window, each saved to the sidecar; 0: as many as fit hidden_cache_mb
    key_factor: float = 2.0
    key_top: int = 2
    key_min_kl: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least((("--top-tokens", self.top_tokens, 1), ("--stack", self.stack, 0),
                  ("--hidden-cache-mb", self.hidden_cache_mb, 0), ("--checkpoint-every", self.checkpoint_every, 0)))
        one_of("--prune", self.prune, PRUNE_MODES)
        expert_choice("--candidates", self.candidates)
        self.key_rule  # validates the key-expert knobs

    @property
    def key_rule(self) -> KeyExpertRule:
        return KeyExpertRule(self.key_factor, self.key_top, self.key_min_kl)


def scanned_experts(profile: RoutingProfile, settings: KLScanSettings) -> torch.Tensor:
    """Returns the experts to scan (bool [moe_layers, experts]), or raises naming what is missing."""
    d = settings.domain
    if settings.candidates == "mask":
        mask = profile.domain(d).candidates.clone()
        if not mask.any():
            raise ProfileError(
                f"the profile has no candidate experts for domain '{d}': rerun `banpick profile` with a lower "
                "--candidate-ratio or --candidate-top, or pass --candidates top-N"
            )
        return mask
    counts = profile.domain(d).expert_counts
    if settings.candidates == "all":
        return torch.ones_like(counts, dtype=torch.bool)
    n = int(settings.candidates[4:])
    if n > counts.shape[1]:
        raise BadSetting(f"--candidates {settings.candidates}: this model has {counts.shape[1]} experts per layer "
                         f"(give top-N with N <= {counts.shape[1]}, or 'all')")
    top = torch.topk(counts, n, dim=-1).indices
    return torch.zeros_like(counts, dtype=torch.bool).scatter_(1, top, True) & (counts > 0)


def prune_variant(spec: RouterSpec, expert: int, mode: str = "refill") -> RouteVariant:
    """Returns the routing of a layer without `expert` (refill: the next fills in; drop: K_base - 1)."""
    banned = torch.zeros(spec.num_experts, dtype=torch.bool)
    banned[expert] = True
    if mode == "refill":
        return lambda logits: route(logits, spec, banned=banned).as_router_output()

    def drop(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = route(logits, spec).indices
        indices = indices.masked_fill(indices == expert, spec.num_experts)
        return weights_for(logits, spec, indices), indices

    return drop


@dataclass(frozen=True)
class ExpertKL:
    """One scanned expert: where it is, its KL when pruned, its usage share, whether it is key."""

    position: int
    layer_index: int
    expert: int
    kl: float
    usage: float
    key: bool


@dataclass
class KLScanResult:
    """What a `kl-scan` run produced."""

    profile: RoutingProfile
    path: Path
    domain: str
    kl: torch.Tensor  # [moe_layers, experts] float32, NaN where not scanned
    key_experts: torch.Tensor  # [moe_layers, experts] bool
    layers_resumed: int  # layers taken over from a finished run of the same scan (nothing recomputed)
    layers_scanned: int  # layers computed by this run
    tokens: int
    wall_s: float
    notes: list[str]
    windows: int = 0  # windows of batches in all (each loads every decoder layer once)
    windows_resumed: int = 0  # windows taken over from an interrupted run's sidecar

    def ranked(self) -> list[ExpertKL]:
        """Returns every scanned expert, largest KL first."""
        m = self.profile.model
        counts = self.profile.domain(self.domain).expert_counts.double()
        tokens = self.profile.domain(self.domain).token_counts.double().clamp(min=1)
        share = counts / tokens.unsqueeze(-1)
        found = [ExpertKL(p, m.moe_layers[p], e, float(self.kl[p, e]), float(share[p, e]), bool(self.key_experts[p, e]))
                 for p, e in (~torch.isnan(self.kl)).nonzero().tolist()]
        return sorted(found, key=lambda x: (-x.kl, x.position, x.expert))


def run_kl_scan(settings: KLScanSettings, *, profile: str | Path, out: str | Path | None = None,
                restart: bool = False, progress: ProgressFn = silent, **model: Unpack[ModelArgs]) -> KLScanResult:
    """Scans the domain's candidates, saving the KL sums of each finished window of batches beside `out`
    (default: `profile`).

    An interrupted run (Ctrl-C, SIGTERM, a kill) resumes after its last finished window when rerun with
    the same model, data and settings, and gives the same numbers; `restart=True` discards them. Everything
    that can fail on bad input is checked before the model loads, and the profile is left untouched.
    """
    source, out = Path(profile), Path(out or profile)
    ensure_writable(out)
    prof = read_profile(source)
    scanned = scanned_experts(prof, settings)
    domain, text, loaded = load_inputs(settings, **model)
    check_fingerprint(prof, loaded.fingerprint, path=source)
    previous = previous_output(out, source, loaded.fingerprint)

    engine = KLEngine(loaded, text.texts, seq_len=settings.seq_len, batch_size=settings.batch_size,
                      top_tokens=settings.top_tokens, stack=settings.stack, hidden_cache_mb=settings.hidden_cache_mb,
                      window_batches=settings.checkpoint_every, progress=progress)
    run = digest(dict(stage=f"kl-scan/{domain.name}", model=loaded.fingerprint, data=texts_digest(text.texts), seq_len=settings.seq_len,
                       top_tokens=engine.top_tokens, prune=settings.prune, experts=mask_digest(scanned),
                       dtype=str(next(loaded.model.parameters()).dtype)))
    layers = scanned.any(dim=1).nonzero().flatten().tolist()
    finished = None if restart else _finished(previous or prof, run, domain.name)
    specs = loaded.router_specs()
    plans = [] if finished is not None else [  # a completed scan of the same identity is not recomputed
        LayerPlan(p, tuple(prune_variant(specs[p], e, settings.prune) for e in scanned[p].nonzero().flatten().tolist()))
        for p in layers]
    # The sums are per batch, so the batches must be the same ones (the run identity need not say so:
    # the stored KL is a mean over tokens, whatever the batching).
    checkpoint = WindowCheckpoint(out, "kl-scan", domain.name, digest(dict(run=run, batch_size=settings.batch_size)),
                                  restart=restart)
    resume, _ = checkpoint.resume(int(scanned.sum())) if plans else (None, {})

    start = time.perf_counter()
    with lifecycle("kl-scan", out, count_saved(lambda: checkpoint.windows, lambda: engine.windows_resumed + engine.windows,
                                               "windows")):
        found = engine.run(plans, resume=resume, on_window=checkpoint.save)
    wall = time.perf_counter() - start

    if finished is not None:
        kl = finished.masked_fill(~scanned, float("nan"))
    else:
        kl = torch.full(prof.shape, float("nan"), dtype=torch.float32)
        for p, values in found.items():
            kl[p, scanned[p]] = values.float()
    key = settings.key_rule.choose(kl)
    old = prof.recorded("kl-scan", domain.name)
    facts = dict(dataset=text.source, split=text.split, samples=len(text.texts), seq_len=settings.seq_len, seed=settings.seed,
                 tokens=engine.tokens, wall_s=round(wall, 3) if plans else old.get("wall_s"))
    if plans:
        facts.update(windows=engine.windows_resumed + engine.windows, windows_resumed=engine.windows_resumed,
                     layer_loads=sum(engine.layer_loads), stream=loaded.streamed is not None)
    record = provenance("kl-scan", settings, loaded, **facts, run=run, top_tokens=engine.top_tokens,
                        experts_scanned=int(scanned.sum()), layers_resumed=0 if plans else len(layers))

    def change(p: RoutingProfile) -> None:
        view = p.domain(domain.name)
        view.put("kl", kl)
        view.put("key_experts", key)
        view.settings["key_experts"] = {"rule": asdict(settings.key_rule), "source": "kl-scan", "prune": settings.prune,
                                        "top_tokens": engine.top_tokens}
        p.record("kl-scan", domain.name, record)

    prof = store(out, prof, loaded, change, domain=domain.name)
    checkpoint.finish()
    notes = [*text.notes, *engine.notes]
    if checkpoint.stale:
        notes.append("discarded the saved windows of an earlier kl-scan with other settings, data or model")
    return KLScanResult(prof, out, domain.name, kl, key, 0 if plans else len(layers), len(plans), engine.tokens, wall,
                        notes, windows=engine.windows_resumed + engine.windows, windows_resumed=engine.windows_resumed)


def _finished(prof: RoutingProfile, run: str, domain: str) -> torch.Tensor | None:
    """Returns the stored KL of a completed run with this identity, else None."""
    if prof.recorded("kl-scan", domain).get("run") == run:
        return prof.domain(domain).find("kl")
    return None
