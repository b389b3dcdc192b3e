"""Every family: the adapter finds the MoE layers, hooks change nothing unless asked, sentinels cost nothing."""

from __future__ import annotations

import pytest
import torch

from banpick_cli.errors import ModelError, UnsupportedArchitecture
from banpick_cli.models import RoutingHooks, supported_model_types
from banpick_cli.models.loading import load_config, load_model
from tiny import FAMILIES, build_model

# (MoE decoder-layer indices, experts, K_base, renormalised, scoring) of the tiny configs in tests/tiny.py
EXPECTED = {
    "qwen3_moe": ((0, 2), 8, 4, True, "softmax"),
    "qwen2_moe": ((0, 1, 2), 8, 4, False, "softmax"),
    "olmoe": ((0, 1, 2), 8, 4, False, "softmax"),
    "mixtral": ((0, 1, 2), 6, 2, True, "softmax"),
    "deepseek_v2": ((1, 2), 8, 3, False, "softmax"),
    "deepseek_v3": ((1, 2), 8, 3, True, "sigmoid"),
}


def _ids(loaded, n=2, length=12):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, loaded.identity.vocab_size, (n, length), generator=gen)


def test_registry_covers_six_families():
    assert set(FAMILIES) <= set(supported_model_types())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_identity(tiny_models, family):
    loaded = load_model(str(tiny_models[family]), device="cpu")
    layers, experts, k, renorm, scoring = EXPECTED[family]
    ident = loaded.identity
    assert (ident.moe_layers, ident.num_experts, ident.k_base, ident.router.renormalize, ident.router.scoring) == (layers, experts, k, renorm, scoring)
    assert ident.num_layers == 3 and ident.model_type == family
    assert [layer.position for layer in loaded.layers] == list(range(len(layers)))


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_without_change_reproduce_logits_exactly(tiny_models, family):
    loaded = load_model(str(tiny_models[family]), device="cpu")
    ids = _ids(loaded)
    with torch.inference_mode():
        reference = loaded.model(ids).logits
        seen = []
        with RoutingHooks(loaded.layers, loaded.routing.num_experts, observers=[lambda p, lg, w, i: seen.append(p)]):
            hooked = loaded.model(ids).logits
        after = loaded.model(ids).logits
    assert torch.equal(reference, hooked) and torch.equal(reference, after)
    assert sorted(set(seen)) == list(range(len(loaded.layers)))


@pytest.mark.parametrize("family", FAMILIES)
def test_sentinel_slot_costs_nothing_and_changes_nothing(tiny_models, family):
    """An extra slot holding index == num_experts with weight 0 leaves the logits unchanged."""
    loaded = load_model(str(tiny_models[family]), device="cpu")
    E = loaded.routing.num_experts

    def pad(position, logits, weights, indices):
        sentinel = torch.full_like(indices[:, :1], E)
        return torch.cat([weights, torch.zeros_like(weights[:, :1])], 1), torch.cat([indices, sentinel], 1)

    ids = _ids(loaded)
    with torch.inference_mode():
        reference = loaded.model(ids).logits
        with RoutingHooks(loaded.layers, E, overrides={p.position: pad for p in loaded.layers}):
            padded = loaded.model(ids).logits
    torch.testing.assert_close(padded, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_override_changes_routing(tiny_models, family):
    loaded = load_model(str(tiny_models[family]), device="cpu")

    def first_only(position, logits, weights, indices):
        return weights[:, :1], indices[:, :1]

    ids = _ids(loaded)
    with torch.inference_mode():
        reference = loaded.model(ids).logits
        with RoutingHooks(loaded.layers, loaded.routing.num_experts, overrides={0: first_only}):
            changed = loaded.model(ids).logits
    assert not torch.allclose(changed, reference)


def test_fingerprint_same_across_dtypes_and_differs_across_checkpoints(tiny_models, tmp_path):
    path = str(tiny_models["qwen3_moe"])
    fp32 = load_model(path, device="cpu", dtype="float32").fingerprint
    bf16 = load_model(path, device="cpu", dtype="bfloat16").fingerprint
    other = load_model(str(build_model("qwen3_moe", tmp_path / "other", seed=7)), device="cpu").fingerprint
    assert fp32 == bf16 and fp32.startswith("sha256:")
    assert other != fp32


def test_dense_model_is_refused(tiny_models):
    with pytest.raises(ModelError, match="dense model"):
        load_model(str(tiny_models["llama"]), device="cpu")


def test_unknown_moe_architecture_lists_supported():
    from banpick_cli.models import adapter_for

    class Config:
        model_type = "jamba"
        num_experts = 16

    with pytest.raises(UnsupportedArchitecture, match="supported: .*qwen3_moe"):
        adapter_for(Config())


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        load_config(str(tmp_path / "nope"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_router_spec_reproduces_the_router_in_the_model(tiny_models, family, dtype):
    """The routing core, fed the logits the hooks see, returns exactly what the model's router chose."""
    from banpick_cli.routing import route

    loaded = load_model(str(tiny_models[family]), device="cpu", dtype=dtype)
    specs = loaded.router_specs()
    checked = []

    def compare(position, logits, weights, indices):
        mine = route(logits, specs[position])
        order_hf, order_mine = indices.argsort(-1), mine.indices.argsort(-1)
        assert torch.equal(indices.gather(-1, order_hf), mine.indices.gather(-1, order_mine))
        assert torch.equal(weights.gather(-1, order_hf), mine.weights.gather(-1, order_mine))
        assert weights.dtype == mine.weights.dtype
        checked.append(position)

    with torch.inference_mode(), RoutingHooks(loaded.layers, loaded.routing.num_experts, observers=[compare]):
        loaded.model(_ids(loaded))
    assert sorted(checked) == list(range(len(loaded.layers)))
