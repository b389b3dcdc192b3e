"""Markdown tables for docs/results.md from the JSON that tools/accuracy_results.sh writes.

Usage: python tools/results_tables.py OUT_DIR   (prints markdown on stdout)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def _cell(row: dict, task: str, base: dict | None) -> str:
    r = row["results"][task]
    if r["no_answers"]:
        return f"n/a (0/{r['n']})"
    text = f"{r['accuracy']:.2f}"
    if base is not None and row is not base:
        text += f" ({r['delta']:+.2f})"
    return text


def method_table(data: dict, labels: list[str]) -> str:
    tasks = data.get("task_order") or list(data["tasks"])
    rows = {r["label"]: r for r in data["rows"]}
    base = rows["baseline"]
    head = ["Method", "Avg-TopK", *[f"{t} (n={data['tasks'][t]['n']})" for t in tasks], "mean", "tok/s", "speed"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        if label not in rows:
            continue
        row = rows[label]
        mean = sum(row["results"][t]["accuracy"] for t in tasks) / len(tasks)
        base_mean = sum(base["results"][t]["accuracy"] for t in tasks) / len(tasks)
        mean_text = f"{mean:.2f}" + ("" if row is base else f" ({mean - base_mean:+.2f})")
        cells = [label, f"{row['avg_topk']:.2f}", *[_cell(row, t, base) for t in tasks], mean_text,
                 f"{row['tokens_per_s']:,.0f}", f"{row['speedup']:.2f}x"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def probe_table(out_dir: Path) -> str:
    lines = ["| domain | probe tasks | baseline right | failure set | candidates probed | key experts (fixed / failures, McNemar p) |",
             "|---|---|---|---|---|---|"]
    for d in ("math", "code", "general"):
        data = _load(out_dir / f"failure-probe-{d}.json")
        if data is None:
            lines.append(f"| {d} | | | (empty failure set: not probed) | | |")
            continue
        stats = data.get("gain_stats", {})
        keys = ", ".join(f"{k} ({data['gains'][k] * data['failure_set']:.0f}/{data['failure_set']}"
                         + (f", p={stats[k]['p_value']:.2f}" if k in stats else "") + ")"
                         for k in data["key_experts"]) or "none"
        lines.append(f"| {d} | {data['tasks']} | {data['baseline_correct']} | {data['failure_set']} | "
                     f"{data['candidates_probed']} | {keys} |")
    return "\n".join(lines)


def strategy_table(out_dir: Path) -> str:
    lines = ["| strategy | Avg-TopK | math (n) | change |", "|---|---|---|---|"]
    for s in "ABCDE":
        data = _load(out_dir / f"eval-pick-{s}.json")
        if data is None:
            continue
        task = (data.get("task_order") or list(data["tasks"]))[0]
        base, pick = data["rows"][0], data["rows"][1]
        if s == "A":
            r = base["results"][task]
            lines.append(f"| baseline | {base['avg_topk']:.2f} | {r['accuracy']:.2f} ({r['n']}) | |")
        r = pick["results"][task]
        lines.append(f"| {s} | {pick['avg_topk']:.2f} | {r['accuracy']:.2f} ({r['n']}) | {r['delta']:+.2f} |")
    return "\n".join(lines)


def budget_table(out_dir: Path, targets=(4, 5, 6)) -> str:
    """Matched budgets: each method at each target Avg-TopK, mean accuracy change with its 95% interval and p."""
    head = ["target", "Method", "Avg-TopK", "experts vs baseline", "mean (change)", "95% CI of change", "McNemar p",
            "speed"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target in targets:
        data = _load(out_dir / f"eval-budget-{target}.json")
        if data is None:
            continue
        base = data["rows"][0]
        for row in data["rows"]:
            if row is base and target != targets[0]:
                continue
            change = "" if row is base else f" ({row['accuracy'] - base['accuracy']:+.2f})"
            ci = "" if row is base else f"[{row['ci95'][0]:+.2f}, {row['ci95'][1]:+.2f}]"
            p = "" if row is base else f"{row['p_value']:.2f}"
            cells = ["" if row is base else f"{target}", row["label"], f"{row['avg_topk']:.2f}",
                     f"{row['experts_vs_baseline']:.2f}", f"{row['accuracy']:.2f}{change}", ci, p, f"{row['speedup']:.2f}x"]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "build/accuracy")
    data = _load(out_dir / "eval.json")
    print("### Key experts from failure-probe\n")
    print(probe_table(out_dir))
    if data is not None:
        labels = [r["label"] for r in data["rows"]]
        dyn = [lab for lab in labels if lab.startswith("dynamic")]
        print("\n### Table 2/3 shape (lambda 0.7)\n")
        print(method_table(data, ["baseline", "pick", *dyn, "ban(λ=0.7)", "des", "odp(0.02)", "ban&pick(λ=0.7)"]))
        print("\n### Ban and Ban&Pick over lambda (appendix Table 6 shape)\n")
        sweep = [lab for lab in labels if lab.startswith(("ban(", "ban&pick("))]
        print(method_table(data, ["baseline", *sweep]))
    print("\n### Pick strategies A-E on math\n")
    print(strategy_table(out_dir))
    print("\n### Matched budgets (--target-avg-topk 4, 5, 6)\n")
    print(budget_table(out_dir))


if __name__ == "__main__":
    main()
