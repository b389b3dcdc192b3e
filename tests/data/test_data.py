"""Calibration data: local files of every supported type through `datasets`, user domains, clear errors."""

from __future__ import annotations

import json

import pytest

from banpick_cli.data import get_domain, load_calibration_text
from banpick_cli.data.registry import builtin_domains
from banpick_cli.errors import DataError


def test_builtin_domains_name_their_hub_sources():
    assert builtin_domains() == ["code", "general", "math"]
    math = get_domain("math")
    assert [s.dataset for s in math.sources] == ["allenai/math_qa", "openai/gsm8k"]
    general = get_domain("general")
    assert general.sources[0].dataset == "allenai/c4" and general.sources[0].split == "validation" and general.sources[0].streaming


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".parquet", ".csv"])
def test_local_files(tmp_path, suffix):
    import pandas as pd

    texts = [f"sample number {i}" for i in range(10)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    elif suffix == ".txt":
        path.write_text("\n".join(texts) + "\n")
    elif suffix == ".parquet":
        pd.DataFrame({"text": texts}).to_parquet(path)
    else:
        pd.DataFrame({"text": texts}).to_csv(path, index=False)
    got = load_calibration_text(get_domain("general"), str(path), samples=4, seed=0)
    assert len(got.texts) == 4 and set(got.texts) <= set(texts) and got.source == str(path)
    again = load_calibration_text(get_domain("general"), str(path), samples=4, seed=0)
    assert again.texts == got.texts  # deterministic by seed


def test_template_fields_and_text_field(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    # The math domain's template for GSM8K-shaped rows is not the first source's; --text-field picks one.
    got = load_calibration_text(get_domain("math"), str(path), samples=5, seed=0, text_field="question")
    assert got.texts == ["1+1?"]
    with pytest.raises(DataError, match="has none of the fields"):
        load_calibration_text(get_domain("math"), str(path), samples=5, seed=0)


def test_user_domain_file(tmp_path):
    data = tmp_path / "legal.jsonl"
    data.write_text(json.dumps({"body": "the party of the first part"}) + "\n")
    toml = tmp_path / "legal.toml"
    toml.write_text(f'name = "legal"\ndescription = "contracts"\n[[sources]]\ndataset = "json"\ndata_files = "{data}"\nsplit = "train"\ntemplate = "{{body}}"\n')
    domain = get_domain(str(toml))
    assert domain.name == "legal"
    assert load_calibration_text(domain, None, samples=3, seed=0).texts == ["the party of the first part"]
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nsurprise = 1\n')
    with pytest.raises(DataError, match="unknown key"):
        get_domain(str(bad))


def test_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError):
        load_calibration_text(get_domain("math"), str(empty), samples=3, seed=0)
    with pytest.raises(DataError, match="data file not found"):
        load_calibration_text(get_domain("math"), str(tmp_path / "missing.jsonl"), samples=3, seed=0)
    with pytest.raises(DataError, match="unknown domain"):
        get_domain("astrology")
    # Offline mode is read at import time, so set it where the libraries look (no 25 s of retries).
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load dataset 'allenai/math_qa' from the hub.*--data"):
        load_calibration_text(get_domain("math"), None, samples=3, seed=0)
