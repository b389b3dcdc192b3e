"""The HF runtime: apply() installs the plan on every family, counts what it did, refuses wrong profiles."""

from __future__ import annotations

import pytest
import torch

from banpick_cli.errors import BadSetting, FingerprintMismatch, ProfileError
from banpick_cli.models.base import RoutingHooks
from banpick_cli.models.loading import load_model
from banpick_cli.profile.format import new_profile, write_profile
from banpick_cli.routing import ban_k, pick, route, token_ratio
from banpick_cli.runtime import apply
from rt_helpers import ids_for, key_at, make_profile
from tiny import FAMILIES, build_model


@pytest.fixture(scope="module")
def models(tiny_models):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(str(tiny_models[family]), device="cpu")
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_and_empty_rules_reproduce_the_model_exactly(models, family):
    loaded = models(family)
    ids = ids_for(loaded)
    empty = new_profile(loaded.identity, loaded.fingerprint)
    no_keys = make_profile(loaded, key=torch.zeros(len(loaded.layers), loaded.routing.num_experts, dtype=torch.bool))
    with torch.inference_mode():
        reference = loaded.model(ids).logits
        with apply(loaded, empty) as h:
            same = loaded.model(ids).logits
        with apply(loaded, no_keys, "pick", domain="math") as h_pick:
            assert h_pick.plan.rules == {}  # no layer has key experts: nothing is overridden
            same_pick = loaded.model(ids).logits
        after = loaded.model(ids).logits
    assert torch.equal(same, reference) and torch.equal(same_pick, reference) and torch.equal(after, reference)
    stats = h.stats()
    assert stats.avg_experts == [float(loaded.routing.top_k)] * len(loaded.layers)
    assert stats.tokens == [ids.numel()] * len(loaded.layers)
    assert stats.added == stats.removed == stats.key_added == [0] * len(loaded.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_ban_runs_the_core_k_per_token_and_stats_count_it(models, family):
    loaded = models(family)
    prof = make_profile(loaded)
    specs = loaded.router_specs()
    ban_settings = prof.settings["ban"]
    seen = []

    def check(position, logits, weights, indices):
        k = (indices < loaded.routing.num_experts).sum(-1)
        ratio = token_ratio(logits, specs[position], k_num=ban_settings["k_min"])
        expected = ban_k(ratio, float(prof.ban.layer_sensitivity[position]), 0.3, 0.9, specs[position].top_k,
                         k_min=1, lam=1.0, beta=0.5)
        assert torch.equal(k, expected)
        seen.append((position, int(k.sum())))

    ids = ids_for(loaded)
    with torch.inference_mode(), apply(loaded, prof, "ban", count_changes=True) as h:
        h.hooks.observers.append(check)
        loaded.model(ids)
    stats = h.stats()
    assert sorted({p for p, _ in seen}) == list(range(len(loaded.layers)))
    for position, total in seen:
        assert stats.avg_experts[position] == pytest.approx(total / ids.numel())
        # Ban keeps a prefix of the router's top-k: every change is a removal.
        assert stats.removed[position] == ids.numel() * loaded.routing.top_k - total
    assert stats.added == [0] * len(loaded.layers)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "mixtral"])
def test_pick_acts_only_where_key_experts_are_and_counts_insertions(models, family):
    loaded = models(family)
    e, k = loaded.routing.num_experts, loaded.routing.top_k
    key = key_at(loaded, 0, [e - 1, e - 2])
    prof = make_profile(loaded, key=key, ban=False)
    ids = ids_for(loaded)
    first = []
    with torch.inference_mode():
        with RoutingHooks(loaded.layers, e, observers=[lambda p, lg, w, i: first.append(lg) if p == 0 else None]):
            loaded.model(ids)
        with apply(loaded, prof, "pick", domain="math", strategy="A", count_changes=True) as h:
            loaded.model(ids)
    assert set(h.plan.rules) == {0}
    # Layer 0 sees the unmodified model's logits, so the core's answer is known exactly.
    expected = pick(first[0], loaded.router_specs()[0], key[0], "A")
    missing = int((expected.k - k).sum())
    stats = h.stats()
    assert stats.key_added[0] == stats.added[0] == missing > 0
    assert stats.avg_experts[0] == pytest.approx(k + missing / ids.numel())
    assert stats.key_added[1:] == [0] * (len(loaded.layers) - 1) and stats.avg_experts[1:] == [float(k)] * (len(loaded.layers) - 1)
    assert stats.engaged == [True] + [False] * (len(loaded.layers) - 1)


