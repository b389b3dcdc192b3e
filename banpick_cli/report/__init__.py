"""Figures and the HTML report of a routing profile (matplotlib, Agg canvas; imported by `banpick report`)."""

from banpick_cli.report.build import Report, ReportFigure, build_report

__all__ = ["Report", "ReportFigure", "build_report"]
