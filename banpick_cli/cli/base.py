"""The Typer app object and the options every command shares. Heavy imports stay inside commands."""

from __future__ import annotations

import typer

EXIT_CODES = "Exit codes: 0 done, 1 user error (bad input, wrong model, missing data), 2 usage error, 3 interrupted (rerun to resume)."

app = typer.Typer(
    name="banpick",
    context_settings={"help_option_names": ["-h", "--help"]},
    help=f"Calibrate Mixture-of-Experts routing after training (Ban&Pick) and write routing profiles.\n\n{EXIT_CODES}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

def settings_from(cls, flags: dict):
    """Returns the stage's settings object built from a command's parameters: each settings field takes the
    parameter of the same name (the flag's value), so a command lists each setting once, as its option."""
    import dataclasses

    return cls(**{f.name: flags[f.name] for f in dataclasses.fields(cls) if f.name in flags})


def flag(default: bool, *names: str, **kwargs):
    """Returns the typer.Option of an on/off flag, shown in --help without a value placeholder (Typer 0.29's
    help prints "<bool>" after every flag otherwise, which reads as if the flag took a value)."""
    return typer.Option(default, *names, metavar="", **kwargs)


ModelOpt = typer.Option("demo", "--model", "-m", help="Local model directory or hub id; 'demo' is the shipped demo model.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32.")
ProgressOpt = flag(True, "--progress/--no-progress", help="Show a progress bar (off for CI logs).")
JsonOpt = flag(False, "--json", help="Print a JSON summary on stdout instead of tables.")
StreamOpt = flag(
    False, "--stream", help="Read each decoder layer from the checkpoint (a local safetensors folder) when it runs: for models "
    "larger than this machine's memory. Chosen by itself, with a note, when the weights do not fit the memory free now."
)
DryRunOpt = flag(
    False, "--dry-run", help="From the model's config alone: print the forwards, layer loads, generated tokens, peak memory "
    "per mode and a time estimate (one layer of the model's shape timed here), then exit without writing anything."
)


def _version(value: bool) -> None:
    if value:
        from banpick_cli import __version__

        typer.echo(f"banpick {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = flag(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Calibrate Mixture-of-Experts routing after training (Ban&Pick) and write routing profiles."""
