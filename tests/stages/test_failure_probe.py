"""`failure-probe` on a tiny Qwen3-MoE: gains equal an independent re-run, the key-expert rule,
resume after an interrupt, and the messages for an empty failure set and missing stages."""

from __future__ import annotations

import json

import pytest

from banpick_cli.errors import Interrupted
import torch
from typer.testing import CliRunner

from acc_helpers import argmax_letter, build_sharp_model, calib_file, letter_scores, mc_tasks, near_ties, save_tasks
from banpick_cli.tasks.task import Task
from banpick_cli.evaluation.harness import EvalOptions
from banpick_cli.stages.failure_probe import (EmptyFailureSet, FailureProbeSettings, accuracy_gain,
                                                 choose_key_experts, run_failure_probe)
from banpick_cli.stages.profile import ProfileSettings, run_profile
from banpick_cli.cli.app import app
from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.models.loading import load_model
from banpick_cli.profile.format import read_profile, write_profile
from banpick_cli.routing import pick

OPTIONS = EvalOptions(batch_size=4, mc_scoring="loglik")
N = 8


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return load_model(str(tiny_models["qwen3_moe"]), device="cpu")


def _profile(loaded, tmp_path, *, kl=True):
    path = tmp_path / "p.safetensors"
    run_profile(ProfileSettings(domain="math", data=str(calib_file(tmp_path)), samples=12, seq_len=32,
                                candidate_ratio=1.0), out=path, loaded=loaded)
    prof = read_profile(path)
    if kl:  # a hand-set KL scan: expert e of layer m has KL (m + 1) * (e + 1) / 100
        m, e = prof.shape
        prof.put("domain/math/kl", (torch.arange(1, m + 1)[:, None] * torch.arange(1, e + 1)[None, :]).float() / 100)
        write_profile(prof, path)
    return path, prof.get("domain/math/candidates")


def _forced_scores(loaded, tasks, layer, expert):
    """Reference: option scores with one expert forced in by strategy A, through RoutingHooks and pick()."""
    spec = loaded.router_specs()[layer]
    key = torch.zeros(loaded.routing.num_experts, dtype=torch.bool)
    key[expert] = True

    def override(position, logits, weights, indices):
        routing = pick(logits, spec, key, "A")
        return routing.weights, routing.indices

    return letter_scores(loaded, tasks, {layer: override})


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    return load_model(str(build_sharp_model(tmp_path_factory.mktemp("sharp") / "qwen3")), device="cpu")


def test_gains_equal_an_independent_rerun(sharp, tmp_path):
    loaded = sharp
    path, candidates = _profile(loaded, tmp_path)
    probed = [tuple(x) for x in candidates.nonzero().tolist()]
    tasks = near_ties(loaded, N)
    base = [argmax_letter(s) for s in letter_scores(loaded, tasks)]
    forced = {c: [argmax_letter(s) for s in _forced_scores(loaded, tasks, *c)] for c in probed}
    # Answers: where some candidate changes the model's choice, that candidate's choice (a failure the
    # candidate fixes); elsewhere a letter the model does not choose.
    answers = []
    for i in range(N):
        flipped = [forced[c][i] for c in probed if forced[c][i] != base[i]]
        answers.append(flipped[0] if flipped else "ABC".replace(base[i], "")[0])
    assert any(a != b for a, b in zip(answers, base))
    fixes = {c: sum(forced[c][i] == answers[i] for i in range(N)) for c in probed}
    assert max(fixes.values()) >= 1, "no candidate flips any task on this tiny model"
    task_path = save_tasks(tmp_path, [Task(t.id, t.domain, t.kind, t.prompt, a, choices=t.choices)
                                      for t, a in zip(tasks, answers)])
    # one prompt per batch: the same arithmetic as the unpadded reference, so near-ties resolve alike
    settings = FailureProbeSettings(domain="math", task=str(task_path), strategy="A", kl_quantile=0.5,
                                    max_per_layer=1, options=EvalOptions(batch_size=1, mc_scoring="loglik"))
    events = []
    result = run_failure_probe(settings, profile=path, model="tiny", loaded=loaded, progress=events.append)
    assert result.failure_set == [f"t{i}" for i in range(N)] and result.baseline_correct == 0
    assert {c: int(result.fixed[c]) for c in probed} == fixes
    assert int((result.fixed >= 0).sum()) == len(probed)  # everything else stays unprobed (-1, NaN gain)
    assert [e.done for e in events if e.task == "probe"] == list(range(1, len(probed) + 1))
    prof = read_profile(path)
    gain = prof.get("domain/math/accuracy_gain")
    assert torch.equal(gain.isnan(), result.fixed < 0)
    assert torch.allclose(gain[result.fixed >= 0], result.fixed[result.fixed >= 0].float() / N)
    expected_key, floor = choose_key_experts(result.fixed, prof.get("domain/math/kl"), settings)
    assert torch.equal(prof.get("domain/math/key_experts"), expected_key)
    assert prof.settings["pick/math"]["strategy"] == "A" and prof.settings["pick/math"]["range_factor"] == 2.0
    assert prof.settings["pick/math"]["failure_set"] == result.failure_set
    assert prof.provenance["failure-probe/math"]["candidates_probed"] == len(probed)
    assert not list(tmp_path.glob("*.partial"))
    # The CLI shows each gain as a paired comparison on all N tasks: a fix of 1 in 8 is p = 1.
    from banpick_cli.evaluation.stats import probe_gain

    out = CliRunner().invoke(app, ["failure-probe", "--model", str(loaded.identity.name_or_path), "--profile", str(path),
                                   "--domain", "math", "--task", str(task_path), "--strategy", "A", "--max-per-layer", "1",
                                   "--batch-size", "1", "--mc-scoring", "loglik", "--no-progress", "--json"])
    assert out.exit_code == 0, out.output
    stats = json.loads(out.output)["gain_stats"]
    layers = loaded.identity.moe_layers
    for m, e in probed:
        expected = probe_gain(fixes[m, e], N, N).to_dict()
        assert stats[f"L{layers[m]}E{e}"] == {k: expected[k] for k in ("delta", "ci95", "p_value")}
    assert all(v["p_value"] == 1.0 for k, v in stats.items() if v["delta"] == round(100 / N, 2))


