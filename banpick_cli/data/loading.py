"""Calibration text through `datasets`: embedded demo files, local files, or hub datasets."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from banpick_cli.data.registry import Domain, Source
from banpick_cli.errors import DataError
from banpick_cli.paths import DEMO_DATA_DIR

EMBEDDED = "embedded"
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


@dataclass(frozen=True)
class CalibrationText:
    """The texts of one calibration run and where they came from (recorded as provenance)."""

    texts: list[str]
    source: str  # what was loaded: a path, "hub:<id>", or "embedded:<domain>"
    split: str


def embedded_file(domain: Domain) -> Path:
    """Returns the shipped calibration file of a domain's embedded demo data."""
    if not domain.embedded:
        raise DataError(f"domain '{domain.name}' has no embedded data; pass --data FILE_OR_DATASET")
    return DEMO_DATA_DIR / domain.embedded / "calib.jsonl"


def load_calibration_text(
    domain: Domain, data: str | None, *, samples: int, seed: int, text_field: str | None = None, use_embedded: bool = False
) -> CalibrationText:
    """Returns up to `samples` non-empty texts, shuffled by `seed`.

    `data` is a local file (.jsonl/.json/.parquet/.txt/.csv), a hub dataset id, "embedded", or
    None: the domain's embedded demo data when `use_embedded` (the demo model), else its hub sources.
    """
    if data == EMBEDDED or (data is None and use_embedded):
        path = embedded_file(domain)
        if not path.is_file():
            raise DataError(f"embedded data for '{domain.name}' is missing at {path}; run `make demo-model`")
        return _from_source(Source(dataset=str(path), template="{text}"), samples, seed, text_field, f"embedded:{domain.name}")
    if data is not None:
        local = Path(data)
        if local.suffix in _BUILDERS or local.exists():
            if not local.is_file():
                raise DataError(f"data file not found: {local}")
            return _from_source(Source(dataset=str(local), template=_template_of(domain)), samples, seed, text_field, str(local))
        return _from_source(Source(dataset=data, template=_template_of(domain)), samples, seed, text_field, f"hub:{data}")
    if not domain.sources:
        raise DataError(f"domain '{domain.name}' lists no sources; pass --data FILE_OR_DATASET")
    # Several hub sources share the sample budget evenly; texts are interleaved by the shuffle.
    per_source = [samples // len(domain.sources) + (i < samples % len(domain.sources)) for i in range(len(domain.sources))]
    parts = [_from_source(src, n, seed, text_field, f"hub:{src.dataset}") for src, n in zip(domain.sources, per_source) if n]
    texts = [t for part in parts for t in part.texts]
    return CalibrationText(texts, "+".join(p.source for p in parts), "+".join(p.split for p in parts))


def _template_of(domain: Domain) -> str:
    return domain.sources[0].template if domain.sources else "{text}"


def _from_source(source: Source, samples: int, seed: int, text_field: str | None, label: str) -> CalibrationText:
    import datasets

    datasets.disable_progress_bars()
    local = Path(source.dataset)
    try:
        if local.is_file():
            builder = _BUILDERS.get(local.suffix)
            if builder is None:
                raise DataError(f"{local}: unsupported file type '{local.suffix}'; use {', '.join(_BUILDERS)}")
            table = datasets.load_dataset(builder, data_files=str(local), split="train")
            split = "train"
        else:
            table = datasets.load_dataset(
                source.dataset, source.config, split=source.split, streaming=source.streaming, data_files=source.data_files
            )
            split = source.split
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for an unreachable hub or a bad file
        reason = str(err).strip().splitlines()[0][:140] if str(err).strip() else type(err).__name__
        if local.is_file():
            raise DataError(f"cannot read {local}: {reason}") from None
        raise DataError(
            f"cannot load dataset '{source.dataset}' from the hub ({reason}); pass a local file with --data FILE, or --data embedded"
        ) from None
    render = _renderer(source.template, text_field, table.column_names, label)
    # A streamed split shuffles within a buffer; a downloaded one is shuffled whole.
    rows = table.shuffle(seed=seed, buffer_size=1000) if source.streaming else table.shuffle(seed=seed) if len(table) else table
    texts = []
    for row in rows:
        text = render(row)
        if text:
            texts.append(text)
        if len(texts) >= samples:
            break
    if not texts:
        raise DataError(f"no text found in {label}")
    return CalibrationText(texts, label, split)


def _renderer(template: str, text_field: str | None, columns: list[str] | None, label: str):
    if text_field is not None:
        if columns is not None and text_field not in columns:
            raise DataError(f"{label} has no field '{text_field}'; fields: {', '.join(columns)}")
        return lambda row: str(row[text_field] or "").strip()
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    if columns is not None and not set(fields) <= set(columns):
        if "text" in columns:
            return lambda row: str(row["text"] or "").strip()
        raise DataError(f"{label} has none of the fields {fields}; fields: {', '.join(columns)}; pass --text-field")
    return lambda row: template.format(**{k: row[k] if row[k] is not None else "" for k in fields}).strip()
