"""A Qwen3-MoE checkpoint of real layer shapes, written shard by shard (never whole in memory), and a
subprocess that calibrates a model under a hard memory limit (RLIMIT_DATA) and reports its peak.

Shared by tests/passes/test_stream_limit.py (a scaled-down checkpoint) and bench/bench_scale.py (the
full-size proof: hidden 2048 and expert width 768, Qwen3-30B-A3B's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def write_checkpoint(folder: Path, *, layers: int, hidden: int, width: int, experts: int, top_k: int,
                     heads: int, kv_heads: int, head_dim: int, vocab: int = 512, seed: int = 0) -> int:
    """Writes a random Qwen3-MoE in the hub's per-expert layout, one shard per decoder layer; returns its bytes.

    The output is sharpened (a large LM head, strong experts) so that pruning one expert moves the KL
    well above float32 noise.
    """
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=width,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            head_dim=head_dim, num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                            max_position_embeddings=512, tie_word_embeddings=False)
    config.save_pretrained(folder)
    build_tokenizer(folder)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    weight_map: dict[str, str] = {}
    total = 0

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    shard("embed.safetensors", {"model.embed_tokens.weight": randn(vocab, hidden, std=1.0),
                                "model.norm.weight": torch.ones(hidden),
                                "lm_head.weight": randn(vocab, hidden, std=0.5)})
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": randn(heads * head_dim, hidden, std=hidden**-0.5),
            p + "self_attn.k_proj.weight": randn(kv_heads * head_dim, hidden, std=hidden**-0.5),
            p + "self_attn.v_proj.weight": randn(kv_heads * head_dim, hidden, std=hidden**-0.5),
            p + "self_attn.o_proj.weight": randn(hidden, heads * head_dim, std=(heads * head_dim) ** -0.5),
            p + "self_attn.q_norm.weight": torch.ones(head_dim),
            p + "self_attn.k_norm.weight": torch.ones(head_dim),
            p + "mlp.gate.weight": randn(experts, hidden, std=0.5),
        }
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            tensors[q + "gate_proj.weight"] = randn(width, hidden, std=hidden**-0.5)
            tensors[q + "up_proj.weight"] = randn(width, hidden, std=hidden**-0.5)
            tensors[q + "down_proj.weight"] = randn(hidden, width, std=3 * width**-0.5)
        shard(f"layer-{i:03d}.safetensors", tensors)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


# Runs in a fresh process: optional RLIMIT_DATA first (before torch allocates anything), then profile
# counts and the KL of pruning each layer's most used experts; prints one JSON line.
RUN = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
def kib(key):  # a /proc/self/status figure in kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
if args.get("limit_mb") and args.get("cgroup"):
    pass  # the memory cgroup run_limited put this process in holds the limit
elif args["limit_mb"]:
    limit = args["limit_mb"] << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
import torch
torch.set_num_threads(args.get("threads", 1))
from banpick_cli.passes.kl import KLEngine, LayerPlan
from banpick_cli.passes.usage_pass import RunOptions, count_usage_pass
from banpick_cli.stages.kl_scan import prune_variant
import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401  (imported before the limit, as the runtime)
from transformers import AutoTokenizer  # noqa: F401
if args.get("cgroup_above_mb"):
    # As limit_above_mb, for the memory cgroup: what the runtime is charged now, plus this much.
    usage = int(open(args["cgroup"] + "/memory.usage_in_bytes").read())
    limit = usage + (args["cgroup_above_mb"] << 20)
    open(args["cgroup"] + "/memory.limit_in_bytes", "w").write(str(limit))
    args["limit_mb"], args["runtime_mb"] = limit >> 20, usage >> 20
if args.get("limit_above_mb"):
    # The runtime (Python, torch, transformers) is what it is; the model gets only this much more.
    data_now = kib("VmData") << 10
    limit = data_now + (args["limit_above_mb"] << 20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    args["limit_mb"] = limit >> 20
texts = [json.loads(line)["text"] for line in open(args["data"])]
start = time.perf_counter()
if args["stream"]:
    from banpick_cli.passes.streaming import load_streaming
    loaded = load_streaming(args["model"], device="cpu", dtype="float32")
else:
    from banpick_cli.models.loading import load_model
    loaded = load_model(args["model"], device="cpu", dtype="float32")
load_s = time.perf_counter() - start
# The runtime as issue 21 counts it: Python, torch, transformers and the model's resident parts.
loaded_rss = kib("VmRSS") // 1024
start = time.perf_counter()
usage = count_usage_pass(loaded, texts, seq_len=args["seq_len"], batch_size=args["batch_size"],
                         options=RunOptions(checkpoint_every=0)).usage
profile_s = time.perf_counter() - start
profile_peak = kib("VmHWM") // 1024
counts = usage.expert_counts
specs = loaded.router_specs()
plans = [LayerPlan(layer.position, tuple(prune_variant(specs[layer.position], e)
                                         for e in torch.topk(counts[layer.position], args["top"]).indices.tolist()))
         for layer in loaded.layers[-args.get("scan_layers", len(loaded.layers)):]]
start = time.perf_counter()
engine = KLEngine(loaded, texts, seq_len=args["seq_len"], batch_size=args["batch_size"], top_tokens=args["top_tokens"],
                  hidden_cache_mb=args["hidden_cache_mb"])
kl = engine.run(plans)
kl_s = time.perf_counter() - start
# Peak RSS is this process's own high-water mark (VmHWM), not getrusage's ru_maxrss: Linux carries
# ru_maxrss over an exec, and Python starts children with vfork, so a child's ru_maxrss is at least its
# parent's peak (a pytest process that loaded models, say) and two runs of different sizes can read the same.
status = {k: kib(k) // 1024 for k in ("VmHWM", "VmData", "VmPeak")}
print(json.dumps({"limit_mb": args["limit_mb"], "runtime_mb": args.get("runtime_mb"), "counts": counts.tolist(), "tokens": usage.tokens, "kl": {p: v.tolist() for p, v in kl.items()},
                  "load_s": round(load_s, 3), "profile_s": round(profile_s, 3), "kl_s": round(kl_s, 3),
                  "peak_rss_mb": status["VmHWM"], "profile_peak_rss_mb": profile_peak, "loaded_rss_mb": loaded_rss,
                  "proc": status,
                  "layer_loads": sum(engine.layer_loads), "windows": engine.windows, "notes": engine.notes,
                  "bytes_read": getattr(loaded.streamed, "bytes_read", 0)}))
"""


