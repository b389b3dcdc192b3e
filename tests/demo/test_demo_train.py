"""Training the demo model end to end on a tiny configuration: it saves a loadable, reproducible checkpoint."""

from __future__ import annotations

import pytest

from banpick_cli.demo.train import TrainConfig, train_demo_model
from banpick_cli.errors import BadSetting

TINY = dict(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, num_experts=4, top_k=2, expert_size=16,
            vocab_size=600, steps=3, seq_len=32, batch_size=6, warmup_steps=1, tokenizer_docs=100, log_every=1,
            threads=1)


def test_tiny_training_run_saves_a_reproducible_checkpoint(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    events = []
    report = train_demo_model(TrainConfig(**TINY), tmp_path / "a", progress=events.append)
    assert (report.steps, report.tokens) == (3, 3 * 6 * 32)
    assert [step for step, _ in report.loss_curve] == [1, 2, 3]
    assert [e.done for e in events if e.task == "train"] == [1, 2, 3]
    assert set(report.eval_loss) == {"math", "code", "general"} and report.final_aux_loss > 0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert model.config.num_experts_per_tok == 2 and model.config.vocab_size == len(tokenizer) == report.vocab_size
    assert report.parameters == sum(p.numel() for p in model.parameters())
    ids = tokenizer("Question: What is 2 + 3?\nAnswer:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3) or int(out[0, -1]) == tokenizer.eos_token_id

    train_demo_model(TrainConfig(**TINY), tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad, message", [
    (dict(top_k=40), "top_k"), (dict(batch_size=10), "batch_size"), (dict(task_fraction=1.5), "task_fraction"),
    (dict(lr=-1.0), "lr"), (dict(steps=0), "steps"),
])
def test_train_config_rejects_bad_values(bad, message):
    with pytest.raises(BadSetting, match=message):
        TrainConfig(**bad)
