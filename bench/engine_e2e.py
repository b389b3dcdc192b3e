"""End-to-end engine check and benchmark (GPU machine with vLLM or SGLang installed).

Each configuration runs in a fresh process (the plugin reads its environment when the engine loads
the model), on the same prompts, greedy, a fixed number of new tokens (EOS ignored):

  stock       no BANPICK_PROFILE: the engine alone
  empty       an empty profile of this model: the plugin loads, checks the fingerprint, changes nothing
  core        method baseline with BANPICK_ROUTE_ALL=1: every layer routed by banpick's core
              (the model's own rule), so greedy tokens should match stock
  ban         method ban (the profile's Ban tensors, or --synthetic-ban)

It prints identical-token rates against stock and throughput ratios (new tokens/s) of every
configuration to stock, and writes them as JSON with --out.

    python bench/engine_e2e.py --engine vllm --model banpick_cli/artifacts/demo-moe --synthetic-ban
    python bench/engine_e2e.py --engine sglang --model Qwen/Qwen1.5-MoE-A2.7B --profile math.safetensors
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

PROMPTS = [
    "Question: what is 17 * 23? Answer step by step.",
    "def fibonacci(n):",
    "The capital of France is",
    "Explain why the sky is blue in two sentences.",
    "Solve for x: 3x + 7 = 22.",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 50:",
    "import numpy as np\n# compute the mean of each row\n",
]


def make_profiles(model: str, profile: str | None, synthetic: bool, workdir: Path) -> dict[str, str]:
    """Returns {"empty": path, "ban": path}: an empty profile of the model, and one with Ban tensors."""
    import torch

    from banpick_cli.models.loading import load_model
    from banpick_cli.profile.format import new_profile, read_profile, write_profile

    loaded = load_model(model, device="cpu", dtype="bfloat16")  # for the identity and router fingerprint
    empty = write_profile(new_profile(loaded.identity, loaded.fingerprint), workdir / "empty.safetensors")
    out = {"empty": str(empty)}
    if profile:
        read_profile(profile, fingerprint=loaded.fingerprint)
        out["ban"] = profile
    elif synthetic:  # layer sensitivity spread over [0, 1], a typical R range: throughput only, not accuracy
        m = len(loaded.layers)
        prof = new_profile(loaded.identity, loaded.fingerprint)
        prof.put("ban/layer_sensitivity", torch.linspace(0.0, 1.0, m))
        prof.put("ban/ratio_min", torch.full((m,), 0.35))
        prof.put("ban/ratio_max", torch.full((m,), 0.95))
        prof.settings["ban"] = {"k_min": max(1, loaded.routing.top_k * 3 // 8), "lambda": 0.7, "beta": 0.5}
        out["ban"] = str(write_profile(prof, workdir / "ban.safetensors"))
    return out


def child(args: argparse.Namespace) -> None:
    """Runs one configuration (environment already set) and prints a JSON line."""
    prompts = (PROMPTS * ((args.prompts + len(PROMPTS) - 1) // len(PROMPTS)))[: args.prompts]
    if args.engine == "vllm":
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.model, enforce_eager=args.eager, gpu_memory_utilization=args.gpu_memory, seed=0,
                  max_model_len=args.max_model_len)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate(prompts[:2], params)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
    else:
        import sglang as sgl

        engine = sgl.Engine(model_path=args.model, disable_cuda_graph=args.eager, mem_fraction_static=args.gpu_memory,
                            random_seed=0, context_length=args.max_model_len)
        params = {"temperature": 0.0, "max_new_tokens": args.max_tokens, "ignore_eos": True}
        engine.generate(prompts[:2], params)
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        wall = time.perf_counter() - start
        tokens = [o.get("output_ids") or o["text"] for o in outputs]
        engine.shutdown()
    new = sum(len(t) for t in tokens)
    print("E2E_RESULT " + json.dumps({"tokens": tokens, "wall_s": wall, "new_tokens": new, "tokens_per_s": new / wall}))


def run_config(name: str, env: dict[str, str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--engine", args.engine, "--model", args.model, "--prompts",
           str(args.prompts), "--max-tokens", str(args.max_tokens), "--gpu-memory", str(args.gpu_memory),
           "--max-model-len", str(args.max_model_len)] + (["--eager"] if args.eager else [])
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BANPICK_")} | env
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("E2E_RESULT ")]
    banpick_log = [line for line in (proc.stdout + proc.stderr).splitlines() if "banpick:" in line]
    if proc.returncode != 0 or not lines:
        return {"name": name, "error": (proc.stderr or proc.stdout)[-3000:], "banpick_log": banpick_log}
    return {"name": name, **json.loads(lines[-1][len("E2E_RESULT "):]), "banpick_log": banpick_log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "sglang"], required=True)
    parser.add_argument("--model", required=True, help="A local model directory or hub id of a supported MoE family.")
    parser.add_argument("--profile", help="A profile with Ban tensors (from `banpick layer-sensitivity`).")
    parser.add_argument("--synthetic-ban", action="store_true", help="Without --profile: made-up Ban tensors (speed only).")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--gpu-memory", type=float, default=0.6)
    parser.add_argument("--eager", action="store_true", help="No CUDA graphs (vLLM --enforce-eager, SGLang --disable-cuda-graph).")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", help="Write the results as JSON here.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        profiles = make_profiles(args.model, args.profile, args.synthetic_ban, Path(tmp))
        configs = {"stock": {}, "empty": {"BANPICK_PROFILE": profiles["empty"]},
                   "core": {"BANPICK_PROFILE": profiles["empty"], "BANPICK_METHOD": "baseline", "BANPICK_ROUTE_ALL": "1"}}
        if "ban" in profiles:
            configs["ban"] = {"BANPICK_PROFILE": profiles["ban"], "BANPICK_METHOD": "ban"}
        results = {name: run_config(name, env, args) for name, env in configs.items()}

    stock = results["stock"]
    summary = {"engine": args.engine, "model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens,
               "eager": args.eager, "configs": {}}
    for name, res in results.items():
        row = {k: res.get(k) for k in ("tokens_per_s", "wall_s", "new_tokens", "error", "banpick_log")}
        if "tokens" in res and "tokens" in stock:
            same = [a == b for a, b in zip(res["tokens"], stock["tokens"])]
            row["identical_sequences"] = f"{sum(same)}/{len(same)}"
            row["speed_vs_stock"] = round(res["tokens_per_s"] / stock["tokens_per_s"], 3)
        summary["configs"][name] = row
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    empty = summary["configs"]["empty"].get("identical_sequences") or "0/?"
    same, total = empty.split("/")
    errors = [name for name, row in summary["configs"].items() if row.get("error")]
    sys.exit(0 if same == total and not errors else 1)

if __name__ == "__main__":
    main()