def test_banpick_changes_output_and_context_restores_the_model(models):
    loaded = models("qwen3_moe")
    e = loaded.routing.num_experts
    prof = make_profile(loaded, key=key_at(loaded, 1, [0, 5]))
    ids = ids_for(loaded)
    flags = [layer.block.experts._is_expert_parallel for layer in loaded.layers]
    with torch.inference_mode():
        reference = loaded.model(ids).logits
        handle = apply(loaded, prof, "banpick", domain="math", count_changes=True)
        changed = loaded.model(ids).logits
        handle.remove()
        after = loaded.model(ids).logits
    assert not torch.allclose(changed, reference)
    assert torch.equal(after, reference)
    assert [layer.block.experts._is_expert_parallel for layer in loaded.layers] == flags
    stats = handle.stats()
    assert stats.removed[0] > 0 and stats.key_added[1] > 0
    assert all(1.0 <= a <= loaded.routing.top_k + 2 for a in stats.avg_experts)
    assert e == 8


def test_padding_is_not_counted(models):
    loaded = models("olmoe")
    ids = ids_for(loaded, batch=2, length=8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    with torch.inference_mode(), apply(loaded, make_profile(loaded), "ban") as h:
        loaded.model(ids, attention_mask=mask)
    assert h.stats().tokens == [int(mask.sum())] * len(loaded.layers)


def test_generate_under_banpick_runs_and_counts_decode_tokens(models):
    loaded = models("qwen3_moe")
    prof = make_profile(loaded, key=key_at(loaded, 0, [1]))
    ids = ids_for(loaded, batch=1, length=6)
    with torch.inference_mode(), apply(loaded, prof, "banpick", domain="math") as h:
        out = loaded.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 10
    assert h.stats().tokens[0] == 6 + 3  # prefill, then one token per decode step but the last


def test_profile_of_another_model_is_refused(models, tiny_models, tmp_path):
    loaded = models("qwen3_moe")
    other = load_model(str(build_model("qwen3_moe", tmp_path / "other", seed=5)), device="cpu")
    prof = make_profile(other, key=key_at(other, 0, [1]))
    with pytest.raises(FingerprintMismatch, match="another model"):
        apply(loaded, prof, "pick", domain="math")
    path = write_profile(prof, tmp_path / "other.safetensors")
    with pytest.raises(FingerprintMismatch):
        apply(loaded, path, "pick", domain="math")
    assert all(not layer.router._forward_hooks for layer in loaded.layers)  # nothing left installed


def test_a_profile_path_and_a_plain_transformers_model_work(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["mixtral"])).eval()
    loaded = load_model(str(tiny_models["mixtral"]), device="cpu")
    path = write_profile(make_profile(loaded), tmp_path / "p.safetensors")
    ids = ids_for(loaded)
    with torch.inference_mode():
        reference = model(ids).logits
        with apply(model, path, "ban") as h:
            banned = model(ids).logits
    assert not torch.allclose(banned, reference)
    assert h.stats().avg_experts_overall < loaded.routing.top_k


