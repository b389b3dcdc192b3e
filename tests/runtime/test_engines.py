"""Engine plugins on CPU, with the calls and tensor shapes the engines make (neither engine installed).

vLLM (router objects, read at vllm-project/vllm@03919875 base_router.py): the MoE runner calls
`router.select_experts(hidden_states, router_logits)`, which calls
`self._compute_routing(hidden_states, router_logits, indices_type)` -> (topk_weights float32
[T, top_k], topk_ids int32 [T, top_k]); newer routers take `*, input_ids=None` too (fused_topk_router.py
@04b27e94). SGLang (python/sglang/srt/layers/moe/topk.py, select_experts): `_post_process_topk_ids(
topk_ids=..., topk_weights=..., topk_config=..., router_logits=..., num_token_non_padded=..., layer_id=...,
expert_location_dispatch_info=...)`, keywords only, with fused shared experts as trailing columns.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from banpick_cli.errors import FingerprintMismatch
from banpick_cli.models.loading import load_model
from banpick_cli.profile.format import write_profile
from banpick_cli.routing import ban, ban_pick
from banpick_cli.runtime import engine as engine_mod
from banpick_cli.runtime import methods as methods_mod
from banpick_cli.runtime import sglang_plugin, vllm_plugin
from banpick_cli.runtime.engine import EngineUnsupported, check_version, engine_fingerprint, gate_modules, read_env
from rt_helpers import key_at, make_profile
from tiny import build_model

REPO = Path(__file__).resolve().parents[2]


class VllmLikeRouter:
    """vLLM's FusedTopKRouter (softmax, fused_topk) or GroupedTopKRouter (grouped_topk, torch path) in torch."""

    def __init__(self, top_k, renormalize, n_group=0, topk_group=0, routed_scaling_factor=1.0):
        self.top_k, self.renormalize = top_k, renormalize
        self.n_group, self.topk_group, self.routed_scaling_factor = n_group, topk_group, routed_scaling_factor

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        scores = torch.softmax(router_logits.float(), dim=-1)
        if self.n_group:  # grouped_topk without correction bias: a group scores its best expert
            t = scores.shape[0]
            group_scores = scores.view(t, self.n_group, -1).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            mask = mask.unsqueeze(-1).expand(t, self.n_group, scores.shape[-1] // self.n_group).reshape(t, -1)
            scores = scores.masked_fill(~mask.bool(), float("-inf"))
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return (weights * self.routed_scaling_factor).float(), ids.to(indices_type or torch.int32)

    def select_experts(self, hidden_states, router_logits):
        # BaseRouter.select_experts, without EPLB: compute, then convert the indices dtype.
        return self._compute_routing(hidden_states, router_logits, torch.int32)


class Runner(nn.Module):
    def __init__(self, router, layer_name, monolithic=False):
        super().__init__()
        self.router, self.layer_name = router, layer_name
        self.routed_experts = SimpleNamespace(quant_method=SimpleNamespace(is_monolithic=monolithic))


def engine_model(loaded, router_factory, attr="experts_runner"):
    """The tiny HF model with a vLLM-like runner beside each MoE block's gate (same names as vLLM's)."""
    for layer in loaded.layers:
        layer.block.add_module(attr, router_factory(layer))
    return loaded.model


@pytest.fixture()
def profile_env(tmp_path, monkeypatch):
    def setup(loaded, method, domain=None, key=None, **env):
        path = write_profile(make_profile(loaded, key=key), tmp_path / "p.safetensors")
        monkeypatch.setenv("BANPICK_PROFILE", str(path))
        monkeypatch.setenv("BANPICK_METHOD", method)
        for name, value in {"BANPICK_DOMAIN": domain, **env}.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        return path

    return setup


def _logits(loaded, tokens=64, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, loaded.routing.num_experts, generator=gen).to(dtype) * 2


def test_gate_fingerprint_matches_the_hf_one(tiny_models):
    for family in ("qwen3_moe", "deepseek_v3", "mixtral"):
        loaded = load_model(str(tiny_models[family]), device="cpu")
        gates = gate_modules(loaded.model.named_modules())
        assert sorted(gates) == list(loaded.identity.moe_layers)
        assert engine_fingerprint(gates) == loaded.fingerprint


def test_vllm_ban_reroutes_with_the_engines_shapes_and_safe_slots(tiny_models, profile_env):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    k, e = loaded.routing.top_k, loaded.routing.num_experts
    profile_env(loaded, "ban")
    model = engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), f"model.layers.{layer.layer_index}.mlp.experts"))
    router = vllm_plugin.install(model)
    assert router.changed == {0, 1}
    specs = router.specs  # the model's rule with float32 weights, as vLLM hands them to its kernels
    for layer in loaded.layers:
        logits = _logits(loaded, seed=layer.position)
        hidden = torch.randn(logits.shape[0], 32)
        weights, ids = layer.block.experts_runner.router.select_experts(hidden, logits)
        assert weights.shape == ids.shape == (64, k) and weights.dtype == torch.float32 and ids.dtype == torch.int32
        assert int(ids.min()) >= 0 and int(ids.max()) < e  # no sentinel reaches the kernel
        mine = ban(logits, specs[layer.position], float(torch.linspace(0, 1, 2)[layer.position]), 0.3, 0.9,
                   k_min=1, lam=1.0, beta=0.5)
        live = weights > 0
        assert torch.equal(live.sum(-1), mine.k)  # the experts that run are Ban's K per token
        # Live slots are Ban's experts with Ban's weights; dead slots repeat the token's first expert.
        assert torch.equal(torch.where(live, ids.long(), -1), torch.where(mine.indices < e, mine.indices, -1))
        torch.testing.assert_close(weights[live], mine.weights.float()[mine.indices < e])
        assert torch.equal(ids.long()[~live], ids.long()[:, :1].expand_as(ids)[~live])


