"""The passes' experts forward (models/experts.py) returns transformers' grouped_mm bits in less memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from banpick_cli.models import experts as sliced
from banpick_cli.models.loading import load_model
from tiny import FAMILIES, _configs


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "num_experts")]


def _model(family, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[family], dtype=dtype).eval()
    for module in _experts_modules(model):
        with torch.no_grad():
            module.gate_up_proj.normal_(0, 0.3), module.down_proj.normal_(0, 0.3)
    return model


def _routing(tokens, experts, k, *, pruned=0, weight_dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    weights, index = torch.rand(tokens, experts, generator=gen).softmax(-1).topk(k)
    if pruned:  # pruned slots: expert id == num_experts with weight 0 (models/base.py)
        index[:pruned, -1] = experts
        weights[:pruned, -1] = 0
    return index, weights.to(weight_dtype)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruned", [0, 5])
def test_sliced_experts_equal_transformers_grouped_mm_bit_for_bit(family, pruned, monkeypatch):
    from transformers.integrations.moe import grouped_mm_experts_forward

    # Slices of a row or two and blocks of 3 tokens: many slices, many blocks, an expert alone in its slice.
    monkeypatch.setattr(sliced, "SLICE_BYTES", 1)
    monkeypatch.setattr(sliced, "BLOCK_BYTES", 3 * 4 * 32 * 4)
    for dtype in (torch.float32, torch.bfloat16):
        module = _experts_modules(_model(family, dtype))[0]
        module._is_expert_parallel = bool(pruned)  # transformers masks pruned slots only with the flag
        k = _configs()[family].num_experts_per_tok
        hidden = torch.randn(40, module.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(2)).to(dtype)
        index, weights = _routing(40, module.num_experts, k, pruned=pruned)
        with torch.no_grad():
            want = grouped_mm_experts_forward(module, hidden, index, weights)
            got = sliced.sliced_grouped_mm(module, hidden, index, weights)
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want), (family, dtype)
        assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("threads", [1, 2])
def test_sliced_experts_equal_grouped_mm_on_parallel_sizes(threads, monkeypatch):
    """Sizes past torch's parallel grain (32,768 elements), on one and two threads: the sums of a block and of
    the whole batch parallelise over tokens and hidden, never over the k slots."""
    from transformers import Qwen3MoeConfig
    from transformers.integrations.moe import grouped_mm_experts_forward
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    module = Qwen3MoeExperts(config).eval()
    torch.nn.init.normal_(module.gate_up_proj, std=0.1), torch.nn.init.normal_(module.down_proj, std=0.1)
    hidden = torch.randn(700, 256)
    index, weights = _routing(700, 16, 4)
    monkeypatch.setattr(sliced, "SLICE_BYTES", 200 * (256 + 4 * 128) * 4)  # about 200 rows a slice: 15 slices
    monkeypatch.setattr(sliced, "BLOCK_BYTES", 96 * 4 * 256 * 4)  # 96 tokens a block: 8 blocks, the last short
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert torch.equal(sliced.sliced_grouped_mm(module, hidden, index, weights),
                               grouped_mm_experts_forward(module, hidden, index, weights))
    finally:
        torch.set_num_threads(before)


def test_slices_cover_every_expert_once_and_hold_to_the_row_budget():
    ends = [2, 2, 9, 10, 14, 30]  # rows 0-2 | 2-2 (none) | 2-9 | 9-10 | 10-14 | 14-30
    assert sliced._slices(ends, 8) == [(0, 2), (2, 4), (4, 5), (5, 6)]  # 2 | 7 + 1 | 4 (+16 > 8) | 16 alone
    assert sliced._slices(ends, 100) == [(0, 6)]
    assert sliced._slices(ends, 1) == [(e, e + 1) for e in range(6)]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_loaded_models_run_the_sliced_experts_and_return_the_default_logits(tiny_models, family, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(sliced, "SLICE_BYTES", 1)
    loaded = load_model(str(tiny_models[family]), device="cpu", dtype="float32")
    assert loaded.model.config._experts_implementation == sliced.NAME
    default = AutoModelForCausalLM.from_pretrained(str(tiny_models[family]), dtype=torch.float32).eval()
    assert default.config._experts_implementation == "grouped_mm"
    calls = []
    monkeypatch.setattr(sliced, "_slices", lambda ends, rows, real=sliced._slices: calls.append(rows) or real(ends, rows))
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, default(ids).logits)
    assert calls  # the sliced forward ran


def test_a_model_on_another_experts_implementation_is_left_alone():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_configs()["olmoe"], experts_implementation="eager")
    assert not sliced.use_sliced_experts(model)
    assert model.config._experts_implementation == "eager"


_PEAK = r"""
import ctypes, json, sys, torch
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # as a streamed run sets it (passes/streaming.py)
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
from transformers.integrations.moe import grouped_mm_experts_forward
from banpick_cli.models.experts import sliced_grouped_mm
config = Qwen3MoeConfig(hidden_size=1024, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=8)
config._experts_implementation = "grouped_mm"
module = Qwen3MoeExperts(config).eval()
torch.nn.init.normal_(module.gate_up_proj, std=0.02), torch.nn.init.normal_(module.down_proj, std=0.02)
hidden = torch.randn(1024, 1024)
weights, index = torch.randn(1024, 64).softmax(-1).topk(8)
def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
fn = {"sliced": sliced_grouped_mm, "transformers": grouped_mm_experts_forward}[sys.argv[1]]
with torch.no_grad():
    fn(module, hidden, index, weights)  # warm-up: the kernels' one-time buffers are not the forward's
    before = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM back to VmRSS
    out = fn(module, hidden, index, weights)
    print(json.dumps({"added_mib": (kib("VmHWM") - before) / 1024}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_sliced_experts_hold_half_of_transformers_peak_and_at_most_peak_bytes():
    """1,024 tokens of a top-8, hidden-1024 layer in float32 (the 3.3 GB proof's shape, docs/benchmarks.md).
    Resident memory is what a memory cgroup charges; the slack covers the allocator and the output's pages."""
    added = {}
    for name in ("sliced", "transformers"):
        done = subprocess.run([sys.executable, "-c", _PEAK, name], capture_output=True, text=True, check=True)
        added[name] = json.loads(done.stdout.strip().splitlines()[-1])["added_mib"]
    predicted = sliced.peak_bytes(1024, 8, 1024, 512, 4) / 2**20
    theirs = sliced.peak_bytes(1024, 8, 1024, 512, 4, sliced=False) / 2**20  # the dry-run's figure off the CPU
    assert 0.9 * theirs <= added["transformers"] <= theirs + 4, (added, theirs)  # 4 x S x hidden x 4 bytes
    assert added["sliced"] <= predicted + 4, (added, predicted)
    assert added["sliced"] < added["transformers"] / 2, added
