"""The HF transformers runtime: apply a routing profile to a loaded model, and count what it did.

    with banpick_cli.runtime.apply(model, "math.safetensors", method="banpick", domain="math") as h:
        model.generate(...)
    h.stats().avg_experts        # experts actually run per token, per MoE layer
    h.stats().unique_experts_per_batch   # distinct experts per MoE layer per forward batch

Routing goes through `RoutingHooks` (a forward hook on each router) and the routing core; only the
layers the plan changes get an override. A "no expert" slot is index == num_experts, which the
experts module skips (eager loop, and grouped_mm with the expert-parallel flag RoutingHooks sets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from banpick_cli.errors import BadSetting, FingerprintMismatch, ProfileError
from banpick_cli.models.base import RoutingHooks
from banpick_cli.models.loading import LoadedModel, describe
from banpick_cli.models.registry import adapter_for
from banpick_cli.profile.format import RoutingProfile, check_fingerprint
from banpick_cli.routing.topk import to_mask

from banpick_cli.runtime.auto import AutoPlan, build_auto
from banpick_cli.runtime.bundle import load_bundle, routing_choice
from banpick_cli.runtime.plan import AUTO, RoutingPlan, build_plan


@dataclass(frozen=True)
class RoutingStats:
    """What the routing did since install (or the last reset), on real tokens: not padding, and not the decode
    steps generate() still runs for rows that have ended (their input is EOS or padding).

    avg_experts[l] = experts run per token at MoE layer l; k_base is the model's own. Where the
    plan changed a layer: added / removed = (token, expert) pairs that entered / left the router's
    own top-k, key_added = the added ones that are key experts (Pick's insertions); these three only with
    apply(..., count_changes=True), else 0. unique_experts_per_batch[l] = distinct experts the real
    tokens of one forward run together at MoE layer l, averaged over the forwards that had real tokens
    (at decode with B sequences, what the layer reads; every method, the baseline included).
    """

    method: str
    domain: str | None
    k_base: int
    tokens: list[int]  # per MoE layer
    avg_experts: list[float]  # per MoE layer
    avg_experts_overall: float
    added: list[int]
    removed: list[int]
    key_added: list[int]
    domain_choices: dict[str, int]  # domain auto: requests routed by each domain
    unique_experts_per_batch: list[float]  # per MoE layer
    batches: list[int]  # per MoE layer: forwards with real tokens that the average is over

    @property
    def engaged(self) -> list[bool]:
        """Returns, per layer, whether the rule changed any token's experts."""
        return [a > 0 or r > 0 for a, r in zip(self.added, self.removed)]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "engaged": self.engaged}


