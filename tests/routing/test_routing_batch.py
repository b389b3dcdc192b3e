"""Batch-aware step (routing/batch.py): hand-computed batches, and what must hold for any rule's routing."""

import pytest
import torch

from banpick_cli.routing import (
    RouterSpec,
    Routing,
    ban,
    batch_share,
    des,
    distinct_experts,
    fixed_k,
    probs,
    route,
    select_scores,
    weights_for,
)
from banpick_cli.routing.topk import rank_of, to_mask

E = 8
#        e0    e1    e2    e3    e4    e5    e6     e7
T0 = [0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.015, 0.005]  # keeps e0 e1
T1 = [0.20, 0.05, 0.45, 0.15, 0.03, 0.10, 0.015, 0.005]  # keeps e2 e0
T2 = [0.08, 0.12, 0.05, 0.50, 0.20, 0.03, 0.015, 0.005]  # keeps e3 e4; e0 is its 4th choice
SPEC = RouterSpec(E, 4, "softmax", True)


def logits_of(*rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


def experts(routing):
    return [sorted(x for x in row if x < E) for row in routing.indices.tolist()]


def three_tokens():
    logits = logits_of(T0, T1, T2)
    return logits, fixed_k(logits, SPEC, 2)


def test_a_low_slot_moves_onto_an_expert_another_token_keeps():
    logits, plain = three_tokens()
    assert experts(plain) == [[0, 1], [0, 2], [3, 4]]  # 5 distinct experts
    shared = batch_share(logits, SPEC, plain, candidates=4)
    # e1 (t0 alone) goes first: t0's candidates e0..e3, not kept, still used: e2, e3 -> e2 (its 3rd choice).
    # e2 and e3 are anchors (t1's and t2's first choice). e4 (t2 alone): t2's top-4 is e3 e4 e1 e0; e1 is
    # now unused, so e0 (its 4th). e0 anchors t0. Three distinct experts remain.
    assert experts(shared) == [[0, 2], [0, 2], [0, 3]]
    assert int(distinct_experts(shared, E)) == 3 and int(distinct_experts(plain, E)) == 5
    assert shared.k.tolist() == [2, 2, 2]
    torch.testing.assert_close(shared.weights[0], torch.tensor([0.40 / 0.55, 0.15 / 0.55]))
    torch.testing.assert_close(shared.weights[2], torch.tensor([0.50 / 0.58, 0.08 / 0.58]))
    assert torch.equal(shared.indices[1], plain.indices[1]) and torch.equal(shared.weights[1], plain.weights[1])


def test_the_candidate_bound_forbids_a_move():
    logits, plain = three_tokens()
    shared = batch_share(logits, SPEC, plain, candidates=3)
    # t0 still reaches e2 (rank 3); t2's only shared candidate e0 is rank 4, beyond the bound, and
    # e1 (its rank 3) is no longer kept by anyone: e4 stays.
    assert experts(shared) == [[0, 2], [0, 2], [3, 4]]
    assert torch.equal(shared.indices[2], plain.indices[2])
    assert experts(batch_share(logits, SPEC, plain, candidates=2)) == experts(plain)  # top-2 is what they keep


def test_without_an_anchor_the_first_choice_may_move_too():
    logits, plain = three_tokens()
    shared = batch_share(logits, SPEC, plain, candidates=4, anchor=0)
    assert int(distinct_experts(shared, E)) < 3


def test_batch_of_one_is_the_input_bit_for_bit():
    torch.manual_seed(0)
    spec = RouterSpec(32, 8, "softmax", True, weights_in_logits_dtype=True)
    logits = torch.randn(1, 32, dtype=torch.bfloat16) * 2
    base = ban(logits, spec, 0.5, 0.3, 0.9)
    for rule in (base, route(logits, spec), fixed_k(logits, spec, 5)):
        out = batch_share(logits, spec, rule, candidates=32, anchor=0)
        assert torch.equal(out.indices, rule.indices) and torch.equal(out.weights, rule.weights)
        assert out.weights.dtype == rule.weights.dtype
    # Through the loop: two copies of one token keep the same experts, so no expert can be emptied.
    two = logits.expand(2, -1)
    rule = ban(two, spec, 0.5, 0.3, 0.9)
    out = batch_share(two, spec, rule, candidates=32, anchor=0)
    assert torch.equal(out.indices, rule.indices) and torch.equal(out.weights, rule.weights)


@pytest.mark.parametrize("spec", [
    RouterSpec(64, 8, "softmax", True),
    RouterSpec(64, 6, "softmax", False, routed_scaling_factor=2.5),
    RouterSpec(64, 6, "softmax", False, topk_method="group_limited_greedy", n_group=8, topk_group=3),
], ids=["qwen3", "deepseek-v2", "grouped"])
def test_what_must_hold_for_any_rule(spec):
    torch.manual_seed(1)
    logits = torch.randn(16, spec.num_experts) * 1.5
    thresholds = torch.tensor([1.2, 1.2])  # des_bounds gives two ratios for K_base 6 and 8
    rules = [ban(logits, spec, 0.3, 0.3, 0.8), fixed_k(logits, spec, 4), route(logits, spec),
             des(logits, spec, thresholds)]
    ranks = rank_of(select_scores(logits, spec).double().nan_to_num(neginf=-1e9))
    allowed = torch.isfinite(select_scores(logits, spec))
    for rule in rules:
        before = to_mask(rule.indices, spec.num_experts)
        out = batch_share(logits, spec, rule, candidates=2 * spec.top_k)
        after = to_mask(out.indices, spec.num_experts)
        assert out.indices.shape == rule.indices.shape and torch.equal(out.k, rule.k)
        assert torch.equal(after.sum(1), rule.k)  # a swap never adds or drops an expert
        assert bool((out.indices <= spec.num_experts).all())
        assert bool(((out.indices < spec.num_experts) == (out.weights != 0)).all())
        assert not bool((after & ~before.any(0)).any())  # no expert that no token kept
        new = after & ~before
        assert bool((ranks[new] <= 2 * spec.top_k).all()) and bool(allowed[new].all())
        assert int(distinct_experts(out, spec.num_experts)) <= int(distinct_experts(rule, spec.num_experts))
        assert bool((before & ~after).sum() > 0)  # something moved at B = 16
        changed = (after != before).any(1)
        # the model's rule over the new set: renormalised to 1 (Qwen3) or the raw scores times the scale
        torch.testing.assert_close(out.weights[changed], weights_for(logits, spec, out.indices)[changed])
        if spec.renormalize:
            torch.testing.assert_close(out.weights[changed].sum(1), torch.ones(int(changed.sum())))
        # the first choice stays
        first = probs(logits, spec).masked_fill(~allowed, -1).gather(1, rule.indices.clamp(max=spec.num_experts - 1))
        top = rule.indices.gather(1, first.argmax(1, keepdim=True))
        assert bool(after.gather(1, top).all())


def test_tokens_in_another_order_get_the_same_experts():
    torch.manual_seed(2)
    spec = RouterSpec(64, 8, "softmax", True)
    logits = torch.randn(12, 64) * 1.5
    out = batch_share(logits, spec, ban(logits, spec, 0.3, 0.3, 0.8))
    perm = torch.randperm(12)
    again = batch_share(logits[perm], spec, ban(logits[perm], spec, 0.3, 0.3, 0.8))
    assert torch.equal(again.indices, out.indices[perm]) and torch.equal(again.weights, out.weights[perm])


def test_bad_settings_are_refused_in_one_line():
    logits, plain = three_tokens()
    for bad in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="candidates must be an integer in \\[1, 8\\]"):
            batch_share(logits, SPEC, plain, candidates=bad)
    with pytest.raises(ValueError, match="anchor"):
        batch_share(logits, SPEC, plain, anchor=-1)
    with pytest.raises(ValueError, match="indices"):
        batch_share(logits, SPEC, Routing(plain.indices[:2], plain.weights[:2], plain.k[:2]))


def test_visiting_every_expert_as_on_an_accelerator_gives_the_same_routing(monkeypatch):
    import banpick_cli.routing.batch as batch

    torch.manual_seed(3)
    spec = RouterSpec(64, 8, "softmax", True)
    logits = torch.randn(16, 64) * 1.5
    rule = ban(logits, spec, 0.3, 0.3, 0.8)
    on_cpu = batch_share(logits, spec, rule)
    monkeypatch.setattr(batch, "_visits", lambda support: support.shape[0])
    everywhere = batch_share(logits, spec, rule)
    assert torch.equal(on_cpu.indices, everywhere.indices) and torch.equal(on_cpu.weights, everywhere.weights)
    assert not torch.equal(on_cpu.indices, rule.indices)