def test_vllm_fixed_k_runs_the_cores_top_k_per_layer(tiny_models, profile_env):
    from banpick_cli.routing import fixed_k

    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    k, e = loaded.routing.top_k, loaded.routing.num_experts
    profile_env(loaded, "fixed-k", BANPICK_PARAMS='{"k": [2, 3]}')
    model = engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), f"model.layers.{layer.layer_index}.mlp.experts"))
    router = vllm_plugin.install(model)
    assert router.changed == {0, 1} and router.expected.overall == (2.5, 2.5) and router.needed == k
    for layer, kept in zip(loaded.layers, (2, 3)):
        logits = _logits(loaded, seed=layer.position)
        weights, ids = layer.block.experts_runner.router.select_experts(torch.randn(64, 32), logits)
        assert weights.shape == ids.shape == (64, k) and int(ids.max()) < e
        mine = fixed_k(logits, router.specs[layer.position], kept)
        assert torch.equal(ids[:, :kept].long(), mine.indices) and (weights[:, kept:] == 0).all()
        torch.testing.assert_close(weights[:, :kept], mine.weights.float())


def test_vllm_learns_the_engines_weight_scale_on_grouped_routers(tiny_models, profile_env):
    loaded = load_model(str(tiny_models["deepseek_v2"]), device="cpu")
    k = loaded.routing.top_k
    # lam 0.5 keeps at most 1 + 2 key experts per token: it fits the engine's 3 slots.
    profile_env(loaded, "banpick", "math", key=key_at(loaded, 0, [0, 5]), BANPICK_PARAMS='{"lam": 0.5}')
    # vLLM's MoE runner applies routed_scaling_factor (1.5 here) to the layer output, not the weights.
    model = engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, False, 4, 2), f"model.layers.{layer.layer_index}.mlp.experts"))
    vllm_plugin.install(model)
    spec = loaded.router_specs()[0]
    logits = _logits(loaded, dtype=torch.float32)
    weights, ids = loaded.layers[0].block.experts_runner.router.select_experts(torch.zeros(64, 32), logits)
    mine = ban_pick(logits, spec, key_at(loaded, 0, [0, 5])[0], 0.0, 0.3, 0.9, k_min=1, lam=0.5, beta=0.5)
    assert torch.equal((weights > 0).sum(-1), mine.k)
    torch.testing.assert_close(weights.sum(-1), mine.weights.float().sum(-1) / 1.5)