class RoutingHandle:
    """An installed routing: use as a context manager, or call `remove()` when done."""

    def __init__(self, loaded: LoadedModel, plan: RoutingPlan | AutoPlan, *, count_changes: bool = False):
        self.loaded = loaded
        self.plan = plan
        self.count_changes = count_changes
        m, e = len(loaded.layers), loaded.routing.num_experts
        self._num_experts = e
        self._device = loaded.device
        self._experts = torch.zeros(m, dtype=torch.int64, device=self._device)
        self._tokens = torch.zeros(m, dtype=torch.int64, device=self._device)
        self._changes = torch.zeros(3, m, dtype=torch.int64, device=self._device)  # added, removed, key_added
        self._unique = torch.zeros(2, m, dtype=torch.int64, device=self._device)  # distinct experts, forwards
        self._mask: torch.Tensor | None = None  # bool [T]: real tokens of the current forward
        self._decoding = True  # the current forward is a decode step (no forward seen yet: as a plain call)
        self._rows: torch.Tensor | None = None  # long [T]: domain index per token (auto)
        self._row_domains: torch.Tensor | None = None  # long [B]
        self._choices = torch.zeros(len(plan.domains) if isinstance(plan, AutoPlan) else 0, dtype=torch.int64)
        self._signature: torch.Tensor | None = None
        self._stop_ids = _stop_ids(loaded)  # long [S]: EOS and padding ids, whose decode steps are not counted
        self._in_signature_pass = False
        self.hooks = RoutingHooks(loaded.layers, e, overrides=self._overrides(), observers=[self._observe])
        self._pre_handle = None
        self.hooks.install()
        decoder = loaded.adapter.decoder(loaded.model)
        self._pre_handle = decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    # --- public --------------------------------------------------------------------------------
    def stats(self) -> RoutingStats:
        """Returns the experts run per token and layer, and how many the plan added or removed."""
        tokens = self._tokens.cpu()
        experts = self._experts.cpu()
        avg = [float(x) / t if t else 0.0 for x, t in zip(experts.tolist(), tokens.tolist())]
        total_tokens = int(tokens.sum())
        changes = self._changes.cpu().tolist()
        unique, forwards = self._unique.cpu().tolist()
        domain = self.plan.domain if isinstance(self.plan, RoutingPlan) else AUTO
        choices = dict(zip(self.plan.domains, self._choices.tolist())) if isinstance(self.plan, AutoPlan) else {}
        return RoutingStats(
            method=self.plan.method, domain=domain, k_base=self.loaded.routing.top_k, tokens=tokens.tolist(),
            avg_experts=avg, avg_experts_overall=float(experts.sum()) / total_tokens if total_tokens else 0.0,
            added=changes[0], removed=changes[1], key_added=changes[2], domain_choices=choices,
            unique_experts_per_batch=[u / f if f else 0.0 for u, f in zip(unique, forwards)], batches=forwards,
        )

    def reset_stats(self) -> None:
        for t in (self._experts, self._tokens, self._changes, self._choices, self._unique):
            t.zero_()

    @property
    def chosen_domains(self) -> list[str] | None:
        """Domain auto: the domain chosen for each request (row) of the last prefill."""
        if self._row_domains is None:
            return None
        return [self.plan.domains[i] for i in self._row_domains.tolist()]

    def remove(self) -> None:
        self.hooks.remove()
        if self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None

    def __enter__(self) -> "RoutingHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- hooks ---------------------------------------------------------------------------------
    def _overrides(self) -> dict[int, Any]:
        if isinstance(self.plan, AutoPlan):
            return {p: self._auto_override for p in self.plan.changed_layers()}
        return {p: self._override for p in self.plan.rules}

    def _override(self, position: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        rule = self.plan.rules[position]
        routing = rule.routing(logits, decode=self._decoding)
        self._count(position, indices, routing.indices, rule.key_experts)
        return _trimmed(routing)

    def _auto_override(self, position: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        plan: AutoPlan = self.plan
        if self._rows is None or self._rows.shape[0] != logits.shape[0]:
            return weights, indices  # no choice made for these tokens (e.g. a direct router call)
        rows = self._rows.to(logits.device)
        e, width = self._num_experts, plan.width
        out_i = torch.full((logits.shape[0], width), e, dtype=torch.long, device=logits.device)
        out_w = None
        key = torch.zeros(logits.shape[0], e, dtype=torch.bool, device=logits.device)
        for d, name in enumerate(plan.domains):
            sel = rows == d
            if not bool(sel.any()):
                continue
            dplan = plan.plans[name]
            routing = dplan.route(position, logits[sel])
            if out_w is None:
                out_w = torch.zeros(logits.shape[0], width, dtype=routing.weights.dtype, device=logits.device)
            out_i[sel, : routing.width] = routing.indices
            out_w[sel, : routing.width] = routing.weights
            rule = dplan.rules.get(position)
            if rule is not None and rule.key_experts is not None:
                key[sel] = rule.key_experts.to(logits.device)
        self._count(position, indices, out_i, key)
        return out_w, out_i

    def _count(self, position: int, before: torch.Tensor, after: torch.Tensor, key: torch.Tensor | None) -> None:
        if not self.count_changes:
            return
        e = self._num_experts
        old, new = to_mask(before.long(), e), to_mask(after, e)  # [T, E]
        mask = self._mask_on(old)
        if mask is not None:
            old, new = old[mask], new[mask]
        added, removed = new & ~old, old & ~new
        key_added = torch.zeros((), dtype=torch.int64, device=added.device)
        if key is not None:
            key = key.to(added.device)
            if key.dim() == 2 and mask is not None:  # domain auto: one key row per token
                key = key[mask]
            key_added = (added & key).sum()
        # Layers may sit on several devices (device_map); the counters live on one.
        self._changes[:, position] += torch.stack([added.sum(), removed.sum(), key_added]).to(self._device)

    def _observe(self, position: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        real = indices < self._num_experts  # [T, W]
        if self._in_signature_pass:
            if self._signature is not None:
                self._signature[:, position] += self._usage_per_row(indices, real)
            return
        mask = self._mask_on(real)
        if mask is None:
            self._experts[position] += real.sum().to(self._device)
            self._tokens[position] += real.shape[0]
        else:  # sums, not boolean indexing: no host sync per layer
            real = real & mask.unsqueeze(-1)
            self._experts[position] += real.sum().to(self._device)
            self._tokens[position] += mask.sum().to(self._device)
        # [E + 1], the last for dropped slots: an index write of T x W, not a [T, E] mask
        used = torch.zeros(self._num_experts + 1, dtype=torch.bool, device=indices.device)
        used[torch.where(real, indices.long(), self._num_experts).flatten()] = True
        self._unique[:, position] += torch.stack([used[:-1].sum(), real.any()]).to(self._device)

    def _mask_on(self, like: torch.Tensor) -> torch.Tensor | None:
        """Returns the real-token mask on `like`'s device, or None when it does not fit these tokens."""
        if self._mask is None or self._mask.shape[0] != like.shape[0]:
            return None
        return self._mask.to(like.device)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._in_signature_pass:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = ids.shape if ids is not None else embeds.shape[:2] if embeds is not None else None
        if shape is None or len(shape) != 2:
            self._mask = None
            return None
        batch, new = int(shape[0]), int(shape[1])
        # A decode step: one new position per sequence (the batch-aware step runs only there: no sequence then
        # has two positions in the forward that could share experts with each other).
        self._decoding = new == 1
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= new:
            self._mask = mask[:, -new:].reshape(-1).bool()
        else:
            self._mask = None
        if new == 1 and ids is not None and self._stop_ids is not None and _seen(kwargs) > 0:
            # A decode step whose input is EOS or padding belongs to a row that has finished: generate()
            # keeps computing it (its attention mask stays 1), but it is no token of any answer.
            live = ~torch.isin(ids.reshape(-1), self._stop_ids.to(ids.device))
            self._mask = live if self._mask is None else self._mask & live
        if isinstance(self.plan, AutoPlan):
            self._route_requests(module, args, kwargs, batch, new)
        return None

    # --- domain auto ---------------------------------------------------------------------------
    def _route_requests(self, decoder: nn.Module, args: tuple, kwargs: dict, batch: int, new: int) -> None:
        seen = _seen(kwargs)
        keep = new == 1 and seen > 0 and self._row_domains is not None and self._row_domains.shape[0] == batch
        if not keep:
            # A prefill (or a batch we have not seen): one extra pass of the model's own routing over
            # the prompt gives each request's usage signature; then the real pass routes by its domain.
            usage = self._signature_pass(decoder, args, kwargs, batch, new)
            self._row_domains, _ = self.plan.choose(usage)
            self._choices += torch.bincount(self._row_domains.cpu(), minlength=len(self.plan.domains))
        self._rows = self._row_domains.to(self._device).repeat_interleave(new)

    @torch.no_grad()
    def _signature_pass(self, decoder: nn.Module, args: tuple, kwargs: dict, batch: int, new: int) -> torch.Tensor:
        m, e = len(self.loaded.layers), self._num_experts
        self._signature = torch.zeros(batch, m, e, device=self._device)
        self._signature_shape = (batch, new)
        passed = {k: kwargs[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
                  if kwargs.get(k) is not None}
        saved = self.hooks.overrides
        self.hooks.overrides = {}
        self._in_signature_pass = True
        try:
            decoder(*args[:1], **passed, use_cache=False)
        finally:
            self._in_signature_pass = False
            self.hooks.overrides = saved
        usage, self._signature = self._signature, None
        return usage

    def _usage_per_row(self, indices: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        batch, new = self._signature_shape
        e = self._num_experts
        row = torch.arange(batch, device=indices.device).repeat_interleave(new).unsqueeze(-1).expand_as(indices)
        mask = self._mask_on(real)
        keep = real if mask is None else real & mask.unsqueeze(-1)
        flat = (row * e + indices.clamp(max=e - 1))[keep]
        return torch.bincount(flat, minlength=batch * e).view(batch, e).float().to(self._device)


def _seen(kwargs: dict) -> int:
    """Returns how many positions the forward's KV cache already holds (0 for a prefill or no cache)."""
    past = kwargs.get("past_key_values")
    past = kwargs.get("cache") if past is None else past  # transformers 5.24 passes `cache`
    return past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0


def _stop_ids(loaded: LoadedModel) -> torch.Tensor | None:
    """Returns the tokenizer's EOS and padding ids (long [S]), or None when it has none."""
    tok = getattr(loaded, "tokenizer", None)
    ids: set[int] = set()
    for value in (getattr(tok, "eos_token_id", None), getattr(tok, "pad_token_id", None)):
        ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    return torch.tensor(sorted(ids), dtype=torch.long) if ids else None


def _trimmed(routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights, indices) without the trailing slots no token of the batch fills, on a CPU.

    The experts kernels do elementwise work (gating, masks, the weighted sum) on every slot, sentinel
    or not: a rule of width W that runs k < W experts pays for W there. Real experts come first, so
    the columns past the batch's largest k are empty. Reading that k is a host sync, free on a CPU
    and not on an accelerator, where the routing keeps its width.
    """
    if routing.indices.device.type != "cpu":
        return routing.weights, routing.indices
    width = max(int(routing.k.max()), 1) if routing.k.numel() else routing.width
    if width >= routing.width:
        return routing.weights, routing.indices
    return routing.weights[:, :width], routing.indices[:, :width]


def apply(
    model: Any,
    profile: RoutingProfile | str | os.PathLike | None = None,
    method: str | None = None,
    domain: str | None = None,
    *,
    count_changes: bool = False,
    batch_aware: bool | dict[str, Any] = False,
    **overrides: Any,
) -> RoutingHandle:
    """Installs `method`'s routing on every MoE layer of `model`; returns the handle (a context manager).

    `model`: a LoadedModel (banpick_cli.models.load_model) or a transformers MoE model of a supported
    family. `profile`: a RoutingProfile, a profile file, or a bundle folder from `banpick export`;
    one made for another checkpoint is refused (FingerprintMismatch). `method`: baseline, pick, ban,
    banpick, fixed-k, dynamic, des, odp, rice (default: the bundle's, else baseline). `domain`: the key
    experts Pick reads (pick, banpick; default: the bundle's), or "auto" to choose per request at
    prefill. `overrides`: hyperparameters (e.g. lam=0.5, strategy="D"; k for fixed-k, one or one per
    MoE layer; tau for dynamic, thresholds for des/odp, cognitive_experts and factor for rice), over the
    profile's settings. `count_changes`: also count the (token, expert) pairs the plan added and removed
    (`stats().added/removed`); off by default, since it compares dense [tokens, experts] masks per layer.
    Experts run per token are always counted, on the device, at no measurable cost. `batch_aware` (True,
    or {"candidates": n}): after the method's rule, the batch-aware step moves tokens' slots onto experts
    the rest of the forward batch keeps (`runtime.plan.batch_aware_plan`; default: the bundle's setting).
    """
    loaded = as_loaded(model)
    prof, manifest = load_profile_for(profile, loaded)
    method, domain, overrides, batch_aware = routing_choice(manifest, method=method, domain=domain, overrides=overrides,
                                                            batch_aware=batch_aware)
    specs = loaded.router_specs()
    if domain == AUTO:
        if batch_aware:
            raise BadSetting("batch-aware routing with domain auto is not supported (choose a domain)")
        plan: RoutingPlan | AutoPlan = build_auto(prof, specs, method, **overrides)
    else:
        plan = build_plan(prof, specs, method, domain, batch_aware=batch_aware, **overrides)
    return RoutingHandle(loaded, plan, count_changes=count_changes)


def remove(handle: RoutingHandle) -> None:
    """Removes an installed routing (same as `handle.remove()`)."""
    handle.remove()


def as_loaded(model: Any) -> LoadedModel:
    """Returns a LoadedModel for a LoadedModel or a plain transformers MoE model."""
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"apply() needs a transformers model or a LoadedModel, got {type(model).__name__}")
    device = next(model.parameters()).device
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return describe(model, None, adapter_for(model.config), name_or_path=str(name), device=device)


def load_profile_for(
    profile: RoutingProfile | str | os.PathLike | None, loaded: LoadedModel
) -> tuple[RoutingProfile | None, dict | None]:
    """Returns (profile, bundle manifest or None) after checking the profile was made for this checkpoint."""
    if profile is None:
        return None, None
    manifest = None
    if not isinstance(profile, RoutingProfile):
        profile, manifest = load_bundle(profile, fingerprint=loaded.fingerprint)
    check_fingerprint(profile, loaded.fingerprint)
    ident = profile.model
    if ident.k_base != loaded.routing.top_k or tuple(ident.moe_layers) != tuple(loaded.identity.moe_layers):
        raise FingerprintMismatch(
            f"the profile was made for top-{ident.k_base} routing over MoE layers {list(ident.moe_layers)}; "
            f"this model is loaded with top-{loaded.routing.top_k} over {list(loaded.identity.moe_layers)}"
        )
    if ident.num_experts != loaded.routing.num_experts:
        raise ProfileError(f"the profile has {ident.num_experts} experts per layer; this model {loaded.routing.num_experts}")
    return profile, manifest


__all__ = ["RoutingHandle", "RoutingStats", "apply", "as_loaded", "load_profile_for", "remove"]
