"""The demo model's card (`banpick_cli/artifacts/demo-moe/README.md`), written from a training report and baseline scores."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from banpick_cli.paths import REPO_ROOT

ROUTING_HEADING = "## Routing phenomena"
ROUTING_TODO = (f"{ROUTING_HEADING}\n\nTODO: measured with banpick's own commands "
                "(usage, KL scans, layer sensitivity) — filled in by hand.\n")


def active_parameters(config) -> int:
    """Returns the parameters one token uses: everything except the experts it is not routed to."""
    h, layers = config.hidden_size, config.num_hidden_layers
    expert = 3 * h * config.moe_intermediate_size
    attn = h * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    per_layer = attn + 2 * config.head_dim + 2 * h + config.num_experts * h + config.num_experts_per_tok * expert
    return config.vocab_size * h + layers * per_layer + h


def _existing_routing_section(path: Path) -> str:
    """Returns the hand-written routing section of an existing card, so a retrain does not erase it."""
    if not path.is_file():
        return ROUTING_TODO
    text = path.read_text(encoding="utf-8")
    if ROUTING_HEADING not in text:
        return ROUTING_TODO
    section = text[text.index(ROUTING_HEADING):]
    following = section.find("\n## ", len(ROUTING_HEADING))
    return (section if following < 0 else section[:following + 1]).rstrip() + "\n"


def render_model_card(report: dict, baseline: dict, model_config, *, previous: Path | None = None) -> str:
    """Returns the model card as Markdown.

    `report` is a `TrainReport` as a dict; `baseline` maps "top-<k>" to {domain: accuracy} plus
    "by_form" ({domain: {form: [correct, total]}}) and "command" (how the numbers were produced).
    """
    c, cfg = report["config"], model_config
    domains = list(baseline[_ks(baseline)[0]])
    mb = report["checkpoint_bytes"] / 1e6
    k_base = cfg.num_experts_per_tok
    head = "| router top-k | " + " | ".join(domains) + " | mean |\n|---|" + "---|" * (len(domains) + 1)
    rows = "\n".join(
        f"| {key.removeprefix('top-')}{' (trained)' if key == f'top-{k_base}' else ''} | "
        + " | ".join(f"{100 * baseline[key][d]:.1f}%" for d in domains)
        + f" | {100 * sum(baseline[key].values()) / len(domains):.1f}% |" for key in _ks(baseline))
    losses = ", ".join(f"{d} {report['eval_loss'][d]:.3f}" for d in domains)
    forms = "\n".join(
        f"- **{d}**: " + ", ".join(f"{form} {r}/{t}" for form, (r, t) in baseline["by_form"][d].items())
        for d in domains)
    routing = _existing_routing_section(previous) if previous else ROUTING_TODO
    return f"""# banpick demo-moe

A small Mixture-of-Experts language model that banpick trains and ships so that every command has a
real model to work on with no hub and no GPU. It knows only three synthetic domains — **math**
(arithmetic and word problems), **code** (small Python functions checked by unit tests) and
**general** (facts about a small world, four-way multiple choice) — and is not useful for anything else.

## Architecture

| | |
|---|---|
| class | `Qwen3MoeForCausalLM` (transformers {report['versions'].get('transformers', '')}, torch {report['versions'].get('torch', '')}) |
| layers | {cfg.num_hidden_layers}, every one an MoE block |
| hidden size | {cfg.hidden_size}; {cfg.num_attention_heads} attention heads, {cfg.num_key_value_heads} key/value heads, head dim {cfg.head_dim} |
| experts | {cfg.num_experts} per layer, top-{cfg.num_experts_per_tok} (softmax router, `norm_topk_prob=True`), expert width {cfg.moe_intermediate_size} |
| router loss | auxiliary load balancing, `router_aux_loss_coef={cfg.router_aux_loss_coef}` (final value {report['final_aux_loss']:.3f}; {cfg.num_experts_per_tok} is perfect balance) |
| vocabulary | {report['vocab_size']} tokens, byte-level BPE trained on the domains, one token per digit; `<|endoftext|>` (EOS), `<|pad|>` |
| parameters | {report['parameters']:,} total, {active_parameters(cfg):,} active per token (embeddings tied) |
| checkpoint | `model.safetensors`, float32, {mb:.1f} MB |

