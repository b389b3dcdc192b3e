"""Tasks, profiles and an independent reference for accuracy tests on the tiny random models."""

from __future__ import annotations

from pathlib import Path

import torch

from banpick_cli.profile.format import new_profile, write_profile
from banpick_cli.tasks.task import Task, write_tasks

WORDS = ["fox", "dog", "river", "garden", "window", "seven", "blue", "stone"]


def mc_tasks(n: int = 8, domain: str = "math", answers: list[str] | None = None) -> list[Task]:
    """Returns n three-way multiple-choice tasks (answer 'A' unless given)."""
    tasks = []
    for i in range(n):
        choices = (WORDS[i % 8], WORDS[(i + 3) % 8], WORDS[(i + 5) % 8])
        prompt = f"Question: which word comes after {i} + {i * 3}?\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nAnswer:"
        tasks.append(Task(f"t{i}", domain, "mc", prompt, (answers or ["A"] * n)[i], choices=choices))
    return tasks


def save_tasks(tmp_path: Path, tasks: list[Task], name: str = "tasks.jsonl") -> Path:
    path = tmp_path / name
    write_tasks(path, tasks)
    return path


def letter_scores(loaded, tasks, overrides=None) -> list[list[float]]:
    """Reference: each option's log-probability, one unpadded forward per option, with `overrides`
    (RoutingHooks route functions) installed directly, not through the runtime."""
    from banpick_cli.models.base import RoutingHooks

    tok, model = loaded.tokenizer, loaded.model
    out = []
    with RoutingHooks(loaded.layers, loaded.routing.num_experts, overrides=overrides or {}), torch.no_grad():
        for task in tasks:
            context = tok(task.prompt).input_ids
            row = []
            for letter in "ABC"[: len(task.choices)]:
                whole = tok(task.prompt + " " + letter).input_ids
                cont = whole[len(context):]
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
                row.append(sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(cont)))
            out.append(row)
    return out


def argmax_letter(scores: list[float]) -> str:
    return "ABC"[max(range(len(scores)), key=lambda i: (scores[i], -i))]


def ban_profile(loaded, path: Path | None = None, *, domain: str | None = None, key=None):
    """Returns (and writes, with `path`) a profile with hand-set Ban tensors (and key experts)."""
    m = len(loaded.layers)
    prof = new_profile(loaded.identity, loaded.fingerprint)
    prof.put("ban/layer_sensitivity", torch.zeros(m))
    prof.put("ban/ratio_min", torch.full((m,), 0.3))
    prof.put("ban/ratio_max", torch.full((m,), 0.9))
    if key is not None:
        e = loaded.routing.num_experts
        prof.domain(domain).put("expert_counts", torch.full((m, e), 10, dtype=torch.int64))
        prof.domain(domain).put("token_counts", torch.full((m,), 10 * e // loaded.routing.top_k, dtype=torch.int64))
        prof.domain(domain).put("candidates", torch.ones(m, e, dtype=torch.bool))
        prof.domain(domain).put("key_experts", key)
    if path is not None:
        write_profile(prof, path)
    return prof


def calib_file(tmp_path: Path, n: int = 12) -> Path:
    """Writes calibration text (a 'text' field per line) for DES medians and RICE."""
    import json

    path = tmp_path / "calib.jsonl"
    lines = [{"text": f"problem {i}: {i} + {i * 3} = {i * 4}. the quick brown fox jumps over the lazy dog"} for i in range(n)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def build_sharp_model(out: Path) -> Path:
    """Saves a tiny Qwen3-MoE whose experts outweigh the residual stream (expert weights x40).

    In the shared tiny model, forcing one expert in moves an option's log-probability by ~5e-4, less
    than any margin between options; here it moves it by ~1e-2, so some near-tied tasks flip.
    """
    from transformers import AutoModelForCausalLM

    from tiny import build_model

    build_model("qwen3_moe", out)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.mul_(40.0)
    model.save_pretrained(out)
    return out


def near_ties(loaded, n: int, pool: int = 160, domain: str = "math") -> list[Task]:
    """Returns the n tasks of mc_tasks(pool) whose two best options are closest (renumbered t0..)."""
    tasks = mc_tasks(pool, domain)
    scores = letter_scores(loaded, tasks)
    margin = [sorted(s)[-1] - sorted(s)[-2] for s in scores]
    chosen = sorted(range(pool), key=lambda i: margin[i])[:n]
    return [Task(f"t{j}", domain, "mc", tasks[i].prompt, "A", choices=tasks[i].choices) for j, i in enumerate(chosen)]
