"""banpick's SGLang plugin inside a real SGLang (`make test-engines`; skipped where sglang is not installed).

Nothing is stubbed: SGLang's plugin loader runs the entry point of the installed banpick wheel, its
HookRegistry patches the server's load path (ModelRunner.load_model) and `_post_process_topk_ids`,
and SGLang's own `select_experts` routes on the CPU through its torch-native top-k (TopKConfig
torch_native=True; the CUDA top-k kernels are the only part not run). The model the AFTER hook sees
is the demo model with SGLang's real TopKConfig on each MoE block; building it with SGLang's own
model classes needs CUDA kernels at construction and is left to bench/engine_e2e.py on a GPU.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
from types import SimpleNamespace

import pytest

sglang = pytest.importorskip("sglang")

import torch  # noqa: E402

from engine_helpers import DEMO, demo_profile  # noqa: E402

from banpick_cli.routing import ban  # noqa: E402
from banpick_cli.runtime import sglang_plugin  # noqa: E402


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """SGLang's own plugin loading with BANPICK_PROFILE set, as every server process does."""
    from sglang.srt.plugins import load_plugins

    profile = demo_profile(tmp_path_factory.mktemp("sglang") / "ban.safetensors")
    os.environ.update(BANPICK_PROFILE=str(profile), BANPICK_METHOD="ban")
    load_plugins()
    return profile


def test_the_entry_point_hooks_the_load_path_the_server_takes(plugins):
    from sglang.srt.layers.moe import topk
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.plugins.hook_registry import HookRegistry

    assert sglang.__version__ == "0.5.23"
    assert sglang_plugin._state["armed"] and sglang_plugin._state["problem"] is None
    assert {sglang_plugin.LOAD_TARGET, sglang_plugin.TOPK_TARGET} <= HookRegistry._patched
    # The server's model runner loads in load_model (called from its initialisation), and the hook is on it.
    assert "self.load_model()" in inspect.getsource(ModelRunner)
    # The server's load_model now carries banpick's AFTER hook (somewhere in the registry's wrapper).
    assert sglang_plugin.after_load_model in _closure_functions(ModelRunner.load_model)
    # The patched top-k post-processing runs banpick's BEFORE hook: with no model installed yet, the
    # hook refuses (a wrapper that skipped it would reach SGLang's own code instead).
    saved = sglang_plugin._state["router"]
    sglang_plugin._state["router"] = None
    try:
        with pytest.raises(sglang_plugin.EngineUnsupported, match="before the model-load hook ran"):
            topk._post_process_topk_ids(topk_ids=torch.zeros(2, 8, dtype=torch.int32), topk_weights=torch.zeros(2, 8),
                                        topk_config=None, router_logits=torch.zeros(2, 32), layer_id=0,
                                        num_token_non_padded=None, expert_location_dispatch_info=None)
    finally:
        sglang_plugin._state["router"] = saved


def _closure_functions(fn, depth: int = 6) -> list:
    """Every function reachable from `fn` through __wrapped__ and closure cells (a hook wrapper's)."""
    found, todo = [], [(fn, 0)]
    while todo:
        f, d = todo.pop()
        if f in found or d > depth:
            continue
        found.append(f)
        inner = [getattr(f, "__wrapped__", None), getattr(f, "__func__", None)]
        inner += [c.cell_contents for c in (getattr(f, "__closure__", None) or ()) if _cell_ok(c)]
        todo += [(g, d + 1) for g in inner if callable(g)]
    return found


