"""The shipped demo model: loads offline, routes by domain, and degrades with k the way the paper's models do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from banpick_cli.demo.corpus import DOMAINS
from banpick_cli.demo.evaluate import evaluate_demo, set_top_k
from banpick_cli.paths import DEMO_DATA_DIR, DEMO_MODEL_DIR

# Per-domain max/mean expert usage must exceed this in every layer (balanced routing gives 1.0; the shipped
# model measures 1.80-2.61 on 96 calibration texts per domain).
MIN_MAX_OVER_MEAN = 1.5
# In every layer each domain has an expert it uses more than the mean, and more than this many times as often
# as the other domains do (a domain-specialised expert; the shipped model measures 1.85-8.3).
MIN_SPECIALISATION = 1.5
TASKS_PER_DOMAIN = 40


@pytest.fixture(scope="module")
def demo():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One thread: on a busy 2-core machine two OpenMP threads spin against other processes (50x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    yield model, tokenizer
    torch.set_num_threads(threads)


def test_checkpoint_loads_offline_in_a_fresh_process(tmp_path):
    # a fresh interpreter with the hub switched off and the cache pointed at an empty folder
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()), len(t))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", script, str(DEMO_MODEL_DIR)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((DEMO_MODEL_DIR / "train_report.json").read_text())
    assert out.stdout.split() == ["Qwen3MoeForCausalLM", str(report["parameters"]), str(report["vocab_size"])]


def test_checkpoint_is_the_documented_architecture(demo):
    model, tokenizer = demo
    cfg = model.config
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (32, 8, True)
    assert 4 <= cfg.num_hidden_layers <= 6 and 128 <= cfg.hidden_size <= 256
    assert cfg.router_aux_loss_coef > 0 and cfg.output_router_logits is False
    assert 1000 < len(tokenizer) == cfg.vocab_size <= 4000
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 20_000_000
    # digits are single tokens, so numbers are spelled out digit by digit
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]


def _expert_counts(model, tokenizer, texts):
    """Returns (selections per expert [layers, experts], tokens) over the real (non-pad) tokens of `texts`."""
    import torch

    layers = model.model.layers
    counts = torch.zeros(len(layers), model.config.num_experts, dtype=torch.long)  # [layers, experts]
    state = {}

    def hook(layer):
        def count(module, args, output):
            _, _, top_k_index = output  # [tokens, k]
            picked = top_k_index[state["mask"]]
            counts[layer] += torch.bincount(picked.reshape(-1), minlength=model.config.num_experts)
        return count

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        tokenizer.padding_side = "right"
        for start in range(0, len(texts), 32):
            enc = tokenizer(texts[start:start + 32], return_tensors="pt", padding=True, truncation=True,
                            max_length=128)
            state["mask"] = enc.attention_mask.reshape(-1).bool()
            with torch.no_grad():
                model(**enc)
            state["tokens"] = state.get("tokens", 0) + int(state["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
        tokenizer.padding_side = "left"
    return counts, state["tokens"]


def test_routing_specialises_by_domain(demo):
    model, tokenizer = demo
    k = model.config.num_experts_per_tok
    usage = {}
    for domain in DOMAINS:
        texts = [json.loads(line)["text"] for line in (DEMO_DATA_DIR / domain / "calib.jsonl").open()][:96]
        counts, tokens = _expert_counts(model, tokenizer, texts)
        assert counts.sum(dim=1).tolist() == [tokens * k] * len(counts)  # every layer picks k per token
        usage[domain] = counts.double() / (tokens * k)  # [layers, experts], rows sum to 1
        max_over_mean = usage[domain].max(dim=1).values * model.config.num_experts
        assert bool((max_over_mean > MIN_MAX_OVER_MEAN).all()), (domain, max_over_mean.tolist())
    for domain in DOMAINS:
        others = sum(usage[d] for d in DOMAINS if d != domain) / (len(DOMAINS) - 1)  # [layers, experts]
        ratio = usage[domain] / others.clamp_min(1e-9)
        ratio[usage[domain] <= 1.0 / model.config.num_experts] = 0.0  # only experts this domain uses often
        best = ratio.max(dim=1).values  # [layers]
        assert bool((best > MIN_SPECIALISATION).all()), (domain, best.tolist())


def test_top1_collapses_accuracy_and_top_k_minus_1_keeps_it(demo):
    model, tokenizer = demo
    k_base = model.config.num_experts_per_tok
    acc = {}
    try:
        for k in (k_base, k_base - 1, 1):
            set_top_k(model, k)
            scores = evaluate_demo(model, tokenizer, limit=TASKS_PER_DOMAIN, batch_size=40)
            acc[k] = sum(s.accuracy for s in scores.values()) / len(scores)
    finally:
        set_top_k(model, k_base)
    assert acc[k_base] >= 0.4, acc
    assert acc[1] <= acc[k_base] / 2, acc  # one expert per token is not enough
    assert abs(acc[k_base - 1] - acc[k_base]) <= 0.05, acc  # dropping the weakest expert barely matters
