"""The `banpick` command line: thin Typer commands over the library. Heavy imports stay inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from banpick_cli.cli.base import flag, settings_from, DeviceOpt, DryRunOpt, DtypeOpt, JsonOpt, ModelOpt, ProgressOpt, StreamOpt, app
from banpick_cli.cli.render import note, console, err_console, handle_errors, print_json, progress_bar, say, table

@app.command()
@handle_errors
def profile(
    domain: str = typer.Option(..., "--domain", "-d", help="Domain name (math, code, general) or a domain .toml file."),
    out: Path = typer.Option(..., "--out", "-o", help="Profile to write; an existing profile of the same model is updated."),
    model: str = ModelOpt,
    data: Optional[str] = typer.Option(
        None, "--data", help="Local .jsonl/.json/.parquet/.txt/.csv file, hub dataset id, or 'embedded'. Default: the domain's hub datasets ('embedded' for the demo model)."
    ),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field holding the text (default: the domain's template, else 'text')."),
    samples: int = typer.Option(256, "--samples", help="Number of calibration texts."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per text (longer texts are truncated)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Shuffle seed for choosing texts."),
    candidate_ratio: float = typer.Option(2.0, "--candidate-ratio", help="Candidate if usage >= this many times the layer mean."),
    candidate_top: int = typer.Option(0, "--candidate-top", help="Also mark the N most used experts of each layer (0: off)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = typer.Option(
        None, "--device-map", help="Spread a model too big for one GPU over all visible GPUs (accelerate), e.g. 'auto'."
    ),
    sequential: bool = flag(
        False, "--sequential", help="Keep the model in CPU memory and run one decoder layer at a time on the device (fits 235B on one GPU)."
    ),
    checkpoint_every: int = typer.Option(
        32, "--checkpoint-every", help="Save partial counts every N batches next to --out; a rerun resumes (0: off)."
    ),
    stream: bool = StreamOpt,
    dry: bool = DryRunOpt,
    show_progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Count expert usage on a domain's calibration text and mark its domain-specialised candidates.

    Runs data-parallel under `torchrun --nproc-per-node N` (rank 0 writes the profile).
    """
    from banpick_cli.stages.profile import ProfileSettings, RunOptions, run_profile

    settings = settings_from(ProfileSettings, locals())
    from banpick_cli.cli.scans import choose_stream, dry_run

    if dry:
        RunOptions(sequential=sequential, checkpoint_every=checkpoint_every, device_map=device_map, stream=stream)
        return dry_run("profile", settings, model=model, device=device, dtype=dtype, as_json=as_json,
                       checkpoint_every=checkpoint_every)
    if not (sequential or device_map):  # those two already place a model that does not fit one device
        stream = choose_stream(stream, model, device, dtype)
    options = RunOptions(sequential=sequential, checkpoint_every=checkpoint_every, device_map=device_map, stream=stream)
    with progress_bar(show_progress and not as_json, "profile") as progress:
        result = run_profile(settings, out=out, model=model, device=device, dtype=dtype, progress=progress, options=options)
    if result.rank != 0:
        return  # rank 0 reports for the whole data-parallel run
    if result.stale_sidecar:
        err_console.print("note: discarded partial counts of an earlier run with other settings, data or model")
    for text in result.notes:
        note(text)
    summary = {
        "profile": str(result.path),
        "domain": result.domain,
        "samples": result.usage.samples,
        "tokens": result.usage.tokens,
        "wall_s": round(result.wall_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "candidates": int(result.profile.domain(result.domain).candidates.sum()),
        "dropped_stale": result.dropped,
        "resumed_batches": result.resumed_batches,
        "world_size": result.world,
    }
    if as_json:
        print_json(summary)
        return
    _print_usage(result.profile, result.domain, top=4)
    for name in result.dropped:
        err_console.print(f"note: removed stale '{name}' (its usage counts changed); rerun its stage")
    if result.resumed_batches:
        err_console.print(f"note: resumed {result.resumed_batches} batches from the checkpoint of an interrupted run")
    say(
        f"[bold]{result.domain}[/]: {summary['samples']} texts, {summary['tokens']:,} tokens in {summary['wall_s']:.1f}s "
        f"({summary['tokens_per_s']:,.0f} tok/s); {summary['candidates']} candidate experts -> {result.path}"
    )


def _print_usage(prof, domain: str, top: int) -> None:
    from banpick_cli.cli.views import domain_usage

    rows = []
    for layer in domain_usage(prof, domain, top=top):
        cells = [f"E{e} {f:.0%} {r:.1f}x" for e, f, r in layer.top]
        cands = " ".join(f"E{e}" for e in layer.candidates[:8]) + (" …" if len(layer.candidates) > 8 else "")
        rows.append([f"L{layer.layer_index}", *cells, cands or "-"])
    columns = ["layer", *[f"#{i + 1}" for i in range(len(rows[0]) - 2)], "candidates"]
    console.print(
        table(f"domain '{domain}': most used experts per layer (share of tokens, ratio to the layer mean)", columns, rows)
    )


@app.command()
@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="A routing profile (.safetensors)."),
    domain: Optional[str] = typer.Option(None, "--domain", "-d", help="Show only this domain."),
    top: int = typer.Option(5, "--top", help="Experts to list per layer."),
    as_json: bool = JsonOpt,
) -> None:
    """Show what a routing profile holds: model, provenance, and per domain the top experts of each layer."""
    from banpick_cli.cli.views import profile_summary
    from banpick_cli.errors import BadSetting
    from banpick_cli.profile import read_profile

    if top < 1:
        raise BadSetting(f"--top must be >= 1, got {top}")
    prof = read_profile(path)
    if domain is not None and domain not in prof.domains():
        raise BadSetting(f"the profile has no domain '{domain}'; it has: {', '.join(prof.domains()) or 'none'}")
    if as_json:
        print_json(profile_summary(prof))
        return
    m = prof.model
    say(
        f"[bold]{path}[/]: {m.name_or_path} ({m.architecture}), {len(m.moe_layers)} MoE layers x {m.num_experts} experts, "
        f"top-{m.k_base} {m.router.scoring}{' renormalised' if m.router.renormalize else ''}; fingerprint {prof.fingerprint[:19]}…; "
        f"banpick {prof.banpick_version}, {prof.created_utc}"
    )
    stage_rows = [[key, rec.get("dataset", ""), rec.get("samples", ""), rec.get("tokens", ""), rec.get("wall_s", "")] for key, rec in sorted(prof.provenance.items())]
    if stage_rows:
        console.print(table("stages", ["stage", "data", "samples", "tokens", "wall s"], stage_rows, justify_right_from=2))
    for name in [domain] if domain else prof.domains():
        _print_usage(prof, name, top=top)
        _print_findings(prof, name)
    extra = sorted(k for k in prof.tensors if not k.endswith(("expert_counts", "token_counts", "candidates")))
    if extra:
        say("other tensors: " + ", ".join(extra))


