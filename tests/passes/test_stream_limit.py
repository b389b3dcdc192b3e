"""Proof on this machine, scaled down: a checkpoint three times larger than the memory a process may use
above its runtime is profiled and scanned streamed under that hard limit (RLIMIT_DATA, in a subprocess),
with the counts and KLs of an unlimited in-memory run; the in-memory run fails under the same limit.

The full-size version (hidden 2048, expert width 768, a limit on the whole process) is
bench/bench_scale.py --stream-proof; docs/benchmarks.md has its numbers.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from stream_helpers import run_limited, write_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux's")


def test_streamed_run_under_a_third_of_the_checkpoint_equals_the_unlimited_run(tmp_path):
    from scan_helpers import TEXTS

    size = write_checkpoint(tmp_path / "model", layers=24, hidden=256, width=128, experts=16, top_k=4, heads=4,
                            kv_heads=2, head_dim=64)
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 2))
    above = size // 3 >> 20  # MB the process may use beyond its runtime: a third of the checkpoint
    base = dict(model=str(tmp_path / "model"), data=str(data), seq_len=32, batch_size=4, top=2, top_tokens=100,
                hidden_cache_mb=64, limit_mb=0, scan_layers=3)
    streamed, err = run_limited({**base, "stream": True, "limit_above_mb": above})
    assert streamed is not None, err
    whole, err = run_limited({**base, "stream": False})
    assert whole is not None, err
    assert streamed["counts"] == whole["counts"] and streamed["tokens"] == whole["tokens"] == 112
    for position, values in whole["kl"].items():
        assert min(values) > 1e-3  # pruning moves the output: equality means something
        torch.testing.assert_close(torch.tensor(streamed["kl"][position]), torch.tensor(values), rtol=1e-5, atol=1e-7)
    assert streamed["layer_loads"] == 24 and streamed["windows"] == 1  # the scan read each layer once
    # Each run's own peak (VmHWM of its process, stream_helpers.RUN): the streamed run holds less than half
    # the checkpoint that the whole run holds, whatever the size of this (parent) process.
    peaks = (streamed["peak_rss_mb"], whole["peak_rss_mb"], size >> 20)
    assert streamed["peak_rss_mb"] < whole["peak_rss_mb"] - size // 2 ** 20 // 2, peaks
    # The limit binds: the same model loaded whole does not fit under it.
    failed, err = run_limited({**base, "stream": False, "limit_above_mb": above})
    assert failed is None and ("memory" in err.lower() or "alloc" in err.lower()), err[-500:]
