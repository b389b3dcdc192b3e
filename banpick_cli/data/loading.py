"""Calibration text through `datasets`: embedded demo files, local files, or hub datasets."""

from __future__ import annotations

import codecs
import json
import string
from dataclasses import dataclass
from pathlib import Path

from banpick_cli.checks import missing_file
from banpick_cli.data.registry import Domain, Source
from banpick_cli.errors import DataError, import_extra
from banpick_cli.paths import DEMO_DATA_DIR

EMBEDDED = "embedded"
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_RECORDS_CHECKED = 1000  # JSON records whose shape is checked before `datasets` reads the file
_RECORD = '{"text": "..."}'
_NL = b"\n"


@dataclass(frozen=True)
class CalibrationText:
    """The texts of one calibration run and where they came from (recorded as provenance)."""

    texts: list[str]
    source: str  # what was loaded: a path, "hub:<id>", or "embedded:<domain>"
    split: str
    notes: tuple[str, ...] = ()  # what the user should know: fewer texts than --samples asked for


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
        if local.suffix in _BUILDERS or local.exists() or local.is_symlink():
            problem = missing_file("data file", local)
            if problem:
                raise DataError(problem)
            return _from_source(Source(dataset=str(local), template=_template_of(domain)), samples, seed, text_field, str(local))
        return _from_source(Source(dataset=data, template=_template_of(domain)), samples, seed, text_field, f"hub:{data}")
    if not domain.sources:
        raise DataError(f"domain '{domain.name}' lists no sources; pass --data FILE_OR_DATASET")
    # Several hub sources share the sample budget evenly; texts are interleaved by the shuffle.
    per_source = [samples // len(domain.sources) + (i < samples % len(domain.sources)) for i in range(len(domain.sources))]
    parts = [_from_source(src, n, seed, text_field, f"hub:{src.dataset}") for src, n in zip(domain.sources, per_source) if n]
    texts = [t for part in parts for t in part.texts]
    notes = tuple(n for p in parts for n in p.notes)
    return CalibrationText(texts, "+".join(p.source for p in parts), "+".join(p.split for p in parts), notes)


def _template_of(domain: Domain) -> str:
    return domain.sources[0].template if domain.sources else "{text}"


def _from_source(source: Source, samples: int, seed: int, text_field: str | None, label: str) -> CalibrationText:
    datasets = import_extra("datasets", "calibrate", "reading calibration data")

    datasets.disable_progress_bars()
    local = Path(source.dataset)
    try:
        if local.is_file():
            builder = check_data_file(local)
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
        reason = root_cause(err)
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
    notes = () if len(texts) >= samples else (
        f"{label} has {len(texts)} non-empty texts, fewer than the {samples} asked for (--samples); using all {len(texts)}",)
    return CalibrationText(texts, label, split, notes)


def _text_of(field: str, label: str):
    """Returns a row -> text function that refuses a field holding something other than text."""

    def text(row) -> str:
        value = row[field]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataError(f"{label}: field '{field}' holds {type(value).__name__} values like {str(value)[:30]!r}, "
                            "not text; pass --text-field")
        return value.strip()

    return text


def _renderer(template: str, text_field: str | None, columns: list[str] | None, label: str):
    if text_field is not None:
        if columns is not None and text_field not in columns:
            raise DataError(f"{label} has no field '{text_field}'; fields: {', '.join(columns)}")
        return _text_of(text_field, label)
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    if columns is not None and not set(fields) <= set(columns):
        if "text" in columns:
            return _text_of("text", label)
        raise DataError(f"{label} has none of the fields {fields}; fields: {', '.join(columns)}; pass --text-field")
    return lambda row: template.format(**{k: row[k] if row[k] is not None else "" for k in fields}).strip()


def root_cause(err: BaseException) -> str:
    """Returns the first line of the innermost cause of an exception (datasets wraps the real reason in
    'An error occurred while generating the dataset')."""
    seen = set()
    while (err.__cause__ or err.__context__) is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    if " is not cached in " in text:  # datasets' words (with its cache folder, often None) when the hub is unreachable
        return "not in the local datasets cache, and the hub could not be reached"
    return (text.splitlines()[0][:140] if text else type(err).__name__)


def check_data_file(path: Path) -> str:
    """Returns the `datasets` builder for a local data file after checking, before `datasets` reads it,
    what it would report badly: an empty file, binary or non-UTF-8 bytes, JSON that is not records.
    Raises a one-line DataError naming the file (and line) otherwise."""
    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(_BUILDERS)}")
    try:
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path} is empty")
        if builder == "parquet":
            with open(path, "rb") as handle:
                if handle.read(4) != b"PAR1":
                    raise DataError(f"{path} is not a parquet file")
            return builder
        check_utf8_text(path)
        if builder == "json":
            _check_records(path)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return builder


def check_utf8_text(path: Path) -> None:
    """Raises a one-line DataError unless `path` is UTF-8 text with something besides whitespace."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, has_text = 1, False
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise DataError(f"{path} is a binary file (a NUL byte on line {line + chunk.count(_NL, 0, nul)}), not text")
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = min(max(err.start, 0), len(chunk))
                byte = err.object[err.start] if err.start < len(err.object) else 0
                raise DataError(f"{path} is not UTF-8 text (byte 0x{byte:02x} on line {line + chunk.count(_NL, 0, at)}); "
                                "convert it, e.g. with iconv -t utf-8") from None
            has_text = has_text or bool(text.strip())
            line += chunk.count(_NL)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text (it ends inside a character)") from None
    if not has_text:
        raise DataError(f"{path} holds no text (only whitespace)")


def _check_records(path: Path) -> None:
    """Raises unless a .json/.jsonl file holds JSON objects (records), one per line or as one list."""
    text = path.read_text(encoding="utf-8")
    records: list = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # JSON lines in a .json file, which datasets reads too
        if isinstance(data, dict):
            return  # columns ({"text": [...]}) or a nested field: datasets decides
        if isinstance(data, list):
            records = [(i + 1, r) for i, r in enumerate(data[:_RECORDS_CHECKED])]
            if not records:
                raise DataError(f"{path} holds an empty JSON list")
        elif data is not None:
            raise DataError(f"{path} holds a single JSON {type(data).__name__}, not records like {_RECORD}")
    if not records:
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                records.append((number, json.loads(raw)))
            except ValueError as err:
                raise DataError(f"{path} line {number} is not JSON ({err.msg})") from None
            if len(records) >= _RECORDS_CHECKED:
                break
    for number, record in records:
        if not isinstance(record, dict):
            where = f"item {number}" if path.suffix == ".json" and text.lstrip().startswith("[") else f"line {number}"
            raise DataError(f"{path} {where} is a JSON {type(record).__name__} ({json.dumps(record)[:30]}), "
                            f"not a record like {_RECORD}")
