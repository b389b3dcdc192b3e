"""banpick's vLLM plugin inside a real vLLM (`make test-engines`; skipped where vllm is not installed).

vLLM's PyPI wheel is a CUDA build and this machine has no GPU, so the test process runs vLLM's own
code on a CPU test platform and stubs only what needs CUDA:

- `CpuTestPlatform`: an out-of-tree platform (device "cpu", gloo) so vLLM builds its configs and
  model; it names an attention backend that is built and never run [CUDA-only: attention kernels].
- `select_unquantized_moe_backend` returns vLLM's "OOT" backend (no kernel is built: the Triton
  experts kernels are CUDA-only and routing never reaches them) with the experts class vLLM's CUDA
  oracle picks for `--moe-backend triton` (TritonExperts), so `quant_method.is_monolithic` answers
  as it does on a GPU [CUDA-only: fused experts kernels].
- `vllm_topk_softmax`: vLLM's `_moe_C.topk_softmax` CUDA kernel, absent here, replaced by its torch
  contract (softmax, top-k, optional renormalisation) [CUDA-only: reached only by the engine's stock
  routing, which the plugin's load-time self-check compares with banpick's].

Everything else is vLLM's: EngineArgs and its config, plugin loading through the entry point of the
installed banpick wheel, the default loader building Qwen3MoeForCausalLM from banpick_cli/artifacts/demo-moe,
MoERunner/FusedTopKRouter.select_experts, the routed-experts capturer and the server's numpy2base64.
"""

from __future__ import annotations

import json
import os
import shlex

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import vllm.platforms  # noqa: E402
from vllm.platforms.interface import Platform, PlatformEnum  # noqa: E402

from engine_helpers import DEMO, demo_profile  # noqa: E402


class CpuTestPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    dispatch_key = "CPU"
    dist_backend = "gloo"

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        return "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend"  # built, never run


vllm.platforms.current_platform = CpuTestPlatform()

from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as _unquantized  # noqa: E402
from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend, backend_to_kernel_cls  # noqa: E402
from vllm.model_executor.layers.fused_moe.router import fused_topk_router  # noqa: E402

TRITON_EXPERTS = backend_to_kernel_cls(UnquantizedMoeBackend.TRITON)[0]


def _oot_with_triton_experts(moe_config):
    return UnquantizedMoeBackend.OOT, TRITON_EXPERTS


