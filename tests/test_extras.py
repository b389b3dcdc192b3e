"""A missing optional extra is one line naming the pip install that adds it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from banpick_cli.errors import MissingExtra, import_extra


def test_import_extra_names_the_install():
    with pytest.raises(MissingExtra, match=r"pip install 'banpick\[calibrate\]'") as err:
        import_extra("no_such_module_banpick", "calibrate", "reading calibration data")
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    assert import_extra("json", "calibrate", "x").dumps([1]) == "[1]"


@pytest.mark.parametrize("module, args, install", [
    ("datasets", ["profile", "--domain", "math", "--out", "{tmp}/p.safetensors", "--no-progress"], "banpick[calibrate]"),
    ("matplotlib", ["report", "{profile}", "-o", "{tmp}/r"], "banpick[report]"),
])
def test_the_cli_without_an_extra_says_what_to_install(module, args, install, tmp_path):
    from banpick_cli.paths import DEMO_MODEL_DIR

    profile = tmp_path / "demo.safetensors"
    if "{profile}" in args:  # a real profile of the demo model, made without the extra under test
        from banpick_cli.profile import write_profile
        from banpick_cli.profile.format import new_profile
        from banpick_cli.models.loading import load_model

        loaded = load_model(str(DEMO_MODEL_DIR), device="cpu")
        write_profile(new_profile(loaded.identity, loaded.fingerprint), profile)
    argv = [a.format(tmp=tmp_path, profile=profile) for a in args]
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from banpick_cli.cli.app import main\n"
            f"sys.argv = ['banpick', *{argv!r}]\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and install in done.stderr and "Traceback" not in done.stderr, done.stderr