def test_key_expert_rule():
    fixed = torch.tensor([[-1, 3, 0, 2, 1], [4, -1, 1, 1, -1]])
    kl = torch.tensor([[0.9, 0.1, 0.5, 0.4, 0.3], [0.2, 0.8, float("nan"), 0.6, 0.7]])
    s = FailureProbeSettings(domain="math", task="x", min_fixed=1, kl_quantile=0.5, max_per_layer=1)
    key, floor = choose_key_experts(fixed, kl, s)
    # probed with KL: 0.1 0.5 0.4 0.3 | 0.2 0.6 -> median 0.35; eligible: fixed >= 1 and KL >= 0.35
    assert floor == pytest.approx(0.35)
    assert key.nonzero().tolist() == [[0, 3], [1, 3]]
    key, floor = choose_key_experts(fixed, None, FailureProbeSettings(domain="math", task="x", kl_quantile=0, max_key=2))
    assert floor is None and key.nonzero().tolist() == [[0, 1], [1, 0]]  # gain alone, the two best
    assert torch.equal(accuracy_gain(fixed, 4).isnan(), fixed < 0)
    with pytest.raises(ProfileError, match="kl-scan --domain math"):
        choose_key_experts(fixed, None, s)
    with pytest.raises(BadSetting, match="--strategy"):
        FailureProbeSettings(domain="math", task="x", strategy="F")


def test_resume_after_interrupt(loaded, tmp_path):
    path, candidates = _profile(loaded, tmp_path, kl=False)
    wrong = ["ABC".replace(argmax_letter(s), "")[0] for s in letter_scores(loaded, mc_tasks(4))]
    task_path = save_tasks(tmp_path, mc_tasks(4, answers=wrong))
    settings = FailureProbeSettings(domain="math", task=str(task_path), kl_quantile=0, options=OPTIONS)
    before = path.read_bytes()

    def stop_after_first(event):
        if event.task == "probe" and event.done == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="failure-probe stopped: the failure set and 1 of .* candidates finished and saved"):
        run_failure_probe(settings, profile=path, loaded=loaded, progress=stop_after_first)
    assert path.read_bytes() == before and len(list(tmp_path.glob("*.partial"))) == 1
    resumed = run_failure_probe(settings, profile=path, loaded=loaded)
    assert resumed.resumed == 1
    (tmp_path / "fresh").mkdir()
    fresh_path = tmp_path / "fresh" / "p.safetensors"
    fresh_path.write_bytes(before)
    fresh = run_failure_probe(settings, profile=fresh_path, loaded=loaded)
    assert torch.equal(resumed.fixed, fresh.fixed) and resumed.failure_set == fresh.failure_set


def test_empty_failure_set_and_missing_stages(loaded, tmp_path, tiny_models):
    path, _ = _profile(loaded, tmp_path, kl=False)
    base = [argmax_letter(s) for s in letter_scores(loaded, mc_tasks(3))]
    task_path = save_tasks(tmp_path, mc_tasks(3, answers=base))
    before = path.read_bytes()
    with pytest.raises(EmptyFailureSet, match="answers all 3 tasks .* right: the failure set is empty"):
        run_failure_probe(FailureProbeSettings(domain="math", task=str(task_path), kl_quantile=0, options=OPTIONS),
                          profile=path, loaded=loaded)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.partial"))
    with pytest.raises(ProfileError, match="run `banpick kl-scan --domain math` first"):
        run_failure_probe(FailureProbeSettings(domain="math", task=str(task_path), options=OPTIONS),
                          profile=path, loaded=loaded)
    with pytest.raises(ProfileError, match="run `banpick profile --domain code` first"):
        run_failure_probe(FailureProbeSettings(domain="code", task=str(task_path), kl_quantile=0, options=OPTIONS),
                          profile=path, loaded=loaded)
    runner = CliRunner()
    result = runner.invoke(app, ["failure-probe", "--model", str(tiny_models["qwen3_moe"]), "--profile", str(path),
                                 "--domain", "math", "--task", str(task_path), "--kl-quantile", "0",
                                 "--mc-scoring", "loglik", "--no-progress"])
    assert result.exit_code == 1 and "failure set is empty" in result.output


def test_candidates_choice(loaded, tmp_path):
    from banpick_cli.stages.failure_probe import probe_candidates

    path, mask = _profile(loaded, tmp_path)
    prof = read_profile(path)
    pairs = lambda c, **kw: probe_candidates(prof, FailureProbeSettings(domain="math", task="x", candidates=c, **kw))
    assert pairs("mask") == [tuple(x) for x in mask.nonzero().tolist()]
    assert len(pairs("all")) == 2 * 8
    counts = prof.get("domain/math/expert_counts")
    assert pairs("top-1") == [(m, int(counts[m].argmax())) for m in range(2)]
    # --probe-top 1: each layer's largest-KL candidate; the hand-set KL grows with the expert id
    assert pairs("all", probe_top=1) == [(0, 7), (1, 7)]
    with pytest.raises(BadSetting, match="--candidates"):
        FailureProbeSettings(domain="math", task="x", candidates="some")
