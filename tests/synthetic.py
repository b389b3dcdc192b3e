"""A synthetic routing profile with every stage's tensors, shaped like a real model's (no model needed)."""

from __future__ import annotations

import torch

from banpick_cli.profile.identity import ModelIdentity
from banpick_cli.routing import RouterSpec
from banpick_cli.profile.format import RoutingProfile, new_profile
from banpick_cli.profile.stats import CandidateRule, candidate_mask


def identity(layers: int = 12, experts: int = 32, k: int = 8, dense_first: int = 0) -> ModelIdentity:
    return ModelIdentity(
        name_or_path="synthetic/Qwen3-like", architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe",
        num_layers=layers + dense_first, moe_layers=tuple(range(dense_first, layers + dense_first)), vocab_size=1000,
        router=RouterSpec(num_experts=experts, top_k=k, scoring="softmax", renormalize=True),
    )


def synthetic_profile(
    *, layers: int = 12, experts: int = 32, k: int = 8, domains: tuple[str, ...] = ("math", "code", "general"),
    stages: tuple[str, ...] = ("kl", "gain", "ban"), seed: int = 0, dense_first: int = 0,
) -> RoutingProfile:
    """Returns a profile whose domains each favour a few experts per layer, with KL, gains and Ban tensors."""
    g = torch.Generator().manual_seed(seed)
    prof = new_profile(identity(layers, experts, k, dense_first), "sha256:" + "ab" * 32)
    tokens = 20_000
    shared = torch.randint(0, experts, (layers,), generator=g)  # one expert every domain loves, per layer
    rule = CandidateRule(2.0, 0)
    for d_i, d in enumerate(domains):
        logits = torch.randn(layers, experts, generator=g) * 0.4
        fav = torch.randint(0, experts, (layers, 3), generator=g)
        logits.scatter_add_(1, fav, torch.full((layers, 3), 1.6))
        logits[torch.arange(layers), shared] += 1.2
        # Selection shares: K per token in all, none above 1; counts are their expectation.
        share = (torch.softmax(logits, -1) * k).clamp(max=0.9)
        share = share * (k / share.sum(-1, keepdim=True))
        counts = (share.clamp(max=0.95) * tokens).round().long()
        token_counts = torch.full((layers,), tokens, dtype=torch.int64)
        prof.domain(d).put("expert_counts", counts)
        prof.domain(d).put("token_counts", token_counts)
        cands = candidate_mask(counts, token_counts, rule)
        prof.domain(d).put("candidates", cands)
        prof.settings[f"domain/{d}"] = {"candidates": rule.to_dict()}
        prof.provenance[f"profile/{d}"] = {"stage": "profile", "settings": {"domain": d, "samples": 256}, "dataset": f"hub/{d}",
                                           "split": "train", "samples": 256, "tokens": tokens, "seq_len": 512, "seed": 0,
                                           "wall_s": 12.5, "device": "cuda:0", "dtype": "bfloat16",
                                           "command": f"banpick profile --domain {d} --out p.safetensors",
                                           "finished_utc": "2026-01-01T00:00:00Z"}
        if "kl" in stages:
            kl = torch.full((layers, experts), float("nan"))
            kl[cands] = torch.rand(int(cands.sum()), generator=g) ** 4 * 0.05
            scanned = cands.nonzero()
            top = kl[cands].argsort(descending=True)[:3]
            keys = torch.zeros(layers, experts, dtype=torch.bool)
            for t in top.tolist():
                p, e = scanned[t].tolist()
                kl[p, e] += 0.1
                keys[p, e] = True
            prof.domain(d).put("kl", kl)
            prof.domain(d).put("key_experts", keys)
        if "gain" in stages:
            gain = torch.full((layers, experts), float("nan"))
            probed = prof.domain(d).kl if "kl" in stages else torch.zeros(layers, experts)
            order = torch.nan_to_num(probed, nan=-1).flatten().argsort(descending=True)[:10]
            for idx in order.tolist():
                p, e = divmod(idx, experts)
                gain[p, e] = float(torch.randint(-1, 6, (1,), generator=g)) / 24
            prof.domain(d).put("accuracy_gain", gain)
    if "ban" in stages:
        w = torch.rand(layers, generator=g) * 0.02
        w[0] += 0.08
        w[-1] += 0.05
        prof.put("ban/layer_kl", w)
        prof.put("ban/layer_sensitivity", (w - w.min()) / (w.max() - w.min()))
        bins = 50
        centre = 0.45 + 0.2 * torch.rand(layers, generator=g)
        x = (torch.arange(bins) + 0.5) / bins
        hist = (torch.exp(-((x[None] - centre[:, None]) ** 2) / 0.01) * 1000).long()
        prof.put("ban/ratio_hist", hist)
        nz = hist > 0
        lo = torch.stack([x[r].min() for r in nz]) - 0.5 / bins
        hi = torch.stack([x[r].max() for r in nz]) + 0.5 / bins
        prof.put("ban/ratio_min", lo.float())
        prof.put("ban/ratio_max", hi.float())
        prof.settings["ban"] = {"k_base": k, "k_min": 3, "lambda": 0.7, "beta": 0.5, "ratio_k_num": 3, "ratio_scope": "layer"}
        prof.provenance["layer-sensitivity"] = {"stage": "layer-sensitivity", "settings": {"k_min": 3}, "dataset": "hub/mathqa",
                                                "samples": 128, "tokens": 60000, "wall_s": 80.0, "device": "cuda:0",
                                                "dtype": "bfloat16", "command": "banpick layer-sensitivity", "finished_utc": "2026-01-01T00:00:00Z"}
    return prof