def test_vllm_refuses_what_it_cannot_route(tiny_models, profile_env, tmp_path):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    k = loaded.routing.top_k
    name = lambda layer: f"model.layers.{layer.layer_index}.mlp.experts"  # noqa: E731
    profile_env(loaded, "ban")
    model = engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), name(layer), monolithic=True), "mono")
    with pytest.raises(EngineUnsupported, match="monolithic"):
        vllm_plugin.install(model)
    # An engine whose own routing is not the profile's rule (no renormalisation here) fails on its first pass.
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    model = engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, False), name(layer)))
    vllm_plugin.install(model)
    with pytest.raises(EngineUnsupported, match="weights differ"):
        loaded.layers[0].block.experts_runner.router.select_experts(torch.zeros(64, 32), _logits(loaded))
    # A MoE layer whose runner the plugin cannot find (another runner class) is refused, not left unrouted.
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    model = engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), name(layer) if layer.position else "x"))
    with pytest.raises(EngineUnsupported, match=r"MoE layers \[0\] have no router object"):
        vllm_plugin.install(model)
    # A profile of another checkpoint is refused at load.
    other = load_model(str(build_model("qwen3_moe", tmp_path / "other", seed=9)), device="cpu")
    profile_env(other, "ban")
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    with pytest.raises(FingerprintMismatch, match="not the one"):
        vllm_plugin.install(engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), name(layer))))


def test_vllm_needs_enough_slots_unless_told_to_truncate(tiny_models, profile_env):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    k, e = loaded.routing.top_k, loaded.routing.num_experts
    name = lambda layer: f"model.layers.{layer.layer_index}.mlp.experts"  # noqa: E731
    key = key_at(loaded, 0, [0, 1, 2])
    profile_env(loaded, "pick", "math", key=key, BANPICK_PARAMS='{"strategy": "A"}')
    with pytest.raises(EngineUnsupported, match='num_experts_per_tok": 7'):
        vllm_plugin.install(engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), name(layer))))
    # Widened to 7 slots (--hf-overrides): every layer routes here, the unchanged one at its own top-4.
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    router = vllm_plugin.install(engine_model(loaded, lambda layer: Runner(VllmLikeRouter(7, True), name(layer))))
    assert router.changed == {0, 1}
    _, ids = loaded.layers[1].block.experts_runner.router.select_experts(torch.zeros(64, 32), _logits(loaded))
    assert ids.shape == (64, 7) and int(ids.max()) < e
    # Or truncate to the engine's 4 slots.
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    profile_env(loaded, "pick", "math", key=key, BANPICK_PARAMS='{"strategy": "A"}', BANPICK_OVERFLOW="truncate")
    vllm_plugin.install(engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), name(layer))))
    weights, ids = loaded.layers[0].block.experts_runner.router.select_experts(torch.zeros(64, 32), _logits(loaded))
    assert ids.shape == (64, k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))  # re-weighted over what is kept