It ships inside banpick (package data, in every wheel). Load it offline: `from banpick_cli.paths import DEMO_MODEL_DIR`, then
`AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)`, `AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)`; or `--model demo`.

## Training

- Command: `.venv/bin/python tools/train_demo.py` (regenerates `banpick_cli/artifacts/data/` and this folder from seeds).
- Data: `banpick_cli.demo.corpus`, seed {c['data_seed']}. Each domain's held-out tasks (`banpick_cli/artifacts/data/<domain>/tasks.jsonl`)
  are drawn first; calibration text (`calib.jsonl`) and every training document are drawn from the same generators with
  those task prompts excluded. Training mixes calibration-style text with task-formatted examples
  ({100 * c['task_fraction']:.0f}% of documents); each step has {c['batch_size'] // len(domains)} rows of {c['seq_len']} tokens per domain.
- {report['steps']} steps, {report['tokens']:,} tokens, AdamW (lr {c['lr']}, warmup {c['warmup_steps']}, cosine to {c['min_lr_ratio']}x), seed {c['train_seed']}.
- Wall time {report['wall_s'] / 60:.1f} min with {c['threads']} torch CPU thread{'' if c['threads'] == 1 else 's'} on a shared 2-core machine
  (timings are noisy there; two OpenMP threads competing with other processes ran slower than one).
- Final training loss {report['final_train_loss']:.3f} nats/token (language-model part, last {c['log_every']} steps).
  Loss on each domain's `calib.jsonl` after training (nats/token): {losses}.

## Baseline accuracy

Greedy decoding, every held-out task of each domain; math by final number, code by running the task's unit tests
in a sandbox, general by the option the completion names (the model answers with an option's text, which the
scorer maps to its letter; a stated letter would count too). "top-k" sets every router to select k experts
(`gate.top_k`) for the whole run, prompt and answer.

{head}
{rows}

Reproduce: `{baseline['command']}`

Per form (correct/total) at top-{k_base}:
{forms}

{routing}
## Limitations

Synthetic data only; the model has memorised a small world and a few templates. Accuracy numbers are on
150 tasks per domain, so one task is 0.7 points. The data files are reproduced byte for byte from the seed
(`tests/demo/test_demo_generators.py`); training is deterministic for one torch build, CPU and thread count
(a second run of the training command reproduced `model.safetensors` bit for bit; `tests/demo/test_demo_train.py`
checks the same on a tiny configuration) and differs in the last bits otherwise. Wall time depends on the
machine's load: the same run took 32.5 min while other jobs shared the two cores.
"""


def _ks(baseline: dict) -> list[str]:
    return [k for k in baseline if k.startswith("top-")]


def update_baseline(model_dir: str | Path, baseline: dict) -> Path:
    """Replaces the baseline in a checkpoint's `train_report.json` and rewrites its card; returns the card's path."""
    from banpick_cli.demo.train import TrainReport

    record = json.loads((Path(model_dir) / "train_report.json").read_text(encoding="utf-8"))
    record.pop("baseline", None)
    record["loss_curve"] = [tuple(point) for point in record["loss_curve"]]
    return write_artifacts(model_dir, TrainReport(**record), baseline)


def write_artifacts(model_dir: str | Path, report, baseline: dict) -> Path:
    """Writes `train_report.json` and the model card next to a trained checkpoint; returns the card's path."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    record = {**asdict(report), "baseline": baseline}
    out = Path(report.out_dir).resolve()
    if out.is_relative_to(REPO_ROOT):  # a shipped report names its folder the same on every clone
        record["out_dir"] = str(out.relative_to(REPO_ROOT))
    (model_dir / "train_report.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    card = model_dir / "README.md"
    text = render_model_card(record, baseline, AutoConfig.from_pretrained(model_dir), previous=card)
    card.write_text(text, encoding="utf-8")
    return card
