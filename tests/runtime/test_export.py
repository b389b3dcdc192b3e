"""`banpick export`: the bundle, its manifest and compact profile, bad inputs, and the three lines in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import typer

from banpick_cli.cli.runtime import export as export_command
from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.models.base import RoutingHooks
from banpick_cli.models.loading import load_model
from banpick_cli.profile.format import new_profile, read_profile, write_profile
from banpick_cli.routing import ban_k, token_ratio
from banpick_cli.runtime import apply
from banpick_cli.runtime.bundle import sha256_of
from banpick_cli.runtime.export import export_bundle
from banpick_cli.runtime.snippets import three_lines
from rt_helpers import ids_for, key_at, make_profile


# The command as the CLI registers it, on an app of its own: app.py imports every stage module,
# some of which others are still writing. A second command keeps `export` a subcommand.
app = typer.Typer()
app.command("export")(export_command)
app.command("noop")(lambda: None)


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return load_model(str(tiny_models["qwen3_moe"]), device="cpu")


@pytest.fixture()
def full_profile(qwen, tmp_path):
    m, e = len(qwen.layers), qwen.routing.num_experts
    prof = make_profile(qwen, key=key_at(qwen, 0, [1, 2]), counts=torch.randint(1, 50, (m, e)))
    prof.put("domain/math/kl", torch.rand(m, e))
    prof.put("ban/layer_kl", torch.rand(m))
    prof.settings["pick/math"] = {"strategy": "C", "range_factor": 2.0}
    return write_profile(prof, tmp_path / "full.safetensors")


def test_bundle_holds_what_inference_needs(qwen, full_profile, tmp_path):
    result = export_bundle(full_profile, "vllm", tmp_path / "bundle", method="banpick", domain="math")
    names = sorted(p.name for p in result.files)
    assert names == ["Dockerfile.banpick", "README.md", "manifest.json", "profile.safetensors", "serve.env"]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == qwen.fingerprint
    assert (manifest["method"], manifest["domain"], manifest["target"]) == ("banpick", "math", "vllm")
    assert manifest["hyperparameters"]["lam"] == 1.0 and manifest["hyperparameters"]["range_factor"] == 2.0
    assert manifest["profile"]["sha256"] == sha256_of(result.profile)
    assert manifest["banpick_version"]
    compact = read_profile(result.profile, fingerprint=qwen.fingerprint)  # still a valid v1 profile
    assert sorted(compact.tensors) == ["ban/layer_sensitivity", "ban/ratio_hist", "ban/ratio_max", "ban/ratio_min",
                                       "domain/math/key_experts"]
    runtime = compact.settings["runtime"]["served"]["banpick/math"]
    assert len(runtime["expected_avg_experts"]["per_layer_low"]) == len(qwen.layers)
    assert manifest["engine_slots"] == runtime["engine_slots"] == 4  # Ban keeps <= 2 at layer 0, + 2 key experts
    assert "BANPICK_PROFILE=/opt/banpick/bundle" in (tmp_path / "bundle" / "Dockerfile.banpick").read_text()
    assert "vllm serve" in (tmp_path / "bundle" / "README.md").read_text()


def test_method_chosen_at_serve_time(qwen, full_profile, tmp_path):
    result = export_bundle(full_profile, "hf", tmp_path / "b")
    assert result.manifest["method"] is None
    assert sorted(result.manifest["served"]) == ["ban", "banpick/math", "pick/math"]
    ids = ids_for(qwen)
    with torch.inference_mode():
        with apply(qwen, tmp_path / "b", method="pick", domain="math", strategy="A", count_changes=True) as h:
            qwen.model(ids)
        with apply(qwen, tmp_path / "b") as base:  # no method anywhere: the model's own routing
            qwen.model(ids)
    assert h.stats().key_added[0] > 0 and base.plan.method == "baseline"


def test_export_refuses_bad_input(qwen, tmp_path):
    bare = write_profile(new_profile(qwen.identity, qwen.fingerprint), tmp_path / "bare.safetensors")
    with pytest.raises(ProfileError, match=r"run `banpick layer-sensitivity` first"):
        export_bundle(bare, "vllm", tmp_path / "o", method="ban")
    with pytest.raises(ProfileError, match=r"run `banpick kl-scan --domain code` first"):
        export_bundle(bare, "sglang", tmp_path / "o", method="pick", domain="code")
    with pytest.raises(ProfileError, match="layer-sensitivity"):
        export_bundle(bare, "hf", tmp_path / "o")  # nothing servable: names the first stage
    with pytest.raises(BadSetting, match="known targets: vllm, sglang, hf"):
        export_bundle(bare, "tgi", tmp_path / "o")
    with pytest.raises(BadSetting, match="HF runtime only"):
        export_bundle(bare, "vllm", tmp_path / "o", method="des")
    assert not (tmp_path / "o").exists()


def test_cli_export_exit_codes(full_profile, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["export", str(full_profile), "--target", "sglang", "--out", str(tmp_path / "b"),
                             "--method", "ban", "--param", "lam=0.5", "--json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["method"] == "ban" and summary["served"]["ban"]["basis"].startswith("Ban's K")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["overrides"] == {"lam": 0.5}
    bad = runner.invoke(app, ["export", str(full_profile), "--target", "tgi", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 1 and "known targets: vllm, sglang, hf" in bad.output
    missing = runner.invoke(app, ["export", str(full_profile), "-t", "hf", "-o", str(tmp_path / "d"), "--method", "pick",
                                  "--domain", "code"])
    assert missing.exit_code == 1 and "kl-scan --domain code" in missing.output


def test_expected_avg_experts_is_what_the_runtime_counts(qwen, tmp_path):
    """Ban's expected K from the ratio histogram equals the K the HF runtime reports (layer 0 sees the
    unmodified model's logits, so its calibration histogram is exact)."""
    spec = qwen.router_specs()[0]
    ids = ids_for(qwen, batch=4, length=16, seed=7)
    ratios = []
    with torch.inference_mode(), RoutingHooks(qwen.layers, qwen.routing.num_experts,
                                              observers=[lambda p, lg, w, i: ratios.append(token_ratio(lg, spec, 1)) if p == 0 else None]):
        qwen.model(ids)
    prof = make_profile(qwen)
    bins = 2000
    hist = torch.histc(ratios[0], bins=bins, min=0.0, max=1.0).long()
    prof.put("ban/ratio_hist", hist.unsqueeze(0).expand(len(qwen.layers), -1).contiguous())
    path = write_profile(prof, tmp_path / "p.safetensors")
    manifest = export_bundle(path, "hf", tmp_path / "b", method="ban").manifest
    expected = manifest["expected_avg_experts"]["per_layer_low"][0]
    with torch.inference_mode(), apply(qwen, tmp_path / "b") as h:
        qwen.model(ids)
    exact = float(ban_k(ratios[0], 0.0, 0.3, 0.9, spec.top_k, k_min=1, lam=1.0, beta=0.5).double().mean())
    assert h.stats().avg_experts[0] == pytest.approx(exact)
    assert expected == pytest.approx(exact, abs=0.05)


def test_three_lines_apply_the_bundle_in_a_fresh_process(qwen, full_profile, tiny_models, tmp_path):
    bundle = tmp_path / "banpick-bundle"
    manifest = export_bundle(full_profile, "hf", bundle, method="banpick", domain="math",
                             model=str(tiny_models["qwen3_moe"])).manifest
    readme = (bundle / "README.md").read_text()
    lines = three_lines(manifest, "banpick-bundle")
    assert lines.rstrip() in readme and len(lines.strip().splitlines()) == 3
    check = ("import torch, json\n"
             "out = model(torch.arange(12).view(2, 6)).logits\n"
             "print(json.dumps({'method': handle.plan.method, 'domain': handle.plan.domain, "
             "'avg': handle.stats().avg_experts, 'finite': bool(torch.isfinite(out).all())}))\n")
    run = subprocess.run([sys.executable, "-c", lines + check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["method"] == "banpick" and report["domain"] == "math" and report["finite"]
    assert all(1.0 <= a <= 4.0 for a in report["avg"]) and report["avg"] != [4.0, 4.0]
