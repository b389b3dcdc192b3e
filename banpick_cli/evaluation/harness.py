"""Accuracy of a model on task sets under one routing: what `eval` compares and `failure-probe` repeats.

`run_tasks` generates (or scores options by log-likelihood) and scores one task set under whatever
routing is installed; `run_method` installs a routing through `banpick_cli.runtime.apply` for each
task set (Pick reads the task set's domain), and reads the experts actually run per token from the
runtime's counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from banpick_cli.checks import number, one_of
from banpick_cli.errors import BadSetting, DataError
from banpick_cli.models.loading import LoadedModel
from banpick_cli.progress import ProgressFn, silent
from banpick_cli.evaluation.generate import Sampling, TaskOutcome, generate, model_card_sampling, score_tasks
from banpick_cli.tasks.registry import TaskSet
from banpick_cli.tasks.task import Task

SAMPLING = ("greedy", "model-card")
MC_SCORING = ("generate", "loglik")
CHAT = ("auto", "on", "off")
CLOCKS = ("wall", "cpu")  # cpu: this process's CPU time, steady when other jobs share the CPU


@dataclass(frozen=True)
class EvalOptions:
    """How tasks are run; recorded with every result. Validated here, naming the flag."""

    batch_size: int = 16
    sampling: str = "greedy"
    seed: int = 0
    max_new_tokens: int | None = None  # None: the task set's own limit
    mc_scoring: str = "generate"
    chat: str = "auto"
    code_timeout_s: float = 5.0
    allow_unsafe_code: bool = False  # code tasks without kernel isolation where the system forbids it
    clock: str = "wall"

    def __post_init__(self) -> None:
        number("--batch-size", self.batch_size, low=1, integer=True)
        if self.max_new_tokens is not None:
            number("--max-new-tokens", self.max_new_tokens, low=1, integer=True)
        for flag, value, choices in (("--sampling", self.sampling, SAMPLING), ("--mc-scoring", self.mc_scoring, MC_SCORING),
                                     ("--chat", self.chat, CHAT), ("--clock", self.clock, CLOCKS)):
            one_of(flag, value, choices)
        number("--code-timeout", self.code_timeout_s, low=0, low_open=True)


@dataclass
class TaskRun:
    """One task set's outcomes under one routing, and the cost of producing them."""

    task_set: str
    outcomes: list[TaskOutcome]
    tokens: int  # generated tokens (generation) or tokens scored (log-likelihood)
    seconds: float  # model time only (generate / forward calls), by the options' clock
    positions: int = 0  # positions the model computed (padding and finished rows included)

    @property
    def correct(self) -> int:
        return sum(o.correct for o in self.outcomes)

    @property
    def answered(self) -> int:
        return sum(o.answered for o in self.outcomes)

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.outcomes) if self.outcomes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def positions_per_s(self) -> float:
        return self.positions / self.seconds if self.seconds > 0 else 0.0

    def no_answers(self) -> bool:
        """Returns whether no task was answered in the expected form (a format problem, not 0%)."""
        return bool(self.outcomes) and self.answered == 0


@dataclass
class MethodRun:
    """A routing method (with its hyperparameters) over every task set of one eval."""

    label: str
    method: str
    params: dict[str, Any]
    runs: dict[str, TaskRun] = field(default_factory=dict)
    experts: float = 0.0  # experts run, summed over tokens and MoE layers
    routed: int = 0  # tokens routed, summed over MoE layers
    distinct: float = 0.0  # distinct experts a forward ran, summed over forwards and MoE layers
    forwards: int = 0  # forwards, summed over MoE layers
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def avg_topk(self) -> float:
        """Returns the experts actually run per token, averaged over every MoE layer and token."""
        return self.experts / self.routed if self.routed else 0.0

    @property
    def unique_experts(self) -> float:
        """Returns the distinct experts per MoE layer per forward batch (the weights a decode step reads)."""
        return self.distinct / self.forwards if self.forwards else 0.0

    # Totals over the task sets, and rates over the total seconds.
    tokens = property(lambda self: sum(r.tokens for r in self.runs.values()))
    seconds = property(lambda self: sum(r.seconds for r in self.runs.values()))
    positions = property(lambda self: sum(r.positions for r in self.runs.values()))
    tokens_per_s = property(lambda self: self.tokens / self.seconds if self.seconds > 0 else 0.0)
    positions_per_s = property(lambda self: self.positions / self.seconds if self.seconds > 0 else 0.0)


