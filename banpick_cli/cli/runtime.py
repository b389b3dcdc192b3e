"""`export`: ship a profile into serving images."""

from __future__ import annotations

from banpick_cli.cli.base import app
from banpick_cli.cli.render import handle_errors


def _not_yet(name: str, issue: str) -> None:
    @app.command(name=name, help=f"Not yet available ({issue}).")
    @handle_errors
    def stub() -> None:
        from banpick_cli.errors import BanpickError

        raise BanpickError(f"`banpick {name}` is not available yet ({issue})")


_not_yet("export", "runtimes and export")
