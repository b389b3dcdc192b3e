"""`failure-probe` and `eval`: the accuracy side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from banpick_cli.runtime import methods

from banpick_cli.cli.base import flag, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, ProgressOpt, app
from banpick_cli.cli.render import note, console, err_console, handle_errors, print_json, progress_bar, say, table

TASK_HELP = ("Task set: math, code, general (the demo's), gsm8k, math500, mbpp, humaneval, gpqa-diamond, "
             "arc-challenge, arc-easy, winogrande; NAME=FILE for a local copy; or a banpick .jsonl task file.")
BatchOpt = typer.Option(16, "--batch-size", help="Prompts per generate call.")
SamplingOpt = typer.Option("greedy", "--sampling", help="greedy, or model-card (the model's generation_config sampling).")
SeedOpt = typer.Option(0, "--seed", help="Sampling seed.")
MaxNewOpt = typer.Option(None, "--max-new-tokens", help="Generation limit (default: the task set's).")
McOpt = typer.Option("generate", "--mc-scoring", help="Multiple choice: generate (extract the letter) or loglik (most probable option).")
ChatOpt = typer.Option("auto", "--chat", help="Wrap prompts in the tokenizer's chat template: auto (when it has one), on, off.")
CodeTimeoutOpt = typer.Option(5.0, "--code-timeout", help="Seconds each code task's tests may run in the sandbox.")
UnsafeCodeOpt = flag(False, "--allow-unsafe-code", help="Where the system forbids the namespaces that isolate model-written code, run it anyway with only rlimits (unsafe: it can write files and leave processes).")
ClockOpt = typer.Option("wall", "--clock", help="Time generation by wall clock, or by this process's CPU time (cpu: steady on a shared CPU; not for GPUs).")
LimitOpt = typer.Option(None, "--limit", help="Use at most N tasks.")
OffsetOpt = typer.Option(0, "--offset", help="Skip the first N tasks (e.g. probe on one half, eval on the other).")


def _options(batch_size, sampling, seed, max_new_tokens, mc_scoring, chat, code_timeout, unsafe_code, clock="wall"):
    from banpick_cli.evaluation.harness import EvalOptions

    return EvalOptions(batch_size=batch_size, sampling=sampling, seed=seed, max_new_tokens=max_new_tokens,
                       mc_scoring=mc_scoring, chat=chat, code_timeout_s=code_timeout, allow_unsafe_code=unsafe_code,
                       clock=clock)


def _floats(text: Optional[str], flag: str) -> tuple[float, ...]:
    from banpick_cli.errors import BadSetting

    if not text:
        return ()
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadSetting(f"{flag} takes comma-separated numbers, got '{text}'") from None


def _ints(text: Optional[str], flag: str) -> tuple[int, ...]:
    from banpick_cli.errors import BadSetting

    try:
        return tuple(int(x) for x in (text or "").split(",") if x.strip())
    except ValueError:
        raise BadSetting(f"{flag} takes comma-separated integers, got '{text}'") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@app.command("failure-probe")
@handle_errors
def failure_probe(
    profile: Path = typer.Option(..., "--profile", "-p", help="Profile to update (needs the domain's candidates, and its KL unless --kl-quantile 0)."),
    domain: str = typer.Option(..., "--domain", "-d", help="Domain whose candidates are probed and whose key experts are chosen."),
    task: str = typer.Option(..., "--task", "-t", help=TASK_HELP),
    model: str = ModelOpt,
    limit: Optional[int] = LimitOpt,
    offset: int = OffsetOpt,
    strategy: str = typer.Option("C", "--strategy", help="Pick strategy used to force each candidate in, and stored for Pick: C, D, A, B or E."),
    range_factor: float = typer.Option(2.0, "--range-factor", help="C/D range: a key expert enters if ranked within range-factor x k (top-2k)."),
    candidates: str = typer.Option("mask", "--candidates", help="Experts to probe: 'mask' (the profile's candidates), 'top-N' (N most used per layer), 'all'."),
    probe_top: int = typer.Option(0, "--probe-top", help="Probe only each layer's N candidates of largest KL (0: every candidate)."),
    min_fixed: int = typer.Option(1, "--min-fixed", help="Key only if forcing it turns at least this many failures right."),
    kl_quantile: float = typer.Option(0.5, "--kl-quantile", help="Key only if its KL is at least this quantile of the probed candidates' KL (0: ignore KL)."),
    max_per_layer: int = typer.Option(2, "--max-per-layer", help="At most this many key experts per layer."),
    max_key: int = typer.Option(0, "--max-key", help="At most this many key experts in all (0: no cap)."),
    batch_size: int = BatchOpt,
    sampling: str = SamplingOpt,
    seed: int = SeedOpt,
    max_new_tokens: Optional[int] = MaxNewOpt,
    mc_scoring: str = McOpt,
    chat: str = ChatOpt,
    code_timeout: float = CodeTimeoutOpt,
    unsafe_code: bool = UnsafeCodeOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    show_progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Find the failure set, measure each candidate expert's accuracy gain on it, choose the key experts."""
    from banpick_cli.stages.failure_probe import FailureProbeSettings, run_failure_probe

    settings = FailureProbeSettings(
        domain=domain, task=task, limit=limit, offset=offset, strategy=strategy, range_factor=range_factor,
        candidates=candidates, probe_top=probe_top, min_fixed=min_fixed, kl_quantile=kl_quantile, max_per_layer=max_per_layer,
        max_key=max_key, options=_options(batch_size, sampling, seed, max_new_tokens, mc_scoring, chat, code_timeout, unsafe_code),
    )
    with progress_bar(show_progress and not as_json, "failure-probe") as progress:
        result = run_failure_probe(settings, profile=profile, model=model, device=device, dtype=dtype, progress=progress)
    from banpick_cli.evaluation.stats import probe_gain

    layers = result.profile.model.moe_layers
    gain = result.gain
    probed = [(m, e) for m, e in (result.fixed >= 0).nonzero().tolist()]
    # The gain as a paired comparison on all probed tasks (only failures rerun: broken successes not counted).
    paired = {(m, e): probe_gain(int(result.fixed[m, e]), len(result.failure_set), result.tasks) for m, e in probed}
    summary = {
        "profile": str(result.path), "domain": result.domain, "task": result.task_set, "tasks": result.tasks,
        "baseline_correct": result.baseline_correct, "failure_set": len(result.failure_set),
        "candidates_probed": len(probed), "resumed": result.resumed, "kl_floor": result.kl_floor,
        "key_experts": [f"L{layers[m]}E{e}" for m, e in result.key_experts.nonzero().tolist()],
        "gains": {f"L{layers[m]}E{e}": round(float(gain[m, e]), 4) for m, e in probed},
        "gain_stats": {f"L{layers[m]}E{e}": {k: v for k, v in paired[m, e].to_dict().items()
                                              if k in ("delta", "ci95", "p_value")} for m, e in probed},
        "strategy": settings.strategy, "range_factor": settings.range_factor, "wall_s": round(result.wall_s, 2),
    }
    if as_json:
        print_json(summary)
        return
    kl = result.profile.domain(result.domain).find("kl")
    rows = sorted(probed, key=lambda me: (-int(result.fixed[me[0], me[1]]), me))
    console.print(table(
        f"failure-probe '{result.domain}' on {result.task_set}: {len(result.failure_set)} failures of {result.tasks} tasks "
        f"(strategy {settings.strategy})",
        ["expert", "fixed", "gain", f"accuracy change on {result.tasks} [95% CI]", "p", "KL", "key"],
        [[f"L{layers[m]}E{e}", f"{int(result.fixed[m, e])}/{len(result.failure_set)}", f"{float(gain[m, e]):.1%}",
          f"{paired[m, e].delta:+.2f} [{paired[m, e].ci95[0]:+.2f}, {paired[m, e].ci95[1]:+.2f}]",
          f"{paired[m, e].p_value:.2f}",
          "-" if kl is None or bool(kl[m, e].isnan()) else f"{float(kl[m, e]):.4f}",
          "key" if bool(result.key_experts[m, e]) else ""] for m, e in rows[:40]],
    ))
    if len(rows) > 40:
        console.print(f"... {len(rows) - 40} more candidates (see --json)")
    say("accuracy change: points on all probed tasks, 95% paired-bootstrap interval; p: exact McNemar. Only "
                  "failures are rerun, so successes a candidate breaks are not counted: the most favourable reading.")
    if result.resumed:
        err_console.print(f"note: resumed after {result.resumed} candidates probed by an earlier run")
    keys = summary["key_experts"]
    floor = f" and KL >= {result.kl_floor:.4g}" if result.kl_floor is not None else ""
    rule = f"fixes >= {settings.min_fixed} of the {len(result.failure_set)} failures{floor}"
    if keys:
        say(f"[bold]{result.domain}[/]: {len(keys)} key experts: {', '.join(keys)} (each {rule}); Pick strategy "
            f"{settings.strategy}, range top-{settings.range_factor:g}k -> {result.path}")
    else:
        say(f"[bold]{result.domain}[/]: no key experts (a key expert {rule}; no candidate did): pick and ban&pick's "
            f"Pick leave {result.domain}'s routing as is -> {result.path}")


