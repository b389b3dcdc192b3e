"""The report's HTML page: one self-contained file (figures embedded as base64 PNG, no scripts, no links out)."""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from dataclasses import dataclass, field
from typing import Mapping

from banpick_cli.profile.format import RoutingProfile


@dataclass(frozen=True)
class ReportFigure:
    """One written figure: its section of the page, file, title and caption."""

    section: str
    path: Path
    title: str
    caption: str


@dataclass
class Report:
    """What `build_report` wrote, and which figures it skipped for missing stages (with why)."""

    html: Path
    figures: list[ReportFigure] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (section, note)
    missing: list[str] = field(default_factory=list)  # the profile tensors whose absence skipped a figure



SECTIONS = [
    ("usage", "Expert usage per domain"),
    ("candidates", "Candidates across domains"),
    ("pick", "Pick: key experts"),
    ("ban", "Ban: layer and token sensitivity"),
]
STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #222; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.6rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f6f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2rem 0 2rem; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9rem; color: #444; margin-top: 0.3rem; }
.skip { background: #fff8e6; border-left: 4px solid #f0b400; padding: 0.4rem 0.8rem; margin: 0.4rem 0; font-size: 0.9rem; }
code, pre { font-size: 0.82rem; background: #f6f8fa; } pre { padding: 0.5rem; overflow-x: auto; }
.muted { color: #666; font-size: 0.9rem; }
"""


def render_page(profile: RoutingProfile, report: Report, *, source: str = "", images: Mapping[Path, Path] | None = None) -> str:
    """Returns the HTML of `report.html`: provenance first, then each section's figures and its skipped-figure
    notes. `images` maps a figure's final path to where its PNG is now (a staged temporary file)."""
    m = profile.model
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>banpick report: {escape(m.name_or_path)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Routing profile report: {escape(m.name_or_path)}</h1>",
        f"<p class='muted'>{escape(source) + ' · ' if source else ''}written by banpick {escape(profile.banpick_version)} "
        f"at {escape(profile.created_utc)} · fingerprint <code>{escape(profile.fingerprint[:23])}…</code></p>",
        "<h2>Model and provenance</h2>",
        _model_table(profile),
        _provenance_table(profile),
    ]
    for key, heading in SECTIONS:
        figs = [f for f in report.figures if f.section == key]
        notes = [note for section, note in report.skipped if section == key]
        if not figs and not notes:
            continue
        parts.append(f"<h2>{escape(heading)}</h2>")
        for note in notes:
            parts.append(f"<p class='skip'>Not shown: {escape(note)}</p>")
        for fig in figs:
            data = base64.b64encode((images or {}).get(fig.path, fig.path).read_bytes()).decode("ascii")
            parts.append(
                f"<figure id='{escape(fig.path.stem)}'><img alt='{escape(fig.title)}' src='data:image/png;base64,{data}'>"
                f"<figcaption><b>{escape(fig.title)}.</b> {escape(fig.caption)} "
                f"<span class='muted'>({escape(fig.path.name)})</span></figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _model_table(profile: RoutingProfile) -> str:
    m, r = profile.model, profile.model.router
    rows = [
        ("architecture", f"{m.architecture} ({m.model_type})"),
        ("layers", f"{m.num_layers} decoder layers, {len(m.moe_layers)} MoE (L{m.moe_layers[0]}-L{m.moe_layers[-1]})"),
        ("experts", f"{m.num_experts} per layer, top-{m.k_base} {r.scoring}{', renormalised' if r.renormalize else ''}"),
        ("routing", f"{r.topk_method}" + (f", {r.n_group} groups, top {r.topk_group}" if r.n_group > 1 else "")
         + (f", scaling {r.routed_scaling_factor:g}" if r.routed_scaling_factor != 1 else "")),
        ("domains", ", ".join(profile.domains()) or "none"),
        ("tensors", ", ".join(sorted(profile.tensors))),
        ("settings", f"<details><summary>{escape(', '.join(sorted(profile.settings)) or 'none')}</summary>"
                     f"<pre>{escape(json.dumps(profile.settings, indent=1, sort_keys=True))}</pre></details>"),
    ]
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v if k == 'settings' else escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _provenance_table(profile: RoutingProfile) -> str:
    records = []
    for key, record in sorted(profile.provenance.items()):
        if "merged" in record:  # a merged profile keeps each input's record
            records += [(f"{key} (merged {i + 1})", r) for i, r in enumerate(record["merged"])]
        else:
            records.append((key, record))
    if not records:
        return "<p class='muted'>No provenance records.</p>"
    head = "<tr><th>stage</th><th>data</th><th>samples</th><th>tokens</th><th>seq len</th><th>wall s</th><th>device / dtype</th><th>finished</th><th>how</th></tr>"
    rows = []
    for key, r in records:
        settings = json.dumps(r.get("settings", {}), indent=1, sort_keys=True)
        how = (f"<code>{escape(str(r.get('command', '')))}</code>"
               f"<details><summary>settings</summary><pre>{escape(settings)}</pre></details>")
        cells = [escape(key), escape(f"{r.get('dataset', '')} {r.get('split') or ''}".strip()),
                 _num(r.get("samples")), _num(r.get("tokens")), _num(r.get("seq_len")), _num(r.get("wall_s")),
                 escape(f"{r.get('device', '')} / {r.get('dtype', '')}"), escape(str(r.get("finished_utc", ""))), how]
        classes = ["", "", "num", "num", "num", "num", "", "", ""]
        rows.append("<tr>" + "".join(f"<td class='{c}'>{v}</td>" for c, v in zip(classes, cells)) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _num(value: object) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return escape(str(value)) if value is not None else ""
