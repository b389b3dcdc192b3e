"""Batch-aware routing: move tokens' slots onto experts the rest of the batch already runs.

At decode an MoE layer reads the weights of every distinct expert its batch touches, so a batch of B
tokens costs about its number of distinct experts, not its (token, expert) pairs. After a per-token
rule (Ban, Ban&Pick, Fixed-K, DES, ...) has chosen each token's experts, `batch_share` empties the
experts the fewest tokens use: an expert is dropped from the batch when every token that keeps it can
swap that slot for another expert that (a) some token of the batch still keeps, (b) lies within the
token's own candidates (its router top-`candidates`), and (c) the token does not already keep. A
token never runs more experts than before (each move is a swap, so Avg-TopK does not change), never
an expert no token kept, and its first `anchor` experts never move. The idea is Opportunistic Expert
Activation's piggybacking (arXiv 2511.02237) and SERE's re-routing of secondary slots onto experts
already active (arXiv 2602.07616), laid over a per-token keep-set: docs/routing.md.
"""

from __future__ import annotations

import torch

from .spec import RouterSpec, Routing
from .topk import check_indices, choice_scores, from_mask, preference, probs, rank_of, to_mask, top_in

ANCHOR = 1  # each token's most preferred kept expert never moves: the router's first choice


def default_candidates(spec: RouterSpec) -> int:
    """Returns the candidate bound used when none is given: the router's top-2k (Pick C's range), capped."""
    return min(2 * spec.top_k, spec.available())


def batch_share(
    logits: torch.Tensor,
    spec: RouterSpec,
    routing: Routing,
    *,
    candidates: int | None = None,
    anchor: int = ANCHOR,
) -> Routing:
    """Returns `routing` with the batch's least shared experts emptied where the tokens can move.

    `routing` holds each token's keep-set (from any rule; index E is "no expert") for the tokens of
    one forward batch, `logits` [T, E] their router logits. Experts are visited once, fewest keeping
    tokens first (ties: lower index). An expert is emptied when each token keeping it (none of them
    anchoring it) has a target: an expert still kept by some token, not kept by this token, ranked
    within its router top-`candidates` (1-based rank under the router's choice scores; experts
    outside its allowed groups never qualify). Each such token takes its most preferred target.
    Tokens whose set changed get weights by the model's rule over the new set; every other token's
    row is returned exactly as given, so a batch of one token is `routing` bit for bit. Width and
    `Routing.k` do not change.
    """
    p = probs(logits, spec)
    check_indices(routing.indices, p)
    n = default_candidates(spec) if candidates is None else candidates
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= spec.available():
        raise ValueError(f"candidates must be an integer in [1, {spec.available()}] for this router, got {n!r}")
    if not isinstance(anchor, int) or isinstance(anchor, bool) or anchor < 0:
        raise ValueError(f"anchor must be an integer >= 0, got {anchor!r}")
    tokens, e = p.shape
    if tokens < 2:  # nothing to share with
        return routing
    choice = choice_scores(p, spec)
    pref = preference(choice, p)  # [T, E] float64, the router's order of preference
    cand = (rank_of(pref) <= n) & torch.isfinite(choice)  # [T, E]
    kept0 = to_mask(routing.indices, e)  # [T, E]
    fixed = top_in(kept0, pref, torch.full((tokens,), anchor, dtype=torch.long, device=p.device))
    support = kept0.sum(0)  # [E]: tokens keeping each expert
    # Visit order: fewest keeping tokens first, ties to the lower index; unused experts last.
    key = torch.where(support > 0, support, tokens + 1) * e + torch.arange(e, device=p.device)
    order = torch.argsort(key)
    steps = _visits(support)
    kept = kept0.clone()
    minus_inf = torch.tensor(float("-inf"), dtype=pref.dtype, device=p.device)
    for j in range(steps):
        x = order[j : j + 1]  # [1]
        holders = kept.index_select(1, x).squeeze(1)  # [T]
        targets = cand & ~kept & kept.any(0)  # [T, E]: kept by someone, not by this token
        free = ~fixed.index_select(1, x).squeeze(1) & targets.any(1)
        empty = ~(holders & ~free).any()  # 0-dim: every holder can move
        move = holders & empty  # [T]
        best = torch.where(targets, pref, minus_inf).argmax(1, keepdim=True)  # [T, 1]; ties: lower index
        kept.scatter_(1, x.expand(tokens, 1), (holders & ~move).unsqueeze(1))
        kept.scatter_(1, best, kept.gather(1, best) | move.unsqueeze(1))
    changed = (kept != kept0).any(1, keepdim=True)  # [T, 1]
    moved = from_mask(kept, pref, p, spec, routing.width, logits.dtype)
    return Routing(
        indices=torch.where(changed, moved.indices, routing.indices),
        weights=torch.where(changed, moved.weights.to(routing.weights.dtype), routing.weights),
        k=routing.k,
    )


def _visits(support: torch.Tensor) -> int:
    """Returns how many experts to visit: on a CPU the used ones (reading a count costs nothing there);
    elsewhere every expert rather than sync the host (visits past the used ones change nothing)."""
    return int((support > 0).sum()) if support.device.type == "cpu" else support.shape[0]


def distinct_experts(routing: Routing, num_experts: int) -> torch.Tensor:
    """Returns the number of distinct experts (0-dim long) the routing's tokens run together."""
    return to_mask(routing.indices, num_experts).any(0).sum()
