"""`banpick report`: every figure a profile supports, as PNG files and one self-contained HTML page."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from banpick_cli.errors import BadSetting, ProfileError, import_extra
from banpick_cli.profile.format import RoutingProfile, read_profile
from banpick_cli.progress import ProgressEvent, ProgressFn, silent
from banpick_cli.report.page import Report, ReportFigure, render_page

ALL_LAYERS_PER_PAGE = 12  # as the paper's appendix figures 6-9


def resolve_layers(profile: RoutingProfile, layers: list[int] | None) -> list[int] | None:
    """Returns the rows of the decoder layers a user named (`--layers 3,16`), or None for the default."""
    if not layers:
        return None
    moe = list(profile.model.moe_layers)
    rows = []
    for layer in layers:
        if layer not in moe:
            raise BadSetting(f"--layers: {layer} is not an MoE layer of this model (MoE layers: {moe[0]}..{moe[-1]}"
                             f"{'' if len(moe) == moe[-1] - moe[0] + 1 else ', with gaps'})")
        rows.append(moe.index(layer))
    return sorted(set(rows))


def build_report(
    profile: RoutingProfile | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    layers: list[int] | None = None,
    all_layers: bool = False,
    progress: ProgressFn = silent,
) -> Report:
    """Writes the figures the profile supports and `report.html` (images embedded) under `out_dir`.

    `layers` are decoder-layer indices for the per-layer bar charts (default: the three layers whose
    usage differs most between domains); `all_layers` adds the whole model in pages of 12 layers, as
    the paper's appendix. Figures of stages the profile lacks are skipped with a note on the page.
    """
    matplotlib = import_extra("matplotlib", "report", "banpick report")

    from banpick_cli.outputs import atomic_folder, check_output, output_error
    from banpick_cli.report import figures
    from banpick_cli.report.data import specialised_layers

    source = str(profile) if not isinstance(profile, RoutingProfile) else ""
    out = check_output(out_dir, kind="folder")
    prof = profile if isinstance(profile, RoutingProfile) else read_profile(profile)
    prof.check_values()  # as export does: no figures from values no run writes
    rows = resolve_layers(prof, layers)
    report = Report(out / "report.html")
    plan: list[tuple[str, str, str, str, Callable]] = []  # (section, file stem, title, caption, builder)
    domains = prof.domains()

    if not domains:
        report.skipped.append(("usage", "no domain has usage counts: run `banpick profile --domain D` first"))
    for d in domains:
        plan.append(("usage", f"usage-heatmap-{d}", f"Expert usage frequency, domain '{d}'",
                     "Share of the domain's calibration tokens that select each expert, per MoE layer (paper figure 2, "
                     "appendix figures 6-9 as one heatmap). Red rings mark the domain's candidate experts.",
                     lambda d=d: figures.usage_heatmap(prof, d)))
    if domains:
        chosen = rows or specialised_layers(prof)
        names = ", ".join(f"L{prof.model.moe_layers[r]}" for r in chosen)
        why = "chosen with --layers" if rows else "the layers whose usage differs most between domains"
        plan.append(("usage", "usage-bars-" + "-".join(f"L{prof.model.moe_layers[r]}" for r in chosen),
                     f"Usage per expert in {names}",
                     f"Bars per expert for {names} ({why}), one column per domain, as the paper's figure 2. "
                     "Coloured bars are candidates; the dashed line is the layer mean.",
                     lambda chosen=chosen: figures.usage_bars(prof, chosen, title=f"Expert usage frequency in {names}")))
        if all_layers:
            m = len(prof.model.moe_layers)
            for start in range(0, m, ALL_LAYERS_PER_PAGE):
                page = list(range(start, min(start + ALL_LAYERS_PER_PAGE, m)))
                first, last = prof.model.moe_layers[page[0]], prof.model.moe_layers[page[-1]]
                plan.append(("usage", f"usage-bars-all-L{first}-L{last}", f"Usage per expert, layers {first}-{last}",
                             f"Every expert of layers {first}-{last}, per domain (paper appendix figures 6-9).",
                             lambda page=page, a=first, b=last: figures.usage_bars(
                                 prof, page, title=f"Expert usage frequency, layers {a}-{b}")))
    if len(domains) >= 2:
        plan.append(("candidates", "candidate-overlap", "Cross-domain overlap of candidates",
                     "Per layer, how many candidate experts all domains share, some share, or only one domain has; "
                     "right: Jaccard similarity of the domains' candidate sets over all layers.",
                     lambda: figures.candidate_overlap(prof)))
    else:
        report.skipped.append(("candidates", "cross-domain overlap needs at least two domains in the profile"))
    pick_figures = (
        ("kl", "kl", "KL per candidate", figures.kl_per_candidate,
         "Top-1000 KL of the output when each candidate expert is pruned (paper figure 3, left axis); "
         "key experts in red. Green diamonds: accuracy gain when forced in, where probed (right axis)."),
        ("accuracy_gain", "accuracy-gain", "Accuracy gain per probed candidate", figures.accuracy_gain,
         "Accuracy gain on the failure set when each probed candidate is forced in (paper figure 3, "
         "right axis); outlined bars are the chosen key experts."),
    )
    for d in domains:
        for part, slug, title, draw, caption in pick_figures:
            if prof.domain(d).has(part):
                plan.append(("pick", f"{slug}-{d}", f"{title}, domain '{d}'", caption, lambda d=d, draw=draw: draw(prof, d)))
            else:
                what = "KL per candidate" if part == "kl" else "accuracy gain"
                report.skipped.append(("pick", _missing(prof.domain(d), part, f"{what} for '{d}'")))
                report.missing.append(prof.domain(d).name_of(part))
    if prof.ban.has("layer_kl"):
        plan.append(("ban", "layer-sensitivity", "Layer sensitivity W_l",
                     "KL of the output when one layer alone drops from K_base to K_min experts (paper figure 5a).",
                     lambda: figures.layer_sensitivity(prof)))
    else:
        report.skipped.append(("ban", _missing(prof.ban, "layer_kl", "layer sensitivity (figure 5a)")))
        report.missing.append(prof.ban.name_of("layer_kl"))
    if prof.ban.has("ratio_hist"):
        plan.append(("ban", "token-ratio", "Token ratio R per layer",
                     "Distribution of each token's ratio R of the top-K_min to the top-K_base routing weight, per layer, "
                     "on the calibration set (paper figure 5b, as a histogram per layer).",
                     lambda: figures.token_ratio(prof)))
        if all(prof.ban.has(t) for t in ("layer_sensitivity", "ratio_min", "ratio_max")):
            plan.append(("ban", "ban-k", "Ban's K per layer",
                         "How many experts Ban keeps per token in each layer at the stored λ, β and K_min, computed with "
                         "the routing core's ban_k from the R histogram (each bin at its centre).",
                         lambda: figures.ban_k(prof)))
    else:
        report.skipped.append(("ban", _missing(prof.ban, "ratio_hist", "token ratio and Ban's K (figure 5b)")))
        report.missing.append(prof.ban.name_of("ratio_hist"))

    # Every file is staged beside its final name and renamed in only when the page is written too: a
    # failure (a full disk) leaves no 0-byte PNG and no page that points at missing figures.
    with matplotlib.rc_context(figures.FONT), atomic_folder(out) as stage:
        images: dict[Path, Path] = {}
        for i, (section, stem, title, caption, build) in enumerate(plan):
            fig = build()
            path = out / f"{stem}.png"
            try:
                images[path] = figures.save(fig, stage.path(path.name))
            except OSError as err:
                raise output_error(path, err) from None
            report.figures.append(ReportFigure(section, path, title, caption))
            progress(ProgressEvent("report", i + 1, len(plan), note=stem))
        stage.write_text(report.html.name, render_page(prof, report, source=source, images=images))
    return report


def _missing(group, part: str, what: str) -> str:
    """Returns why a figure is skipped: the one-line error naming the stage that writes `part`."""
    try:
        group.get(part)
    except ProfileError as err:
        return f"{what}: {err}"
    return what