def test_missing_stages_and_bad_settings_are_one_line_errors(models):
    loaded = models("qwen3_moe")
    bare = new_profile(loaded.identity, loaded.fingerprint)
    with pytest.raises(ProfileError, match=r"run `banpick layer-sensitivity` first"):
        apply(loaded, bare, "ban")
    with pytest.raises(ProfileError, match=r"no domain .math. \(it holds none\): run `banpick profile --domain math` first"):
        apply(loaded, bare, "pick", domain="math")
    with pytest.raises(BadSetting, match="needs a domain"):
        apply(loaded, bare, "banpick")
    prof = make_profile(loaded, key=key_at(loaded, 0, [1]))
    with pytest.raises(BadSetting, match="no hyperparameter 'lamda'.*accepts: .*lam"):
        apply(loaded, prof, "ban", lamda=0.5)
    with pytest.raises(BadSetting, match="lam"):
        apply(loaded, prof, "ban", lam=-1.0)
    with pytest.raises(BadSetting, match="strategy"):
        apply(loaded, prof, "pick", domain="math", strategy="Z")
    with pytest.raises(BadSetting, match="unknown method 'prune'.*banpick"):
        apply(loaded, prof, "prune")
    with pytest.raises(BadSetting, match="needs tau"):
        apply(loaded, prof, "dynamic")
    assert all(not layer.router._forward_hooks for layer in loaded.layers)


def test_baselines_through_apply(models):
    loaded = models("qwen3_moe")
    prof = make_profile(loaded)
    ids = ids_for(loaded)
    e, m = loaded.routing.num_experts, len(loaded.layers)
    with torch.inference_mode():
        with apply(loaded, prof, "dynamic", tau=0.3, cap=4) as dyn:
            loaded.model(ids)
        with apply(loaded, prof, "des", thresholds=torch.tensor([1.0])) as des:  # k 2..3; ratio > 1 always
            loaded.model(ids)
        cognitive = torch.zeros(m, e, dtype=torch.bool)
        cognitive[0, 3] = True
        with apply(loaded, prof, "rice", cognitive_experts=cognitive, factor=2.0) as ric:
            loaded.model(ids)
        with apply(loaded, prof, "odp", thresholds=torch.tensor([1.0]),
                   key_tokens=lambda n: torch.ones(n, dtype=torch.bool)) as o:
            loaded.model(ids)
    assert all(1.0 <= a <= 4.0 for a in dyn.stats().avg_experts)
    assert des.stats().avg_experts == [2.0] * m  # every ratio exceeds its median 1.0: top-k_lo
    assert o.stats().avg_experts == [3.0] * m  # ODP keeps key tokens at k_hi
    assert set(ric.plan.rules) == {0} and ric.stats().avg_experts == [4.0] * m


def test_layer_sensitivity_settings_are_read_as_that_stage_writes_them(models):
    """settings["ban"] as `banpick layer-sensitivity` records it: `lambda`, pooled range in *_global."""
    loaded = models("qwen3_moe")
    prof = make_profile(loaded)
    prof.settings["ban"] = {"k_base": 4, "k_min": 2, "lambda": 0.0, "beta": 0.5, "ratio_k_num": 2,
                            "ratio_scope": "pooled", "ratio_min_global": 0.2, "ratio_max_global": 0.8}
    with apply(loaded, prof, "ban") as h:
        pass
    assert h.plan.params["lam"] == 0.0 and h.plan.params["ratio_scope"] == "pooled"
    assert h.plan.ban_params["per_layer"][0][1:] == (pytest.approx(0.2), pytest.approx(0.8))
    with torch.inference_mode(), apply(loaded, prof, "ban") as h:  # lam 0: every token at K_min
        loaded.model(ids_for(loaded))
    assert h.stats().avg_experts == [2.0] * len(loaded.layers)


def test_baselines_need_no_profile(models):
    loaded = models("olmoe")
    with torch.inference_mode(), apply(loaded, None, "dynamic", tau=0.5, cap=4) as h:
        loaded.model(ids_for(loaded))
    assert all(1.0 <= a <= 4.0 for a in h.stats().avg_experts)
    with pytest.raises(ProfileError, match="needs a routing profile"):
        apply(loaded, None, "ban")
