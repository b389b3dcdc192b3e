"""Benchmark: `profile` throughput against a plain forward pass of the same model and data.

Three timings on the same tokenised batches, best of --repeat:
  plain     model(input_ids) as a user would run it: decoder + LM head (logits)
  decoder   the decoder alone (no LM head), no hooks
  profile   what `banpick profile` runs per batch: decoder + router hooks + on-device bincount
Counting overhead = profile / decoder - 1 (target < 5%); profile / plain < 1 means skipping the LM head
more than pays for the counting.

    .venv/bin/python bench/bench_profile.py [--model demo] [--samples 128] [--seq-len 128] [--batch-size 8]
        [--threads 1 --clock cpu]   # on a shared CPU: count CPU time of one thread
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from banpick_cli.passes.batches import batches
    from banpick_cli.passes.usage import UsageCounter
    from banpick_cli.models import RoutingHooks
    from banpick_cli.data import get_domain, load_calibration_text
    from banpick_cli.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--domain", default="math")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time, steady on a shared machine (use with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    loaded = load_model(args.model, device=args.device)
    texts = load_calibration_text(get_domain(args.domain), "embedded" if args.model == "demo" else None,
                                  samples=args.samples, seed=0).texts
    data = list(batches(loaded.tokenizer, texts, seq_len=args.seq_len, batch_size=args.batch_size, device=loaded.device))
    decoder = loaded.adapter.decoder(loaded.model)

    def sync() -> None:
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def plain() -> None:
        for b in data:
            loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    @torch.inference_mode()
    def decoder_only() -> None:
        for b in data:
            decoder(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    @torch.inference_mode()
    def profile() -> None:
        # What count_usage runs per batch, on the same pre-tokenised batches as the other two.
        counter = UsageCounter(len(loaded.layers), loaded.routing.num_experts, loaded.device)
        with RoutingHooks(loaded.layers, loaded.routing.num_experts, observers=[counter]):
            for b in data:
                counter.mask = b.attention_mask.reshape(-1).bool()
                decoder(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    tokens = sum(b.tokens for b in data)
    runs = (("plain", plain), ("decoder", decoder_only), ("profile", profile))
    for _, fn in runs:
        fn()  # warm-up
    # Interleave the three so drift on a shared machine hits all alike; keep the best of each.
    results = {name: [] for name, _ in runs}
    for _ in range(args.repeat):
        for name, fn in runs:
            results[name].append(_once(fn, sync, clock))
    t = {name: min(values) for name, values in results.items()}
    report = {
        "model": args.model,
        "device": str(loaded.device),
        "clock": args.clock,
        "threads": torch.get_num_threads(),
        "tokens": tokens,
        "plain_tok_s": round(tokens / t["plain"]),
        "decoder_tok_s": round(tokens / t["decoder"]),
        "profile_tok_s": round(tokens / t["profile"]),
        "counting_overhead_vs_decoder": round(t["profile"] / t["decoder"] - 1, 4),
        "profile_time_over_plain": round(t["profile"] / t["plain"], 4),
    }
    print(json.dumps(report, indent=2))


def _once(fn, sync, clock) -> float:
    sync()
    start = clock()
    fn()
    sync()
    return clock() - start


if __name__ == "__main__":
    main()
