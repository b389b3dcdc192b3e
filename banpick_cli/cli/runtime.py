"""`export`: ship a profile into serving images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from banpick_cli.runtime import methods

from banpick_cli.cli.base import JsonOpt, app, flag
from banpick_cli.cli.render import console, handle_errors, print_json, say, table


@app.command()
@handle_errors
def export(
    profile: Path = typer.Argument(..., help="A routing profile (.safetensors)."),
    target: str = typer.Option(..., "--target", "-t", help="Where it will run: vllm, sglang or hf (transformers)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write (created if missing)."),
    method: Optional[str] = typer.Option(None, "--method", help=f"vllm and sglang serve: {', '.join(methods.names(lambda m: m.engines))}; hf: every method ({', '.join(methods.names())}). Default: chosen at serve time."),
    domain: Optional[str] = typer.Option(None, "--domain", "-d", help="Domain whose key experts pick/banpick reinforce; 'auto' (hf only) chooses per request."),
    param: list[str] = typer.Option([], "--param", help="Hyperparameter override KEY=VALUE (JSON value), e.g. lam=0.5 or strategy=\"D\"; repeatable."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model path or hub id the serving image loads (default: the one the profile names)."),
    batch_aware: bool = flag(False, "--batch-aware", help="Serve with the batch-aware step after the method (fewer distinct experts per batch; bound from the profile's calibration, else top-2k)."),
    as_json: bool = JsonOpt,
) -> None:
    """Write a serving bundle: compact runtime profile, manifest, README with the three lines, Dockerfile lines."""
    from banpick_cli.export import export_bundle

    params = _params(param)
    if batch_aware:
        params.setdefault("batch_aware", True)
    result = export_bundle(profile, target, out, method=method, domain=domain, overrides=params, model=model)
    m = result.manifest
    if as_json:
        print_json({"out": str(result.out), "files": [str(f) for f in result.files], "method": m["method"],
                    "domain": m["domain"], "engine_slots": m["engine_slots"], "profile_sha256": m["profile"]["sha256"],
                    "served": {k: v["expected_avg_experts"] for k, v in m["served"].items()}})
        return
    rows = []
    for name, served in sorted(m["served"].items()):
        e = served["expected_avg_experts"]
        span = f"{e['overall_low']:.2f}" if e["overall_low"] == e["overall_high"] else f"{e['overall_low']:.2f}-{e['overall_high']:.2f}"
        rows.append([name, len(served["changed_layers"]), served["engine_slots"], span])
    console.print(table(f"bundle for {target} (model top-{m['model']['k_base']})", ["serves", "layers changed", "slots", "experts/token"], rows, justify_right_from=1))
    lams = sorted({served["hyperparameters"]["lam"] for served in m["served"].values() if "lam" in served["hyperparameters"]})
    if lams:  # why this need not match eval's --target-avg-topk rows, which solve their own lambda for a budget
        say(f"experts/token: Ban's expected count on the calibration text at the profile's lambda "
            f"{', '.join(f'{x:g}' for x in lams)} (eval --target-avg-topk solves its own lambda for its budget; serve "
            "that one with --param lam=VALUE)")
    say(f"wrote {len(result.files)} files to {result.out} (profile sha256 {m['profile']['sha256'][:12]}…); see {result.out / 'README.md'}")


def _params(items: list[str]) -> dict:
    import json

    from banpick_cli.errors import BadSetting

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BadSetting(f"--param {item!r}: expected KEY=VALUE, e.g. lam=0.5")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw  # a bare word: strategy=D
    return out
