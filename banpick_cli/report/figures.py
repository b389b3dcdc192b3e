"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state).

Each function takes a profile (and what to show) and returns a Figure; `save` writes it as PNG. Build
and save inside `matplotlib.rc_context(FONT)` (build.py does) for the intended type sizes. The numbers
come from report/data.py; names and axes use the paper's words (figures 2, 3, 5, 6-9).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.patches import Patch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from banpick_cli.profile.format import RoutingProfile
from banpick_cli.report import data

DPI = 110
FONT = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "figure.titlesize": 13}
DOMAIN_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
KEY_COLOUR, PLAIN_COLOUR, NEUTRAL = "#d62728", "#8c9bb0", "#c9d1dc"
MAX_BARS = 40  # KL and gain charts keep their bars readable; the rest are summarised in the subtitle


def domain_colour(profile: RoutingProfile, domain: str) -> str:
    return DOMAIN_COLOURS[profile.domains().index(domain) % len(DOMAIN_COLOURS)]


def save(fig: Figure, path: Path) -> Path:
    """Writes a figure as PNG and returns the path."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, facecolor="white", format="png")  # path may be a staged temporary name
    return path


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _per_layer_figure(profile: RoutingProfile, least: float, base: float, height: float) -> tuple[list[str], int, Figure]:
    """Returns (layer labels, their number, a figure wide enough for a bar per layer: base + 0.22 in each)."""
    labels = _layer_labels(profile)
    return labels, len(labels), _figure(min(max(least, base + len(labels) * 0.22), 18.0), height)


def _wrap(fig: Figure, text: str, points: float = 9) -> str:
    """Wraps a subtitle to the figure's width (about 0.6 em per character), so no line is clipped."""
    import textwrap

    chars = int(fig.get_figwidth() * 72 / (points * 0.6))
    return "\n".join(textwrap.fill(line, max(chars, 30)) for line in text.split("\n"))


def _title(fig: Figure, text: str) -> None:
    fig.suptitle(_wrap(fig, text, 13))


def _subtitle(fig: Figure, ax, text: str) -> None:
    ax.set_title(_wrap(fig, text), fontsize=9, color="#444")


def _layer_ticks(ax, labels: list[str], axis: str = "x", most: int = 32) -> None:
    """Labels every layer when there are few, every n-th when there are many."""
    step = max(1, math.ceil(len(labels) / most))
    ticks = list(range(0, len(labels), step))
    if axis == "x":
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90 if len(ticks) > 16 else 0)
    else:
        ax.set_yticks(ticks, [labels[i] for i in ticks])


def _layer_labels(profile: RoutingProfile) -> list[str]:
    return [f"L{i}" for i in profile.model.moe_layers]


def _bars(ax, heights: list[float], colours: list[str], width: float = 0.85) -> None:
    """Draws one bar per x = 0..n-1 as a single collection (ax.bar makes one artist per bar: slow at 128 x 36)."""
    from matplotlib.collections import PolyCollection

    half = width / 2
    verts = [[(x - half, 0), (x - half, h), (x + half, h), (x + half, 0)] for x, h in enumerate(heights)]
    ax.add_collection(PolyCollection(verts, facecolors=colours, edgecolors="none"))
    ax.set_xlim(-1, len(heights))
    top, bottom = max(heights, default=0.0), min(heights, default=0.0)
    ax.set_ylim(min(bottom, 0.0), max(top, 1e-9) * 1.18)


# --- usage (figures 2 and 6-9) -------------------------------------------------------------------
def usage_heatmap(profile: RoutingProfile, domain: str) -> Figure:
    """Expert usage frequency of one domain, every layer by every expert; candidates dotted."""
    freq = data.frequency(profile, domain).float() * 100  # [M, E] in %
    cands = profile.domain(domain).candidates
    m, e = freq.shape
    k = profile.model.k_base
    tokens = int(profile.domain(domain).token_counts[0])
    fig = _figure(min(max(7.0, 3 + e * 0.07), 16.0), min(max(3.6, 1.8 + m * 0.26), 14.0))
    ax = fig.add_subplot()
    # A square-root scale: one expert at 60% would otherwise leave every other layer in the dark.
    image = ax.imshow(freq.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                      norm=PowerNorm(0.5, vmin=0, vmax=max(float(freq.max()), 1e-9)))
    ys, xs = cands.nonzero(as_tuple=True)
    ax.scatter(xs.numpy(), ys.numpy(), s=9, c="white", edgecolors="#e8202a", linewidths=0.9, marker="o")
    _layer_ticks(ax, _layer_labels(profile), axis="y", most=24)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("share of tokens routed to the expert (%)")
    _title(fig, f"Expert usage frequency per layer: domain '{domain}'")
    _subtitle(fig, ax, f"{tokens:,} tokens, top-{k} of {e} experts (layer mean {100 * k / e:.1f}%); "
              "white dots: the domain's candidate experts; colour on a square-root scale")
    return fig