def _cell_ok(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _demo_with_sglang_topk():
    from sglang.srt.layers.moe.topk import TopKConfig

    from banpick_cli.models.loading import load_model

    loaded = load_model(str(DEMO), device="cpu")
    for layer in loaded.layers:
        # SGLang's TopK module reads the server's published runtime config at construction; the plugin
        # reads only its `topk_config`, SGLang's real TopKConfig here.
        holder = torch.nn.Module()
        holder.topk_config = TopKConfig(top_k=8, renormalize=True)
        layer.block.add_module("topk", holder)
    return loaded


def test_the_after_hook_installs_on_the_runners_model_and_sglangs_select_experts_routes_ban(plugins):
    from sglang.srt.layers.moe.topk import TopKConfig, select_experts

    loaded = _demo_with_sglang_topk()
    runner = SimpleNamespace(model=loaded.model)  # what ModelRunner.load_model leaves behind
    assert sglang_plugin.after_load_model(None, runner) is None
    router = sglang_plugin._state["router"]
    assert router.changed == {0, 1, 2, 3} and router.slots == 8
    assert sglang_plugin.shared_slots(loaded.layers[0].block.topk.topk_config) == 0
    spec = router.specs[0]
    sensitivity = torch.linspace(0.0, 1.0, 4)
    gen = torch.Generator().manual_seed(0)
    for layer in loaded.layers:
        logits = torch.randn(64, 32, generator=gen) * 2
        config = TopKConfig(top_k=8, renormalize=True, torch_native=True)
        out = select_experts(torch.zeros(64, 128), logits, config, layer_id=layer.layer_index)
        weights, ids = out.topk_weights, out.topk_ids
        assert ids.shape == (64, 8) and int(ids.min()) >= 0 and int(ids.max()) < 32
        mine = ban(logits, spec, float(sensitivity[layer.position]), 0.35, 0.95, k_min=2, lam=0.7, beta=0.5)
        live = weights > 0
        assert torch.equal(live.sum(-1), mine.k) and int(mine.k.min()) < 8
        assert torch.equal(torch.where(live, ids.long(), -1), torch.where(mine.indices < 32, mine.indices, -1))
        torch.testing.assert_close(weights[live].float(), mine.weights.float()[mine.indices < 32])


def test_sglangs_argument_parser_accepts_every_flag_a_bundle_writes(plugins, tmp_path):
    import argparse

    from sglang.srt.server_args import ServerArgs

    from banpick_cli.export.writer import export_bundle
    from banpick_cli.export.snippets import serve_command

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    manifest = export_bundle(str(plugins), "sglang", tmp_path / "ban", method="ban").manifest
    wide = dict(manifest, engine_slots=10, served={"pick/x": {"method": "pick", "hyperparameters": {"strategy": "C"}}})
    for m in (manifest, wide):
        command = shlex.split(serve_command(m))
        assert command[:3] == ["python", "-m", "sglang.launch_server"]
        args = parser.parse_args(command[3:])
        assert args.moe_runner_backend == "triton"
        if m is wide:
            assert json.loads(args.json_model_override_args) == {"num_experts_per_tok": 10}


def test_an_sglang_whose_load_path_differs_fails_at_start_in_one_line(plugins, monkeypatch):
    from sglang.srt.model_executor.model_runner import ModelRunner

    def load_model(self):  # a load path that keeps the model elsewhere
        self._model = None

    monkeypatch.setattr(ModelRunner, "load_model", load_model)
    monkeypatch.setitem(sglang_plugin._state, "armed", False)
    with pytest.raises(SystemExit) as exit_info:
        sglang_plugin.register()
    message = str(exit_info.value)
    assert "\n" not in message and "no longer sets self.model" in message and "not supported" in message


def test_sglangs_expert_distribution_recorder_dump_imports_back_exactly(plugins, tmp_path, monkeypatch):
    """The `stat` recorder as SGLang runs it: its select-experts gatherer counts SGLang's own top-k per layer and
    pass, its circular buffer (default size) holds the passes, its conversion makes `logical_count`, and its
    `_dump_to_file` writes the .pt; `import-usage --from sglang` reads back exactly those counts."""
    from sglang.srt.eplb import expert_distribution as recorder
    from sglang.srt.layers.moe.topk import TopKConfig, select_experts

    from banpick_cli.profile.format import read_profile
    from banpick_cli.stages.import_usage import read_sglang

    monkeypatch.setattr(recorder, "get_device", lambda: "cpu")  # CUDA-only: the device of the gatherer's buffer
    # A server recording traffic for import-usage runs without a banpick profile: every layer keeps its routing.
    monkeypatch.setitem(sglang_plugin._state, "router", SimpleNamespace(changes=lambda layer: False))
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    identity = read_profile(plugins).model
    L, E, K = identity.num_layers, identity.num_experts, identity.k_base
    meta = SimpleNamespace(num_layers=L, num_physical_experts=E, num_local_physical_experts=E)
    gatherer = recorder._SelectExpertsSinglePassGatherer(meta, 0)
    buffered = recorder._Buffer.init_new(item_shape=(L, E), buffer_size=1000, dtype=torch.int32, device="cpu")
    config = TopKConfig(top_k=K, renormalize=True, torch_native=True)
    gen = torch.Generator().manual_seed(3)
    expected = torch.zeros(L, E, dtype=torch.int64)
    passes = (23, 1, 1, 9)  # a prefill, two decode steps, a mixed batch
    for tokens in passes:
        gatherer.reset()
        for layer in range(L):
            out = select_experts(torch.zeros(tokens, 128), torch.randn(tokens, E, generator=gen) * 2, config, layer_id=layer)
            gatherer.on_select_experts(layer, out.topk_ids)
            expected[layer] += torch.bincount(out.topk_ids.reshape(-1).long(), minlength=E)
        buffered.append(gatherer.collect()["global_physical_count"])
    logical = recorder._convert_global_physical_count_to_logical_count(
        buffered.get_all(), num_layers=L, num_logical_experts=E, physical_to_logical_map=torch.arange(E).expand(L, -1))
    recorder._dump_to_file("expert_distribution_recorder_1.pt",
                           dict(rank=0, logical_count=logical, average_utilization_rate_over_window=None))
    usage = read_sglang([str(tmp_path)], identity)
    assert torch.equal(usage.expert_counts, expected) and int(expected.sum()) == sum(passes) * K * L
    assert usage.sequences == len(passes) and not usage.tokens_exact
    assert usage.token_counts.tolist() == [sum(passes)] * L and usage.notes == []
