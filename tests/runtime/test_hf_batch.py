"""The HF runtime's distinct experts per batch, and its batch-aware hook (routing.batch_share after the plan)."""

from __future__ import annotations

import pytest
import torch

from banpick_cli.errors import BadSetting
from banpick_cli.models.loading import load_model
from banpick_cli.routing import batch_share
from banpick_cli.runtime import apply
from banpick_cli.runtime.plan import build_plan
from rt_helpers import ids_for, make_profile


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return load_model(str(tiny_models["qwen3_moe"]), device="cpu")


def test_distinct_experts_per_batch_by_hand(qwen):
    e = qwen.routing.num_experts  # 8; index 8 is "no expert"
    with apply(qwen, None, "baseline") as h:
        # forward 1, layer 0: 3 tokens running {0, 1}, {1, 2}, {} -> 3 distinct experts
        h._observe(0, None, None, torch.tensor([[0, 1], [1, 2], [e, e]]))
        # forward 2, layer 0: {5}, {5, 7} -> 2; layer 1: {3, 4} -> 2
        h._observe(0, None, None, torch.tensor([[5, e], [5, 7]]))
        h._observe(1, None, None, torch.tensor([[3, 4], [4, 3]]))
        # forward 3, layer 1, with the second token padding: {6} -> 1
        h._mask = torch.tensor([True, False])
        h._observe(1, None, None, torch.tensor([[6, e], [0, 1]]))
        # a forward with no real token does not count as a batch
        h._mask = torch.tensor([False, False])
        h._observe(1, None, None, torch.tensor([[2, 3], [0, 1]]))
    stats = h.stats()
    assert stats.unique_experts_per_batch == [2.5, 1.5] and stats.batches == [2, 2]
    h.reset_stats()
    assert h.stats().unique_experts_per_batch == [0.0, 0.0]


@pytest.mark.parametrize("method", ["baseline", "ban", "fixed-k"])
def test_every_method_counts_the_experts_its_real_tokens_ran(qwen, method):
    prof = make_profile(qwen)
    ids = ids_for(qwen, batch=3, length=6)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # left padding of the third row
    seen: dict[int, list[int]] = {}
    current = {}

    def record(position, logits, weights, indices):
        real = current["mask"].reshape(-1).bool()
        seen.setdefault(position, []).append(len({int(x) for x in indices[real].flatten() if x < 8}))

    extra = {"k": 2} if method == "fixed-k" else {}
    with torch.inference_mode(), apply(qwen, prof, method, **extra) as h:
        h.hooks.observers.append(record)
        for width in (6, 3):
            current["mask"] = mask[:, -width:]
            qwen.model(ids[:, -width:], attention_mask=mask[:, -width:])
    stats = h.stats()
    assert stats.unique_experts_per_batch == [sum(v) / 2 for _, v in sorted(seen.items())]


def _prefill_then_decode(qwen, prompt, step, observer=None, handle=None):
    """Runs a prefill of `prompt` [B, n] and one decode step `step` [B, 1]; returns what `observer` saw per forward."""
    seen = []
    if handle is not None and observer is not None:
        handle.hooks.observers.append(lambda p, lg, w, i: seen.append((p, lg.clone(), i.clone())))
    out = qwen.model(prompt, use_cache=True)
    qwen.model(step, past_key_values=out.past_key_values, use_cache=True)
    return seen


def test_apply_batch_aware_runs_the_core_step_after_the_plan_on_decode_steps(qwen):
    prof = make_profile(qwen)
    specs = qwen.router_specs()
    plan = build_plan(prof, specs, "ban")
    prompt, step = ids_for(qwen, batch=8, length=4, seed=3), ids_for(qwen, batch=8, length=1, seed=5)
    layers = len(specs)
    with torch.inference_mode():
        with apply(qwen, prof, "ban") as plain:
            before = _prefill_then_decode(qwen, prompt, step, True, plain)
        with apply(qwen, prof, "ban", batch_aware={"candidates": 8}) as handle:
            assert handle.plan.batch == {"candidates": 8, "anchor": 1, "source": "given", "steps": "decode"}
            after = _prefill_then_decode(qwen, prompt, step, True, handle)
    # the prefill (first `layers` observations) routes as plain Ban; the decode step adds the core's step
    for (p, lg, got), (_, _, want) in zip(after[:layers], before[:layers]):
        assert torch.equal(got, want)
    for p, lg, got in after[layers:]:
        want = batch_share(lg, specs[p], plan.rules[p].route(lg), candidates=8).indices[:, : got.shape[1]]
        assert torch.equal(got, want)
    moved = sum(int((a[2] != b[2]).any()) for a, b in zip(after[layers:], before[layers:]))
    assert moved > 0  # the step changed some decode routing on this batch
    s_plain, s_aware = plain.stats(), handle.stats()
    assert s_aware.avg_experts == s_plain.avg_experts  # swaps: the same experts per token
    assert sum(s_aware.unique_experts_per_batch) < sum(s_plain.unique_experts_per_batch)
    # one sequence: batch-aware is plain Ban, bit for bit
    one_prompt, one_step = prompt[:1], step[:1]
    with torch.inference_mode():
        with apply(qwen, prof, "ban") as h:
            alone = _prefill_then_decode(qwen, one_prompt, one_step, True, h)
        with apply(qwen, prof, "ban", batch_aware=True) as h:
            alone_aware = _prefill_then_decode(qwen, one_prompt, one_step, True, h)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(alone, alone_aware))
    with pytest.raises(BadSetting, match="domain auto"):
        apply(qwen, prof, "ban", "auto", batch_aware=True)
    with pytest.raises(BadSetting, match="batch_aware takes candidates and anchor"):
        apply(qwen, prof, "ban", batch_aware={"bogus": 1})
