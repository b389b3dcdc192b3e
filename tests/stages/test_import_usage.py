"""`banpick import-usage`: profiles from SGLang and vLLM dumps, built here in those engines' exact formats."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from banpick_cli.stages.import_usage import ImportSettings, model_identity, read_sglang, read_vllm, run_import
from banpick_cli.cli.app import app
from banpick_cli.errors import BadSetting, DataError
from banpick_cli.models import RoutingHooks
from banpick_cli.models.loading import load_model
from banpick_cli.profile import read_profile
from tiny import FAMILIES

TEXTS = ["the quick brown fox jumps", "def add(x, y): return x + y", "12 + 35 = 47", "lazy dog and more words"]
runner = CliRunner()


@pytest.fixture(scope="module")
def served(tiny_models):
    """What a serving engine would record for TEXTS on the tiny DeepSeek-V2 (dense layer 0, MoE layers 1-2):
    per text, the routed expert ids [tokens, decoder layers, top_k] (dense rows zero, as vLLM's buffer)."""
    path = str(tiny_models["deepseek_v2"])
    loaded = load_model(path, device="cpu")
    L, K, E = loaded.identity.num_layers, loaded.routing.top_k, loaded.routing.num_experts
    per_text, expected = [], torch.zeros(len(loaded.layers), E, dtype=torch.int64)
    for text in TEXTS:
        ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
        routed = torch.zeros(ids.shape[1], L, K, dtype=torch.int32)

        def record(position, logits, weights, indices, routed=routed):
            routed[:, loaded.layers[position].layer_index] = indices.int()
            expected[position] += torch.bincount(indices.reshape(-1), minlength=E)

        with torch.inference_mode(), RoutingHooks(loaded.layers, E, observers=[record]):
            loaded.model(ids)
        per_text.append(routed)
    return path, loaded, per_text, expected


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_and_fingerprint_without_loading_weights(tiny_models, family):
    loaded = load_model(str(tiny_models[family]), device="cpu")
    identity, fingerprint, _ = model_identity(str(tiny_models[family]))
    assert identity == loaded.identity
    assert fingerprint == loaded.fingerprint


def test_vllm_arrays_and_openai_responses(served, tmp_path):
    path, loaded, per_text, expected = served
    # Offline API: CompletionOutput.routed_experts saved with np.savez, one array per request.
    np.savez(tmp_path / "offline.npz", *[r.numpy() for r in per_text[:2]])
    # OpenAI server: prompt_routed_experts at the response level, routed_experts per choice (MoE layers only).
    moe = list(loaded.identity.moe_layers)
    lines = []
    for r in per_text[2:]:
        split = r.shape[0] - 2
        lines.append({"id": "cmpl-1", "prompt_routed_experts": r[:split, moe].tolist(),
                      "choices": [{"index": 0, "text": "..", "routed_experts": r[split:, moe].tolist()}]})
    (tmp_path / "server.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    usage = read_vllm([str(tmp_path / "offline.npz"), str(tmp_path / "server.jsonl")], loaded.identity)
    assert torch.equal(usage.expert_counts, expected)
    tokens = sum(r.shape[0] for r in per_text)
    assert usage.token_counts.tolist() == [tokens] * 2 and usage.tokens_exact
    assert usage.expert_counts.sum(-1).tolist() == [tokens * loaded.routing.top_k] * 2


def test_sglang_stat_per_pass_and_per_token_with_eplb_replicas(served, tmp_path):
    path, loaded, per_text, expected = served
    L, E = loaded.identity.num_layers, loaded.routing.num_experts
    counts = [torch.stack([torch.bincount(r[:, layer].reshape(-1).long(), minlength=E) if layer in loaded.identity.moe_layers
                           else torch.zeros(E, dtype=torch.int64) for layer in range(L)]) for r in per_text]  # per pass [L, E]
    # stat mode: logical_count [passes, layers, logical experts], in a circular buffer with empty rows.
    stat = torch.zeros(8, L, E, dtype=torch.int32)
    for i, c in enumerate(counts):
        stat[i] = c.int()
    torch.save({"rank": 0, "logical_count": stat, "average_utilization_rate_over_window": None},
               tmp_path / "expert_distribution_recorder_1700000000.0.pt")
    usage = read_sglang([str(tmp_path)], loaded.identity)
    assert torch.equal(usage.expert_counts, expected) and usage.sequences == len(per_text) and not usage.tokens_exact
    assert usage.token_counts.tolist() == [sum(r.shape[0] for r in per_text)] * 2

    # per_pass mode with EPLB: experts 0 and 5 have a second physical replica (physical ids 8 and 9).
    mapping = torch.cat([torch.arange(E), torch.tensor([0, 5])]).expand(L, -1).contiguous()
    records = []
    for i, c in enumerate(counts):
        physical = torch.zeros(L, E + 2, dtype=torch.int32)
        physical[:, :E] = c.int()
        for replica, expert in ((E, 0), (E + 1, 5)):  # send a third of each replicated expert's tokens to its copy
            moved = physical[:, expert] // 3
            physical[:, expert] -= moved
            physical[:, replica] += moved
        record = {"forward_pass_id": i, "rank": 0, "gatherer_key": "primary", "global_physical_count": physical}
        records.append(record)
    torch.save({"records": records, "last_physical_to_logical_map": mapping}, tmp_path / "pp.pt")
    assert torch.equal(read_sglang([str(tmp_path / "pp.pt")], loaded.identity).expert_counts, expected)

    # per_token mode: the records also carry input_ids, so token counts are exact; two TP ranks saw the same tokens.
    for rank in range(2):
        recs = [{**rec, "input_ids": list(range(r.shape[0])), "positions": list(range(r.shape[0])),
                 "extend_seq_lens": [r.shape[0]], "forward_mode": 1, "topk_ids_of_layer": torch.full((L, r.shape[0], 8), -1),
                 "misc_objects": [], "rank": rank} for rec, r in zip(records, per_text)]
        torch.save({"records": recs, "last_physical_to_logical_map": mapping}, tmp_path / f"pt_{rank}.pt")
    usage = read_sglang([str(tmp_path / "pt_0.pt"), str(tmp_path / "pt_1.pt")], loaded.identity, replicas=2)
    assert torch.equal(usage.expert_counts, expected) and usage.tokens_exact
    assert usage.token_counts.tolist() == [sum(r.shape[0] for r in per_text)] * 2


def test_dumps_of_another_model_are_refused(served, tmp_path):
    path, loaded, per_text, _ = served
    np.save(tmp_path / "k.npy", per_text[0][:, :, :2].numpy())
    with pytest.raises(DataError, match="top-2 experts per token"):
        read_vllm([str(tmp_path / "k.npy")], loaded.identity)
    np.save(tmp_path / "l.npy", torch.zeros(3, 5, loaded.routing.top_k, dtype=torch.int32).numpy())
    with pytest.raises(DataError, match="5 layers in the dump"):
        read_vllm([str(tmp_path / "l.npy")], loaded.identity)
    fused = torch.zeros(1, loaded.identity.num_layers, loaded.routing.num_experts + 1, dtype=torch.int32)
    torch.save({"rank": 0, "logical_count": fused}, tmp_path / "fused.pt")
    with pytest.raises(DataError, match="disable-shared-experts-fusion"):
        read_sglang([str(tmp_path / "fused.pt")], loaded.identity)
    with pytest.raises(BadSetting, match="--from"):
        ImportSettings(engine="trt", domain="x", files=("a",))


def test_import_usage_command_writes_a_profile(served, tmp_path):
    path, loaded, per_text, expected = served
    np.savez(tmp_path / "traffic.npz", *[r.numpy() for r in per_text])
    out = tmp_path / "prod.safetensors"
    result = runner.invoke(app, ["import-usage", str(tmp_path / "traffic.npz"), "--from", "vllm", "--model", path,
                                 "--domain", "prod-chat", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    prof = read_profile(out, fingerprint=loaded.fingerprint)
    assert torch.equal(prof.get("domain/prod-chat/expert_counts"), expected)
    assert summary["sequences"] == len(per_text) and prof.provenance["profile/prod-chat"]["stage"] == "import-usage"
    # A second import updates the same profile in place.
    run_import(ImportSettings(engine="vllm", domain="other", files=(str(tmp_path / "traffic.npz"),)), model=path, out=out)
    assert read_profile(out).domains() == ["other", "prod-chat"]


# --- vLLM's OpenAI server since 0.26: routed_experts as base64 .npy ---------------------------------------
def numpy2base64(array: np.ndarray) -> str:
    """What vLLM's server sends per choice (`vllm/utils/serial_utils.py` numpy2base64 since 0.28; the same
    np.save + base64 inline in 0.26/0.27's completion and chat serving)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _counts(arrays, moe_rows, experts):
    """Returns expected [moe layers, E] counts of (token, expert) pairs, each pair once."""
    out = torch.zeros(len(moe_rows), experts, dtype=torch.int64)
    for a in arrays:
        for position, row in enumerate(moe_rows):
            for token in torch.as_tensor(a[:, row]).long():
                out[position, token.unique()] += 1
    return out


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32"])
def test_vllm_server_base64_npy_in_completion_and_chat_responses(served, tmp_path, dtype):
    path, loaded, per_text, _ = served
    moe, E = list(loaded.identity.moe_layers), loaded.routing.num_experts
    # The server returns [tokens - 1, MoE layers, top_k]: the last sampled token was never forwarded.
    arrays = [r[:-1, moe].numpy().astype(dtype) for r in per_text]
    completion = {"id": "cmpl-1", "object": "text_completion", "model": path,
                  "choices": [{"index": 0, "text": "..", "finish_reason": "length", "routed_experts": numpy2base64(arrays[0])}]}
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "model": path,
            "choices": [{"index": i, "message": {"role": "assistant", "content": ".."}, "finish_reason": "stop",
                         "routed_experts": numpy2base64(a)} for i, a in enumerate(arrays[1:3])]}
    (tmp_path / "server.jsonl").write_text(json.dumps(completion) + "\n\n" + json.dumps(chat) + "\n")
    (tmp_path / "one.json").write_text(json.dumps({**completion, "choices": [
        {**completion["choices"][0], "routed_experts": numpy2base64(arrays[3])}]}))
    usage = read_vllm([str(tmp_path / "server.jsonl"), str(tmp_path / "one.json")], loaded.identity)
    assert torch.equal(usage.expert_counts, _counts(arrays, range(len(moe)), E))
    assert usage.token_counts.tolist() == [sum(len(a) for a in arrays)] * len(moe) and usage.tokens_exact
    assert usage.sequences == 4 and usage.notes == []


def test_vllm_nested_lists_of_older_servers(served, tmp_path):
    """vLLM 0.21-0.25: int lists, prompt_routed_experts per response and routed_experts per choice; a .json list."""
    path, loaded, per_text, _ = served
    moe, E = list(loaded.identity.moe_layers), loaded.routing.num_experts
    responses = [{"id": f"cmpl-{i}", "prompt_routed_experts": r[:3, moe].tolist(),
                  "choices": [{"index": 0, "text": "..", "routed_experts": r[3:, moe].tolist()}]} for i, r in enumerate(per_text)]
    (tmp_path / "responses.json").write_text(json.dumps(responses))
    usage = read_vllm([str(tmp_path / "responses.json")], loaded.identity)
    assert torch.equal(usage.expert_counts, _counts([r[:, moe] for r in per_text], range(len(moe)), E))
    assert usage.token_counts.tolist() == [sum(r.shape[0] for r in per_text)] * len(moe)


def test_each_token_expert_pair_counts_once(served, tmp_path):
    """A banpick-routed server fills a pruned slot with the token's first expert at weight 0: counted once."""
    path, loaded, per_text, _ = served
    moe, E, K = list(loaded.identity.moe_layers), loaded.routing.num_experts, loaded.routing.top_k
    routed = per_text[0][:, moe].clone()  # [T, M, K]
    pruned = routed.clone()
    pruned[0, 0, 1:] = pruned[0, 0, :1]  # token 0 keeps one expert at the first MoE layer
    pruned[2:, 1, K - 1] = pruned[2:, 1, 0]  # from token 2 on, the second MoE layer drops its last slot
    (tmp_path / "pruned.json").write_text(json.dumps({"choices": [{"routed_experts": numpy2base64(pruned.numpy().astype("uint8"))}]}))
    usage = read_vllm([str(tmp_path / "pruned.json")], loaded.identity)
    expected = _counts([pruned], range(len(moe)), E)
    assert torch.equal(usage.expert_counts, expected)
    T = routed.shape[0]
    assert usage.expert_counts.sum(-1).tolist() == [T * K - (K - 1), T * K - (T - 2)]
    assert usage.token_counts.tolist() == [T, T]
    assert any(f"{(K - 1) + (T - 2)} repeated (token, expert) slots counted once" in n for n in usage.notes)


def test_unreadable_vllm_files_are_one_line(served, tmp_path):
    path, loaded, per_text, _ = served
    moe, K = list(loaded.identity.moe_layers), loaded.routing.top_k
    ids = per_text[0][:, moe].numpy().astype("uint8")
    cases = {
        "notjson.json": (b'{"choices": [{"routed_experts": ', "not JSON"),
        "notjson.jsonl": (b'{"choices": []}\n{oops\n', "line 2 is not JSON"),
        "binary.jsonl": (bytes(range(256)) * 4, "a binary file"),
        "latin1.jsonl": ('{"id": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8 text (byte 0xe9 at line 1)"),
        "none.json": (json.dumps({"id": "cmpl-1", "choices": [{"index": 0, "text": "hi"}]}).encode(),
                      "--enable-return-routed-experts"),
        "flat.json": (json.dumps({"choices": [{"routed_experts": numpy2base64(ids[:, 0])}]}).encode(),
                      "must be [tokens, layers, top_k], got shape"),
        "garbled.json": (json.dumps({"choices": [{"routed_experts": "bm90IGFuIG5weQ=="}]}).encode(),
                         "not base64 of a .npy array"),
        "floats.json": (json.dumps({"choices": [{"routed_experts": numpy2base64(ids.astype("float32"))}]}).encode(),
                        "float32 values"),
        "number.json": (json.dumps({"choices": [{"routed_experts": 7}]}).encode(), "routed_experts is a int"),
        "ragged.json": (json.dumps({"choices": [{"routed_experts": [[[1] * K], [[1]]]}]}).encode(), "integer arrays"),
        "bad.npy": (b"\x93NUMPY garbage", "not a readable .npy array"),
        "bad.npz": (b"PK\x03\x04 garbage", "not a readable .npz archive"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as failed:
            read_vllm([str(tmp_path / name)], loaded.identity)
        text = str(failed.value)
        assert message in text and "\n" not in text and name in text, (name, text)
    result = runner.invoke(app, ["import-usage", str(tmp_path / "binary.jsonl"), "--from", "vllm", "--model", path,
                                 "--domain", "x", "--out", str(tmp_path / "p.safetensors")])
    assert result.exit_code == 1 and "Traceback" not in result.output and "a binary file" in result.output
    assert not (tmp_path / "p.safetensors").exists()
