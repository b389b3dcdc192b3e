"""`banpick report`: every figure a profile supports is written, readable, and embedded in one HTML page."""

from __future__ import annotations

import re
import struct

import pytest
import torch
from typer.testing import CliRunner

from banpick_cli.cli.app import app
from banpick_cli.errors import BadSetting
from banpick_cli.profile import write_profile
from banpick_cli.report import build_report
from banpick_cli.report.data import ban_k_distribution, candidate_overlap, specialised_layers
from banpick_cli.routing import ban_k
from synthetic import synthetic_profile

runner = CliRunner()


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_full_profile_writes_every_figure_and_one_self_contained_page(tmp_path):
    prof = synthetic_profile(layers=8, experts=16, k=4, domains=("math", "code"))
    report = build_report(prof, tmp_path / "rep")
    names = sorted(f.path.name for f in report.figures)
    domains = ["code", "math"]
    expected = {f"usage-heatmap-{d}.png" for d in domains} | {f"kl-{d}.png" for d in domains} \
        | {f"accuracy-gain-{d}.png" for d in domains} | {"candidate-overlap.png", "layer-sensitivity.png", "token-ratio.png", "ban-k.png"}
    assert expected <= set(names)
    assert [n for n in names if n.startswith("usage-bars-")] == ["usage-bars-" + "-".join(f"L{r}" for r in specialised_layers(prof)) + ".png"]
    assert report.skipped == []
    for fig in report.figures:
        width, height = _png_size(fig.path)
        assert width >= 600 and height >= 300, fig.path.name
        assert fig.path.stat().st_size > 15_000, f"{fig.path.name} looks empty"
    page = report.html.read_text()
    assert page.count("data:image/png;base64,") == len(report.figures)
    assert not re.search(r"(src|href)=['\"](?!data:)", page), "the page must not link to anything outside itself"
    for text in ("synthetic/Qwen3-like", "profile/math", "layer-sensitivity", "banpick profile --domain math", prof.fingerprint[:23]):
        assert text in page


def test_missing_stages_are_skipped_with_a_note(tmp_path):
    prof = synthetic_profile(layers=4, experts=8, k=2, domains=("math",), stages=())
    report = build_report(prof, tmp_path / "rep")
    bars = "usage-bars-" + "-".join(f"L{r}" for r in specialised_layers(prof)) + ".png"
    assert sorted(f.path.name for f in report.figures) == [bars, "usage-heatmap-math.png"]
    notes = " | ".join(note for _, note in report.skipped)
    for needed in ("two domains", "banpick kl-scan --domain math", "banpick failure-probe --domain math", "banpick layer-sensitivity"):
        assert needed in notes
    page = report.html.read_text()
    assert page.count("Not shown:") == len(report.skipped) == 5
    assert not (tmp_path / "rep" / "ban-k.png").exists()


def test_layers_choose_the_bar_charts_and_all_layers_pages(tmp_path):
    prof = synthetic_profile(layers=13, experts=4, k=1, domains=("math",), stages=(), dense_first=1)
    report = build_report(prof, tmp_path / "rep", layers=[3, 9], all_layers=True)
    names = {f.path.name for f in report.figures}
    assert "usage-bars-L3-L9.png" in names
    assert {"usage-bars-all-L1-L12.png", "usage-bars-all-L13-L13.png"} <= names  # 12 layers a page
    with pytest.raises(BadSetting, match="--layers: 0 is not an MoE layer"):
        build_report(prof, tmp_path / "rep", layers=[0])


def test_ban_k_distribution_uses_the_routing_core_on_bin_centres():
    prof = synthetic_profile(layers=3, experts=16, k=8, domains=("math",), stages=("ban",))
    hist = torch.zeros(3, 4, dtype=torch.int64)
    hist[0] = torch.tensor([0, 10, 30, 0])
    hist[1] = torch.tensor([5, 0, 0, 5])
    hist[2] = torch.tensor([0, 0, 0, 7])
    prof.put("ban/ratio_hist", hist)
    prof.put("ban/ratio_min", torch.tensor([0.25, 0.0, 0.5]))
    prof.put("ban/ratio_max", torch.tensor([0.75, 1.0, 1.0]))
    prof.put("ban/layer_sensitivity", torch.tensor([1.0, 0.0, 0.5]))
    dist = ban_k_distribution(prof)
    centres = torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64)
    for pos in range(3):
        k = ban_k(centres, float(prof.ban.layer_sensitivity[pos]), float(prof.ban.ratio_min[pos]),
                  float(prof.ban.ratio_max[pos]), 8, k_min=3, lam=0.7, beta=0.5)
        mean = float((hist[pos].double() * k).sum() / hist[pos].sum())
        assert dist.mean_k[pos] == pytest.approx(mean)
    # Layer 0 by hand: L'=1, bins at R=.375 (T'=.75) and .625 (T'=.25): K = floor(3 + 5*.7*S) = 6 and 5.
    assert dist.share[0][dist.k_values.index(6)] == pytest.approx(0.25)
    assert dist.share[0][dist.k_values.index(5)] == pytest.approx(0.75)
    assert dist.settings["lam"] == 0.7 and dist.from_profile


def test_candidate_overlap_by_hand():
    prof = synthetic_profile(layers=2, experts=4, k=1, domains=("a", "b", "c"), stages=())
    masks = {"a": [[1, 1, 0, 0], [1, 0, 0, 0]], "b": [[1, 0, 1, 0], [0, 0, 0, 1]], "c": [[1, 1, 0, 1], [0, 0, 0, 0]]}
    for d, m in masks.items():
        prof.domain(d).put("candidates", torch.tensor(m, dtype=torch.bool))
    ov = candidate_overlap(prof)
    assert ov.shared_by_all == [1, 0] and ov.shared_by_some == [1, 0]
    assert ov.unique == {"a": [0, 1], "b": [1, 1], "c": [1, 0]}
    assert ov.jaccard[0][1] == pytest.approx(1 / 5)  # a∩b = {L0E0}; a∪b = {L0E0, L0E1, L0E2, L1E0, L1E3}


def test_report_command(tmp_path):
    path = tmp_path / "p.safetensors"
    write_profile(synthetic_profile(layers=4, experts=8, k=2, domains=("math", "code"), stages=("kl",)), path)
    result = runner.invoke(app, ["report", str(path), "--out", str(tmp_path / "r"), "--layers", "L1,2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "usage-bars-L1-L2.png").is_file()
    # Each missing stage is one command on a line of its own, whole (never wrapped), runnable as printed.
    hints = [line.strip() for line in result.output.splitlines() if line.startswith("  banpick ")]
    assert hints == [f"banpick layer-sensitivity --profile {path}",
                     f"banpick failure-probe --profile {path} --domain code --task code",
                     f"banpick failure-probe --profile {path} --domain math --task math"]
    bad = runner.invoke(app, ["report", str(path), "--out", str(tmp_path / "r"), "--layers", "seven"])
    assert bad.exit_code == 1 and "--layers" in bad.output


def test_help_names_the_new_commands_and_flags():
    for args, names in ((["report", "--help"], ["--out", "--layers", "--all-layers"]),
                        (["import-usage", "--help"], ["--from", "--model", "--domain", "--replicas"]),
                        (["profile", "--help"], ["--device-map", "--sequential", "--checkpoint-every"])):
        result = runner.invoke(app, args, terminal_width=200)
        assert result.exit_code == 0 and all(n in result.output for n in names), args