def render_prompt(tokenizer, prompt: str, chat: str) -> str:
    """Returns the prompt as the model should see it: wrapped in its chat template when it has one ('auto')."""
    template = getattr(tokenizer, "chat_template", None)
    if chat == "off" or (chat == "auto" and not template):
        return prompt
    if not template:
        raise BadSetting("--chat on: this tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def sampling_for(loaded: LoadedModel, options: EvalOptions) -> Sampling:
    """Returns greedy decoding, or the model card's recommended sampling (`generation_config.json`)."""
    if options.sampling == "greedy":
        return Sampling(seed=options.seed)
    return model_card_sampling(loaded.model, options.seed)


def clock_of(options: EvalOptions):
    """Returns the timer of `options.clock`: wall time, or this process's CPU time."""
    import time

    return time.process_time if options.clock == "cpu" else time.perf_counter


def check_code_sandbox(task_sets: list[TaskSet], options: EvalOptions) -> None:
    """Raises SandboxUnavailable before any generation when code tasks could not run isolated and the
    caller did not opt in to unsafe runs."""
    from banpick_cli.tasks.sandbox import require_sandbox

    if any(t.kind == "code" for task_set in task_sets for t in task_set.tasks):
        require_sandbox(options.allow_unsafe_code)


def run_tasks(
    loaded: LoadedModel, task_set: TaskSet, options: EvalOptions, *, tasks: Sequence[Task] | None = None,
    progress: ProgressFn = silent,
) -> TaskRun:
    """Returns the outcomes of `tasks` (default: the whole set) under the routing installed on the model now."""
    chosen = list(task_set.tasks if tasks is None else tasks)
    tok = loaded.tokenizer
    if options.mc_scoring == "loglik" and {t.kind for t in chosen} == {"mc"}:
        return _run_loglik(loaded, task_set.name, chosen, options, progress)
    prompts = [render_prompt(tok, t.prompt, options.chat) for t in chosen]
    gen = generate(loaded.model, tok, prompts, max_new_tokens=options.max_new_tokens or task_set.max_new_tokens,
                   batch_size=options.batch_size, sampling=sampling_for(loaded, options), progress=progress,
                   clock=clock_of(options))
    outcomes = score_tasks(chosen, gen.texts, code_timeout_s=options.code_timeout_s,
                           allow_unsafe_code=options.allow_unsafe_code)
    return TaskRun(task_set.name, outcomes, gen.tokens, gen.seconds, gen.positions)


def _run_loglik(loaded: LoadedModel, name: str, tasks: list[Task], options: EvalOptions, progress: ProgressFn) -> TaskRun:
    from banpick_cli.tasks.loglik import best_option, option_logprobs

    rendered = [Task(**{**t.__dict__, "prompt": render_prompt(loaded.tokenizer, t.prompt, options.chat)}) for t in tasks]
    scored = option_logprobs(loaded.model, loaded.tokenizer, rendered, batch_size=options.batch_size, progress=progress,
                             clock=clock_of(options))
    outcomes = []
    for task, logprobs in zip(tasks, scored.logprobs):
        letter = best_option(logprobs)
        outcomes.append(TaskOutcome(task.id, task.domain, task.kind, letter == task.answer.strip().upper(), letter,
                                    " ".join(f"{x:.3f}" for x in logprobs), True))
    return TaskRun(name, outcomes, scored.tokens, scored.seconds, scored.positions)


def run_method(
    loaded: LoadedModel,
    profile: Any,
    method: str,
    task_sets: Sequence[TaskSet],
    options: EvalOptions,
    *,
    label: str | None = None,
    domain: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: ProgressFn = silent,
) -> MethodRun:
    """Returns one method's results on every task set, each run under `runtime.apply`.

    Pick and Ban&Pick read the key experts of `domain`, or of each task set's own domain.
    """
    from banpick_cli.runtime import apply
    from banpick_cli.runtime.methods import DOMAIN_METHODS

    overrides = dict(overrides or {})
    result = MethodRun(label or method, method, {k: _public(v) for k, v in overrides.items()})
    for task_set in task_sets:
        use_domain = None
        if method in DOMAIN_METHODS:
            use_domain = domain or task_set.domain
            if use_domain is None:
                raise BadSetting(f"task '{task_set.name}' mixes domains: pass --domain for method '{method}'")
        # Progress names the row and the task set ("ban(λ=0.7) on math"): one line per method, not seven alike.
        named = _named(progress, f"{result.label} on {task_set.name}")
        with apply(loaded, profile, method, use_domain, count_changes=False, **overrides) as handle:
            run = run_tasks(loaded, task_set, options, progress=named)
            stats = handle.stats()
        result.runs[task_set.name] = run
        result.experts += stats.avg_experts_overall * sum(stats.tokens)
        result.routed += sum(stats.tokens)
        result.distinct += sum(u * f for u, f in zip(stats.unique_experts_per_batch, stats.batches))
        result.forwards += sum(stats.batches)
        if use_domain:
            result.extra.setdefault("domains", {})[task_set.name] = use_domain
    return result


def _named(progress: ProgressFn, name: str) -> ProgressFn:
    """Returns a progress callback that reports each event under `name` (the method row and task set)."""
    from dataclasses import replace

    return lambda event: progress(replace(event, task=name))


def require_answers(run: TaskRun, what: str) -> None:
    """Raises DataError when no task of a run was answered in the expected form."""
    if run.no_answers():
        raise DataError(
            f"{what}: the model answered none of the {len(run.outcomes)} tasks of '{run.task_set}' in the expected "
            f"form (no number / option letter / code found); check the prompt format, --chat and --max-new-tokens"
        )


def _public(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"tensor{list(value.shape)}"
    if callable(value):
        return "callable"
    return value
