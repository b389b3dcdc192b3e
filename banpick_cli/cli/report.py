"""`report` (figures and an HTML page of a profile) and `import-usage` (profiles from serving-engine dumps)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from banpick_cli.cli.base import flag, JsonOpt, ProgressOpt, app
from banpick_cli.cli.render import commands, note, console, err_console, handle_errors, print_json, progress_bar, say


@app.command()
@handle_errors
def report(
    path: Path = typer.Argument(..., help="A routing profile (.safetensors)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for the PNG figures and report.html."),
    layers: Optional[str] = typer.Option(
        None, "--layers", help="Decoder layers for the per-expert bar charts, e.g. '4,16,29' (default: the 3 most domain-specific)."
    ),
    all_layers: bool = flag(False, "--all-layers", help="Also draw every layer's bars, 12 layers a page (paper figures 6-9)."),
    show_progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Draw a profile's figures (usage, candidates, KL, gains, layer and token sensitivity) into PNGs and one HTML page."""
    from banpick_cli.errors import BadSetting
    from banpick_cli.report import build_report

    chosen = None
    if layers:
        try:
            chosen = [int(part.strip().lstrip("Ll")) for part in layers.split(",") if part.strip()]
        except ValueError:
            raise BadSetting(f"--layers takes decoder-layer numbers like '4,16,29', got {layers!r}") from None
    with progress_bar(show_progress and not as_json, "report") as progress:
        result = build_report(path, out, layers=chosen, all_layers=all_layers, progress=progress)
    if as_json:
        print_json({"html": str(result.html), "figures": [str(f.path) for f in result.figures],
                    "skipped": [note for _, note in result.skipped]})
        return
    if result.skipped:
        runs = _stage_commands(path, result.missing)
        commands(f"skipped {len(result.skipped)} figures whose stages have not run on this profile (report.html lists "
                 "them)" + ("; to draw them, run:" if runs else ""), runs, stderr=True)
    say(f"{len(result.figures)} figures -> {out}/; open {result.html}")


def _stage_commands(profile: Path, missing: list[str]) -> list[str]:
    """Returns the commands that write the missing tensors, in pipeline order, one per stage and domain."""
    import shlex

    from banpick_cli.profile.format import stage_of
    from banpick_cli.tasks.registry import list_task_sets

    tasks = {source.name for source in list_task_sets()}
    order = ("kl-scan", "failure-probe", "layer-sensitivity")
    runs = {}
    for name in missing:
        stage, parts = stage_of(name), name.split("/")
        line = f"banpick {stage} --profile {shlex.quote(str(profile))}"
        if parts[0] == "domain":
            line += f" --domain {shlex.quote(parts[1])}"
            if stage == "failure-probe":  # its task set: the domain's own when one has its name
                line += f" --task {shlex.quote(parts[1]) if parts[1] in tasks else 'TASK'}"
        domain = parts[1] if parts[0] == "domain" else ""
        runs.setdefault((domain, order.index(stage) if stage in order else len(order), stage), line)
    return [runs[k] for k in sorted(runs)]


@app.command("import-usage")
@handle_errors
def import_usage(
    files: list[Path] = typer.Argument(..., help="Dump files or folders (SGLang .pt; vLLM .npz/.npy/.pt/.json/.jsonl)."),
    engine: str = typer.Option(..., "--from", help="Which engine wrote the dumps: sglang or vllm."),
    model: str = typer.Option(..., "--model", "-m", help="The served model (local directory or hub id)."),
    domain: str = typer.Option(..., "--domain", "-d", help="Name of the domain the traffic belongs to (e.g. math, prod-chat)."),
    out: Path = typer.Option(..., "--out", "-o", help="Profile to write; an existing profile of the same model is updated."),
    replicas: int = typer.Option(
        1, "--replicas", help="Ranks that each recorded the same tokens (SGLang tensor parallel without DP attention: its --tp-size)."
    ),
    candidate_ratio: float = typer.Option(2.0, "--candidate-ratio", help="Candidate if usage >= this many times the layer mean."),
    candidate_top: int = typer.Option(0, "--candidate-top", help="Also mark the N most used experts of each layer (0: off)."),
    as_json: bool = JsonOpt,
) -> None:
    """Build a domain's usage profile from what SGLang or vLLM recorded while serving (docs/import.md)."""
    from banpick_cli.stages.import_usage import ImportSettings, run_import

    settings = ImportSettings(engine=engine, domain=domain, files=tuple(str(f) for f in files), replicas=replicas,
                              candidate_ratio=candidate_ratio, candidate_top=candidate_top)
    result = run_import(settings, model=model, out=out)
    usage = result.usage
    summary = {
        "profile": str(result.path),
        "domain": domain,
        "engine": engine,
        "files": len(usage.files),
        "sequences": usage.sequences,
        "tokens": int(usage.token_counts[0]),
        "tokens_exact": usage.tokens_exact,
        "candidates": int(result.profile.domain(domain).candidates.sum()),
        "notes": usage.notes,
        "dropped_stale": result.dropped,
    }
    if as_json:
        print_json(summary)
        return
    for text in usage.notes:
        note(text)
    for name in result.dropped:
        err_console.print(f"note: removed stale '{name}' (its usage counts changed); rerun its stage")
    estimated = "" if usage.tokens_exact else " (estimated as selections / K_base)"
    say(f"[bold]{domain}[/]: {summary['files']} {engine} dumps, {summary['sequences']} records, "
                  f"{summary['tokens']:,} tokens{estimated}; {summary['candidates']} candidate experts -> {result.path}")
