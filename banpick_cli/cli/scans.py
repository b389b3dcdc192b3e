"""`kl-scan` and `layer-sensitivity`: the sensitivity scans. Thin: flags -> calibrate/ -> Rich."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from banpick_cli.cli.base import flag, settings_from, DeviceOpt, DryRunOpt, DtypeOpt, JsonOpt, ModelOpt, ProgressOpt, StreamOpt, app
from banpick_cli.cli.render import note, console, handle_errors, print_estimate, print_json, progress_bar, say, table

DataOpt = typer.Option(
    None, "--data", help="Local .jsonl/.json/.parquet/.txt/.csv file, hub dataset id, or 'embedded'. Default: the domain's sources ('embedded' for the demo model)."
)
TextFieldOpt = typer.Option(None, "--text-field", help="Field holding the text (default: the domain's template, else 'text').")
SamplesOpt = typer.Option(128, "--samples", help="Number of calibration texts.")
SeqLenOpt = typer.Option(256, "--seq-len", help="Tokens per text (longer texts are truncated).")
BatchOpt = typer.Option(8, "--batch-size", help="Texts per forward (halved automatically on a GPU out-of-memory).")
SeedOpt = typer.Option(0, "--seed", help="Shuffle seed for choosing texts (the same as `profile` picks the same texts).")
TopTokensOpt = typer.Option(1000, "--top-tokens", help="KL over the unmodified model's N most probable tokens (appendix B); clamped to the vocabulary.")
CacheOpt = typer.Option(2048, "--hidden-cache-mb", help="Memory for stored hidden states; beyond it later layers' inputs are recomputed.")
OutOpt = typer.Option(None, "--out", "-o", help="Write the updated profile here instead of updating --profile (alone: the profile to update).")
RestartOpt = flag(False, "--restart", help="Discard the finished windows of an interrupted run and scan from the start.")
WindowOpt = typer.Option(
    0, "--checkpoint-every", help="At most N batches per window; each finished window is saved beside the profile and a rerun "
    "resumes after it (0: as many as fit --hidden-cache-mb). Every window loads each decoder layer once: more windows, more loads."
)


def choose_stream(stream: bool, model: str, device: str, dtype: str) -> bool:
    """Returns --stream, or True with a note when the model's weights (from its config) do not fit the memory free now."""
    if stream:
        return True
    from banpick_cli.stages.estimate import needs_stream

    too_big, need, room = needs_stream(model, device=device, dtype=dtype)
    if too_big:
        note(f"the weights ({need / 2**30:,.1f} GiB) do not fit the {room / 2**30:,.1f} GiB free here: streaming each "
             "decoder layer from the checkpoint (--stream)")
    return too_big


def dry_run(command: str, settings, *, model: str, device: str, dtype: str, as_json: bool, profile=None,
            checkpoint_every: int = 32) -> None:
    """Prints the --dry-run estimate of a command (nothing is loaded but the config, nothing written)."""
    from banpick_cli.stages.estimate import estimate_run

    est = estimate_run(command, settings, model=model, device=device, dtype=dtype, profile=profile,
                       checkpoint_every=checkpoint_every)
    if as_json:
        print_json(est.as_dict())
    else:
        print_estimate(est)


def _scan(command: str, run, settings, flags: dict, *, dry_profile: bool = False):
    """Runs a scan stage with the command's flags (or prints its --dry-run estimate and returns None)."""
    profile, out = _profile_path(flags["profile"], flags["out"]), flags["out"]
    model, device, dtype, as_json = flags["model"], flags["device"], flags["dtype"], flags["as_json"]
    if flags["dry"]:
        dry_run(command, settings, model=model, device=device, dtype=dtype, as_json=as_json,
                profile=profile if dry_profile else None)
        return None
    stream = choose_stream(flags["stream"], model, device, dtype)
    with progress_bar(flags["show_progress"] and not as_json, command) as progress:
        return run(settings, profile=profile, out=out, model=model, device=device, dtype=dtype,
                   restart=flags["restart"], stream=stream, progress=progress)


def _profile_path(profile: Optional[Path], out: Optional[Path]) -> Path:
    """Returns the profile to read: --profile, else --out (updated in place, as `profile -o` does)."""
    if profile is None and out is None:
        from banpick_cli.errors import BadSetting

        raise BadSetting("give the profile with --profile (or --out to update it in place)")
    return profile or out


def _notes(notes: list[str]) -> None:
    for text in notes:
        note(text)


