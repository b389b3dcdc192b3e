"""Batched generation (greedy, or the model card's sampling) on tasks, then scoring: accuracy on math, code and mc tasks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from banpick_cli.progress import ProgressEvent, ProgressFn, silent
from banpick_cli.tasks.sandbox import run_tests
from banpick_cli.tasks.scoring import code_body, code_program, score_math, score_mc
from banpick_cli.tasks.task import Task


@dataclass(frozen=True)
class TaskOutcome:
    """One task's result: the completion, what was extracted from it, and whether it was right."""

    task_id: str
    domain: str
    kind: str
    correct: bool
    prediction: str | None  # the extracted number or letter; for code the sandbox status
    completion: str
    # Whether the completion gave an answer in the expected form at all (a number, a letter, some
    # code): a task set where nothing was answered is a format problem, not 0% accuracy.
    answered: bool = True


@dataclass(frozen=True)
class Generation:
    """Completions of a batch of prompts and what producing them cost."""

    texts: list[str]
    new_tokens: list[int]  # generated tokens per prompt, up to and including its end-of-sequence token
    seconds: float  # wall time of the generate calls alone (tokenising and decoding excluded)
    # positions the model computed: batch x (padded prompt + steps) per call, rows that already ended
    # included. Throughput per position compares routings even when their answers differ in length.
    positions: int = 0

    @property
    def tokens(self) -> int:
        return sum(self.new_tokens)


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy (the default), or sampling with the model card's values."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            # Explicit None: a model's generation_config may carry sampling values that warn under greedy.
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        out: dict[str, Any] = {"do_sample": True}
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {**out, **self.extra}


def model_card_sampling(model, seed: int = 0) -> Sampling:
    """Returns the sampling the model's `generation_config.json` recommends (greedy when it has none)."""
    config = getattr(model, "generation_config", None)
    if config is None or not getattr(config, "do_sample", False):
        return Sampling(seed=seed)
    return Sampling(True, getattr(config, "temperature", None), getattr(config, "top_p", None),
                    getattr(config, "top_k", None), seed)


def generate_completions(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
    progress: ProgressFn = silent,
) -> list[str]:
    """Returns the greedy continuation of each prompt (special tokens removed), in prompt order."""
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    progress=progress).texts


def generate(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
    sampling: Sampling = Sampling(), progress: ProgressFn = silent, clock=time.perf_counter,
) -> Generation:
    """Returns each prompt's continuation (special tokens removed, prompt order), its token count and the time.

    Batched with the KV cache; prompts of similar length share a batch so little padding is computed.
    Sampling draws from a generator seeded once per call, so a rerun gives the same texts. `clock`
    times the generate calls (`time.process_time`: this process's CPU time, steady on a shared CPU).
    """
    import torch

    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token for batched generation")
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i]).input_ids))
    outputs: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) - {None}
    seconds, done_tokens, positions = 0.0, 0, 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end flush
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
            began = clock()
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, **sampling.generate_kwargs(),
                )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += clock() - began
            positions += out.shape[0] * out.shape[1]
            new = out[:, enc["input_ids"].shape[1]:].cpu()
            for row, (i, text) in enumerate(zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True))):
                outputs[i] = text
                counts[i] = _generated_length(new[row].tolist(), stop)
            done_tokens += sum(counts[i] for i in batch)
            progress(ProgressEvent("generate", min(start + batch_size, len(order)), len(order), done_tokens))
    finally:
        tokenizer.padding_side = side
    return Generation(outputs, counts, seconds, positions)


def _generated_length(ids: list[int], stop: set[int]) -> int:
    # Rows that finished early are padded after their end-of-sequence token; those pads were not generated.
    for n, token in enumerate(ids):
        if token in stop:
            return n + 1
    return len(ids)


def score_tasks(
    tasks: Sequence[Task], completions: Sequence[str], *, code_timeout_s: float = 5.0, workers: int = 2,
    allow_unsafe_code: bool = False,
) -> list[TaskOutcome]:
    """Returns each task's outcome for its completion; code runs against its unit tests in a sandbox
    (tasks/sandbox.py; without kernel isolation only when `allow_unsafe_code`)."""

    def score(pair: tuple[Task, str]) -> TaskOutcome:
        task, completion = pair
        if task.kind == "math":
            correct, predicted = score_math(completion, task.answer)
            answered = predicted is not None
        elif task.kind == "mc":
            correct, predicted = score_mc(completion, task.answer, task.choices)
            answered = predicted is not None
        else:
            # a body under the prompt's signature, or the whole function written out
            answered = bool(code_body(completion).strip()) or f"def {task.entry_point}" in completion
            program = code_program(task.prompt, completion, task.tests, task.entry_point)
            result = run_tests(program, timeout_s=code_timeout_s, allow_unsafe=allow_unsafe_code)
            correct, predicted = result.passed, result.status
        return TaskOutcome(task.id, task.domain, task.kind, correct, predicted, completion, answered)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(score, zip(tasks, completions)))


def evaluate_tasks(
    model, tokenizer, tasks: Sequence[Task], *, max_new_tokens: int = 64, batch_size: int = 16,
    code_timeout_s: float = 5.0, allow_unsafe_code: bool = False, progress: ProgressFn = silent,
) -> list[TaskOutcome]:
    """Returns one outcome per task, in task order, from batched greedy generation with the KV cache."""
    completions = generate_completions(
        model, tokenizer, [t.prompt for t in tasks], max_new_tokens=max_new_tokens, batch_size=batch_size,
        progress=progress,
    )
    return score_tasks(tasks, completions, code_timeout_s=code_timeout_s, allow_unsafe_code=allow_unsafe_code)


def accuracy(outcomes: Sequence[TaskOutcome]) -> float:
    """Returns the fraction of outcomes that are correct (0.0 for none)."""
    return sum(o.correct for o in outcomes) / len(outcomes) if outcomes else 0.0
