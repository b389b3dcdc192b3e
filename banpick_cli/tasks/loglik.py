"""Multiple choice by log-likelihood: the option whose continuation the model finds most probable.

The continuation of option i is " <letter>" (target "letter": the prompt lists lettered options) or
" <option text>" (target "text"; compare by total log-probability, as lm-evaluation-harness's `acc`).
Context and continuation are tokenised together and the continuation is what follows the context's
own tokens, so a merge across the boundary is scored as the model would see it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from banpick_cli.progress import ProgressEvent, ProgressFn, silent
from banpick_cli.tasks.hub import LETTERS
from banpick_cli.tasks.task import Task

MC_TARGETS = ("letter", "text")


@dataclass(frozen=True)
class Scored:
    """Log-probabilities of each task's options, and what computing them cost."""

    logprobs: list[list[float]]  # per task, per option
    tokens: int  # real tokens run through the model
    seconds: float
    positions: int = 0  # positions computed, padding included


def continuations(task: Task, target: str = "letter") -> list[str]:
    """Returns the text each option would add after the prompt."""
    if target not in MC_TARGETS:
        raise ValueError(f"target must be one of {MC_TARGETS}, got {target!r}")
    choices = task.choices or ()
    return [f" {LETTERS[i]}" if target == "letter" else f" {c}" for i, c in enumerate(choices)]


def option_logprobs(
    model, tokenizer, tasks: Sequence[Task], *, target: str = "letter", batch_size: int = 16,
    progress: ProgressFn = silent, clock=time.perf_counter,
) -> Scored:
    """Returns the summed log-probability of every option's continuation for every task."""
    import torch

    pairs = []  # (task index, context ids, continuation ids)
    for t, task in enumerate(tasks):
        context = tokenizer(task.prompt).input_ids
        for cont in continuations(task, target):
            whole = tokenizer(task.prompt + cont).input_ids
            if whole[: len(context)] == context and len(whole) > len(context):
                pairs.append((t, context, whole[len(context):]))
            else:  # the boundary merged: score the continuation tokenised on its own
                pairs.append((t, context, tokenizer(cont, add_special_tokens=False).input_ids))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[float] = []
    tokens, seconds, computed = 0, 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = [ctx + cont for _, ctx, cont in chunk]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # right padding: positions stay those of an unpadded run
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        began = clock()
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        seconds += clock() - began
        tokens += int(mask.sum())
        computed += ids.numel()
        for r, (_, ctx, cont) in enumerate(chunk):
            # the token at position p is predicted by the logits at p - 1
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            scores.append(float(logp[r, positions, torch.tensor(cont)].sum()))
        progress(ProgressEvent("score", min(start + batch_size, len(pairs)), len(pairs), tokens))
    out: list[list[float]] = [[] for _ in tasks]
    for (t, _, _), score in zip(pairs, scores):
        out[t].append(score)
    return Scored(out, tokens, seconds, computed)


def best_option(logprobs: list[float]) -> str:
    """Returns the letter of the most probable option (the first on a tie)."""
    return LETTERS[max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))]
