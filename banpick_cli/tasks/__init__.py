"""Tasks with checkable answers: the file format, the task registry, scorers and the code sandbox."""

from banpick_cli.tasks.task import Task, load_tasks, write_tasks

__all__ = ["Task", "load_tasks", "write_tasks"]
