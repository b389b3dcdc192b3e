"""Per-program cost of the code sandbox: `run_tests` against a bare `python -I -B` subprocess on the same program.

    python bench/bench_sandbox.py --programs 40

Prints the median wall time of each (milliseconds per program, one at a time, the two alternating) and
their difference: what isolation adds to each code task.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from banpick_cli.tasks import sandbox

PROGRAM = "def f(x):\n    return x + 1\n\nassert f(1) == 2\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--programs", type=int, default=40)
    args = parser.parse_args()
    if not sandbox.isolation_available()[0]:
        sys.exit(f"no isolation here: {sandbox.isolation_available()[1]}")
    interpreter = os.path.realpath(sys.executable)
    isolated, bare = [], []
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "main.py")
        with open(path, "w") as f:
            f.write(PROGRAM)
        for _ in range(args.programs):
            start = time.perf_counter()
            assert sandbox.run_tests(PROGRAM).passed
            isolated.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run([interpreter, "-I", "-B", path], check=True, cwd=folder)
            bare.append(time.perf_counter() - start)
    iso, plain = statistics.median(isolated) * 1e3, statistics.median(bare) * 1e3
    print(f"sandboxed {iso:.1f} ms, bare python {plain:.1f} ms, isolation adds {iso - plain:.1f} ms per program "
          f"(median of {args.programs}; memory: {sandbox.memory_bound()})")


if __name__ == "__main__":
    main()
