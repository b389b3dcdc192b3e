"""Hand-built routing profiles for runtime tests (the stages that write them land separately)."""

from __future__ import annotations

import torch

from banpick_cli.profile.format import new_profile


def ids_for(loaded, batch=2, length=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, loaded.identity.vocab_size, (batch, length), generator=gen)


def make_profile(loaded, *, key=None, domain="math", ban=True, counts=None, settings=None):
    """Returns a profile of `loaded` with key experts (bool [M, E]), Ban tensors, usage counts."""
    m, e = len(loaded.layers), loaded.routing.num_experts
    prof = new_profile(loaded.identity, loaded.fingerprint)
    if key is not None:
        prof.domain(domain).put("key_experts", key)
    if counts is not None:
        prof.domain(domain).put("expert_counts", counts)
        prof.domain(domain).put("token_counts", torch.full((m,), int(counts[0].sum()) // loaded.routing.top_k))
        prof.domain(domain).put("candidates", counts > 0)
    if ban:
        prof.put("ban/layer_sensitivity", torch.linspace(0.0, 1.0, m))
        prof.put("ban/ratio_min", torch.full((m,), 0.3))
        prof.put("ban/ratio_max", torch.full((m,), 0.9))
        prof.put("ban/ratio_hist", torch.tensor([[0, 0, 0, 2, 2, 2, 2, 2, 2, 0]] * m))
        prof.settings["ban"] = {"k_min": 1, "lam": 1.0, "beta": 0.5}
    if settings:
        prof.settings.update(settings)
    return prof


def key_at(loaded, position, experts):
    m, e = len(loaded.layers), loaded.routing.num_experts
    key = torch.zeros(m, e, dtype=torch.bool)
    key[position, list(experts)] = True
    return key