def test_sglang_hook_replaces_routed_columns_and_keeps_shared_ones(tiny_models, profile_env, monkeypatch):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    k, e = loaded.routing.top_k, loaded.routing.num_experts
    profile_env(loaded, "ban")
    config = SimpleNamespace(top_k=k + 1, num_fused_shared_experts=1)
    for layer in loaded.layers:
        layer.block.add_module("topk", nn.Module())
        layer.block.topk.topk_config = config
    monkeypatch.setitem(sglang_plugin._state, "problem", None)
    monkeypatch.setitem(sglang_plugin._state, "router", None)
    assert sglang_plugin.after_get_model(loaded.model) is loaded.model
    layer = loaded.layers[1]
    logits = _logits(loaded)
    stock_w, stock_ids = VllmLikeRouter(k, True)._compute_routing(None, logits, torch.int32)
    shared_id = torch.full((64, 1), e, dtype=torch.int32)  # SGLang appends the shared expert as id E
    args, kwargs = sglang_plugin.before_post_process(
        topk_ids=torch.cat([stock_ids, shared_id], 1), topk_weights=torch.cat([stock_w, torch.ones(64, 1)], 1),
        topk_config=config, router_logits=logits, num_token_non_padded=None, layer_id=layer.layer_index,
        expert_location_dispatch_info=None)
    assert args == () and set(kwargs) >= {"topk_ids", "topk_weights", "num_token_non_padded", "expert_location_dispatch_info"}
    ids, weights = kwargs["topk_ids"], kwargs["topk_weights"]
    assert ids.shape == (64, k + 1) and ids.dtype == torch.int32
    assert torch.equal(ids[:, -1:], shared_id) and torch.equal(weights[:, -1], torch.ones(64))
    mine = ban(logits, sglang_plugin._state["router"].specs[1], 1.0, 0.3, 0.9, k_min=1, lam=1.0, beta=0.5)
    assert torch.equal((weights[:, :k] > 0).sum(-1), mine.k)
    # A layer the plan leaves alone (none here) or an unknown layer id passes through untouched.
    assert sglang_plugin.before_post_process(topk_ids=ids, topk_weights=weights, topk_config=config,
                                             router_logits=logits, layer_id=99) is None


def test_env_and_version_checks(monkeypatch):
    assert read_env({}) is None
    settings = read_env({"BANPICK_PROFILE": "/b", "BANPICK_METHOD": "ban", "BANPICK_PARAMS": '{"lam": 0.5}'})
    assert (settings.profile, settings.method, settings.domain, settings.params) == ("/b", "ban", None, {"lam": 0.5})
    with pytest.raises(EngineUnsupported, match="BANPICK_PARAMS is not JSON"):
        read_env({"BANPICK_PROFILE": "/b", "BANPICK_PARAMS": "lam=0.5"})
    with pytest.raises(EngineUnsupported, match="BANPICK_OVERFLOW"):
        read_env({"BANPICK_PROFILE": "/b", "BANPICK_OVERFLOW": "drop"})
    supported = ((0, 23), (0, 27))
    check_version("vLLM", "0.26.1", supported, environ={})
    with pytest.raises(EngineUnsupported, match=r"vLLM >=0.23,<0.27, found 0.13.0"):
        check_version("vLLM", "0.13.0", supported, environ={})
    check_version("vLLM", "0.30.0", supported, environ={"BANPICK_ALLOW_UNTESTED_ENGINE": "1"})
    monkeypatch.delenv("BANPICK_PROFILE", raising=False)
    vllm_plugin.register()  # inert without a profile: vLLM is not even imported
    sglang_plugin.register()
    assert "vllm" not in sys.modules and "sglang" not in sys.modules


def test_entry_points_are_declared_and_resolve():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]
    assert points["vllm.general_plugins"]["banpick"] == "banpick_cli.runtime.vllm_plugin:register"
    assert points["sglang.srt.plugins"]["banpick"] == "banpick_cli.runtime.sglang_plugin:register"
    assert callable(vllm_plugin.register) and callable(sglang_plugin.register)
    assert set(methods_mod.names(lambda m: m.engines)) == {"baseline", "ban", "pick", "banpick", "dynamic", "fixed-k"}


def test_plugins_skip_a_dense_model_and_install_once(tiny_models, profile_env):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]))
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    profile_env(loaded, "ban")
    assert vllm_plugin.install(llama) is None  # e.g. a speculative draft model in the same process
    assert sglang_plugin.install(llama) is None
    k = loaded.routing.top_k
    model = engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), f"model.layers.{layer.layer_index}.mlp.experts"))
    first = vllm_plugin.install(model)
    assert vllm_plugin.install(model) is first


