"""What the vLLM and SGLang plugins share: settings from the environment, the fingerprint check, the
plan, and one routing call per layer that fits the engine's slots. No engine is imported here.

The engine hands us router logits [T, E] and expects (weights float32 [T, S], ids int [T, S]) with
S its slot count (top_k). We route with the plan (the routing core) and express a slot the rule
leaves empty as the token's first expert with weight 0 (`Routing.sentinel_free`): every engine
kernel takes a valid id; an out-of-range id is unsafe in vLLM's and SGLang's default Triton paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Any, Mapping

import torch

from banpick_cli.errors import BanpickError, FingerprintMismatch
from banpick_cli.profile.fingerprint import router_fingerprint
from banpick_cli.profile.format import RoutingProfile
from banpick_cli.routing import Routing, route, weights_for

from banpick_cli.runtime.bundle import load_bundle, routing_choice, sha256_of
from banpick_cli.runtime.expect import expected_k, max_experts
from banpick_cli.runtime.methods import get_method, names
from banpick_cli.runtime.plan import RoutingPlan, build_plan

logger = logging.getLogger("banpick")

ENV_PROFILE, ENV_METHOD, ENV_DOMAIN = "BANPICK_PROFILE", "BANPICK_METHOD", "BANPICK_DOMAIN"
ENV_PARAMS, ENV_OVERFLOW = "BANPICK_PARAMS", "BANPICK_OVERFLOW"
ENV_UNTESTED = "BANPICK_ALLOW_UNTESTED_ENGINE"
ENV_ROUTE_ALL = "BANPICK_ROUTE_ALL"  # 1: every layer through the core, even unchanged ones (an equivalence test)
OVERFLOWS = ("error", "truncate")
# Decoder-layer index of an MoE module in every engine's module names ("model.layers.3.mlp.experts");
# router gates by their family's block names: models.registry.gate_pattern.
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Agreement the load-time self-check demands between the engine's routing and the core's.
MAX_SET_MISMATCH = 0.01  # share of tokens whose expert set differs (near-ties in low precision)
MAX_WEIGHT_ERROR = 0.02  # relative to the largest weight


class EngineUnsupported(BanpickError):
    """This engine version, backend or model cannot be routed safely; the engine must not start."""


@dataclass(frozen=True)
class EngineSettings:
    """What the serving process was asked for, from the environment."""

    profile: str
    method: str | None = None
    domain: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    overflow: str = "error"
    route_all: bool = False


def read_env(environ: Mapping[str, str] = os.environ) -> EngineSettings | None:
    """Returns the settings, or None when BANPICK_PROFILE is unset (the plugin then does nothing)."""
    path = environ.get(ENV_PROFILE, "").strip()
    if not path:
        return None
    raw = environ.get(ENV_PARAMS, "").strip()
    try:
        params = json.loads(raw) if raw else {}
    except ValueError as err:
        raise EngineUnsupported(f"{ENV_PARAMS} is not JSON ({err}): e.g. '{{\"lam\": 0.5}}'") from None
    if not isinstance(params, dict):
        raise EngineUnsupported(f"{ENV_PARAMS} must be a JSON object, got {raw!r}")
    overflow = environ.get(ENV_OVERFLOW, "error").strip() or "error"
    if overflow not in OVERFLOWS:
        raise EngineUnsupported(f"{ENV_OVERFLOW}={overflow!r}: expected one of {', '.join(OVERFLOWS)}")
    return EngineSettings(path, environ.get(ENV_METHOD) or None, environ.get(ENV_DOMAIN) or None, params, overflow,
                          environ.get(ENV_ROUTE_ALL) == "1")


def check_version(engine: str, version: str, supported: tuple[tuple[int, int], tuple[int, int]],
                  environ: Mapping[str, str] = os.environ) -> None:
    """Raises EngineUnsupported unless min <= (major, minor) < max, or BANPICK_ALLOW_UNTESTED_ENGINE=1."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    parsed = (int(match.group(1)), int(match.group(2))) if match else None
    lo, hi = supported
    if parsed is not None and lo <= parsed < hi:
        return
    if environ.get(ENV_UNTESTED) == "1":
        logger.warning("banpick: %s %s is outside the tested range %s; %s=1 set, continuing (the load-time "
                       "self-check still guards the routing)", engine, version, _range(supported), ENV_UNTESTED)
        return
    raise EngineUnsupported(
        f"banpick supports {engine} {_range(supported)}, found {version or 'unknown'}: refusing to start rather "
        f"than misroute (set {ENV_UNTESTED}=1 to try anyway; a load-time self-check still compares routings)"
    )


