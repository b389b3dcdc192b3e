"""Benchmark: `profile` throughput against a plain forward pass of the same model and data.

Three timings on the same tokenised batches, best of --repeat:
  plain     model(input_ids) as a user would run it: decoder + LM head (logits)
  decoder   the decoder alone (no LM head), no hooks
  profile   what `banpick profile` runs: decoder + router hooks + on-device bincount
Counting overhead = profile / decoder - 1 (target < 5%); profile / plain < 1 means skipping the LM head
more than pays for the counting.

    .venv/bin/python bench/bench_profile.py [--model demo] [--samples 128] [--seq-len 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from banpick_cli.calibrate.batches import batches
    from banpick_cli.calibrate.usage import count_usage
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
    args = parser.parse_args()

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

    def profile() -> None:
        count_usage(loaded, texts, seq_len=args.seq_len, batch_size=args.batch_size)

    tokens = sum(b.tokens for b in data)
    runs = (("plain", plain), ("decoder", decoder_only), ("profile", profile))
    for _, fn in runs:
        fn()  # warm-up
    # Interleave the three so drift on a shared machine hits all alike; keep the best of each.
    results = {name: [] for name, _ in runs}
    for _ in range(args.repeat):
        for name, fn in runs:
            results[name].append(_once(fn, sync))
    t = {name: min(values) for name, values in results.items()}
    report = {
        "model": args.model,
        "device": str(loaded.device),
        "tokens": tokens,
        "plain_tok_s": round(tokens / t["plain"]),
        "decoder_tok_s": round(tokens / t["decoder"]),
        "profile_tok_s": round(tokens / t["profile"]),
        "counting_overhead_vs_decoder": round(t["profile"] / t["decoder"] - 1, 4),
        "profile_time_over_plain": round(t["profile"] / t["plain"], 4),
    }
    print(json.dumps(report, indent=2))


def _once(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