def _print_findings(prof, domain: str) -> None:
    """Prints which stage found what in a domain: candidates, high-KL candidates, key experts, what Pick reads."""
    from banpick_cli.cli.views import domain_findings

    rows = [[f.stage, f.found] for f in domain_findings(prof, domain)]
    console.print(table(f"domain '{domain}': what each stage found", ["stage", "found"], rows, justify_right_from=2))


@app.command()
@handle_errors
def merge(
    inputs: list[Path] = typer.Argument(..., help="Two or more profiles of the same model."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged profile to write."),
    as_json: bool = JsonOpt,
) -> None:
    """Merge profiles of one model: add usage counts of shared domains (data shards), union the rest."""
    from banpick_cli.profile.merge import merge_files

    merged = merge_files(inputs, out)
    if as_json:
        print_json({"profile": str(out), "domains": merged.domains(), "inputs": [str(p) for p in inputs]})
        return
    say(f"merged {len(inputs)} profiles -> {out} (domains: {', '.join(merged.domains())})")


# Stage commands live in their own modules; importing them registers them on `app`.
from banpick_cli.cli import scans, accuracy, runtime  # noqa: E402,F401
from banpick_cli.cli import report  # noqa: E402,F401

# `banpick --help` lists the commands in the pipeline's order, whichever command module was imported first.
PIPELINE = ("profile", "inspect", "merge", "kl-scan", "layer-sensitivity", "failure-probe", "eval", "export", "report",
            "import-usage")
app.registered_commands.sort(key=lambda cmd: PIPELINE.index(cmd.name or cmd.callback.__name__.replace("_", "-")))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
