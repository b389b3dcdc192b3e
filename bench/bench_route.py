"""Benchmark: the cost of one routing call per MoE layer at decode-sized token counts (microseconds).

What an engine plugin pays per layer per step beside the engine's own fused top-k: a plan built by
`runtime.plan.build_plan` from a hand-made profile (layer sensitivity 0.5, R range 0.3-0.9, K_min 2,
lambda 0.8, beta 0.5, as bench/engine_vllm_cpu.py; banpick adds one key expert per layer) timed as

    plan          RoutingPlan.route(position, logits): the routing core (ban / ban_pick) through the plan
    engine        EngineRouter.route(layer, logits, int32): the plan, fit_slots, sentinel_free, the casts
                  (the call vLLM's and SGLang's plugins make; built from the profile written to a temp file)
    top-k         softmax, torch.topk and renormalisation (the router's own rule in three ops), for scale

at the routers of Qwen3-30B-A3B (128 experts, top-8, softmax, renormalised) and DeepSeek-V2-Lite (64
experts, top-6, softmax, not renormalised) on random logits (std 2) of T tokens, float32 and bfloat16.
One torch thread; each number is the median over --repeat batches of --calls calls (the process's CPU time
per call, less sensitive than wall time to other jobs on the machine).

    .venv/bin/python bench/bench_route.py [--methods ban,banpick] [--tokens 1,8,64] [--dtypes float32,bfloat16]
        [--calls 200] [--repeat 15] [--profile ROWS] [--json]

--profile ROWS also prints torch.profiler's table (top ROWS ops by self CPU time) for ban at T=1, float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

SHAPES = {
    "qwen3-30b-a3b": dict(num_experts=128, top_k=8, renormalize=True, model_type="qwen3_moe"),
    "deepseek-v2-lite": dict(num_experts=64, top_k=6, renormalize=False, model_type="deepseek_v2"),
}
LAYERS = 2
BAN = {"k_min": 2, "lam": 0.8, "beta": 0.5}


def make_profile(shape: str):
    """Returns a profile of a 2-MoE-layer model of `shape`: Ban tensors and one key expert per layer."""
    from banpick_cli.profile.format import new_profile
    from banpick_cli.profile.identity import ModelIdentity
    from banpick_cli.routing import RouterSpec

    s = SHAPES[shape]
    spec = RouterSpec(s["num_experts"], s["top_k"], "softmax", s["renormalize"])
    identity = ModelIdentity(f"bench/{shape}", "Bench", s["model_type"], LAYERS, tuple(range(LAYERS)), 1000, spec)
    prof = new_profile(identity, "sha256:" + "0" * 64)
    prof.put("ban/layer_sensitivity", torch.full((LAYERS,), 0.5))
    prof.put("ban/ratio_min", torch.full((LAYERS,), 0.3))
    prof.put("ban/ratio_max", torch.full((LAYERS,), 0.9))
    prof.settings["ban"] = dict(BAN)
    key = torch.zeros(LAYERS, s["num_experts"], dtype=torch.bool)
    key[:, 5] = True
    prof.domain("bench").put("key_experts", key)
    return prof


def engine_router(prof, path: Path, method: str):
    """Returns an EngineRouter on the profile written to `path`, the way the plugins build one."""
    from banpick_cli.profile.format import write_profile
    from banpick_cli.runtime.engine import EngineRouter, EngineSettings

    write_profile(prof, path)
    settings = EngineSettings(str(path), method, "bench" if method == "banpick" else None, {})
    gates = {i: SimpleNamespace(weight=torch.empty(0)) for i in prof.model.moe_layers}
    router = EngineRouter(settings, gates, engine="bench", slots=router_slots(prof, method), fingerprint=prof.fingerprint)
    for layer in prof.model.moe_layers:
        router._scale[router.position[layer]] = 1.0  # the self-check's result: no engine to compare with here
    return router


def router_slots(prof, method: str) -> int:
    return prof.model.k_base + (1 if method == "banpick" else 0)


def per_call_us(fn, logits: list[torch.Tensor], calls: int, repeat: int) -> float:
    """Returns the median over `repeat` batches of `calls` calls of fn(logits[i]) in microseconds per call."""
    for x in logits[:20]:
        fn(x)
    times = []
    for _ in range(repeat):
        start = time.process_time()
        for i in range(calls):
            fn(logits[i % len(logits)])
        times.append((time.process_time() - start) / calls * 1e6)
    return statistics.median(times)


def topk_ref(spec):
    def run(x):
        w, i = torch.topk(x.float().softmax(-1), spec.top_k, dim=-1)
        return (w / w.sum(-1, keepdim=True) if spec.renormalize else w), i

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=",".join(SHAPES))
    parser.add_argument("--methods", default="ban,banpick")
    parser.add_argument("--tokens", default="1,8,64")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print torch.profiler's top ROWS ops")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from banpick_cli.runtime.plan import build_plan

    rows = []
    if not args.json:
        print("| router | method | logits | T | plan µs | engine µs | top-k µs |\n|---|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="banpick-bench-route-") as tmp:
        for shape in args.shape.split(","):
            prof = make_profile(shape)
            specs = prof.model.router_specs()
            for method in args.methods.split(","):
                plan = build_plan(prof, specs, method, "bench" if method == "banpick" else None)
                router = engine_router(prof, Path(tmp) / f"{shape}-{method}.safetensors", method)
                for dtype in args.dtypes.split(","):
                    for tokens in [int(t) for t in args.tokens.split(",")]:
                        gen = torch.Generator().manual_seed(tokens)
                        logits = [(torch.randn(tokens, specs[0].num_experts, generator=gen) * 2).to(getattr(torch, dtype))
                                  for _ in range(64)]
                        row = dict(shape=shape, method=method, dtype=dtype, tokens=tokens)
                        row["plan_us"] = per_call_us(lambda x: plan.route(1, x), logits, args.calls, args.repeat)
                        row["engine_us"] = per_call_us(lambda x: router.route(1, x, torch.int32), logits, args.calls,
                                                       args.repeat)
                        row["topk_us"] = per_call_us(topk_ref(specs[1]), logits, args.calls, args.repeat)
                        rows.append(row)
                        if not args.json:
                            print(f"| {shape} | {method} | {dtype} | {tokens} | {row['plan_us']:.0f} | "
                                  f"{row['engine_us']:.0f} | {row['topk_us']:.0f} |", flush=True)
                if args.profile and method == "ban":
                    show_profile(plan, router, specs[0].num_experts, args.profile)
    if args.json:
        print(json.dumps(rows, indent=1))


def show_profile(plan, router, num_experts: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, num_experts) * 2
    for _ in range(50):
        router.route(1, x, torch.int32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(200):
            router.route(1, x, torch.int32)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


if __name__ == "__main__":
    main()
