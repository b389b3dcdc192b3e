"""Benchmark: `profile` run whole, in checkpointed windows, layer by layer, and data-parallel; plus report and import.

Each `profile` variant runs in a fresh process (so its peak RSS is its own) on the same model and data,
and every variant's counts are checked equal to the whole-model run. Prints one JSON object; the numbers
in docs/scaling.md come from it. On a shared CPU, wall times swing with the load; `cpu_s_rank0` (the
process's CPU time, including model loading) is the steadier figure.

    .venv/bin/python bench/bench_scale.py [--model demo] [--samples 256] [--seq-len 128] [--batch-size 8]

`--model demo-shaped` builds a random model with the demo model's shape (4 layers, hidden 128, 32 experts,
top-8, expert width 64, vocabulary 3000) when banpick_cli/artifacts/demo-moe does not exist yet.

`--cgroup-proof` writes a 3.3 GB Qwen3-MoE checkpoint (8 layers, hidden 1024, 64 experts of width 512) and
profiles and kl-scans it with `--stream` inside a memory cgroup of `--cgroup-mb` (953 MiB: 1 GB), against
unlimited runs (needs root and cgroup v1 memory; docs/benchmarks.md).

`--family-peaks` measures, per family, the memory one streamed layer read adds against the layer's bytes
(`--old` a folder with another banpick_cli to measure that code instead).

`--stream-proof` instead writes a Qwen3-MoE checkpoint with Qwen3-30B-A3B's hidden size (2048) and expert
width (768), 16 experts top-4, `--layers` layers, and runs `profile` counts and a KL scan of the most used
experts three ways, each in a fresh process: streamed under a hard limit of a third of the checkpoint
(RLIMIT_DATA on the whole process), in memory without a limit (the reference), and in memory under the
same limit (which must fail). It also checks `--dry-run`'s estimate (passes/cost.py: counts from the
config, a timing probe) against the measured times, on this model and on the demo model.
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
    from transformers import Qwen3MoeConfig

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import save_random

    config = Qwen3MoeConfig(vocab_size=3000, hidden_size=128, intermediate_size=512, moe_intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_experts=32, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512,
                            tie_word_embeddings=True)
    return save_random(config, folder)


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


def stream_proof(cli: argparse.Namespace) -> dict:
    """Returns the numbers of the streamed-under-a-limit proof and the dry-run check (see the module docstring)."""
    import torch
    from transformers import AutoConfig

    sys.path.insert(0, str(REPO / "tests" / "passes"))
    from stream_helpers import run_limited, write_checkpoint

    from banpick_cli.demo.corpus import calib_texts
    from banpick_cli.passes.cost import plan_cost, probe

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    start = time.perf_counter()
    size = write_checkpoint(work / "model", layers=cli.layers, hidden=2048, width=768, experts=16, top_k=4, heads=32,
                            kv_heads=4, head_dim=128)
    write_s = time.perf_counter() - start
    data = work / "math.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in calib_texts("math", 0, frozenset(), n=cli.samples)))
    limit_mb = size // 3 >> 20
    base = dict(model=str(work / "model"), data=str(data), seq_len=cli.seq_len, batch_size=cli.batch_size, top=2,
                top_tokens=1000, hidden_cache_mb=2048, threads=2, scan_layers=2)
    runs = {}
    for name, extra in (("stream_limited", {"stream": True, "limit_mb": limit_mb}),
                        ("memory_unlimited", {"stream": False, "limit_mb": 0}),
                        ("memory_limited", {"stream": False, "limit_mb": limit_mb})):
        t0 = time.perf_counter()
        result, err = run_limited({**base, **extra})
        runs[name] = result or {"failed": err.strip().splitlines()[-1][:200]}
        runs[name]["process_s"] = round(time.perf_counter() - t0, 1)
    stream, whole = runs["stream_limited"], runs["memory_unlimited"]
    if "kl" not in stream or "kl" not in whole:
        return {"checkpoint_mb": size >> 20, "limit_mb": limit_mb, "runs": runs}
    same_counts = "counts" in stream and stream["counts"] == whole["counts"]
    max_rel = max(abs(a - b) / max(abs(b), 1e-12) for p in whole["kl"] for a, b in zip(stream["kl"][p], whole["kl"][p]))
    config = AutoConfig.from_pretrained(work / "model")
    texts = cli.samples
    torch.set_num_threads(2)
    timing = probe(config, batch_size=cli.batch_size, seq_len=cli.seq_len, device=torch.device("cpu"), dtype=torch.float32,
                   checkpoint=work / "model")
    moe = list(range(cli.layers))
    profile_cost = plan_cost(config, command="profile", samples=texts, seq_len=cli.seq_len, batch_size=cli.batch_size,
                             checkpoint_every=0)
    kl_cost = plan_cost(config, command="kl-scan", samples=texts, seq_len=cli.seq_len, batch_size=cli.batch_size,
                        variants_by_layer=dict.fromkeys(moe[-2:], 2))
    for run, name in ((stream, "stream"), (whole, "whole")):
        run["predicted_profile_s"] = round(profile_cost.seconds(timing, name), 2)
        run["predicted_kl_s"] = round(kl_cost.seconds(timing, name), 2)
    out = {"checkpoint_mb": size >> 20, "write_s": round(write_s, 1), "limit_mb": limit_mb,
           "ratio": round(size / (limit_mb << 20), 2), "same_counts": same_counts, "kl_max_rel_diff": max_rel,
           "timing": timing.__dict__, "runs": {k: {x: y for x, y in v.items() if x not in ("counts", "kl")} for k, v in runs.items()},
           "cost": {"profile": profile_cost.as_dict(), "kl-scan": kl_cost.as_dict()}}
    out["demo"] = demo_dry_run(cli)
    return out


def cgroup_proof(cli: argparse.Namespace) -> dict:
    """Returns the numbers of the 3.3 GB checkpoint profiled and kl-scanned with --stream in a memory cgroup.

    Qwen3-MoE, 8 layers, hidden 1024, 64 experts of width 512 top-8, float32 (0.41 GB a layer), in the
    hub's per-expert layout. Runs, each a fresh process under /usr/bin/time -v, the checkpoint's pages
    dropped from the page cache first: --stream in a cgroup of `--cgroup-mb`; --stream and the in-memory
    model in unlimited cgroups (the reference); with `--old` (a folder holding another banpick_cli, e.g.
    `git archive <commit> banpick_cli | tar -x -C /tmp/old`), that code's --stream in both as well.
    """
    sys.path.insert(0, str(REPO / "tests" / "passes"))
    from stream_helpers import drop_cache, run_limited, write_checkpoint

    from banpick_cli.demo.corpus import calib_texts

    work = Path(cli.work or tempfile.mkdtemp(prefix="bench-cgroup-"))
    if not (work / "model" / "model.safetensors.index.json").is_file():
        write_checkpoint(work / "model", layers=8, hidden=1024, width=512, experts=64, top_k=8, heads=16, kv_heads=4,
                         head_dim=64)
    size = sum(f.stat().st_size for f in (work / "model").glob("*.safetensors"))
    data = work / "math.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in calib_texts("math", 0, frozenset(), n=cli.samples)))
    base = dict(model=str(work / "model"), data=str(data), seq_len=cli.seq_len, batch_size=cli.batch_size, top=2,
                top_tokens=1000, hidden_cache_mb=2048, threads=2, scan_layers=2, limit_mb=0)
    unlimited = {"cgroup_above_mb": 1 << 20}  # a cgroup, to read its peak, with no limit that binds
    plan = [("stream_limited", REPO, {"stream": True, "cgroup_mb": cli.cgroup_mb}),
            ("stream_unlimited", REPO, {"stream": True, **unlimited}),
            ("memory_unlimited", REPO, {"stream": False, **unlimited})]
    if cli.old:
        plan += [("old_stream_limited", Path(cli.old), {"stream": True, "cgroup_mb": cli.cgroup_mb}),
                 ("old_stream_unlimited", Path(cli.old), {"stream": True, **unlimited})]
    runs = {}
    for name, code, extra in plan:
        drop_cache(work / "model")
        t0 = time.perf_counter()
        result, err = run_limited({**base, **extra}, code=code, time_v=True)
        runs[name] = result or {"failed": err.strip().splitlines()[0][:300]}
        runs[name]["process_s"] = round(time.perf_counter() - t0, 1)
    layer_mb = (work / "model" / "layer-000.safetensors").stat().st_size / 2**20  # one decoder layer, as written
    for run in runs.values():
        if "loaded_rss_mb" in run:  # resident memory above the loaded model's (runtime and resident parts), in layers
            run["profile_layers_above_runtime"] = round((run["profile_peak_rss_mb"] - run["loaded_rss_mb"]) / layer_mb, 2)
            run["layers_above_runtime"] = round((run["peak_rss_mb"] - run["loaded_rss_mb"]) / layer_mb, 2)
    reference = runs["memory_unlimited"]
    for name, run in runs.items():
        if "counts" in run and "counts" in reference:
            run["same_counts"] = run["counts"] == reference["counts"]
            run["kl_max_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for p in reference["kl"]
                                         for a, b in zip(run["kl"][p], reference["kl"][p]))
    return {"checkpoint_bytes": size, "cgroup_mb": cli.cgroup_mb,
            "runs": {k: {x: y for x, y in v.items() if x not in ("counts", "kl")} for k, v in runs.items()}}


LAYER_PEAK = r"""
import sys, torch
from banpick_cli.passes.streaming import load_streaming, LayerSource
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) << 10
loaded = load_streaming(sys.argv[1], device="cpu", dtype="float32")
source = LayerSource(loaded)
index = max(range(len(source.layers)), key=loaded.streamed.layer_bytes)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status("VmRSS")
layer = source.acquire(index, torch.device("cpu"))
print(index, sum(p.numel() * p.element_size() for p in layer.parameters()), status("VmHWM") - before)
"""


def family_peaks(cli: argparse.Namespace) -> list[dict]:
    """Returns, per family, the resident memory one streamed layer read adds (VmHWM above VmRSS, a fresh
    process) against the layer's bytes: each tiny test config widened to hidden 512, 2 layers, all MoE."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    import tiny

    wide = {"qwen3_moe": dict(moe_intermediate_size=512, mlp_only_layers=[]),
            "qwen2_moe": dict(moe_intermediate_size=512, shared_expert_intermediate_size=1024), "olmoe": {}, "mixtral": {},
            "deepseek_v2": dict(moe_intermediate_size=512, first_k_dense_replace=0),
            "deepseek_v3": dict(moe_intermediate_size=512, first_k_dense_replace=0)}
    work, code = Path(tempfile.mkdtemp(prefix="bench-peaks-")), Path(cli.old or REPO)
    out = []
    for family in tiny.FAMILIES:
        folder = work / family
        config = tiny._configs()[family].to_dict()
        config.update(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, **wide[family])
        config.pop("layer_types", None)
        AutoModelForCausalLM.from_config(type(tiny._configs()[family]).from_dict(config)).save_pretrained(folder)
        tiny.build_tokenizer(folder)
        done = subprocess.run([sys.executable, "-c", LAYER_PEAK, str(folder)], capture_output=True, text=True, cwd=code,
                              env={**os.environ, "PYTHONPATH": str(code)})
        index, size, peak = map(int, done.stdout.split()[-3:])
        out.append({"family": family, "layer": index, "layer_mb": round(size / 2**20, 1),
                    "peak_above_mb": round(peak / 2**20, 1), "ratio": round(peak / size, 2)})
    return out


