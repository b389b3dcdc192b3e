"""A new routing method is one record plus one routing function: registered in one place, it is in eval's
rows, export's manifest, the engine plugins' plan, the budget solver and `--help`, with no other file
touched (docs/architecture.md, "What an addition touches")."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from acc_helpers import ban_profile, mc_tasks, save_tasks
from banpick_cli.evaluation.harness import EvalOptions
from banpick_cli.models.loading import load_model
from banpick_cli.profile.format import read_profile
from banpick_cli.runtime import methods

# The whole addition: a routing function (here it keeps each token's router top-k, k=2 unless told) and its
# record. Written as a module so that the --help test can load it through an entry point as a plugin would.
TOY = textwrap.dedent('''
    from banpick_cli.routing import fixed_k
    from banpick_cli.runtime.methods import Knob, Method


    def first_k(logits, spec, k: int = 2):
        """The router's own first k experts per token (weights by the model's rule)."""
        return fixed_k(logits, spec, k)


    TOY = Method("toy", "toy", "toy_method:first_k", "banpick_cli.runtime.plan:per_layer_rules",
                 "banpick_cli.runtime.expect:width_k", engines=True, knob=Knob("k", "layer_mix", symbol="k"))
''')


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_method

    record = methods.register(toy_method.TOY)
    yield record
    methods.REGISTRY.pop("toy", None)
    sys.modules.pop("toy_method", None)


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return load_model(str(tiny_models["qwen3_moe"]), device="cpu")


def test_a_registered_method_gets_eval_rows_at_its_default_and_at_a_budget(toy, loaded, tmp_path):
    from banpick_cli.stages.eval import EvalSettings, run_eval

    path = save_tasks(tmp_path, mc_tasks(4))
    options = EvalOptions(batch_size=4, mc_scoring="loglik")
    report = run_eval(EvalSettings(tasks=(str(path),), methods=("toy",), options=options), model="tiny", loaded=loaded)
    assert [(r.label, r.avg_topk) for r in report.rows] == [("baseline", 4.0), ("toy", 2.0)]
    solved = run_eval(EvalSettings(tasks=(str(path),), methods=("toy",), target_avg_topk=3, options=options),
                      model="tiny", loaded=loaded)
    assert [(r.label, r.avg_topk) for r in solved.rows] == [("baseline", 4.0), ("toy(k=3)", 3.0)]


def test_a_registered_method_is_exported_and_planned_by_the_engine_plugins(toy, loaded, tmp_path):
    from banpick_cli.export import export_bundle
    from banpick_cli.runtime.engine import EngineRouter, EngineSettings, gate_modules

    ban_profile(loaded, tmp_path / "p.safetensors")
    profile = tmp_path / "p.safetensors"
    bundle = export_bundle(profile, "hf", tmp_path / "bundle", method="toy", overrides={"k": 3})
    served = bundle.manifest["served"]["toy"]
    assert served["method"] == "toy" and served["expected_avg_experts"]["overall_low"] == 3.0
    assert read_profile(bundle.profile).fingerprint == loaded.fingerprint
    gates = gate_modules(loaded.model.named_modules())
    router = EngineRouter(EngineSettings(str(profile), "toy", params={"k": 3}), gates, engine="test", slots=4)
    assert router.plan.method == "toy" and router.changed == {0, 1} and router.expected.summary() == "3.00"


def test_a_method_from_an_entry_point_is_listed_in_help(tmp_path):
    (tmp_path / "toy_method.py").write_text(TOY)
    dist = tmp_path / "toy_method-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-method\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[banpick.methods]\ntoy = toy_method:TOY\n")
    code = ("import sys; from banpick_cli.cli.app import app; sys.argv = ['banpick', 'eval', '--help']; app()")
    env = {"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[2]}", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "toy" in done.stdout.split("--method", 1)[1].split("--", 1)[0]
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert "toy" not in without.stdout.split("--method", 1)[1].split("--", 1)[0]


def test_every_consumer_asks_the_record_not_the_name():
    """No module outside the routing core and the registry compares a method's name with a literal."""
    import re

    package = Path(methods.__file__).resolve().parents[1]
    literal = re.compile(r"""method\s*(?:==|!=|in|not in)\s*\(?\s*["'](?:baseline|pick|ban|banpick|fixed-k|dynamic|des|odp|rice)["']""")
    found = [f"{p.relative_to(package)}:{i}" for p in package.rglob("*.py") if p.name != "methods.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not found, found
