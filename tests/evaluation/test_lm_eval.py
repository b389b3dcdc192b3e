"""The lm-evaluation-harness adapter: a harness task run with a routing applied agrees with our scorer."""

from __future__ import annotations

import json

import pytest

from acc_helpers import ban_profile, save_tasks
from banpick_cli.evaluation.harness import EvalOptions, run_method
from banpick_cli.models.loading import load_model
from banpick_cli.tasks.registry import load_task_set
from banpick_cli.tasks.task import Task

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional (pip install 'lm-eval[hf]')")

WORDS = ["fox", "dog", "river", "stone"]


def test_harness_accuracy_and_avg_topk_match_banpick_eval(tiny_models, tmp_path):
    from lm_eval.tasks import TaskManager

    from banpick_cli.evaluation.lm_eval import BanpickLM

    model = str(tiny_models["qwen3_moe"])
    rows = [{"question": f"Question: {i} plus {i * 2}?", "choices": [WORDS[i % 4], WORDS[(i + 1) % 4], "12"],
             "label": i % 3} for i in range(6)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tiny.yaml").write_text(
        "task: banpick_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    loaded = load_model(model, device="cpu")
    ban_profile(loaded, tmp_path / "p.safetensors")
    lm = BanpickLM(pretrained=model, profile=str(tmp_path / "p.safetensors"), method="ban", lam=0.5, device="cpu")
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=["banpick_tiny_mc"], bootstrap_iters=0, log_samples=False,
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
        stats = lm.routing.stats()
    finally:
        lm.close()
    harness_acc = out["results"]["banpick_tiny_mc"]["acc,none"]
    assert stats.avg_experts_overall == 3.0  # Ban at lambda 0.5 keeps K_min = 3 of 4 on every token

    # The same questions through banpick's own log-likelihood scorer (option text as continuation).
    tasks = [Task(f"q{i}", "math", "mc", r["question"], "ABC"[r["label"]], choices=tuple(r["choices"])) for i, r in enumerate(rows)]
    task_set = load_task_set(str(save_tasks(tmp_path, tasks)))
    from banpick_cli.tasks import loglik

    ours = run_method(loaded, tmp_path / "p.safetensors", "ban", [task_set], EvalOptions(mc_scoring="loglik"),
                      overrides={"lam": 0.5})
    assert ours.avg_topk == 3.0
    from banpick_cli.runtime import apply

    with apply(loaded, tmp_path / "p.safetensors", "ban", lam=0.5):
        scored = loglik.option_logprobs(loaded.model, loaded.tokenizer, task_set.tasks, target="text")
    ours_acc = sum(loglik.best_option(s) == t.answer for s, t in zip(scored.logprobs, task_set.tasks)) / len(tasks)
    assert harness_acc == pytest.approx(ours_acc)
