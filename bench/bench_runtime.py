"""Benchmark: what each routing method costs in the HF runtime, at real expert shapes and matched budgets.

A random-weight stack shaped like a real MoE model (its hidden size, expert count and width, top-k,
attention; only a few decoder layers, no LM head) is timed under `banpick_cli.runtime.apply` for
every method at the same expected experts per token (the knob solved by `evaluation.budget` on router
logits of other random tokens), against the plain model without banpick. One thread, CPU time of the
process (`time.process_time`), methods interleaved, median of --repeat passes. Fixed-K is timed at every
integer k, so each method is also compared with Fixed-K at the Avg-TopK it actually ran (interpolated).

    .venv/bin/python bench/bench_runtime.py [--shape qwen3-30b-a3b,deepseek-v2-lite] [--layers 2]
        [--tokens 256] [--repeat 5] [--targets 4,5,6] [--methods fixed-k,ban,banpick,des,dynamic]
        [--experts grouped_mm] [--json]

The shapes (from the models' config.json): Qwen3-30B-A3B: hidden 2048, 128 experts of width 768, top-8,
32 query / 4 KV heads of 128, experts renormalised. DeepSeek-V2-Lite: hidden 2048, 64 routed experts of
width 1408 + 2 shared, top-6 (greedy, no renormalisation), MLA attention (KV rank 512). Weights are
float32 and random; router gates are scaled so logits spread about as real routers' do (std 1.5).
Memory: about 2.4 GB per Qwen3-shaped layer, 2.3 GB per DeepSeek-shaped one.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

SHAPES = {
    "qwen3-30b-a3b": dict(
        family="qwen3_moe", targets=(4, 5, 6),
        config=dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                    intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=4096,
                    max_position_embeddings=4096, tie_word_embeddings=False)),
    "deepseek-v2-lite": dict(
        family="deepseek_v2", targets=(3, 4, 5),
        config=dict(hidden_size=2048, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                    moe_intermediate_size=1408, intermediate_size=10944, first_k_dense_replace=0,
                    num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy", n_group=1,
                    topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, vocab_size=4096,
                    max_position_embeddings=4096, tie_word_embeddings=False)),
}
METHODS = ("fixed-k", "ban", "banpick", "des", "dynamic")
LOGIT_STD = 1.5


def build(shape: str, layers: int, experts: str, seed: int = 0):
    """Returns (LoadedModel, decoder) of a random model of `shape` with `layers` MoE decoder layers."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config, Qwen3MoeConfig

    from banpick_cli.runtime.hf import as_loaded

    spec = SHAPES[shape]
    cls = {"qwen3_moe": Qwen3MoeConfig, "deepseek_v2": DeepseekV2Config}[spec["family"]]
    config = cls(**spec["config"], num_hidden_layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, experts_implementation=experts, dtype=torch.float32).eval()
    hidden = config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.dim() == 2 and param.shape[-1] == hidden:
                param.normal_(0, LOGIT_STD / hidden**0.5)  # RMS-normed input: logit std ~ LOGIT_STD
    loaded = as_loaded(model)
    return loaded, loaded.adapter.decoder(model)


def profile_for(loaded, sample):
    """Returns a profile of the random model: Ban tensors from the sample's token ratios, one key expert per layer."""
    from banpick_cli.profile.format import new_profile
    from banpick_cli.routing import route, token_ratio

    specs = loaded.router_specs()
    m, e = len(specs), specs[0].num_experts
    prof = new_profile(loaded.identity, loaded.fingerprint)
    ratios = [token_ratio(x, s, k_num=3) for x, s in zip(sample.logits, specs)]
    prof.put("ban/layer_sensitivity", torch.linspace(0.0, 1.0, m) if m > 1 else torch.tensor([0.5]))
    prof.put("ban/ratio_min", torch.stack([torch.quantile(r, 0.01) for r in ratios]))
    prof.put("ban/ratio_max", torch.stack([torch.quantile(r, 0.99) for r in ratios]))
    key = torch.zeros(m, e, dtype=torch.bool)
    for position, (x, s) in enumerate(zip(sample.logits, specs)):  # the most used expert: Pick C adds it often
        used = torch.bincount(route(x, s).indices.flatten(), minlength=e + 1)[:e]
        key[position, int(used.argmax())] = True
    prof.domain("bench").put("key_experts", key)
    return prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-30b-a3b,deepseek-v2-lite")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="sequences; tokens are split over them")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--targets", default="", help="Avg-TopK targets (default: the shape's, e.g. 4,5,6 for top-8)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--experts", default="grouped_mm", help="transformers experts implementation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    reports = []
    for shape in args.shape.split(","):
        targets = [float(t) for t in args.targets.split(",")] if args.targets else list(SHAPES[shape]["targets"])
        reports.append(run_shape(shape, args, targets, methods))
        gc.collect()  # one shape's weights (about 5 GB) before the next
    print_reports(reports, render, args.json)


def print_reports(reports: list[dict], render, as_json: bool) -> None:
    """Prints the shapes' reports as JSON, or each rendered as its table (every bench of this folder)."""
    if as_json:
        print(json.dumps(reports, indent=2))
    else:
        for report in reports:
            print(render(report))