@app.command("kl-scan")
@handle_errors
def kl_scan(
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Profile holding the domain's usage counts and candidates (from `profile`); default: --out, updated in place."),
    domain: str = typer.Option(..., "--domain", "-d", help="Domain whose candidates to scan."),
    model: str = ModelOpt,
    data: Optional[str] = DataOpt,
    text_field: Optional[str] = TextFieldOpt,
    samples: int = SamplesOpt,
    seq_len: int = SeqLenOpt,
    batch_size: int = BatchOpt,
    seed: int = SeedOpt,
    candidates: str = typer.Option("mask", "--candidates", help="'mask': the profile's candidates; 'top-N': the N most used experts per layer; 'all'."),
    top_tokens: int = TopTokensOpt,
    prune: str = typer.Option("refill", "--prune", help="'refill': the expert's score is removed before top-k, the next expert fills in (K stays); 'drop': tokens that chose it run K-1."),
    stack: int = typer.Option(0, "--stack", help="Candidates of one layer stacked into one forward (0: 8 on a GPU, 2 on a CPU)."),
    hidden_cache_mb: int = CacheOpt,
    checkpoint_every: int = WindowOpt,
    key_factor: float = typer.Option(2.0, "--key-factor", help="High-KL candidate (Pick's key experts until failure-probe runs): KL >= this times the median KL of the layer's other candidates."),
    key_top: int = typer.Option(2, "--key-top", help="At most this many high-KL candidates per layer (0: no cap)."),
    key_min_kl: float = typer.Option(0.0, "--key-min-kl", help="High-KL candidate: KL at least this."),
    show: int = typer.Option(15, "--show", help="Rows of the ranked table."),
    out: Optional[Path] = OutOpt,
    restart: bool = RestartOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    stream: bool = StreamOpt,
    dry: bool = DryRunOpt,
    show_progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Prune each candidate expert of a domain and rank them by the top-1000 KL of the output (section 4.2)."""
    from banpick_cli.checks import number
    from banpick_cli.stages.kl_scan import KLScanSettings, run_kl_scan

    number("--show", show, low=0, integer=True)  # before anything runs: a bad flag writes nothing
    settings = settings_from(KLScanSettings, locals())
    result = _scan("kl-scan", run_kl_scan, settings, locals(), dry_profile=True)
    if result is None:
        return
    ranked = result.ranked()
    values = sorted((r.kl for r in ranked), reverse=True)
    summary = {
        "profile": str(result.path),
        "domain": result.domain,
        "experts_scanned": len(ranked),
        "layers_scanned": result.layers_scanned,
        "layers_resumed": result.layers_resumed,
        "windows": result.windows,
        "windows_resumed": result.windows_resumed,
        "tokens": result.tokens,
        "wall_s": round(result.wall_s, 3),
        "kl_max": values[0] if values else None,
        "kl_median": values[len(values) // 2] if values else None,
        "key_experts": [f"L{r.layer_index}E{r.expert}" for r in ranked if r.key],
        "top": [{"layer": r.layer_index, "expert": r.expert, "kl": r.kl, "usage": r.usage, "key": r.key} for r in ranked[:show]],
        "notes": result.notes,
    }
    if as_json:
        print_json(summary)
        return
    _notes(result.notes)
    rows = [[i + 1, f"L{r.layer_index}E{r.expert}", f"{r.kl:.4g}", f"{r.kl / values[0]:.0%}" if values[0] > 0 else "-",
             f"{r.usage:.1%}", "yes" if r.key else ""] for i, r in enumerate(ranked[:show])]
    shown = f"; the top {len(rows)} shown" if len(rows) < len(ranked) else ""
    console.print(table(f"kl-scan '{result.domain}': {len(ranked)} candidates by the KL of the output when each is pruned "
                        f"({settings.prune}){shown}", ["rank", "expert", "top-k KL", "of max", "usage", "high KL"],
                        rows, justify_right_from=2))
    layers = result.layers_scanned + result.layers_resumed
    resumed = f"; {result.layers_resumed} of {layers} layers resumed" if result.layers_resumed else ""
    if result.windows_resumed:
        resumed += f"; {result.windows_resumed} of {result.windows} windows resumed"
    say(
        f"[bold]{result.domain}[/]: KL of {len(ranked)} candidates in {layers} layers{resumed}, {result.tokens:,} tokens, "
        f"{result.wall_s:.1f}s; KL max {summary['kl_max']:.4g}, median {summary['kl_median']:.4g} -> {result.path}"
    )
    say(f"high-KL candidates: {', '.join(summary['key_experts']) or 'none'} (KL >= {settings.key_factor:g}x the median "
        "of their layer's other candidates); Pick reinforces them until failure-probe chooses the key experts")


@app.command("layer-sensitivity")
@handle_errors
def layer_sensitivity(
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Profile to update (created if missing); default: --out."),
    domain: Optional[str] = typer.Option(None, "--domain", "-d", help="Domain whose calibration text to use (default: the profile's only domain)."),
    model: str = ModelOpt,
    data: Optional[str] = DataOpt,
    text_field: Optional[str] = TextFieldOpt,
    samples: int = SamplesOpt,
    seq_len: int = SeqLenOpt,
    batch_size: int = BatchOpt,
    seed: int = SeedOpt,
    k_min: int = typer.Option(3, "--k-min", help="K_min: experts per token each layer is cut to when measuring W_l."),
    lam: float = typer.Option(0.7, "--lambda", help="Ban's lambda (stored for the runtime)."),
    beta: float = typer.Option(0.5, "--beta", help="Ban's beta: weight of layer vs token sensitivity (stored for the runtime)."),
    ratio_k_num: Optional[int] = typer.Option(None, "--ratio-k-num", help="R's numerator: top-N weight (default K_min; 3 is the paper's literal top-3)."),
    ratio_percentile: float = typer.Option(0.0, "--ratio-percentile", help="0: R_min/R_max are the raw min/max (the paper); p: the p-th and (100-p)-th percentiles."),
    ratio_scope: str = typer.Option("layer", "--ratio-scope", help="Which R range Ban uses at inference: 'layer' or 'pooled' over all layers (both are stored)."),
    ratio_bins: int = typer.Option(100, "--ratio-bins", help="Bins of the stored R histogram over [0, 1]."),
    top_tokens: int = TopTokensOpt,
    hidden_cache_mb: int = CacheOpt,
    checkpoint_every: int = WindowOpt,
    out: Optional[Path] = OutOpt,
    restart: bool = RestartOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    stream: bool = StreamOpt,
    dry: bool = DryRunOpt,
    show_progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Measure each MoE layer's sensitivity (K_base -> K_min, top-1000 KL) and the token ratios R that Ban needs."""
    from banpick_cli.stages.layer_sensitivity import LayerSensitivitySettings, run_layer_sensitivity

    result = _scan("layer-sensitivity", run_layer_sensitivity, settings_from(LayerSensitivitySettings, locals()), locals())
    if result is None:
        return
    layers = result.profile.model.moe_layers
    summary = {
        "profile": str(result.path),
        "domain": result.domain,
        "layers_scanned": result.layers_scanned,
        "layers_resumed": result.layers_resumed,
        "windows": result.windows,
        "windows_resumed": result.windows_resumed,
        "tokens": result.tokens,
        "wall_s": round(result.wall_s, 3),
        "ban": result.ban,
        "layers": [
            {"layer": layers[p], "layer_kl": float(result.layer_kl[p]), "layer_sensitivity": float(result.layer_sensitivity[p]),
             "ratio_min": float(result.ratio_min[p]), "ratio_max": float(result.ratio_max[p])}
            for p in range(len(layers))
        ],
        "notes": result.notes,
    }
    if as_json:
        print_json(summary)
        return
    _notes(result.notes)
    ban = result.ban
    rows = [[f"L{row['layer']}", f"{row['layer_kl']:.4g}", f"{row['layer_sensitivity']:.2f}", _bar(row["layer_sensitivity"]),
             f"{row['ratio_min']:.3f}", f"{row['ratio_max']:.3f}"] for row in summary["layers"]]
    console.print(table(
        f"layer sensitivity: top-k KL when one layer goes K={ban['k_base']} -> {ban['k_min']} (W), normalised (L'), token ratio R range",
        ["layer", "W", "L'", "", "R min", "R max"], rows, justify_right_from=1,
    ))
    w = result.layer_kl
    say(
        f"W spread: max/min {float(w.max() / w.min()) if float(w.min()) > 0 else float('inf'):.1f}x "
        f"(most sensitive L{layers[int(w.argmax())]}, least L{layers[int(w.argmin())]}); "
        f"R over all layers [{ban['ratio_min_global']:.3f}, {ban['ratio_max_global']:.3f}] (top-{ban['ratio_k_num']}/top-{ban['k_base']}); "
        f"{result.tokens:,} tokens, {result.wall_s:.1f}s; lambda {ban['lam']}, beta {ban['beta']} -> {result.path}"
    )


def _bar(x: float, width: int = 20) -> str:
    return "█" * round(max(0.0, min(1.0, x)) * width)
