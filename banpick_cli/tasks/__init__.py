"""Tasks with checkable answers: the file format, scorers, the code sandbox and batched evaluation."""

from banpick_cli.tasks.evaluate import TaskOutcome, accuracy, evaluate_tasks, generate_completions, score_tasks
from banpick_cli.tasks.task import Task, load_tasks, write_tasks

__all__ = ["Task", "TaskOutcome", "accuracy", "evaluate_tasks", "generate_completions", "load_tasks",
           "score_tasks", "write_tasks"]
