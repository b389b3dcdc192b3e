"""Domains and calibration data: the registry, and loading through `datasets`."""

from banpick_cli.data.loading import EMBEDDED, CalibrationText, load_calibration_text
from banpick_cli.data.registry import Domain, Source, builtin_domains, get_domain

__all__ = ["EMBEDDED", "CalibrationText", "Domain", "Source", "builtin_domains", "get_domain", "load_calibration_text"]