def _topk_softmax_reference(topk_weights, topk_indices, token_expert_indices, gating_output, renormalize=False):
    weights, ids = torch.topk(torch.softmax(gating_output.float(), dim=-1), topk_weights.shape[1], dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    topk_weights.copy_(weights)
    topk_indices.copy_(ids.to(topk_indices.dtype))
    return topk_weights, topk_indices


_unquantized.select_unquantized_moe_backend = _oot_with_triton_experts  # CUDA-only kernels: see the docstring
fused_topk_router.vllm_topk_softmax = _topk_softmax_reference  # CUDA-only kernel: see the docstring

from banpick_cli.routing import ban  # noqa: E402
from banpick_cli.runtime import vllm_plugin  # noqa: E402
from banpick_cli.runtime.engine import EngineUnsupported  # noqa: E402

ENGINE_ARGS = dict(model=str(DEMO), dtype="float32", enforce_eager=True, max_model_len=128, moe_backend="triton")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """vLLM's config for the demo model, plugins loaded by vLLM with BANPICK_PROFILE set, one TP rank."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs

    profile = demo_profile(tmp_path_factory.mktemp("vllm") / "ban.safetensors")
    os.environ.update(BANPICK_PROFILE=str(profile), BANPICK_METHOD="ban")
    config = EngineArgs(**ENGINE_ARGS).create_engine_config()  # calls load_general_plugins()
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method="tcp://127.0.0.1:29571",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
    return config


def load(config):
    """The demo model as vLLM's own loader builds it (the plugin installs inside load_model)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    config.compilation_config.static_forward_context.clear()  # one model per process in a server; several here
    with set_current_vllm_config(config):
        return get_model_loader(config.load_config).load_model(vllm_config=config, model_config=config.model_config)


def runners(model):
    return {int(m.layer_name.split(".")[2]): m for _, m in model.named_modules()
            if hasattr(m, "router") and isinstance(getattr(m, "layer_name", None), str)}


def test_the_entry_point_arms_the_plugin_on_every_loader(engine):
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    assert vllm.__version__ in ("0.26.0", "0.33.0") or os.environ.get("BANPICK_ALLOW_UNTESTED_ENGINE") == "1"
    assert vllm_plugin._armed
    for cls in (BaseModelLoader, DefaultModelLoader):
        assert getattr(cls.load_model, "_banpick_wrapped", False), cls


def test_vllms_loader_builds_the_demo_model_and_the_plugin_shadows_every_router(engine):
    model = load(engine)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    router = model._banpick_router  # installed by the wrapped load_model; the fingerprint matched
    found = runners(model)
    assert sorted(found) == [0, 1, 2, 3] and router.changed == {0, 1, 2, 3}
    for runner in found.values():
        assert type(runner).__name__ == "MoERunner" and type(runner.router).__name__ == "FusedTopKRouter"
        assert runner.routed_experts.quant_method.is_monolithic is False
        assert getattr(runner.router.__dict__["_compute_routing"], "_banpick_wrapped", False)


def test_vllms_select_experts_routes_ban(engine):
    model = load(engine)
    router = model._banpick_router
    spec = router.specs[0]
    e, k = spec.num_experts, spec.top_k
    sensitivity = torch.linspace(0.0, 1.0, 4)
    gen = torch.Generator().manual_seed(0)
    for index, runner in sorted(runners(model).items()):
        logits = torch.randn(96, e, generator=gen) * 2
        hidden = torch.randn(96, 128, generator=gen)
        weights, ids = runner.router.select_experts(hidden, logits)
        assert weights.shape == ids.shape == (96, k) and weights.dtype == torch.float32 and ids.dtype == torch.int32
        assert int(ids.min()) >= 0 and int(ids.max()) < e  # no sentinel reaches the experts kernel
        mine = ban(logits, spec, float(sensitivity[index]), 0.35, 0.95, k_min=2, lam=0.7, beta=0.5)
        live = weights > 0
        assert torch.equal(live.sum(-1), mine.k) and int(mine.k.min()) < k  # Ban prunes, per token
        assert torch.equal(torch.where(live, ids.long(), -1), torch.where(mine.indices < e, mine.indices, -1))
        torch.testing.assert_close(weights[live], mine.weights.float()[mine.indices < e])
        # A pruned slot repeats the token's first expert with weight 0.
        assert torch.equal(ids.long()[~live], ids.long()[:, :1].expand_as(ids)[~live])


def test_a_monolithic_kernel_or_an_unknown_one_is_refused(engine, monkeypatch):
    from vllm.model_executor.layers.fused_moe.experts.trtllm_bf16_moe import TrtLlmBf16ExpertsMonolithic

    profile = os.environ["BANPICK_PROFILE"]
    monkeypatch.delenv("BANPICK_PROFILE")
    model = load(engine)  # plugin inert
    assert getattr(model, "_banpick_router", None) is None
    monkeypatch.setenv("BANPICK_PROFILE", profile)
    for runner in runners(model).values():
        runner.routed_experts.quant_method.experts_cls = TrtLlmBf16ExpertsMonolithic  # --moe-backend flashinfer_trtllm
    with pytest.raises(EngineUnsupported, match="monolithic MoE kernel"):
        vllm_plugin.install(model)
    for runner in runners(model).values():
        runner.routed_experts.quant_method.experts_cls = None  # no kernel chosen: vLLM's property raises
    with pytest.raises(EngineUnsupported, match="cannot tell"):
        vllm_plugin.install(model)


def test_vllms_argument_parser_accepts_every_flag_a_bundle_writes(engine, tmp_path, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser  # 0.33
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser  # 0.26

    from banpick_cli.export.writer import export_bundle
    from banpick_cli.export.snippets import engine_flags, serve_command

    profile = os.environ["BANPICK_PROFILE"]
    parser = make_arg_parser(FlexibleArgumentParser())
    manifests = [export_bundle(profile, "vllm", tmp_path / "ban", method="ban").manifest]
    # Pick C on a widened engine: every flag export can write (--hf-overrides, --enforce-eager).
    wide = dict(manifests[0], engine_slots=10, served={"pick/x": {"method": "pick", "hyperparameters": {"strategy": "C"}}})
    manifests.append(wide)
    for manifest in manifests:
        command = shlex.split(serve_command(manifest))
        assert command[:3] == ["vllm", "serve", manifest["model"]["serve_as"]]
        args = parser.parse_args(["--model", str(DEMO), *command[3:]])
        assert args.moe_backend == "triton"
        engine_args = EngineArgs.from_cli_args(args)
        if manifest is wide:
            assert engine_args.enforce_eager and engine_args.hf_overrides == {"num_experts_per_tok": 10}
            assert set(engine_flags(manifest)) == {"--moe-backend triton", "--enforce-eager",
                                                   "--hf-overrides '{\"num_experts_per_tok\": 10}'"}


def test_the_routed_experts_capturer_and_server_encoding_give_what_banpick_routed(engine, tmp_path):
    from vllm.forward_context import set_forward_context

    model = load(engine)
    snapshot = _bind_capturer(model, engine)
    gen = torch.Generator().manual_seed(1)
    tokens = 40
    routed, logits_of = {}, {}
    with set_forward_context(None, engine, num_tokens=tokens):
        for index, runner in sorted(runners(model).items()):
            logits_of[index] = logits = torch.randn(tokens, 32, generator=gen) * 2
            routed[index] = runner.router.select_experts(torch.zeros(tokens, 128), logits)
    array = snapshot(tokens)  # [tokens, layers, top_k], uint8
    assert array.shape == (tokens, 4, 8) and array.dtype.name == "uint8"
    spec = model._banpick_router.specs[0]
    for index, (weights, ids) in routed.items():
        assert (array[:, index] == ids.numpy()).all()  # the capturer sees what the router returned, pruned slots too
        # ... and that is Ban's routing, not vLLM's own top-8: per token, the captured set of experts is
        # Ban's kept experts (a pruned slot repeats one of them), fewer than 8 for some tokens.
        mine = ban(logits_of[index], spec, float(torch.linspace(0.0, 1.0, 4)[index]), 0.35, 0.95, k_min=2, lam=0.7, beta=0.5)
        captured = [set(row.tolist()) for row in array[:, index]]
        assert captured == [set(row[row < spec.num_experts].tolist()) for row in mine.indices]
        assert min(len(c) for c in captured) < 8
    # What the OpenAI server returns per choice since vLLM 0.26: base64 of the .npy bytes.
    numpy2base64 = _server_encoding()
    response = {"id": "cmpl-1", "object": "text_completion", "choices": [
        {"index": 0, "text": "...", "routed_experts": numpy2base64(array[: tokens - 1])}]}
    path = tmp_path / "responses.jsonl"
    path.write_text(json.dumps(response) + "\n")
    live = {index: (w[: tokens - 1] > 0) for index, (w, _) in routed.items()}
    expected = torch.zeros(4, 32, dtype=torch.int64)
    for index, (_, ids) in routed.items():
        expected[index].scatter_add_(0, ids[: tokens - 1].long()[live[index]], torch.ones(int(live[index].sum()), dtype=torch.int64))
    _check_import(path, expected, tokens - 1)


def _bind_capturer(model, config):
    """Binds vLLM's RoutedExpertsCapturer to the model's routers as the worker does; returns
    tokens -> the [tokens, layers, top_k] ids the scheduler hands the server (uint8 for <= 256 experts)."""
    from vllm.model_executor.layers.fused_moe import routed_experts_capturer as rec

    capturer = rec.RoutedExpertsCapturer(64, config)
    if hasattr(rec, "bind_routed_experts_capturer"):  # 0.28+
        rec.bind_routed_experts_capturer(model, capturer)
        return lambda tokens: capturer.snapshot_routing_data(tokens).numpy()
    # 0.26/0.27: GPUModelRunner binds it; the int32 device buffer is narrowed by RoutedExpertsManager.store_batch.
    from types import SimpleNamespace

    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    GPUModelRunner._bind_routed_experts_capturer(SimpleNamespace(model=model), capturer)
    return lambda tokens: capturer.get_device_buffer()[:tokens].numpy().astype(np.uint8)


def _server_encoding():
    """Returns how this vLLM's OpenAI server encodes routed_experts: `numpy2base64` (0.28+), or the same
    np.save + base64 written inline in completion/serving.py and chat_completion/serving.py (0.26, 0.27)."""
    try:
        from vllm.utils.serial_utils import numpy2base64
    except ImportError:
        import base64
        import inspect
        import io

        import numpy as np
        from vllm.entrypoints.openai.completion import serving

        assert "np.save(buf, output.routed_experts)" in inspect.getsource(serving)

        def numpy2base64(array):
            buf = io.BytesIO()
            np.save(buf, array)
            return base64.b64encode(buf.getvalue()).decode("ascii")
    return numpy2base64


def _check_import(path, expected, tokens):
    """import-usage reads the response back to exactly the (token, expert) pairs banpick routed."""
    from banpick_cli.models.loading import ModelIdentity  # noqa: F401  (the identity comes from the profile)
    from banpick_cli.profile.format import read_profile

    identity = read_profile(os.environ["BANPICK_PROFILE"]).model
    reader = _vllm_reader()
    usage = reader([str(path)], identity)
    assert torch.equal(usage.expert_counts, expected)
    assert usage.token_counts.tolist() == [tokens] * 4


def _vllm_reader():
    try:
        from banpick_cli.stages.import_usage import read_vllm
    except ImportError:
        from banpick_cli.calibrate.serving import read_vllm
    return read_vllm