def attach_log_handler(engine_logger: str) -> None:
    """Makes the plugin's INFO lines reach the engine's log when nobody configured the `banpick` logger.

    The engines configure only their own logger (vLLM: `vllm`), so without this a user sees banpick's
    lines only with a logging config naming it. The handlers of `engine_logger` (or one to stderr) are
    shared, so the lines come out in the engine's format, in the same stream.
    """
    if logger.handlers or logging.getLogger().handlers:
        return
    handlers = logging.getLogger(engine_logger).handlers or [logging.StreamHandler()]
    for handler in handlers:
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False


def gate_modules(named_modules) -> dict[int, Any]:
    """Returns {decoder layer index: router gate module} from a model's named_modules()."""
    from banpick_cli.models.registry import gate_pattern

    pattern = gate_pattern()
    return {int(m.group(1)): module for name, module in named_modules if (m := pattern.search(name))
            and isinstance(getattr(module, "weight", None), torch.Tensor)}


def engine_fingerprint(gates: dict[int, Any]) -> str:
    """Returns the profile-format fingerprint of an engine's router gates (the same hash HF loading gives)."""
    return router_fingerprint((index, name, tensor) for index in sorted(gates)
                              for name, tensor in {"weight": gates[index].weight, **_bias_attr(gates[index])}.items())


