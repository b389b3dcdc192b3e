"""Regenerates the demo data (banpick_cli/artifacts/data/) and the demo model (banpick_cli/artifacts/demo-moe/) from seeds.

    .venv/bin/python tools/train_demo.py [--steps N] [--threads N] [--model-dir DIR] [--data-dir DIR] [--no-eval]

Prints a summary; writes train_report.json and the model card (README.md) next to the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from banpick_cli.demo.corpus import write_demo_data  # noqa: E402
from banpick_cli.demo.card import write_artifacts  # noqa: E402
from banpick_cli.demo.evaluate import run_baseline  # noqa: E402
from banpick_cli.demo.train import TrainConfig, train_demo_model  # noqa: E402
from banpick_cli.paths import DEMO_DATA_DIR, DEMO_MODEL_DIR  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--data-dir", type=Path, default=DEMO_DATA_DIR)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads,
                        help="torch CPU threads (the result differs in the last bits between thread counts)")
    parser.add_argument("--no-eval", action="store_true", help="skip the baseline accuracy (and the model card)")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N tasks per domain (a quick check)")
    args = parser.parse_args(argv)

    config = TrainConfig(steps=args.steps, threads=args.threads)
    written = write_demo_data(args.data_dir, config.data_seed)
    print(f"data: {', '.join(str(p) for files in written.values() for p in files.values())}")
    started = time.perf_counter()

    def progress(event) -> None:
        if event.task == "train" and (event.done % 100 == 0 or event.done == event.total):
            rate = event.tokens / (time.perf_counter() - started)
            print(f"step {event.done}/{event.total}  {event.note}  {rate:,.0f} tok/s", flush=True)

    report = train_demo_model(config, args.model_dir, progress=progress)
    print(json.dumps({k: v for k, v in dataclasses.asdict(report).items() if k not in ("loss_curve", "config")},
                     indent=1))
    if args.no_eval:
        return 0
    baseline = run_baseline(args.model_dir, args.data_dir, limit=args.eval_limit, threads=args.threads)
    write_artifacts(args.model_dir, report, baseline)
    for key, scores in baseline.items():
        if key.startswith("top-"):
            print(key, "  ".join(f"{d} {100 * acc:.1f}%" for d, acc in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