def run_limited(args: dict, *, code: str | Path = REPO, time_v: bool = False) -> tuple[dict | None, str]:
    """Runs RUN in a fresh process; returns (its JSON, or None when it failed, and the tail of its stderr).

    With `args["cgroup_mb"]` (a fixed limit) or `args["cgroup_above_mb"]` (the runtime's charge plus this
    much, set by the process itself) it runs in a fresh memory cgroup (v1), whose peak charge
    (memory.max_usage_in_bytes: resident memory and page cache) is added as `cgroup_peak_mb`, with
    `cgroup_oom` (the kernel killed it). `code` is the folder whose banpick_cli runs; `time_v` runs it
    under /usr/bin/time -v and adds its maximum resident set as `time_max_rss_mb`.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(code), str(REPO)])),
           "OMP_NUM_THREADS": str(args.get("threads", 1))}
    group = None
    if args.get("cgroup_mb") or args.get("cgroup_above_mb"):
        group = make_cgroup(args.get("cgroup_mb", 0))
        args = {**args, "cgroup": str(group), "limit_mb": args.get("cgroup_mb", 0)}
    cmd = [sys.executable, "-c", RUN, json.dumps(args)]
    if time_v:
        cmd = ["/usr/bin/time", "-v", *cmd]

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        # cwd: `python -c` puts the working folder first on sys.path, before PYTHONPATH.
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=enter, cwd=str(code))
        facts = {}
        if group is not None:
            facts["cgroup_peak_mb"] = int((group / "memory.max_usage_in_bytes").read_text()) >> 20
            facts["cgroup_oom"] = "oom_kill 1" in (group / "memory.oom_control").read_text() or done.returncode in (-9, 137)
    finally:
        if group is not None:
            remove_cgroup(group)
    if time_v:
        rss = [line for line in done.stderr.splitlines() if "Maximum resident set size" in line]
        facts["time_max_rss_mb"] = int(rss[-1].split(":")[1]) >> 10 if rss else None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return {**json.loads(lines[-1]), **facts, "returncode": 0}, done.stderr[-3000:]
    return None, f"exit {done.returncode} {json.dumps(facts)}: " + done.stderr[-3000:]


def drop_cache(folder: Path) -> None:
    """Flushes and drops `folder`'s files from the page cache, so a run reads them from disk and is charged
    for the pages it keeps (written files stay cached, charged to the writer, otherwise)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def cgroup_unavailable() -> str | None:
    """Returns why a memory cgroup (v1) cannot be made here, or None when it can."""
    if not (CGROUP_ROOT / "memory.limit_in_bytes").is_file():
        return f"no cgroup v1 memory controller at {CGROUP_ROOT}"
    if not os.access(CGROUP_ROOT, os.W_OK):
        return f"{CGROUP_ROOT} is not writable (memory cgroups need root)"
    return None


def make_cgroup(limit_mb: int) -> Path:
    """Makes a child memory cgroup named after this process, limited to `limit_mb` MiB (0: no limit)."""
    for n in range(1000):
        group = CGROUP_ROOT / f"banpick-test-{os.getpid()}-{n}"
        try:
            group.mkdir()
            break
        except FileExistsError:
            continue
    if limit_mb:
        (group / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
    return group


def remove_cgroup(group: Path) -> None:
    """Removes an empty memory cgroup (its page cache goes to the parent)."""
    try:
        group.rmdir()
    except OSError:
        (group / "memory.force_empty").write_text("0")
        group.rmdir()
