"""Bad inputs of issue #23 (item 10): each is one line, exit 1, nothing written, in words that say what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rt_helpers import key_at, make_profile  # noqa: E402

from banpick_cli.cli.app import app  # noqa: E402
from banpick_cli.errors import ProfileError  # noqa: E402
from banpick_cli.export import writer as export_module  # noqa: E402
from banpick_cli.models.loading import load_model  # noqa: E402
from banpick_cli.profile.format import read_profile, write_profile  # noqa: E402

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _clean_failure(result, message: str, folder: Path, keep: list[str]) -> str:
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert message in err, err
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)
    return err


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return load_model(str(tiny_models["qwen3_moe"]), device="cpu")


def _full(qwen, path: Path, *, nan: bool = False) -> Path:
    """Writes a profile with usage, KL, key experts and Ban; `nan`: every KL and Ban float is NaN."""
    m, e = len(qwen.layers), qwen.routing.num_experts
    prof = make_profile(qwen, key=key_at(qwen, 0, [1, 2]), counts=torch.randint(1, 50, (m, e), generator=torch.Generator().manual_seed(0)))
    prof.put("domain/math/kl", torch.rand(m, e))
    prof.put("ban/layer_kl", torch.rand(m))
    prof.settings["pick/math"] = {"strategy": "C", "range_factor": 2.0}
    if nan:
        for name in ("domain/math/kl", "ban/layer_kl", "ban/layer_sensitivity", "ban/ratio_min", "ban/ratio_max"):
            prof.tensors[name] = torch.full_like(prof.tensors[name], float("nan"))
    return write_profile(prof, path)


def test_export_params_no_served_method_takes_or_of_a_bad_value_are_one_line(qwen, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    source = _full(qwen, work / "p.safetensors")
    keep = ["p.safetensors"]
    # Without --method every served method is built: a key none of them has was a 45-line traceback (max() of
    # an empty sequence), a bad value the same.
    err = _clean_failure(_run("export", source, "--target", "hf", "--param", "bogus=1", "-o", work / "b"),
                         "--param bogus: no method the bundle serves has this hyperparameter", work, keep)
    assert "ban: " in err and "lam" in err
    _clean_failure(_run("export", source, "--target", "hf", "--param", "lam=notjson", "-o", work / "b"),
                   "lam (lambda) must be a finite number", work, keep)
    _clean_failure(_run("export", source, "--target", "hf", "--method", "ban", "--param", "lam=notjson", "-o", work / "b"),
                   "lam (lambda) must be a finite number", work, keep)
    _clean_failure(_run("export", source, "--target", "vllm", "--method", "bogus", "-o", work / "b"),
                   "unknown method 'bogus'", work, keep)


def test_export_param_goes_to_the_methods_that_take_it(qwen, tmp_path, monkeypatch):
    # lam is Ban's: Pick, which has no lam, is still served (it was silently left out of the bundle).
    monkeypatch.setattr(export_module, "_bundle_wheel", lambda folder: None)  # the wheel build is tested in test_export
    source = _full(qwen, tmp_path / "p.safetensors")
    result = export_module.export_bundle(source, "hf", tmp_path / "b", overrides={"lam": 0.5})
    served = result.manifest["served"]
    assert sorted(served) == ["ban", "banpick/math", "pick/math"]
    assert served["ban"]["hyperparameters"]["lam"] == 0.5 and served["banpick/math"]["hyperparameters"]["lam"] == 0.5
    assert "lam" not in served["pick/math"]["hyperparameters"]


def test_report_refuses_what_export_refuses(qwen, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    source = _full(qwen, work / "nan.safetensors", nan=True)
    keep = ["nan.safetensors"]
    pytest.importorskip("matplotlib")
    said = _clean_failure(_run("report", source, "--out", work / "report"), "the profile is corrupt", work, keep)
    assert said == _clean_failure(_run("export", source, "--target", "hf", "-o", work / "b"), "", work, keep)
    assert "'ban/layer_kl' holds NaN/inf at MoE layer(s) [0, 1" in said and "rerun `banpick layer-sensitivity`" in said
    # KL alone: all NaN means nothing was scanned; inf is no KL at all.
    prof = read_profile(_full(qwen, work / "kl.safetensors"))
    keep.append("kl.safetensors")
    prof.tensors["domain/math/kl"][1, 3] = float("inf")
    write_profile(prof, work / "kl.safetensors")
    _clean_failure(_run("report", work / "kl.safetensors", "--out", work / "report"),
                   "'domain/math/kl' holds inf at MoE layer(s) [1]: the profile is corrupt; rerun `banpick kl-scan --domain math`",
                   work, keep)
    prof.tensors["domain/math/kl"].fill_(float("nan"))
    write_profile(prof, work / "kl.safetensors")
    _clean_failure(_run("report", work / "kl.safetensors", "--out", work / "report"), "'domain/math/kl' holds no value (all NaN)",
                   work, keep)


def test_kl_scan_refuses_a_negative_show_and_more_experts_than_the_model_has(qwen, tiny_models, data_file, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    source = _full(qwen, work / "p.safetensors")
    before = source.read_bytes()
    common = ["--profile", source, "--domain", "math", "--model", tiny_models["qwen3_moe"], "--data", data_file,
              "--samples", 2, "--seq-len", 8, "--device", "cpu", "--no-progress"]
    _clean_failure(_run("kl-scan", *common, "--show", -1), "--show must be >= 0, got -1", work, ["p.safetensors"])
    experts = qwen.routing.num_experts
    _clean_failure(_run("kl-scan", *common, "--candidates", f"top-{experts + 1}"),
                   f"--candidates top-{experts + 1}: this model has {experts} experts per layer", work, ["p.safetensors"])
    assert source.read_bytes() == before  # the profile is not rewritten


def test_eval_checks_the_target_budget_whatever_the_methods(tmp_path):
    # Default methods (the baseline alone) ran and exited 0 with one row; --method ban refused the same target.
    _clean_failure(_run("eval", "--task", "math", "--limit", 2, "--target-avg-topk", 100, "-o", tmp_path / "t.json",
                        "--no-progress"), "--target-avg-topk must be in [1, K_base=8], got 100", tmp_path, [])


def test_inputs_that_are_not_files_say_what_they_are(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    fifo, folder, loop = work / "fifo", work / "folder", work / "loop"
    os.mkfifo(fifo)
    folder.mkdir()
    loop.symlink_to(work / "loop2")
    (work / "loop2").symlink_to(loop)
    keep = ["fifo", "folder", "loop", "loop2"]
    common = ["--domain", "math", "--samples", 2, "--out", work / "p.safetensors", "--no-progress"]
    for data, words in ((fifo, "is not a regular file (a FIFO)"), ("/dev/zero", "is not a regular file (a character device)"),
                        (folder, "is a folder, not a file"), (loop, "is a symlink loop")):
        _clean_failure(_run("profile", "--data", data, *common), f"data file {data} {words}", work, keep)
    _clean_failure(_run("inspect", folder), f"profile {folder} is a folder, not a file", work, keep)
    _clean_failure(_run("inspect", loop), f"profile {loop} is a symlink loop", work, keep)
    _clean_failure(_run("inspect", work / "none.safetensors"), "profile not found", work, keep)
    _clean_failure(_run("profile", "--model", loop, *common), f"model {loop} is a symlink loop", work, keep)


def test_a_domain_the_profile_lacks_names_profile_not_kl_scan(qwen, tmp_path):
    prof = read_profile(_full(qwen, tmp_path / "p.safetensors"))
    with pytest.raises(ProfileError, match=r"no domain 'chemistry' \(it holds math\): run `banpick profile --domain chemistry`"):
        prof.domain("chemistry").key_experts
    prof.domain("math").drop("key_experts")
    with pytest.raises(ProfileError, match="run `banpick kl-scan --domain math` first .*failure-probe"):
        prof.domain("math").key_experts


def test_a_dataset_neither_cached_nor_reachable_is_said_so(tmp_path):
    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = ["profile", "--domain", "math", "--data", "someone/not-there", "--samples", "2", "--out",
            str(tmp_path / "p.safetensors"), "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "banpick_cli", *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "None" not in done.stderr and "not in the local datasets cache, and the hub could not be reached" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf") == []