@app.command("eval")
@handle_errors
def evaluate(
    task: str = typer.Option(..., "--task", "-t", help=TASK_HELP + " Comma-separate several for one table."),
    method: str = typer.Option("baseline", "--method", help=f"Comma-separated: {', '.join(methods.names())}. The baseline always runs first."),
    model: str = ModelOpt,
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Routing profile (pick, ban, banpick need one)."),
    domain: Optional[str] = typer.Option(None, "--domain", "-d", help="Key experts of this domain for pick/banpick (default: each task's own domain)."),
    lam: Optional[str] = typer.Option(None, "--lambda", help="Ban / Ban&Pick lambda; comma-separated to sweep (default: the profile's, else 0.7)."),
    k_min: Optional[int] = typer.Option(None, "--k-min", help="Ban / Ban&Pick K_min (default 3)."),
    tau: str = typer.Option("0.7,0.8,0.9", "--tau", help="Dynamic routing thresholds (appendix E: each is a row)."),
    k: Optional[str] = typer.Option(None, "--k", help="Fixed-K: experts per token, comma-separated for one row each (e.g. 4,5,6)."),
    target_avg_topk: Optional[float] = typer.Option(None, "--target-avg-topk", help="Compare at one expert budget: set each budgeted method's knob (" + ", ".join(f"{m.name}: {m.knob.name}" for m in methods.REGISTRY.values() if m.knob) + ") so each runs this many experts per token on calibration text (within 0.2)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Pick strategy, over the profile's (A-E)."),
    range_factor: Optional[float] = typer.Option(None, "--range-factor", help="Pick C/D range factor, over the profile's."),
    limit: Optional[int] = LimitOpt,
    offset: int = OffsetOpt,
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration text for DES medians and RICE (default: the task domains' own)."),
    calib_samples: int = typer.Option(64, "--calib-samples", help="Calibration texts for DES / RICE."),
    odp_protect: float = typer.Option(0.02, "--odp-protect", help="ODP: fraction of each prompt's tokens protected as key tokens."),
    rice_markers: Optional[str] = typer.Option(None, "--rice-markers", help="RICE marker tokens, comma-separated (default <think>,</think>)."),
    rice_factor: float = typer.Option(2.0, "--rice-factor", help="RICE: weight multiplier of cognitive experts."),
    rice_top: int = typer.Option(2, "--rice-top", help="RICE: number of cognitive experts (by nPMI)."),
    batch_size: int = BatchOpt,
    sampling: str = SamplingOpt,
    seed: int = SeedOpt,
    max_new_tokens: Optional[int] = MaxNewOpt,
    mc_scoring: str = McOpt,
    chat: str = ChatOpt,
    code_timeout: float = CodeTimeoutOpt,
    unsafe_code: bool = UnsafeCodeOpt,
    clock: str = ClockOpt,
    batch_aware: bool = flag(False, "--batch-aware", help="Also run each pruning row with the batch-aware step after it (a '+batch' row beside it): tokens move slots onto experts the rest of their batch keeps (docs/routing.md)."),
    repeats: int = typer.Option(1, "--repeats", help="Timing passes, interleaved over methods; tokens/s is each method's median."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the table as JSON to this file."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    show_progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Accuracy, Avg-TopK, tokens/s and speed ratio of routing methods on task sets (the paper's Tables 2-3)."""
    import json

    from banpick_cli.outputs import check_output, write_text_atomic
    from banpick_cli.stages.eval import EvalSettings, run_eval

    settings = EvalSettings(
        tasks=_names(task), methods=_names(method), domain=domain, lambdas=_floats(lam, "--lambda"), k_min=k_min,
        taus=_floats(tau, "--tau"), ks=_ints(k, "--k"), target_avg_topk=target_avg_topk, strategy=strategy, range_factor=range_factor, limit=limit, offset=offset,
        calib_data=calib_data, calib_samples=calib_samples, odp_protect=odp_protect,
        rice_markers=_names(rice_markers or ""), rice_factor=rice_factor, rice_top=rice_top, repeats=repeats,
        batch_aware=batch_aware, options=_options(batch_size, sampling, seed, max_new_tokens, mc_scoring, chat, code_timeout, unsafe_code, clock),
    )
    if out is not None:  # before the run, not after it
        check_output(out, kind="file", inputs=[profile] if profile else ())
    with progress_bar(show_progress and not as_json, "eval") as progress:
        report = run_eval(settings, model=model, profile=profile, device=device, dtype=dtype, progress=progress)
    data = report.to_dict()
    if out is not None:
        write_text_atomic(out, json.dumps(data, indent=2, sort_keys=True) + "\n")
    if as_json:
        print_json(data)
        return
    speed = speed_means_something(data)
    console.print(eval_table(data, speed=speed))
    say(EXPERTS_NOTE + " " + (SPEED_NOTE if speed else no_speed_note(data)))
    for text in report.notes:
        note(text)
    for text in _without_key_experts(data, profile):
        note(text)


# Experts narrower than this do too little work for a timing to show it: the routing's Python overhead and
# machine noise decide the speed column (the demo's 64-wide experts make every pruning method read slower than
# the baseline). Real MoE experts are 768 (Qwen3-30B-A3B) to 2048 wide; docs/benchmarks.md times those shapes.
SPEED_MIN_EXPERT_WIDTH = 256


def speed_means_something(data: dict) -> bool:
    """Returns whether the eval table shows tok/s and speed: not for experts too narrow to time (--json has them)."""
    width = data.get("expert_width", 0)
    return not 0 < width < SPEED_MIN_EXPERT_WIDTH


def no_speed_note(data: dict) -> str:
    return (f"speed: not shown: this model's experts are {data['expert_width']} wide, too small for a timing to show "
            "expert compute (Python routing overhead decides it, so every pruning method would read slower than the "
            "baseline; --json has the numbers). Speed at real shapes: docs/benchmarks.md (bench/bench_runtime.py).")


def _without_key_experts(data: dict, profile) -> list[str]:
    """Returns a note for each pick/ban&pick row whose domain has no key experts (Pick then changes nothing)."""
    if profile is None:
        return []
    from banpick_cli.profile import read_profile

    prof, notes = read_profile(profile), []
    for row in data["rows"]:
        for domain in sorted(set(row.get("extra", {}).get("domains", {}).values())):
            key = prof.domain(domain).find("key_experts")
            if row["method"] in ("pick", "banpick") and (key is None or not bool(key.any())):
                notes.append(f"{row['label']}: domain '{domain}' has no key experts, so its Pick changes nothing "
                             "(`banpick inspect` shows which stage found what)")
    return notes


def eval_table(data: dict, *, speed: bool = True):
    """Returns the Rich table of an eval report (its `to_dict()`): accuracy (delta vs baseline) per task set,
    the mean change with its 95% paired-bootstrap interval and McNemar p, expert compute and measured speed."""
    names = data.get("task_order") or list(data["tasks"])
    batch = bool(data["settings"].get("batch_aware"))  # distinct experts per batch: what the step changes
    rows = []
    for i, row in enumerate(data["rows"]):
        cells = [row["label"], f"{row['avg_topk']:.2f}", f"{row['experts_vs_baseline']:.2f}x"]
        if batch:
            cells.append(f"{row['unique_experts']:.1f}")
        for name in names:
            r = row["results"][name]
            if r["no_answers"]:
                cells.append(f"n/a (0/{r['n']} answered)")
            elif i == 0:
                cells.append(f"{r['accuracy']:.2f}")
            else:
                cells.append(f"{r['accuracy']:.2f} ({r['delta']:+.2f})")
        if i == 0:
            cells += [f"{row['accuracy']:.2f}", ""]
        else:
            lo, hi = row["ci95"]
            cells += [f"{row['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{row['p_value']:.2f}"]
        if speed:
            cells += [f"{row['tokens_per_s']:,.0f}", f"{row['speedup']:.2f}x"]
        rows.append(cells)
    columns = ["method", "Avg-TopK", "experts", *(["experts/batch"] if batch else []), *[f"{n} (n={data['tasks'][n]['n']})" for n in names],
               "change [95% CI]", "p", *(["tok/s", "speed"] if speed else [])]
    return table(f"{data['model']} on {data['device']}: accuracy % (change vs baseline)", columns, rows)


EXPERTS_NOTE = ("experts = expert compute per token against the baseline's; experts/batch (with --batch-aware) = "
                "distinct experts per MoE layer per forward batch; change = mean accuracy change, its 95% "
                "paired-bootstrap interval; p = exact McNemar.")
SPEED_NOTE = ("speed = positions/s against the baseline in this process (real-shape timings: docs/benchmarks.md, "
              "bench/bench_runtime.py).")