def test_vllm_routing_traces_under_torch_compile_with_static_shapes(tiny_models, profile_env):
    """vLLM's CPU path lets torch.compile trace the router (its default mode): the plugin's routing,
    self-check included, must trace in one graph (an opaque op) and give the eager result."""
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    k = loaded.routing.top_k
    profile_env(loaded, "ban")
    model = engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), f"model.layers.{layer.layer_index}.mlp.experts"))
    router = vllm_plugin.install(model)
    engine_router = loaded.layers[0].block.experts_runner.router
    logits = _logits(loaded, dtype=torch.float32)
    hidden = torch.randn(logits.shape[0], 32)
    torch._dynamo.reset()
    compiled = torch.compile(engine_router.select_experts, backend="aot_eager", fullgraph=True, dynamic=True)
    weights, ids = compiled(hidden, logits)  # the first call runs the self-check inside the op
    assert not router.needs_check(loaded.identity.moe_layers[0])
    eager_w, eager_ids = engine_router.select_experts(hidden, logits)
    assert torch.equal(ids, eager_ids) and torch.equal(weights, eager_w)
    assert int((weights == 0).sum()) > 0  # Ban pruned, through the compiled graph
    more = _logits(loaded, tokens=17, dtype=torch.float32, seed=3)  # another token count, same graph
    w17, _ = compiled(torch.randn(17, 32), more)
    assert w17.shape == (17, k)


def test_vllm_sentinel_ids_are_opt_in_refused_off_triton_and_mark_exactly_the_pruned_slots(tiny_models, profile_env, caplog):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    k = loaded.routing.top_k
    profile_env(loaded, "ban", BANPICK_PRUNED_SLOTS="sentinel")
    model = engine_model(loaded, lambda layer: Runner(VllmLikeRouter(k, True), f"model.layers.{layer.layer_index}.mlp.experts"))
    with caplog.at_level("WARNING", logger="banpick"):
        router = vllm_plugin.install(model)
    assert not router.sentinel and "BANPICK_PRUNED_SLOTS=sentinel refused" in caplog.text
    engine_router = loaded.layers[0].block.experts_runner.router
    logits = _logits(loaded, dtype=torch.float32)
    safe_w, safe_ids = engine_router.select_experts(torch.zeros(64, 32), logits)
    assert int(safe_ids.min()) >= 0
    router.sentinel = True  # what install sets where vLLM's Triton experts skip -1 (a GPU; read, not run)
    w, ids = engine_router.select_experts(torch.zeros(64, 32), logits)
    assert torch.equal(w, safe_w) and int((w == 0).sum()) > 0
    assert torch.equal(ids, torch.where(safe_w > 0, safe_ids, -1))  # -1 exactly where the weight is 0


def test_vllm_triton_sentinel_check_reads_the_two_places_that_must_skip():
    kernel = "    if off_experts == -1:\n        write_zeros_to_output()\n        return\n"
    guarded = ("    def moe_sum(self, input, output, topk_ids=None, expert_map=None):\n        if expert_map is not None:\n"
               "            ops.moe_sum(input, output, topk_ids, expert_map)\n        else:\n            ops.moe_sum(input, output)\n")
    assert "only under expert parallelism" in vllm_plugin.triton_sentinel_refusal(kernel, guarded)  # vLLM 0.32
    always = "    def moe_sum(self, input, output, topk_ids=None, expert_map=None):\n        ops.moe_sum(input, output, topk_ids, expert_map)\n"
    assert vllm_plugin.triton_sentinel_refusal(kernel, always) is None
    assert "does not pass topk_ids" in vllm_plugin.triton_sentinel_refusal(kernel, "ops.moe_sum(input, output)")
    assert "zero-write" in vllm_plugin.triton_sentinel_refusal("if off_experts < 0: pass", always)


def test_sglang_says_in_one_line_that_pruned_slots_are_computed(monkeypatch):
    assert "pruned slots are computed at weight 0" in sglang_plugin.pruned_line()
    monkeypatch.setenv("BANPICK_PRUNED_SLOTS", "sentinel")
    assert "BANPICK_PRUNED_SLOTS=sentinel refused: pruned slots are computed" in sglang_plugin.pruned_line()
    monkeypatch.setenv("BANPICK_PRUNED_SLOTS", "skip")
    with pytest.raises(EngineUnsupported, match="expected auto, compute or sentinel"):
        sglang_plugin.pruned_line()
