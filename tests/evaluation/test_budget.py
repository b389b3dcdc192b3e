"""Matched budgets: each method's knob solved on calibration logits lands on the target Avg-TopK, or is refused."""

import pytest
import torch

from banpick_cli.errors import BadSetting
from banpick_cli.models.loading import load_model
from banpick_cli.routing import ban, des_thresholds, dynamic_k, probs
from banpick_cli.runtime import apply, build_plan
from banpick_cli.evaluation.budget import CalibrationLogits, collect_router_logits, plan_avg_topk, solve_budget
from rt_helpers import ids_for, make_profile


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return load_model(str(tiny_models["qwen3_moe"]), device="cpu")  # 2 MoE layers, 8 experts, top-4


def sample_of(loaded, tokens=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e = loaded.routing.num_experts
    return CalibrationLogits(tuple(torch.randn(tokens, e, generator=gen) * 1.5 for _ in loaded.layers))


def test_fixed_k_integer_fraction_and_refusal(qwen):
    specs, sample = qwen.router_specs(), sample_of(qwen)
    b = solve_budget("fixed-k", 3, specs, None)
    assert b.overrides == {"k": 3} and b.expected == 3.0 and b.label == "fixed-k(k=3)"
    half = solve_budget("fixed-k", 2.5, specs, sample)
    assert sorted(half.overrides["k"]) == [2, 3] and half.expected == 2.5
    plan = build_plan(None, specs, "fixed-k", **half.overrides)
    assert plan_avg_topk(plan, sample) == 2.5 and [r.width for r in plan.rules.values()] == half.overrides["k"]
    with pytest.raises(BadSetting, match=r"fixed-k cannot reach Avg-TopK 2.25 within 0.2 .* nearest is 2.00"):
        solve_budget("fixed-k", 2.25, specs, sample)  # two layers: steps of 0.5
    with pytest.raises(BadSetting, match=r"in \[1, K_base=4\]"):
        solve_budget("fixed-k", 5, specs, sample)


def test_ban_lambda_lands_on_the_target_as_the_core_routes_it(qwen):
    specs, sample = qwen.router_specs(), sample_of(qwen)
    prof = make_profile(qwen)  # k_min 1, beta 0.5, L' 0 and 1, R range 0.3..0.9
    b = solve_budget("ban", 2.5, specs, sample, prof)
    lam = b.overrides["lam"]
    assert abs(b.expected - 2.5) <= 0.2 and b.label == f"ban(λ={lam:g})"
    core = [float(ban(x, s, float(sens), 0.3, 0.9, k_min=1, lam=lam, beta=0.5).k.double().mean())
            for x, s, sens in zip(sample.logits, specs, (0.0, 1.0))]
    assert b.expected == pytest.approx(sum(core) / 2)
    again = solve_budget("banpick", 2.5, specs, sample, make_profile(qwen, key=torch.zeros(2, 8, dtype=torch.bool)),
                         domain="math")
    assert again.overrides == b.overrides  # no key experts: Ban&Pick routes as Ban
    with pytest.raises(BadSetting, match=r"ban cannot reach Avg-TopK 1 .* nearest is 2.00 \(lam=0\)"):
        solve_budget("ban", 1.0, specs, sample, prof, overrides={"k_min": 2})  # lam 0 runs K_min everywhere


def test_dynamic_and_des_thresholds_land_on_the_target(qwen):
    specs, sample = qwen.router_specs(), sample_of(qwen)
    d = solve_budget("dynamic", 2.0, specs, sample)
    tau = d.overrides["tau"]
    mean = sum(float(dynamic_k(x, s, tau).double().mean()) for x, s in zip(sample.logits, specs)) / 2
    assert abs(d.expected - 2.0) <= 0.2 and d.expected == pytest.approx(mean)
    des = solve_budget("des", 2.5, specs, sample)  # K_base 4: DES runs 2..3
    assert abs(des.expected - 2.5) <= 0.2 and des.overrides["thresholds"].shape == (2, 1)
    odp = solve_budget("odp", 2.5, specs, sample)
    assert torch.equal(odp.overrides["thresholds"], des.overrides["thresholds"])
    with pytest.raises(BadSetting, match=r"des cannot reach Avg-TopK 3.5 .* nearest is 3.00"):
        solve_budget("des", 3.5, specs, sample)
    with pytest.raises(BadSetting, match="no expert budget"):
        solve_budget("pick", 3, specs, sample)


def test_des_at_the_median_quantile_is_des_own_calibration(qwen):
    from banpick_cli.evaluation import budget as budget_mod

    specs, sample = qwen.router_specs(), sample_of(qwen, tokens=401)
    medians = torch.stack([des_thresholds(probs(x, s), 2, 3) for x, s in zip(sample.logits, specs)])
    ratios = [budget_mod.des_ratios(probs(x, s), 2, 3).double() for x, s in zip(sample.logits, specs)]
    quantile = torch.stack([torch.quantile(r, 0.5, dim=0) for r in ratios]).float()
    torch.testing.assert_close(quantile, medians)


def test_collected_logits_are_the_routers_on_real_tokens_and_predict_the_runtime(qwen):
    texts = ["12 + 35 = 47", "the quick brown fox jumps over the lazy dog", "def add(x, y): return x + y"]
    sample = collect_router_logits(qwen, texts, batch_size=2)
    real = sum(len(qwen.tokenizer(t).input_ids) for t in texts)
    assert sample.tokens == real and len(sample.logits) == len(qwen.layers)
    b = solve_budget("dynamic", 2.0, qwen.router_specs(), sample)
    enc = qwen.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode(), apply(qwen, None, "dynamic", **b.overrides) as h:
        qwen.model(**enc)
    assert h.stats().avg_experts_overall == pytest.approx(b.expected)  # same tokens: the runtime agrees exactly
    capped = collect_router_logits(qwen, texts, batch_size=2, max_tokens=5)
    assert capped.tokens == 5


def test_fixed_k_through_apply_runs_k_and_leaves_k_base_layers_alone(qwen):
    ids = ids_for(qwen)
    with torch.inference_mode():
        with apply(qwen, None, "fixed-k", k=[2, 4]) as h:
            assert set(h.plan.rules) == {0}  # k == K_base: the model's own routing, no override
            qwen.model(ids)
        with apply(qwen, None, "fixed-k", k=2, count_changes=True) as h2:
            qwen.model(ids)
    assert h.stats().avg_experts == [2.0, 4.0]
    s = h2.stats()
    assert s.avg_experts == [2.0, 2.0] and s.removed == [ids.numel() * 2] * 2 and s.added == [0, 0]
    with pytest.raises(BadSetting, match="needs k"):
        apply(qwen, None, "fixed-k")
    with pytest.raises(BadSetting, match=r"k must be an integer in \[1, K_base=4\]"):
        apply(qwen, None, "fixed-k", k=6)
    with pytest.raises(BadSetting, match="k has 3 values"):
        apply(qwen, None, "fixed-k", k=[2, 2, 2])


def test_cpu_routing_drops_the_slots_no_token_fills(qwen):
    ids = ids_for(qwen)
    widths = []
    with torch.inference_mode(), apply(qwen, None, "dynamic", tau=0.3) as h:  # width: every expert (8)
        h.hooks.observers.append(lambda position, logits, weights, indices: widths.append(
            (indices.shape[1], int((indices < 8).sum(-1).max()))))
        qwen.model(ids)
    assert widths and all(w == k_max for w, k_max in widths) and max(w for w, _ in widths) < 8


def test_decode_steps_of_finished_rows_are_not_counted(qwen):
    eos = qwen.tokenizer.eos_token_id
    ids = ids_for(qwen, batch=2, length=5).clamp(min=eos + 1)
    with torch.inference_mode(), apply(qwen, None, "fixed-k", k=2) as h:
        past = qwen.model(ids, use_cache=True).past_key_values
        qwen.model(torch.tensor([[eos], [eos + 3]]), past_key_values=past, use_cache=True)  # row 0 has ended
    assert h.stats().tokens == [2 * 5 + 1] * 2 and h.stats().avg_experts == [2.0, 2.0]
    with torch.inference_mode(), apply(qwen, None, "fixed-k", k=2) as h2:
        qwen.model(torch.tensor([[eos, eos + 1]]))  # a prefill: EOS in a prompt is a token like any other
    assert h2.stats().tokens == [2, 2]


def test_balanced_gives_every_part_the_same_tokens(qwen):
    from banpick_cli.evaluation.budget import balanced

    big, small = sample_of(qwen, tokens=300, seed=1), sample_of(qwen, tokens=40, seed=2)
    both = balanced([big, small])
    assert both.tokens == 80 and torch.equal(both.logits[0][40:], small.logits[0])
    rows = {tuple(r.tolist()) for r in big.logits[0]}
    assert all(tuple(r.tolist()) in rows for r in both.logits[0][:40])  # a subsample of the big part
    assert torch.equal(balanced([big, small]).logits[1], both.logits[1])  # seeded
    with pytest.raises(BadSetting, match="calibration tokens"):
        balanced([CalibrationLogits(tuple(torch.zeros(0, 8) for _ in range(2)))])