def usage_bars(profile: RoutingProfile, positions: list[int], *, title: str | None = None) -> Figure:
    """Per chosen layer (rows) and domain (columns): each expert's usage frequency as a bar.

    Candidates are drawn in the domain's colour, the others grey; the dashed line is the layer mean
    (K_base / experts) and the three most used experts are named, as in the paper's figure 2.
    """
    domains = profile.domains()
    m_layers = profile.model.moe_layers
    k, e = profile.model.k_base, profile.model.num_experts
    freqs = {d: data.frequency(profile, d).float() * 100 for d in domains}
    rows, cols = len(positions), len(domains)
    # About 16 inches across whatever the number of domains: the page shows it at a glance.
    fig = _figure(min(max(7.0, max(4.5, 1.5 + e * 0.06) * cols), 16.0), 2.3 * rows + 1.0)
    axes = fig.subplots(rows, cols, squeeze=False, sharey="row")
    for r, pos in enumerate(positions):
        for c, d in enumerate(domains):
            ax = axes[r][c]
            values = freqs[d][pos]
            cand = profile.domain(d).candidates[pos]
            _bars(ax, values.tolist(), [domain_colour(profile, d) if cand[x] else NEUTRAL for x in range(e)])
            ax.axhline(100 * k / e, color="#333", linestyle="--", linewidth=0.9)
            for x in values.argsort(descending=True)[:3].tolist():
                ax.annotate(f"E{x}", (x, float(values[x])), textcoords="offset points", xytext=(0, 2),
                            ha="center", fontsize=8, color="#222")
            ax.set_title(f"L{m_layers[pos]} · {d}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
            ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
            if c == 0:
                ax.set_ylabel("share of tokens")
            if r == rows - 1:
                ax.set_xlabel("expert")
        top = max(float(freqs[d][pos].max()) for d in domains)
        axes[r][0].set_ylim(0, max(top, 100 * k / e) * 1.2)
    fig.suptitle((title or "Expert usage frequency in chosen layers") + "\n" + _wrap(
        fig, f"coloured bars: the domain's candidates · dashed: layer mean ({100 * k / e:.1f}% = top-{k} of {e})", 13))
    return fig


# --- candidates across domains -------------------------------------------------------------------
def candidate_overlap(profile: RoutingProfile) -> Figure:
    """Per layer, candidates shared by all domains, by some, or unique to one; and domain-pair Jaccard."""
    ov = data.candidate_overlap(profile)
    labels, m, fig = _per_layer_figure(profile, 9.0, 4, 4.6)
    grid = fig.add_gridspec(1, 2, width_ratios=[2.8, 1])
    ax = fig.add_subplot(grid[0])
    xs = list(range(m))
    bottom = [0] * m
    stacks = [("shared by all domains", ov.shared_by_all, "#444444"), ("shared by some", ov.shared_by_some, "#9a9a9a")]
    stacks += [(f"only {d}", ov.unique[d], domain_colour(profile, d)) for d in ov.domains]
    if len(ov.domains) == 2:
        stacks.pop(1)  # with two domains "some" is "all"
    for name, values, colour in stacks:
        ax.bar(xs, values, bottom=bottom, color=colour, label=name, width=0.8)
        bottom = [b + v for b, v in zip(bottom, values)]
    _layer_ticks(ax, labels)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("candidate experts")
    ax.set_title("Candidates per layer by how many domains share them")
    ax.legend(fontsize=8, ncols=min(len(stacks), 5), loc="upper right", frameon=False)
    ax.margins(y=0.18)
    hx = fig.add_subplot(grid[1])
    matrix = torch.tensor(ov.jaccard)
    hx.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=1)
    n = len(ov.domains)
    hx.set_xticks(range(n), ov.domains, rotation=30)
    hx.set_yticks(range(n), ov.domains)
    for i in range(n):
        for j in range(n):
            value = float(matrix[i, j])
            hx.text(j, i, "–" if math.isnan(value) else f"{value:.2f}", ha="center", va="center",
                    color="white" if value > 0.6 else "black", fontsize=10)
    hx.set_title("Jaccard similarity\nof candidates", fontsize=10)
    _title(fig, "Cross-domain overlap of candidate experts")
    return fig


