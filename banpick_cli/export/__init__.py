"""`banpick export`: serving bundles (a compact runtime profile, manifest, README, Dockerfile lines, the wheel)."""

from banpick_cli.export.writer import ExportError, ExportResult, export_bundle

__all__ = ["ExportError", "ExportResult", "export_bundle"]