@torch.inference_mode()
def run_shape(shape: str, args, targets: list[float], methods: list[str]) -> dict:
    """Returns one shape's report: every row's Avg-TopK, median CPU seconds, speed-up and ratio to Fixed-K."""
    from banpick_cli.runtime import apply
    from banpick_cli.evaluation.budget import CalibrationLogits, solve_budget

    loaded, decoder = build(shape, args.layers, args.experts)
    specs = loaded.router_specs()
    k_base, vocab = specs[0].top_k, loaded.model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.tokens // args.batch), generator=gen)
    calib_ids = torch.randint(0, vocab, (4, 256), generator=gen)  # other tokens: the budget is not solved on the timed ones
    sample = CalibrationLogits(tuple(torch.cat(x) for x in zip(*[_router_logits(loaded, decoder, row[None])
                                                                 for row in calib_ids])))
    prof = profile_for(loaded, sample)

    rows = [("baseline", "baseline", {}, float(k_base), None)]
    for k in range(max(1, int(min(targets)) - 1), k_base):  # Fixed-K's curve, for comparison at any Avg-TopK
        rows.append((f"fixed-k(k={k})", "fixed-k", {"k": k}, float(k), None))
    for target in targets:
        for method in methods:
            if method == "fixed-k":
                continue
            try:
                b = solve_budget(method, target, specs, sample, prof, domain="bench" if method == "banpick" else None)
            except Exception as err:  # noqa: BLE001 - a method that cannot reach the target: say so, go on
                rows.append((f"{method}@{target:g}", method, None, target, str(err)))
                continue
            rows.append((f"{b.label}@{target:g}", method, b.overrides, b.expected, None))
            if method == "ban" and target == targets[len(targets) // 2]:  # what asking for the change counts costs
                rows.append((f"{b.label}@{target:g} +count_changes", method, b.overrides, b.expected, None))

    def forward():
        decoder(input_ids=ids, use_cache=False)

    runs = []
    for label, method, overrides, expected, error in rows:
        if error is not None:
            continue
        runs.append((label, method, overrides, expected))
    times: dict[str, list[float]] = {label: [] for label, *_ in runs}
    avg: dict[str, float] = {}
    forward()  # warm-up
    for rep in range(args.repeat + 1):  # the first pass warms each method's path and is not kept
        for label, method, overrides, _ in runs:
            handle = None if method == "baseline" else apply(loaded, prof, method,
                                                             "bench" if method == "banpick" else None,
                                                             count_changes=label.endswith("+count_changes"), **overrides)
            try:
                start = time.process_time()
                forward()
                spent = time.process_time() - start
            finally:
                if handle is not None:
                    avg[label] = handle.stats().avg_experts_overall
                    handle.remove()
            if rep:
                times[label].append(spent)
    base = statistics.median(times["baseline"])
    fixed = {float(k_base): base, **{expected: statistics.median(times[label]) for label, method, _, expected in runs
                                     if method == "fixed-k"}}
    table = []
    for label, method, overrides, expected, error in rows:
        if error is not None:
            table.append({"label": label, "method": method, "error": error})
            continue
        t = statistics.median(times[label])
        ran = avg.get(label, float(k_base))
        row = {"label": label, "method": method, "expected_avg_topk": round(expected, 3), "avg_topk": round(ran, 3),
               "experts_vs_baseline": round(ran / k_base, 3), "seconds": round(t, 4), "speedup": round(base / t, 3)}
        if method not in ("baseline", "fixed-k"):
            row["vs_fixed_k"] = round(_interpolate(fixed, ran) / t, 3)  # > 1: faster than Fixed-K at its Avg-TopK
        table.append(row)
    return {"shape": shape, "layers": args.layers, "tokens": int(ids.numel()), "experts": args.experts,
            "threads": torch.get_num_threads(), "repeat": args.repeat, "clock": "process_time",
            "config": SHAPES[shape]["config"], "rows": table}


def _router_logits(loaded, decoder, ids) -> list[torch.Tensor]:
    from banpick_cli.models.base import RoutingHooks

    out: list[torch.Tensor] = [None] * len(loaded.layers)

    def observe(position, logits, weights, indices):
        out[position] = logits.float().clone()

    with RoutingHooks(loaded.layers, loaded.routing.num_experts, observers=[observe]):
        decoder(input_ids=ids, use_cache=False)
    return out


def _interpolate(curve: dict[float, float], k: float) -> float:
    """Returns Fixed-K's time at Avg-TopK k, linear between the integer k measured."""
    points = sorted(curve.items())
    if k <= points[0][0]:
        return points[0][1]
    for (k0, t0), (k1, t1) in zip(points, points[1:]):
        if k <= k1:
            return t0 + (t1 - t0) * (k - k0) / (k1 - k0)
    return points[-1][1]


def render(report: dict) -> str:
    lines = [(f"{report['shape']}: {report['layers']} layers, {report['tokens']} tokens, experts={report['experts']}, "
              f"{report['threads']} thread(s), CPU time, median of {report['repeat']}"),
             "| method | Avg-TopK | experts vs baseline | s | speed-up | vs Fixed-K at same Avg-TopK |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['label']} | - | - | - | - | {row['error']} |")
            continue
        vs = f"{row['vs_fixed_k']:.2f}x" if "vs_fixed_k" in row else ""
        lines.append(f"| {row['label']} | {row['avg_topk']:.2f} | {row['experts_vs_baseline']:.2f} | {row['seconds']:.3f} | "
                     f"{row['speedup']:.2f}x | {vs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