class EngineRouter:
    """One serving process's routing: the plan on the engine's MoE layers, and the call each layer makes."""

    def __init__(self, settings: EngineSettings, gates: dict[int, Any], *, engine: str, slots: int,
                 fingerprint: str | None = None):
        """`fingerprint`: the gates' fingerprint taken before the engine repacked their weights (vLLM
        on a CPU empties a linear layer's `weight` after loading); by default it is taken here."""
        self.settings = settings
        self.engine = engine
        self.slots = slots
        profile, manifest = load_bundle(settings.profile)
        self.profile: RoutingProfile = profile
        self.profile_sha256 = sha256_of(_profile_file(settings.profile, manifest))
        ident = profile.model
        present = sorted(gates)
        if present != list(ident.moe_layers):
            raise EngineUnsupported(
                f"this {engine} process holds router gates of decoder layers {present[:8]}{'…' if len(present) > 8 else ''}, "
                f"the profile's MoE layers are {list(ident.moe_layers)[:8]}…: pipeline parallelism and partial models "
                "are not supported (the fingerprint covers every router)"
            )
        if fingerprint is None and not all(gates[i].weight.numel() for i in present):
            raise EngineUnsupported(f"{engine} repacked the router gates' weights before banpick could read them: the "
                                    "fingerprint cannot be checked (unsupported engine version or model loader)")
        found = fingerprint or engine_fingerprint(gates)
        if found != profile.fingerprint:
            raise FingerprintMismatch(
                f"{settings.profile} was made for another model ({ident.name_or_path}, router fingerprint "
                f"{profile.fingerprint[7:19]}…), not the one {engine} loaded ({found[7:19]}…)"
            )
        params = dict(settings.params)
        batch = params.pop("batch_aware", None)
        method, domain, params, batch = routing_choice(manifest, method=settings.method, domain=settings.domain,
                                                       overrides=params, batch_aware=batch)
        try:
            served = get_method(method).engines
        except BanpickError as err:
            raise EngineUnsupported(str(err)) from None
        if not served:
            raise EngineUnsupported(f"method '{method}' is not served by the engine plugins; they run: "
                                    f"{', '.join(names(lambda m: m.engines))} (the HF runtime runs every method)")
        if domain == "auto":
            raise EngineUnsupported("domain 'auto' needs a per-request signature pass: the HF runtime has it, the engine plugins do not")
        if slots < ident.k_base:
            raise EngineUnsupported(f"the engine routes {slots} experts per token, fewer than the model's top-{ident.k_base}")
        biases = [getattr(gates[i], "e_score_correction_bias", None) for i in ident.moe_layers]
        # The engines keep routing weights in float32 (vLLM's fused_topk, SGLang's select_experts), whatever
        # HF transformers does with them: route as the engine would, not as the HF model class.
        self.specs = [replace(spec, weights_in_logits_dtype=False) for spec in
                      profile.model.router_specs([None if b is None else b.detach() for b in biases])]
        _pin_key_experts(profile)
        self.plan: RoutingPlan = build_plan(profile, self.specs, method, domain, batch_aware=batch, **params)
        self.needed = max_experts(self.plan)
        if self.needed > slots and settings.overflow != "truncate":
            raise EngineUnsupported(
                f"{method} runs up to {self.needed} experts per token, the engine has {slots} slots: start it with "
                f"{self.needed} experts per token (see the bundle's README: --hf-overrides / --json-model-override-args "
                f"'{{\"num_experts_per_tok\": {self.needed}}}'), or set {ENV_OVERFLOW}=truncate to keep each token's "
                f"{slots} most preferred"
            )
        self.position = {index: position for position, index in enumerate(ident.moe_layers)}
        # With more slots than K_base the engine's own top-k would run too many experts: every layer routes here.
        every = slots > ident.k_base or settings.route_all
        self.changed = set(range(len(self.specs))) if every else set(self.plan.rules)
        self.expected = expected_k(self.plan, profile)
        self.capture_safe = self.plan.graph_safe
        self._scale: dict[int, float] = {}  # engine weight / core weight, learned by the self-check
        # Whether the forward being routed is a decode step (one new token per request): the batch-aware step
        # runs only there. An engine plugin that can tell sets it; until then the step never runs.
        self.is_decode: Callable[[], bool] = lambda: False
        self.sentinel = False  # pruned slots as expert id -1 (only where the engine's kernel skips it)

    def changes(self, layer_index: int | None) -> bool:
        """Returns whether the plan reroutes this decoder layer."""
        return layer_index in self.position and self.position[layer_index] in self.changed

    def needs_check(self, layer_index: int) -> bool:
        """Returns whether this layer's self-check is still to run (the caller then passes `stock`)."""
        return self.position[layer_index] not in self._scale

    def route(self, layer_index: int, logits: torch.Tensor, ids_dtype: torch.dtype | None,
              stock: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights float32 [T, slots], ids [T, slots]) for a layer the plan changes.

        `stock`: the engine's own (weights, ids) for these logits; the first call per layer compares
        them with the core's own routing before anything is rerouted (skipped while a CUDA graph is
        being captured; the engines run eager warm-up passes first).
        """
        position = self.position[layer_index]
        capturing = logits.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing and not self.capture_safe:
            raise EngineUnsupported(
                f"Pick {self.plan.params.get('strategy')} builds its range limit on the host and cannot run inside a "
                "CUDA graph: start the engine eager (vLLM --enforce-eager, SGLang --disable-cuda-graph) or use ban/banpick"
            )
        if logits.shape[1] != self.specs[position].num_experts:  # an engine may append shared-expert gate columns
            logits = logits[:, : self.specs[position].num_experts]
        if position not in self._scale and stock is not None and not capturing:
            self._scale[position] = self_check(self.specs[position], logits, *stock, layer=layer_index, engine=self.engine)
        routing = self.plan.route(position, logits, decode=self.plan.batch is None or self.is_decode())
        weights, ids = fit_slots(routing, logits, self.specs[position], self.slots, reweight=self.needed > self.slots)
        scale = self._scale.get(position, 1.0)
        if self.sentinel:  # static shapes, no host sync: the pruned slots (weight 0) become -1
            ids = torch.where(weights > 0, ids, torch.full_like(ids, -1))
        return (weights * scale if scale != 1.0 else weights), ids.to(ids_dtype or torch.int32)

    def log_line(self) -> str:
        """Returns the one line the plugin logs at load: method, domain, expected experts per token."""
        plan, k = self.plan, self.plan.k_base
        lo, hi = self.expected.overall
        return (f"banpick: {self.engine}: method={plan.method} domain={plan.domain or '-'} on {len(self.changed)}/"
                f"{len(self.specs)} MoE layers, expected experts/token {self.expected.summary()} (model top-{k}, "
                f"{self.slots} engine slots); profile sha256 {self.profile_sha256[:12]}, params {json.dumps(plan.params, default=str)}"
                + (f"; batch-aware step on decode steps, candidates {plan.batch['candidates']} ({plan.batch['source']})"
                   if plan.batch is not None else ""))


def fit_slots(routing: Routing, logits: torch.Tensor, spec, slots: int, *, reweight: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights float32, ids long) of exactly `slots` columns, with no out-of-range id.

    Real experts come first in a Routing, so a wider one is cut to its first `slots` columns: with
    reweight=False the caller knows only empty slots go (slots >= max_experts); with reweight=True
    a token may lose its least preferred experts and the rest are re-weighted by the model's rule.
    Narrower routings are padded; every empty slot then holds the token's first expert, weight 0.
    """
    e = spec.num_experts
    if routing.width > slots:
        indices, weights = routing.indices[:, :slots], routing.weights[:, :slots]
        if reweight:
            weights = weights_for(logits, spec, indices)
        routing = Routing(indices, weights, (indices < e).sum(-1))
    elif routing.width < slots:  # the added slots hold no expert: k stays
        pad = slots - routing.width
        routing = Routing(torch.nn.functional.pad(routing.indices, (0, pad), value=e),
                          torch.nn.functional.pad(routing.weights, (0, pad), value=0.0), routing.k)
    safe = routing.sentinel_free(e)
    return safe.weights.float(), safe.indices


