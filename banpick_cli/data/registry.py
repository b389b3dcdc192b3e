"""The domain registry: built-in domains (TOML files shipped in the package) and user TOML files."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from banpick_cli.checks import domain_name
from banpick_cli.errors import BadSetting, DataError

BUILTIN_DIR = Path(__file__).with_name("domains")
_SOURCE_KEYS = {"dataset", "config", "split", "template", "streaming", "data_files"}
_DOMAIN_KEYS = {"name", "description", "embedded", "sources"}


@dataclass(frozen=True)
class Source:
    """One dataset a domain draws calibration text from."""

    dataset: str
    split: str = "train"
    template: str = "{text}"
    config: str | None = None
    streaming: bool = False
    data_files: str | None = None


@dataclass(frozen=True)
class Domain:
    """A named calibration domain: hub sources and, optionally, the embedded demo data it maps to."""

    name: str
    description: str
    sources: tuple[Source, ...]
    embedded: str | None = None


def builtin_domains() -> list[str]:
    """Returns the names of the built-in domains, sorted."""
    return sorted(path.stem for path in BUILTIN_DIR.glob("*.toml"))


def get_domain(name_or_file: str) -> Domain:
    """Returns a built-in domain by name, or a user domain from a .toml file path."""
    path = Path(name_or_file)
    if path.suffix == ".toml":
        if not path.is_file():
            raise DataError(f"domain file not found: {path}")
        return load_domain_file(path)
    builtin = BUILTIN_DIR / f"{name_or_file}.toml"
    if not builtin.is_file():
        known = ", ".join(builtin_domains())
        raise DataError(f"unknown domain '{name_or_file}'; known: {known} (or pass a domain .toml file)")
    return load_domain_file(builtin)


def load_domain_file(path: Path) -> Domain:
    """Parses and validates a domain TOML file (see docs/domains.md)."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise DataError(f"cannot read domain file {path}: {err}") from None
    unknown = set(raw) - _DOMAIN_KEYS
    if unknown:
        raise DataError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_DOMAIN_KEYS)}")
    try:
        domain_name(raw.get("name"), flag=f"{path}: 'name'")
    except BadSetting as err:
        raise DataError(str(err)) from None
    sources = []
    for i, item in enumerate(raw.get("sources", [])):
        bad = set(item) - _SOURCE_KEYS
        if bad:
            raise DataError(f"{path}: sources[{i}] has unknown key(s) {sorted(bad)}; allowed: {sorted(_SOURCE_KEYS)}")
        if "dataset" not in item:
            raise DataError(f"{path}: sources[{i}] needs 'dataset'")
        sources.append(Source(**item))
    if not sources and not raw.get("embedded"):
        raise DataError(f"{path}: a domain needs at least one [[sources]] entry")
    return Domain(raw["name"], raw.get("description", ""), tuple(sources), raw.get("embedded"))
