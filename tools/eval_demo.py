"""Baseline accuracy of the demo model on its held-out tasks, per domain, at several router top-k.

    .venv/bin/python tools/eval_demo.py [--model-dir DIR] [--data-dir DIR] [--top-k 8 7 1] [--limit N] [--json]
                                        [--update-card]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from banpick_cli.demo.card import update_baseline  # noqa: E402
from banpick_cli.demo.evaluate import BASELINE_KS, run_baseline  # noqa: E402
from banpick_cli.paths import DEMO_DATA_DIR, DEMO_MODEL_DIR  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--data-dir", type=Path, default=DEMO_DATA_DIR)
    parser.add_argument("--top-k", type=int, nargs="+", default=list(BASELINE_KS))
    parser.add_argument("--limit", type=int, default=None, help="first N tasks of each domain")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--update-card", action="store_true",
                        help="write the result into train_report.json and README.md next to the checkpoint")
    args = parser.parse_args(argv)

    result = run_baseline(args.model_dir, args.data_dir, ks=tuple(args.top_k), limit=args.limit)
    if args.update_card:
        print(f"updated {update_baseline(args.model_dir, result)}")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for key, scores in result.items():
        if key.startswith("top-"):
            print(f"{key:>6}  " + "  ".join(f"{d} {100 * acc:5.1f}%" for d, acc in scores.items()))
    for domain, forms in result.get("by_form", {}).items():
        print(f"{domain}: " + ", ".join(f"{f} {r}/{t}" for f, (r, t) in forms.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
