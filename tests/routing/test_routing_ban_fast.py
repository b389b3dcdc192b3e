"""Ban's per-call fast path (ban_rule: knobs checked once, K by one bucketize, scores gathered once) against the
routing as it was computed before it (tests/ban_reference.py): the same experts, weights and K, bit for bit."""

import itertools

import pytest
import torch

import ban_reference as ref
from banpick_cli.routing import RouterSpec, ban, ban_k, ban_pick, ban_pick_rule, ban_rule
from banpick_cli.routing.ban import _float32_of, _order_key, k_steps
from banpick_cli.runtime.engine import fit_slots

SPECS = {
    "qwen3-30b-a3b": RouterSpec(128, 8, "softmax", True, weights_in_logits_dtype=True),
    "qwen3, float32 weights": RouterSpec(128, 8, "softmax", True),
    "deepseek-v2-lite": RouterSpec(64, 6, "softmax", False),
    "deepseek-v2 groups": RouterSpec(64, 6, "softmax", False, 16.0, "group_limited_greedy", n_group=8, topk_group=3),
    "deepseek-v3": RouterSpec(32, 4, "sigmoid", True, 2.5, "noaux_tc", n_group=4, topk_group=2,
                              correction_bias=torch.linspace(-0.3, 0.3, 32)),
    "top-8 of 8": RouterSpec(8, 8, "softmax", True),
}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Returns whether two tensors are equal bit for bit (NaN payloads and the sign of zero included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


def same_routing(a, b) -> bool:
    return same(a.indices, b.indices) and same(a.weights, b.weights) and same(a.k, b.k)


def logits_for(spec: RouterSpec, tokens: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random logits with the awkward cases in: several scales, exact ties, -inf experts, a NaN row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, spec.num_experts, generator=gen) * [0.1, 1.0, 2.0, 6.0][seed % 4]
    if seed % 3 == 0:
        x = x.round()  # many exact ties
    if seed % 2 == 0 and tokens > 4:
        x[1, : spec.num_experts // 2] = float("-inf")  # softmax and sigmoid give them exactly 0
        x[2] = float("nan")
        x[3] = float("-inf")  # sigmoid: every score 0 (softmax: NaN)
        x[4, -1] = float("nan")  # sigmoid: one NaN score, read by the "no expert" slots' gather
    return x.to(dtype)


def knobs(spec: RouterSpec, seed: int) -> dict:
    """Ban's knobs drawn at random (edges included: R_min == R_max, lam 0, beta 0 and 1, K_min == K_base)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    u = torch.rand(5, generator=gen).tolist()

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    r_min = 0.1 + 0.5 * u[1]
    r_max = pick(r_min, r_min + 0.5 * u[2], r_min + 0.5 * u[2], r_min + 0.01 * u[2])
    k_min = int(torch.randint(1, spec.top_k + 1, (1,), generator=gen))
    return dict(layer_sensitivity=pick(0.0, 1.0, u[0], u[0]), r_min=r_min, r_max=r_max, k_min=k_min,
                lam=pick(0.0, 0.35, 0.7, 1.0, 2.5, 4 * u[3]), beta=pick(0.0, 0.5, 1.0, u[4], u[4]), clip=pick(True, False),
                ratio_k_num=pick(None, None, int(torch.randint(1, spec.top_k + 1, (1,), generator=gen))))


CASES = list(itertools.product(SPECS, [0, 1, 2, 7, 64], [torch.float32, torch.bfloat16]))


@pytest.mark.parametrize("name, tokens, dtype", CASES)
def test_ban_and_ban_pick_equal_the_old_routing_bit_for_bit(name, tokens, dtype):
    spec = SPECS[name]
    for seed in range(16):
        x, kw = logits_for(spec, tokens, dtype, seed), knobs(spec, seed)
        reweight = "keep" if seed % 4 == 3 else "model"
        want = ref.ban(x, spec, **kw, reweight=reweight)
        assert same_routing(ban(x, spec, **kw, reweight=reweight), want), (name, tokens, dtype, seed)
        assert same_routing(ban_rule(spec, **kw, reweight=reweight)(x), want), (name, tokens, dtype, seed)
        key = torch.zeros(spec.num_experts, dtype=torch.bool)
        key[[seed % spec.num_experts, (7 * seed + 3) % spec.num_experts]] = seed % 6 != 5  # no key at all, too
        extra = dict(range_factor=[2.0, 1.5, 3.0][seed % 3], range_base=["kept", "base"][seed % 2])
        want = ref.ban_pick(x, spec, key, **kw, **extra)
        assert same_routing(ban_pick(x, spec, key, **kw, **extra), want), (name, tokens, dtype, seed)
        assert same_routing(ban_pick_rule(spec, key, **kw, **extra)(x), want), (name, tokens, dtype, seed)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2-lite", "top-8 of 8"])
def test_the_engines_slots_equal_the_old_ones_bit_for_bit(name):
    spec = SPECS[name]
    x = logits_for(spec, 64, torch.bfloat16, 5)
    kept = ban(x, spec, 0.5, 0.3, 0.9, k_min=2, lam=0.8)
    for slots, reweight in [(spec.top_k, False), (spec.top_k + 2, False), (spec.top_k - 1, True), (spec.top_k - 1, False)]:
        got, want = fit_slots(kept, x, spec, slots, reweight=reweight), ref.fit_slots(kept, x, spec, slots, reweight=reweight)
        assert same(got[0], want[0]) and same(got[1], want[1]), (slots, reweight)


def test_k_steps_give_ban_k_for_every_ratio_near_the_steps_and_across_0_1():
    # The step function must give the formula's K for every float32 R: sweep [-0.5, 1.5] densely, and the
    # 64 floats on either side of each bound, where floor(K_min + ...) changes.
    sweep = torch.linspace(-0.5, 1.5, 20_001)
    for seed in range(40):
        spec = SPECS[["qwen3-30b-a3b", "deepseek-v2-lite", "top-8 of 8"][seed % 3]]
        kw = knobs(spec, seed)
        kw.pop("ratio_k_num")
        rule = ban_rule(spec, **kw)
        layer = dict(kw, k_base=spec.top_k)
        bounds = torch.tensor(k_steps(*rule.layer)[1], dtype=torch.float32)
        near = _float32_of((_order_key(bounds).unsqueeze(-1) + torch.arange(-64, 65)).flatten())
        r = torch.cat([sweep, near, torch.tensor([0.0, -0.0, 1.0, 3e38, -3e38])])
        assert torch.equal(rule.k_of(r), ban_k(r, **layer)), seed
        assert torch.equal(rule.k_of(r), ref.ban_k(r, **layer)), seed
    # a layer whose K does not depend on R: no bounds
    assert k_steps(0.5, 0.4, 0.4, 8, 3, 0.7, 0.5, True) == (3, ())  # floor(3 + 5 * .7 * .25)


def test_the_plan_routes_with_the_rule_built_once():
    from banpick_cli.runtime.plan import build_plan
    from banpick_cli.profile.format import new_profile
    from banpick_cli.profile.identity import ModelIdentity

    spec = SPECS["qwen3, float32 weights"]
    prof = new_profile(ModelIdentity("t", "T", "qwen3_moe", 2, (0, 1), 10, spec), "sha256:" + "0" * 64)
    prof.put("ban/layer_sensitivity", torch.tensor([0.2, 0.9]))
    prof.put("ban/ratio_min", torch.tensor([0.3, 0.35]))
    prof.put("ban/ratio_max", torch.tensor([0.9, 0.8]))
    plan = build_plan(prof, [spec, spec], "ban", k_min=2, lam=0.8)
    x = logits_for(spec, 64, torch.float32, 1)
    for position, (sens, lo, hi) in enumerate([(0.2, 0.3, 0.9), (0.9, 0.35, 0.8)]):
        want = ref.ban(x, spec, float(torch.tensor(sens)), float(torch.tensor(lo)), float(torch.tensor(hi)), k_min=2, lam=0.8)
        assert same_routing(plan.route(position, x), want)