def demo_dry_run(cli: argparse.Namespace) -> dict:
    """Returns the dry-run estimate and the measured time of profile counting and a KL scan on the demo model."""
    import torch

    from banpick_cli.demo.corpus import calib_texts
    from banpick_cli.models.loading import load_model
    from banpick_cli.passes.cost import plan_cost, probe
    from banpick_cli.passes.kl import KLEngine, LayerPlan
    from banpick_cli.passes.usage import count_usage
    from banpick_cli.stages.kl_scan import prune_variant

    torch.set_num_threads(2)
    model = str(REPO / "banpick_cli" / "artifacts" / "demo-moe")
    loaded = load_model(model, device="cpu")
    texts = calib_texts("math", 0, frozenset(), n=128)
    timing = probe(loaded.model.config, batch_size=8, seq_len=256, device=torch.device("cpu"), dtype=torch.float32)
    start = time.perf_counter()
    usage = count_usage(loaded, texts, seq_len=256, batch_size=8)
    profile_s = time.perf_counter() - start
    specs = loaded.router_specs()
    plans = [LayerPlan(layer.position, tuple(prune_variant(specs[layer.position], e)
                                             for e in torch.topk(usage.expert_counts[layer.position], 3).indices.tolist()))
             for layer in loaded.layers]
    start = time.perf_counter()
    KLEngine(loaded, texts, seq_len=256, batch_size=8).run(plans)
    kl_s = time.perf_counter() - start
    config = loaded.model.config
    pc = plan_cost(config, command="profile", samples=128, seq_len=256, batch_size=8, checkpoint_every=0)
    kc = plan_cost(config, command="kl-scan", samples=128, seq_len=256, batch_size=8,
                   variants_by_layer={layer.layer_index: 3 for layer in loaded.layers})
    return {"profile_s": round(profile_s, 2), "predicted_profile_s": round(pc.seconds(timing, "whole"), 2),
            "kl_s": round(kl_s, 2), "predicted_kl_s": round(kc.seconds(timing, "whole"), 2), "timing": timing.__dict__,
            "layer_runs": {"profile": pc.layer_runs, "kl-scan": kc.layer_runs}}


