"""Baseline accuracy of a demo-domain model on the shipped held-out tasks, per domain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from banpick_cli.demo.corpus import DOMAINS
from banpick_cli.paths import DEMO_DATA_DIR
from banpick_cli.progress import ProgressFn, silent
from banpick_cli.evaluation.generate import TaskOutcome, accuracy, evaluate_tasks
from banpick_cli.tasks.registry import REGISTRY
from banpick_cli.tasks.task import load_tasks

# The demo's answer lengths live with its task sets in the task registry.
MAX_NEW_TOKENS = {domain: REGISTRY[domain].max_new_tokens for domain in ("math", "code", "general")}


@dataclass(frozen=True)
class DomainScore:
    """Accuracy of one domain's tasks, overall and per generator form."""

    domain: str
    tasks: int
    accuracy: float
    by_form: dict[str, tuple[int, int]]  # form -> (correct, total)
    outcomes: tuple[TaskOutcome, ...]


def evaluate_demo(
    model, tokenizer, *, data_dir: str | Path = DEMO_DATA_DIR, domains: tuple[str, ...] = tuple(DOMAINS),
    limit: int | None = None, batch_size: int = 32, progress: ProgressFn = silent,
) -> dict[str, DomainScore]:
    """Returns greedy accuracy per domain on `<data_dir>/<domain>/tasks.jsonl` (the first `limit` tasks)."""
    scores = {}
    for domain in domains:
        tasks = load_tasks(Path(data_dir) / domain / "tasks.jsonl")[:limit]
        outcomes = evaluate_tasks(model, tokenizer, tasks, max_new_tokens=MAX_NEW_TOKENS[domain],
                                  batch_size=batch_size, progress=progress)
        by_form: dict[str, tuple[int, int]] = {}
        for task, outcome in zip(tasks, outcomes):
            right, total = by_form.get(task.form or "", (0, 0))
            by_form[task.form or ""] = (right + outcome.correct, total + 1)
        scores[domain] = DomainScore(domain, len(tasks), accuracy(outcomes), dict(sorted(by_form.items())),
                                     tuple(outcomes))
    return scores


def set_top_k(model, top_k: int) -> int:
    """Sets every MoE router of a Qwen3-MoE model to select `top_k` experts; returns the previous k."""
    previous = model.config.num_experts_per_tok
    for layer in model.model.layers:
        layer.mlp.gate.top_k = top_k
    return previous


BASELINE_KS = (8, 7, 6, 5, 4, 3, 2, 1)
EVAL_COMMAND = ".venv/bin/python tools/eval_demo.py"


def run_baseline(
    model_dir: str | Path, data_dir: str | Path = DEMO_DATA_DIR, *, ks: tuple[int, ...] = BASELINE_KS,
    limit: int | None = None, threads: int = 1, progress: ProgressFn = silent,
) -> dict:
    """Returns accuracy per domain at each router top-k, plus per-form counts at the model's own k.

    The result maps "top-<k>" to {domain: accuracy}, "by_form" to {domain: {form: [correct, total]}}
    and "command" to the command that reproduces it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    k_base = model.config.num_experts_per_tok
    result: dict = {}
    for k in ks:
        set_top_k(model, k)
        scores = evaluate_demo(model, tokenizer, data_dir=data_dir, limit=limit, progress=progress)
        result[f"top-{k}"] = {d: round(s.accuracy, 4) for d, s in scores.items()}
        if k == k_base:
            result["by_form"] = {d: {f: list(rt) for f, rt in s.by_form.items()} for d, s in scores.items()}
    set_top_k(model, k_base)
    result["command"] = EVAL_COMMAND
    return result
