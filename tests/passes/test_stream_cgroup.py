"""Proof on this machine, scaled down: inside a memory cgroup (v1) limited to what the runtime is charged
plus 1.25 decoder layers and a little room for one batch's activations, a streamed `profile` and KL scan
give the counts and KLs of the in-memory model; the in-memory model is killed under the same limit.

The cgroup charges resident memory and page cache alike, so this also holds the streamed reads to
dropping the checkpoint's pages once read. The full-size version (a 3.3 GB checkpoint in a 1 GB cgroup)
is bench/bench_scale.py --cgroup-proof; docs/benchmarks.md has its numbers.
"""

from __future__ import annotations

import json

import pytest
import torch

from stream_helpers import cgroup_unavailable, drop_cache, run_limited, write_checkpoint

REASON = cgroup_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs a memory cgroup: {REASON}")

ROOM_MB = 48  # one batch's activations (4 x 32 tokens), the hidden states, the LM head, allocator slack


def test_streamed_run_in_a_cgroup_of_one_and_a_quarter_layers_equals_the_in_memory_run(tmp_path):
    from banpick_cli.models.loading import load_model
    from banpick_cli.passes.kl import KLEngine, LayerPlan
    from banpick_cli.passes.usage import count_usage
    from banpick_cli.stages.kl_scan import prune_variant
    from scan_helpers import TEXTS

    folder = tmp_path / "model"
    size = write_checkpoint(folder, layers=4, hidden=384, width=256, experts=32, top_k=4, heads=4, kv_heads=2, head_dim=64)
    layer_mb = 32 * 3 * 256 * 384 * 4 / 2**20  # the experts: 36 MB of a layer's 38
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 2))
    above = int(1.25 * layer_mb) + ROOM_MB
    base = dict(model=str(folder), data=str(data), seq_len=32, batch_size=4, top=2, top_tokens=100, hidden_cache_mb=64,
                limit_mb=0, scan_layers=4, cgroup_above_mb=above)
    assert size >> 20 > above + 50  # the model (151 MB) does not fit the room above the runtime

    drop_cache(folder)  # read from disk: the pages the run keeps are charged to it
    streamed, err = run_limited({**base, "stream": True})
    assert streamed is not None, err
    assert streamed["cgroup_peak_mb"] - streamed["runtime_mb"] <= above, streamed
    assert streamed["bytes_read"] >= 2 * size * 0.95  # every layer read for profile, and again for the scan

    # The reference, in this process: the in-memory model on the same texts, the same plans.
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    whole = load_model(str(folder), device="cpu", dtype="float32")
    counts = count_usage(whole, texts, seq_len=32, batch_size=4).expert_counts
    assert streamed["counts"] == counts.tolist()
    specs = whole.router_specs()
    plans = [LayerPlan(layer.position, tuple(prune_variant(specs[layer.position], e)
                                             for e in torch.topk(counts[layer.position], 2).indices.tolist()))
             for layer in whole.layers]
    kl = KLEngine(whole, texts, seq_len=32, batch_size=4, top_tokens=100, hidden_cache_mb=64).run(plans)
    for position, values in kl.items():
        assert values.min() > 1e-3  # pruning moves the output: equality means something
        # Same kernels on the same numbers in another process; a tolerance in case its thread count differs.
        torch.testing.assert_close(torch.tensor(streamed["kl"][str(position)], dtype=values.dtype), values, rtol=1e-5, atol=1e-7)

    # The limit binds: the model loaded whole is killed under it.
    failed, err = run_limited({**base, "stream": False})
    assert failed is None and '"cgroup_oom": true' in err, err[-500:]
