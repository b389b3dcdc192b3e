"""Benchmark: the KL engine (kl-scan, layer-sensitivity) against the naive one-forward-per-candidate reference.

Both compute the same numbers on the same model, texts and candidates (the script checks they agree):
  naive   one full forward per batch for the unmodified model, then one full forward per candidate
  fast    `KLEngine`, layer-major: per window of batches each decoder layer is acquired once, and the
          unmodified model and every candidate whose layer is at or before it run through it (each
          candidate forked from the unmodified state at its own layer, candidates of a layer stacked);
          then the final norm and LM head. Texts batched longest first (less padding); "unsorted" is the
          engine in the texts' own order
The forward count of each is printed next to the times: naive = 1 + N candidates; the fast path's floor
is 1 + sum over candidates of (L - l)/L (decoder layers from the candidate's layer on; the LM head is
paid per candidate by both), so the ideal ratio grows with depth and with candidates per layer. The
layer-major order does that work with one layer load per window instead of one sweep per candidate layer
(what matters for --stream; here the model is in memory, so loads cost nothing).

    .venv/bin/python bench/bench_kl.py --model demo --candidates 4          # the embedded model
    .venv/bin/python bench/bench_kl.py --synthetic 4,8,16 --candidates 2,8  # how it grows (random Qwen3-MoE)
Times are CPU seconds of this process on a CPU (one torch thread by default), wall seconds on a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def synthetic_model(layers: int, out: Path) -> Path:
    """Saves a random Qwen3-MoE (hidden 128, 32 experts, top-8, vocab 2048) with `layers` layers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=64,
                            num_experts=32, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512,
                            tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(200), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>").save_pretrained(out)
    return out


def _texts(n: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while 12 plus 35 makes 47 and def add x y return".split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 30)) for i in range(n)]


def measure(model: str, texts: list[str], *, candidates: int, seq_len: int, batch_size: int, stack: int, repeat: int) -> dict:
    from banpick_cli.passes.kl import KLEngine
    from banpick_cli.passes.kl_math import LayerPlan, naive_kl
    from banpick_cli.stages.kl_scan import prune_variant
    from banpick_cli.passes.usage import count_usage
    from banpick_cli.models.loading import load_model

    loaded = load_model(model, device="cpu" if not torch.cuda.is_available() else "auto")
    usage = count_usage(loaded, texts, seq_len=seq_len, batch_size=batch_size)
    specs = loaded.router_specs()
    plans = [LayerPlan(layer.position, tuple(prune_variant(specs[layer.position], e)
                                              for e in torch.topk(usage.expert_counts[layer.position], candidates).indices.tolist()))
             for layer in loaded.layers]
    run = dict(seq_len=seq_len, batch_size=batch_size)

    # On a GPU, wall time. On a CPU, this process's CPU time: the machine may be shared, and with one
    # torch thread (--threads 1) CPU time is the work done, whoever else is running.
    clock = time.perf_counter if loaded.device.type == "cuda" else time.process_time

    def once(fn):
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        out = fn()
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start, out

    # Warm up, then alternate the two so a busy machine slows both alike; best of `repeat` each.
    KLEngine(loaded, texts[: batch_size], **run).run(plans[:1])
    naive_s = fast_s = unsorted_s = float("inf")
    for _ in range(repeat):
        t, naive = once(lambda: naive_kl(loaded, texts, plans, **run))
        naive_s = min(naive_s, t)
        t, fast = once(lambda: KLEngine(loaded, texts, stack=stack, **run).run(plans))
        fast_s = min(fast_s, t)
        t, _ = once(lambda: KLEngine(loaded, texts, stack=stack, sort_by_length=False, **run).run(plans))
        unsorted_s = min(unsorted_s, t)
    diff = max(float((fast[p] - naive[p]).abs().max() / naive[p].abs().max().clamp(min=1e-30)) for p in naive)
    L = loaded.identity.num_layers
    n = sum(len(p.variants) for p in plans)
    floor = 1 + sum(len(p.variants) * (L - layer.layer_index) / L for p, layer in zip(plans, loaded.layers))
    return {"model": model if "/" not in model or len(model) < 40 else Path(model).name, "layers": L,
            "moe_layers": len(loaded.layers), "candidates": n, "tokens": usage.tokens, "naive_s": round(naive_s, 3),
            "fast_s": round(fast_s, 3), "ratio": round(naive_s / fast_s, 2),
            "fast_unsorted_s": round(unsorted_s, 3), "ratio_unsorted": round(naive_s / unsorted_s, 2), "forwards_naive": 1 + n,
            "forwards_floor": round(floor, 2), "ideal_ratio": round((1 + n) / floor, 2), "max_rel_diff": diff,
            "device": str(loaded.device), "clock": "wall" if loaded.device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "stack": stack}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A model (e.g. demo); default: the synthetic sweep.")
    parser.add_argument("--synthetic", default="4,8,16", help="Depths of random Qwen3-MoE models (with no --model).")
    parser.add_argument("--candidates", default="2,8", help="Candidates per MoE layer (comma-separated list).")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stack", type=int, default=0, help="0: the engine's default (8 on a GPU, 2 on a CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.candidates.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from banpick_cli.data import get_domain, load_calibration_text

            texts = load_calibration_text(get_domain("math"), "embedded" if args.model == "demo" else None,
                                          samples=args.samples, seed=0).texts
            models = [args.model]
        else:
            texts = _texts(args.samples)
            models = [str(synthetic_model(int(d), Path(tmp) / f"d{d}")) for d in args.synthetic.split(",")]
        for model in models:
            for c in counts:
                rows.append(measure(model, texts, candidates=c, seq_len=args.seq_len, batch_size=args.batch_size,
                                    stack=args.stack, repeat=args.repeat))
                if not args.json:
                    r = rows[-1]
                    print(f"L={r['layers']:>3} candidates={r['candidates']:>4} tokens={r['tokens']:>6}  naive {r['naive_s']:8.2f}s  "
                          f"fast {r['fast_s']:7.2f}s  ratio {r['ratio']:5.2f}x  (unsorted {r['ratio_unsorted']:.2f}x; forwards {r['forwards_naive']} vs floor "
                          f"{r['forwards_floor']}: ideal {r['ideal_ratio']:.2f}x)  max rel diff {r['max_rel_diff']:.1e}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
