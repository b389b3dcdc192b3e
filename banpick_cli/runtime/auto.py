"""`--domain auto` (beyond the paper): choose each request's domain from its expert usage at prefill.

A request's signature is how often each expert was selected over its prompt tokens, per layer
[M, E], under the model's own routing. Each domain's signature is its calibration usage
(`domain/<d>/expert_counts`). The closest domain by the mean over layers of the cosine between the
two usage vectors wins, and that domain's plan routes the request. Cosine ignores how many tokens
were counted, so a 20-token prompt compares with a 100k-token calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.profile.format import RoutingProfile
from banpick_cli.routing import RouterSpec

from banpick_cli.runtime.methods import get_method, names
from banpick_cli.runtime.plan import RoutingPlan, build_plan


@dataclass(frozen=True)
class AutoPlan:
    """One plan per candidate domain and the usage signatures that choose among them."""

    method: str
    domains: tuple[str, ...]
    plans: dict[str, RoutingPlan]
    signatures: torch.Tensor  # float32 [D, M, E]: each domain's calibration usage counts

    @property
    def specs(self) -> tuple[RouterSpec, ...]:
        return self.plans[self.domains[0]].specs

    @property
    def width(self) -> int:
        return max(plan.width for plan in self.plans.values())

    def changed_layers(self) -> list[int]:
        """Returns the MoE layers that any domain's plan changes."""
        return sorted({p for plan in self.plans.values() for p in plan.rules})

    def choose(self, usage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (domain index [B], scores [B, D]) for request usage counts [B, M, E]."""
        return choose_domains(usage, self.signatures)

    def describe(self) -> dict:
        first = self.plans[self.domains[0]].describe()
        return {**first, "domain": "auto", "domains": list(self.domains),
                "changed_layers": self.changed_layers(), "width": self.width}


def build_auto(profile: RoutingProfile, specs: list[RouterSpec], method: str, **overrides) -> AutoPlan:
    """Returns an AutoPlan over every domain that has both key experts and usage counts."""
    if not get_method(method).takes_domain:
        raise BadSetting(f"domain 'auto' applies to methods that read key experts "
                         f"({', '.join(names(lambda m: m.takes_domain))}), not '{method}'")
    keyed = sorted({name.split("/")[1] for name in profile.tensors if name.endswith("/key_experts")})
    domains = [d for d in keyed if profile.domain(d).has("expert_counts")]
    if not keyed:
        raise ProfileError("domain auto needs key experts of at least one domain: run `banpick kl-scan --domain <d>` first")
    if not domains:
        raise ProfileError(f"domain auto needs usage counts of the domains with key experts ({', '.join(keyed)}): "
                           "export without dropping them, or run `banpick profile --domain <d>`")
    plans = {d: build_plan(profile, specs, method, d, **overrides) for d in domains}
    signatures = torch.stack([profile.domain(d).expert_counts.float() for d in domains])
    return AutoPlan(method, tuple(domains), plans, signatures)


def choose_domains(usage: torch.Tensor, signatures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (index of the closest domain [B], scores [B, D]): mean over layers of the cosine
    between a request's usage counts [B, M, E] and each domain's [D, M, E]. Ties go to the first."""
    if usage.dim() == 2:
        usage = usage.unsqueeze(0)
    u = torch.nn.functional.normalize(usage.float(), dim=-1)  # [B, M, E]; an unused layer stays 0
    s = torch.nn.functional.normalize(signatures.float().to(u.device), dim=-1)  # [D, M, E]
    scores = torch.einsum("bme,dme->bdm", u, s).mean(-1)  # [B, D]
    return scores.argmax(-1), scores