def main() -> None:
    import torch

    from banpick_cli.profile import read_profile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stream-proof", action="store_true", help="the streamed-under-a-memory-limit proof instead")
    parser.add_argument("--layers", type=int, default=12, help="--stream-proof: decoder layers (377 MB each)")
    parser.add_argument("--cgroup-proof", action="store_true", help="the 3.3 GB checkpoint streamed in a memory cgroup instead")
    parser.add_argument("--cgroup-mb", type=int, default=953, help="--cgroup-proof: the limit in MiB (953 MiB = 1 GB)")
    parser.add_argument("--old", default="", help="--cgroup-proof: a folder with an older banpick_cli to measure too")
    parser.add_argument("--work", default="", help="--cgroup-proof: reuse the checkpoint in this folder")
    parser.add_argument("--family-peaks", action="store_true", help="one streamed layer read's memory, per family")
    cli = parser.parse_args()
    if cli.family_peaks:
        print(json.dumps(family_peaks(cli), indent=1))
        return
    if cli.cgroup_proof:
        print(json.dumps(cgroup_proof(cli), indent=2))
        return
    if cli.stream_proof:
        print(json.dumps(stream_proof(cli), indent=2))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    model = cli.model
    if model == "demo-shaped" or (model == "demo" and not (REPO / "banpick_cli" / "artifacts" / "demo-moe" / "config.json").exists()):
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