# --- KL and accuracy gain per candidate (figure 3) -----------------------------------------------
def _select(items: list[data.ScannedExpert]) -> tuple[list[data.ScannedExpert], int]:
    """Keeps every key expert and the largest others, up to MAX_BARS, in layer order."""
    if len(items) <= MAX_BARS:
        return items, 0
    keys = [i for i in items if i.key]
    rest = sorted((i for i in items if not i.key), key=lambda i: i.value, reverse=True)
    kept = keys + rest[: max(MAX_BARS - len(keys), 0)]
    kept.sort(key=lambda i: (i.position, i.expert))
    return kept, len(items) - len(kept)


def kl_per_candidate(profile: RoutingProfile, domain: str) -> Figure:
    """KL of the output when each scanned candidate is pruned; key experts red; gain on a second axis if probed."""
    items, dropped = _select(data.scanned(profile, domain, "kl"))
    gains = {}
    if profile.domain(domain).has("accuracy_gain"):
        gains = {(g.position, g.expert): g.value for g in data.scanned(profile, domain, "accuracy_gain")}
    fig = _figure(min(max(7.0, 2.5 + len(items) * 0.3), 16.0), 4.6)
    ax = fig.add_subplot()
    xs = list(range(len(items)))
    ax.bar(xs, [i.value for i in items], color=[KEY_COLOUR if i.key else PLAIN_COLOUR for i in items], width=0.75)
    ax.set_xticks(xs, [f"L{i.layer_index}E{i.expert}" for i in items], rotation=90, fontsize=8)
    for tick, item in zip(ax.get_xticklabels(), items):
        if item.key:
            tick.set_color(KEY_COLOUR)
            tick.set_fontweight("bold")
    ax.set_ylabel("top-1000 KL when pruned")
    ax.set_xlabel("candidate expert (layer, expert)")
    handles = [Patch(color=KEY_COLOUR, label="key expert"), Patch(color=PLAIN_COLOUR, label="other candidate")]
    shown = [(x, gains[(i.position, i.expert)]) for x, i in zip(xs, items) if (i.position, i.expert) in gains]
    if shown:
        twin = ax.twinx()
        twin.plot([x for x, _ in shown], [g for _, g in shown], "D", color="#2ca02c", markersize=6, label="accuracy gain when forced in")
        twin.axhline(0, color="#2ca02c", linewidth=0.6, alpha=0.5)
        twin.set_ylabel("accuracy gain on the failure set", color="#2ca02c")
        handles.append(twin.get_lines()[0])
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    ax.margins(y=0.12)
    n_key = sum(i.key for i in data.scanned(profile, domain, "kl"))
    _title(fig, f"Impact of pruning each candidate: domain '{domain}' ({n_key} key experts)")
    note = f"{len(items)} scanned candidates" + (f"; {dropped} more with smaller KL not drawn" if dropped else "")
    _subtitle(fig, ax, note)
    return fig


def accuracy_gain(profile: RoutingProfile, domain: str) -> Figure:
    """Accuracy gain on the failure set when each probed candidate is forced in; key experts outlined."""
    items, dropped = _select(data.scanned(profile, domain, "accuracy_gain"))
    fig = _figure(min(max(7.0, 2.5 + len(items) * 0.3), 16.0), 4.4)
    ax = fig.add_subplot()
    xs = list(range(len(items)))
    colours = ["#2ca02c" if i.value > 0 else ("#d62728" if i.value < 0 else "#999999") for i in items]
    ax.bar(xs, [i.value for i in items], color=colours, width=0.75,
           edgecolor=["black" if i.key else "none" for i in items], linewidth=1.6)
    ax.axhline(0, color="#333", linewidth=0.8)
    ax.set_xticks(xs, [f"L{i.layer_index}E{i.expert}" + (" ★" if i.key else "") for i in items], rotation=90, fontsize=8)
    ax.set_ylabel("accuracy gain on the failure set")
    ax.set_xlabel("probed candidate (★ outlined: chosen key expert)")
    _title(fig, f"Accuracy gain when a candidate is forced in: domain '{domain}'")
    note = f"{len(items)} probed candidates" + (f"; {dropped} more not drawn" if dropped else "")
    _subtitle(fig, ax, note)
    return fig


