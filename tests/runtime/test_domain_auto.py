"""--domain auto: each request is routed by the domain whose usage signature is closest to its prompt's."""

from __future__ import annotations

import pytest
import torch

from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.models.base import RoutingHooks
from banpick_cli.models.loading import load_model
from banpick_cli.runtime import apply
from banpick_cli.runtime.auto import choose_domains
from rt_helpers import ids_for, key_at, make_profile


def test_choose_domains_by_mean_layer_cosine():
    signatures = torch.tensor([
        [[9.0, 1.0, 0.0], [5.0, 5.0, 0.0]],  # domain 0
        [[0.0, 1.0, 9.0], [0.0, 5.0, 5.0]],  # domain 1
    ])
    usage = torch.tensor([[[3.0, 0.0, 0.0], [1.0, 1.0, 0.0]], [[0.0, 0.0, 2.0], [0.0, 0.0, 1.0]]])
    chosen, scores = choose_domains(usage, signatures)
    assert chosen.tolist() == [0, 1]
    # Row 0 vs domain 0: layer cosines 9/sqrt(82) and 1; the score is their mean.
    assert scores[0, 0].item() == pytest.approx((9 / 82**0.5 + 1.0) / 2, rel=1e-6)
    assert scores.shape == (2, 2)


def _usage(loaded, ids):
    m, e = len(loaded.layers), loaded.routing.num_experts
    counts = torch.zeros(m, e, dtype=torch.int64)

    def observe(position, logits, weights, indices):
        counts[position] += torch.bincount(indices.reshape(-1), minlength=e)[:e]

    with torch.inference_mode(), RoutingHooks(loaded.layers, e, observers=[observe]):
        loaded.model(ids)
    return counts


def test_auto_routes_each_request_by_its_own_domain(tiny_models):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    ids = torch.cat([ids_for(loaded, batch=1, length=12, seed=3), ids_for(loaded, batch=1, length=12, seed=4)])
    # Each domain's signature is exactly one request's usage, so the choice is known.
    prof = make_profile(loaded, key=key_at(loaded, 0, [0, 1]), domain="a", counts=_usage(loaded, ids[:1]))
    other = make_profile(loaded, key=key_at(loaded, 1, [6, 7]), domain="b", counts=_usage(loaded, ids[1:]))
    for name, tensor in other.tensors.items():
        if name.startswith("domain/b/"):
            prof.put(name, tensor)
    with torch.inference_mode():
        with apply(loaded, prof, "banpick", domain="auto") as h:
            mixed = loaded.model(ids).logits
        assert h.chosen_domains == ["a", "b"]
        assert h.stats().domain_choices == {"a": 1, "b": 1}
        with apply(loaded, prof, "banpick", domain="a"):
            alone_a = loaded.model(ids[:1]).logits
        with apply(loaded, prof, "banpick", domain="b"):
            alone_b = loaded.model(ids[1:]).logits
    torch.testing.assert_close(mixed[:1], alone_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1:], alone_b, rtol=0, atol=1e-5)
    # The signature pass is the model's own routing and is not counted: only the real pass is.
    assert h.stats().tokens == [ids.numel()] * len(loaded.layers)


def test_auto_keeps_the_prefill_choice_while_decoding(tiny_models):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    ids = ids_for(loaded, batch=1, length=8, seed=3)
    prof = make_profile(loaded, key=key_at(loaded, 0, [0, 1]), domain="a", counts=_usage(loaded, ids))
    with torch.inference_mode(), apply(loaded, prof, "pick", domain="auto", strategy="A") as h:
        loaded.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert h.stats().domain_choices == {"a": 1}  # one prefill chose; decode steps reused it


def test_auto_needs_usage_counts_and_a_key_method(tiny_models):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    prof = make_profile(loaded, key=key_at(loaded, 0, [1]))
    with pytest.raises(ProfileError, match="usage counts"):
        apply(loaded, prof, "pick", domain="auto")
    with pytest.raises(BadSetting, match="domain 'auto' applies to"):
        apply(loaded, prof, "ban", domain="auto")