def self_check(spec, logits: torch.Tensor, stock_weights: torch.Tensor, stock_ids: torch.Tensor, *,
               layer: int, engine: str) -> float:
    """Returns the engine's weight scale relative to the core's, after checking that the engine's own
    routing of `logits` is the core's `route` (same experts per token, same weights up to one scale:
    engines that apply routed_scaling_factor to the layer output leave it out of the weights).

    Raises EngineUnsupported when they disagree: a new engine version or kernel that routes
    differently must not be silently rerouted.
    """
    width = stock_ids.shape[1]
    mine = route(logits, spec, min(width, spec.available()))
    e = spec.num_experts
    s_ids, order = stock_ids.long().sort(-1)
    s_w = stock_weights.float().gather(1, order)
    m_ids, m_order = mine.indices.sort(-1)
    m_w = mine.weights.float().gather(1, m_order)
    if m_ids.shape[1] < width:  # the engine has more slots than experts the router can choose: compare the real ones
        s_ids, s_w = s_ids[:, : m_ids.shape[1]], s_w[:, : m_ids.shape[1]]
    same = (s_ids == m_ids).all(-1)
    mismatch = 1.0 - float(same.float().mean()) if same.numel() else 0.0
    if mismatch > MAX_SET_MISMATCH:
        raise EngineUnsupported(
            f"{engine} layer {layer}: the engine's experts differ from the profile's routing rule on {mismatch:.1%} of "
            f"tokens (e.g. {s_ids[~same][0].tolist()} vs {m_ids[~same][0].tolist()}): unsupported engine version or model"
        )
    a, b = s_w[same].sum(-1), m_w[same].sum(-1)
    ok = b > 0
    scale = float((a[ok] / b[ok]).median()) if bool(ok.any()) else 1.0
    error = float((s_w[same] - m_w[same] * scale).abs().max()) / max(float(s_w.abs().max()), 1e-6) if bool(same.any()) else 0.0
    if error > MAX_WEIGHT_ERROR:
        raise EngineUnsupported(f"{engine} layer {layer}: the engine's routing weights differ from the profile's rule "
                                f"(relative error {error:.3f} after scale {scale:.4g}): unsupported engine version or model")
    return 1.0 if abs(scale - 1.0) < 1e-3 else scale


def _pin_key_experts(profile: RoutingProfile) -> None:
    # The core moves key masks to the logits' device per call; from pinned memory that copy can be
    # captured in a CUDA graph, from pageable memory it cannot.
    if torch.cuda.is_available():
        for name, tensor in list(profile.tensors.items()):
            if name.endswith("/key_experts") and not tensor.is_pinned():
                profile.tensors[name] = tensor.pin_memory()


def _bias_attr(gate: Any) -> dict[str, torch.Tensor]:
    bias = getattr(gate, "e_score_correction_bias", None)
    return {"e_score_correction_bias": bias} if isinstance(bias, torch.Tensor) else {}


def _profile_file(path: str, manifest: dict | None) -> str:
    if manifest is None:
        return path
    return os.path.join(path, manifest.get("profile", {}).get("file", "profile.safetensors"))


def _range(supported: tuple[tuple[int, int], tuple[int, int]]) -> str:
    (a, b), (c, d) = supported
    return f">={a}.{b},<{c}.{d}"