# --- Ban (figure 5) -------------------------------------------------------------------------------
def layer_sensitivity(profile: RoutingProfile) -> Figure:
    """W_l per layer (bars coloured by the normalised L'_l), most and least sensitive layers named."""
    kl = profile.ban.layer_kl.float()
    sens = profile.ban.layer_sensitivity.float() if profile.ban.has("layer_sensitivity") else None
    labels, _, fig = _per_layer_figure(profile, 7.5, 3, 4.4)
    k_min = int(data.ban_settings(profile)[0]["k_min"])
    ax = fig.add_subplot()
    cmap = colormaps["plasma"]
    colours = [cmap(float(v)) for v in sens.clamp(0, 1)] if sens is not None else [PLAIN_COLOUR] * len(labels)
    ax.bar(range(len(labels)), kl.numpy(), color=colours, width=0.8)
    for index in {int(kl.argmax()), int(kl.argmin())}:
        ax.annotate(f"{labels[index]}: {float(kl[index]):.2g}", (index, float(kl[index])), textcoords="offset points",
                    xytext=(0, 4), ha="center", fontsize=8,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    _layer_ticks(ax, labels)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(f"$W_l$: top-1000 KL, top-{profile.model.k_base} → top-{k_min}")
    ax.margins(y=0.2)
    if sens is not None:
        bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=ax, pad=0.01)
        bar.set_label("normalised $L'_l$")
    _title(fig, "Layer sensitivity $W_l$: output KL when one layer alone keeps fewer experts")
    _subtitle(fig, ax, "most and least sensitive layers named")
    return fig


def token_ratio(profile: RoutingProfile) -> Figure:
    """Distribution of the token ratio R per layer (share of the layer's tokens per bin), R_min/R_max marked."""
    hist = profile.ban.ratio_hist.double()
    shares = hist / hist.sum(-1, keepdim=True).clamp(min=1)
    r_min, r_max = profile.ban.ratio_min, profile.ban.ratio_max
    labels = _layer_labels(profile)
    m = len(labels)
    k_num = int(data.ban_settings(profile)[0]["ratio_k_num"])
    fig = _figure(9.0, min(max(3.8, 1.8 + m * 0.24), 14.0))
    ax = fig.add_subplot()
    image = ax.imshow((shares * 100).numpy(), aspect="auto", cmap="magma_r", extent=(0, 1, m - 0.5, -0.5),
                      interpolation="nearest")
    ax.plot(r_min.numpy(), range(m), "|", color="#00a0ff", markersize=9, markeredgewidth=2, label="R_min")
    ax.plot(r_max.numpy(), range(m), "|", color="#00c060", markersize=9, markeredgewidth=2, label="R_max")
    _layer_ticks(ax, labels, axis="y", most=24)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"token ratio R = weight of top-{k_num} / weight of top-{profile.model.k_base}")
    ax.set_ylabel("MoE layer")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("share of the layer's tokens (%)")
    _title(fig, "Token sensitivity: distribution of R per layer (calibration set)")
    _subtitle(fig, ax, "low R: weight spread over many experts (sensitive); high R: concentrated (safe to prune)")
    return fig


def ban_k(profile: RoutingProfile) -> Figure:
    """Share of tokens keeping each K per layer at the stored lambda, with the mean K per layer."""
    dist = data.ban_k_distribution(profile)
    labels, m, fig = _per_layer_figure(profile, 8.0, 3, 4.6)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    bottom = [0.0] * m
    n = len(dist.k_values)
    for j, k in enumerate(dist.k_values):
        values = [100 * row[j] for row in dist.share]
        ax.bar(range(m), values, bottom=bottom, color=cmap(j / max(n - 1, 1)), width=0.85, label=f"K={k}")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.set_ylabel("share of the layer's tokens")
    ax.set_xlabel("MoE layer")
    _layer_ticks(ax, labels)
    twin = ax.twinx()
    twin.plot(range(m), dist.mean_k, "o-", color="#ff7f0e", markeredgecolor="white", markersize=5, linewidth=2,
              label="mean K")
    twin.set_ylim(dist.k_values[0] - 0.5, dist.k_values[-1] + 0.5)
    twin.set_ylabel("mean K (experts kept)")
    handles, names = ax.get_legend_handles_labels()
    h2, n2 = twin.get_legend_handles_labels()
    ax.legend(handles + h2, names + n2, loc="upper left", bbox_to_anchor=(1.06, 1), fontsize=8, frameon=False)
    s = dist.settings
    where = "stored" if dist.from_profile else "paper defaults; the profile stores none"
    if s["ratio_scope"] == "pooled":
        where += ", R range pooled over layers"
    _title(fig, f"Ban: experts kept per token, λ={s['lam']}, β={s['beta']}, K_min={s['k_min']} ({where})")
    _subtitle(fig, ax, f"average K over all tokens and layers: {dist.overall_mean_k:.2f} of {profile.model.k_base} "
              "(from the R histogram's bin centres)")
    return fig
