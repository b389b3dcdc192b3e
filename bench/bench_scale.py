"""Benchmark: `profile` run whole, in checkpointed windows, layer by layer, and data-parallel; plus report and import.

Each `profile` variant runs in a fresh process (so its peak RSS is its own) on the same model and data,
and every variant's counts are checked equal to the whole-model run. Prints one JSON object; the numbers
in docs/scaling.md come from it. On a shared CPU, wall times swing with the load; `cpu_s_rank0` (the
process's CPU time, including model loading) is the steadier figure.

    .venv/bin/python bench/bench_scale.py [--model demo] [--samples 256] [--seq-len 128] [--batch-size 8]

`--model demo-shaped` builds a random model with the demo model's shape (4 layers, hidden 128, 32 experts,
top-8, expert width 64, vocabulary 3000) when artifacts/demo-moe does not exist yet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_shaped(folder: Path) -> Path:
    """Saves a random Qwen3-MoE with the demo model's shape (and a small BPE tokenizer) under `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import build_tokenizer

    config = Qwen3MoeConfig(vocab_size=3000, hidden_size=128, intermediate_size=512, moe_intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_experts=32, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512,
                            tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    build_tokenizer(folder)
    return folder


RUN = """
import json, resource, sys, time
from banpick_cli.stages.profile import ProfileSettings, run_profile
from banpick_cli.passes.usage_pass import RunOptions
args = json.loads(sys.argv[1])
settings = ProfileSettings(domain="math", data=args["data"], samples=args["samples"], seq_len=args["seq_len"], batch_size=args["batch_size"])
start, cpu = time.perf_counter(), time.process_time()
result = run_profile(settings, out=args["out"], model=args["model"], device="cpu", options=RunOptions(**args["options"]))
total, cpu = time.perf_counter() - start, time.process_time() - cpu
if result.rank == 0:
    print(json.dumps({"wall_s": round(result.wall_s, 3), "total_s": round(total, 3), "cpu_s_rank0": round(cpu, 2), "tokens": result.usage.tokens,
                      "tokens_per_s": round(result.tokens_per_s), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def run(args: dict, *, ranks: int = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "--no-python",
               sys.executable, "-c", RUN, json.dumps(args)]
    else:
        cmd = [sys.executable, "-c", RUN, json.dumps(args)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    out = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    out["process_s"] = round(time.perf_counter() - start, 1)
    return out


def main() -> None:
    import torch

    from banpick_cli.profile import read_profile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    cli = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    model = cli.model
    if model == "demo-shaped" or (model == "demo" and not (REPO / "artifacts" / "demo-moe" / "config.json").exists()):
        model = str(demo_shaped(work / "demo-shaped"))
    # The demo's math calibration text, generated from its seed (the same text `make demo-model` ships).
    from banpick_cli.demo.corpus import calib_texts

    data = work / "math.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in calib_texts("math", 0, frozenset(), n=cli.samples)))
    base = {"model": model, "data": str(data), "samples": cli.samples, "seq_len": cli.seq_len, "batch_size": cli.batch_size}
    variants = {
        "whole": ({"checkpoint_every": 0}, 1),
        "windows_every_1": ({"checkpoint_every": 1}, 1),
        "sequential": ({"sequential": True, "checkpoint_every": 0}, 1),
        "sequential_windows_4": ({"sequential": True, "checkpoint_every": 4}, 1),
        "data_parallel_2": ({"checkpoint_every": 0}, 2),
    }
    results, counts = {}, {}
    for name, (options, ranks) in variants.items():
        out = work / f"{name}.safetensors"
        results[name] = run({**base, "out": str(out), "options": options}, ranks=ranks)
        counts[name] = read_profile(out).get("domain/math/expert_counts")
        results[name]["same_counts_as_whole"] = bool(torch.equal(counts[name], counts["whole"]))
    profile_bytes = (work / "whole.safetensors").stat().st_size

    from banpick_cli.report import build_report

    start = time.perf_counter()
    report = build_report(work / "whole.safetensors", work / "report")
    report_s = time.perf_counter() - start
    print(json.dumps({"model": model, **base, "profile_bytes": profile_bytes, "variants": results,
                      "report": {"figures": len(report.figures), "seconds": round(report_s, 2),
                                 "html_bytes": report.html.stat().st_size}}, indent=2))


if __name__ == "__main__":
    main()
