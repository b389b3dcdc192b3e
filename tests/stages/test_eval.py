"""`eval` on a tiny Qwen3-MoE: log-likelihood scoring against a reference, Avg-TopK from the runtime's
counters, baseline first with speed ratio 1, appendix-E baselines, and the bad-input messages."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from acc_helpers import argmax_letter, ban_profile, calib_file, letter_scores, mc_tasks, save_tasks
from banpick_cli.stages.eval import EvalSettings, run_eval
from banpick_cli.evaluation.harness import EvalOptions, run_tasks
from banpick_cli.cli.app import app
from banpick_cli.errors import BadSetting, DataError, ProfileError
from banpick_cli.models.loading import load_model
from banpick_cli.tasks.loglik import option_logprobs
from banpick_cli.tasks.registry import load_task_set
from banpick_cli.tasks.task import Task

LOGLIK = EvalOptions(batch_size=4, mc_scoring="loglik")


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return load_model(str(tiny_models["qwen3_moe"]), device="cpu")


def test_loglik_batches_equal_one_by_one_forwards(loaded):
    tasks = mc_tasks(5)
    batched = option_logprobs(loaded.model, loaded.tokenizer, tasks, batch_size=4)  # padded batches of 4
    reference = letter_scores(loaded, tasks)
    assert torch.allclose(torch.tensor(batched.logprobs), torch.tensor(reference), atol=1e-4)
    assert batched.tokens == sum(len(loaded.tokenizer(t.prompt + " A").input_ids) for t in tasks) * 3


def test_eval_table_numbers(loaded, tmp_path):
    ref = letter_scores(loaded, mc_tasks(8))
    answers = [argmax_letter(r) for r in ref[:5]] + ["ABC".replace(argmax_letter(r), "")[0] for r in ref[5:]]
    path = save_tasks(tmp_path, mc_tasks(8, answers=answers))
    profile = ban_profile(loaded, tmp_path / "p.safetensors")
    settings = EvalSettings(tasks=(str(path),), methods=("ban", "dynamic", "des"), lambdas=(0.5, 2.0), taus=(0.9,),
                            calib_data=str(calib_file(tmp_path)), options=LOGLIK)
    report = run_eval(settings, model="tiny", profile=tmp_path / "p.safetensors", loaded=loaded)
    rows = {r.label: r for r in report.rows}
    assert list(rows) == ["baseline", "ban(λ=0.5)", "ban(λ=2)", "dynamic(τ=0.9)", "des"]
    base = rows["baseline"].runs["tasks"]
    assert (base.correct, base.answered, len(base.outcomes)) == (5, 8, 8)  # the answers were set from the reference
    assert rows["baseline"].avg_topk == 4.0 and report.speedup(rows["baseline"]) == 1.0
    # K = floor(3 + (4 - 3) * lam * S), S <= 1 with L' = 0: lam 0.5 keeps K_min = 3 on every token
    assert rows["ban(λ=0.5)"].avg_topk == 3.0
    assert 3.0 <= rows["ban(λ=2)"].avg_topk <= 4.0
    assert 2.0 <= rows["des"].avg_topk <= 3.0  # des_bounds(4) = (2, 3)
    assert 1.0 <= rows["dynamic(τ=0.9)"].avg_topk <= 8.0
    data = report.to_dict()
    assert data["rows"][1]["results"]["tasks"]["delta"] == pytest.approx(
        100 * (rows["ban(λ=0.5)"].runs["tasks"].accuracy - base.accuracy), abs=0.01)
    assert data["rows"][0]["results"]["tasks"]["accuracy"] == 62.5
    json.dumps(data)  # the CI table is plain JSON


def test_odp_protects_key_tokens(loaded, tmp_path):
    path = save_tasks(tmp_path, mc_tasks(4))
    settings = EvalSettings(tasks=(str(path),), methods=("des", "odp"), calib_data=str(calib_file(tmp_path)), odp_protect=0.2,
                            options=LOGLIK)
    attention = loaded.model.config._attn_implementation
    report = run_eval(settings, model="tiny", loaded=loaded)
    des, odp = report.rows[1], report.rows[2]
    # ceil(0.2 x prompt length) key tokens per prompt, at each of the 2 MoE layers
    lengths = [len(loaded.tokenizer(t.prompt + " A").input_ids) for t in mc_tasks(4)]
    assert odp.extra["odp_key_tokens"] == 3 * 2 * sum(math.ceil(0.2 * n) for n in lengths)
    assert odp.extra["odp_routed"] == des.routed
    assert des.avg_topk < odp.avg_topk <= 3.0  # protected tokens run k_hi = 3 experts
    assert loaded.model.config._attn_implementation == attention  # eager only while ODP ran


def test_pick_reads_each_task_sets_domain(loaded, tmp_path):
    key = torch.zeros(len(loaded.layers), loaded.routing.num_experts, dtype=torch.bool)
    key[0, 7] = True
    ban_profile(loaded, tmp_path / "p.safetensors", domain="math", key=key)
    path = save_tasks(tmp_path, mc_tasks(4))
    settings = EvalSettings(tasks=(str(path),), methods=("pick",), strategy="A", options=LOGLIK)
    report = run_eval(settings, model="tiny", profile=tmp_path / "p.safetensors", loaded=loaded)
    pick = report.rows[1]
    assert pick.extra["domains"] == {"tasks": "math"}
    assert 4.0 <= pick.avg_topk <= 4.5  # strategy A adds expert 7 where missing, in 1 of 2 MoE layers


def test_bad_input_is_named(loaded, tmp_path):
    path = save_tasks(tmp_path, mc_tasks(2))
    with pytest.raises(ProfileError, match="need a routing profile"):
        run_eval(EvalSettings(tasks=(str(path),), methods=("ban",)), loaded=loaded)
    empty = ban_profile(loaded, tmp_path / "empty.safetensors")
    with pytest.raises(ProfileError, match="run `banpick profile --domain math` first"):
        run_eval(EvalSettings(tasks=(str(path),), methods=("pick",)), profile=tmp_path / "empty.safetensors",
                 loaded=loaded)
    from banpick_cli.profile.format import new_profile, write_profile

    write_profile(new_profile(loaded.identity, loaded.fingerprint), tmp_path / "nothing.safetensors")
    with pytest.raises(ProfileError, match="run `banpick layer-sensitivity` first"):
        run_eval(EvalSettings(tasks=(str(path),), methods=("ban",)), profile=tmp_path / "nothing.safetensors",
                 loaded=loaded)
    with pytest.raises(BadSetting, match="--method: unknown magic"):
        EvalSettings(tasks=("x",), methods=("magic",))
    with pytest.raises(BadSetting, match="--tau must be in"):
        EvalSettings(tasks=("x",), taus=(1.5,))


def test_no_answer_in_format_is_not_zero_percent(loaded, tmp_path):
    tasks = [Task(f"q{i}", "math", "math", f"Question: {i} + 1 =", str(i + 1)) for i in range(3)]
    path = save_tasks(tmp_path, tasks)
    options = EvalOptions(batch_size=4, max_new_tokens=1)
    run = run_tasks(loaded, load_task_set(str(path)), options)
    assert run.tokens == sum(1 for _ in run.outcomes)  # one new token each
    longest = max(len(loaded.tokenizer(t.prompt).input_ids) for t in tasks)
    assert run.positions == 3 * (longest + 1)  # one left-padded batch of 3, one step
    if any(o.answered for o in run.outcomes):
        pytest.skip("the tiny model happened to write a digit")
    with pytest.raises(DataError, match="answered none of the 3 tasks"):
        run_eval(EvalSettings(tasks=(str(path),), options=options), loaded=loaded)


def test_cli_eval_json(tiny_models, tmp_path):
    model = str(tiny_models["qwen3_moe"])
    path = save_tasks(tmp_path, mc_tasks(4))
    loaded = load_model(model, device="cpu")
    ban_profile(loaded, tmp_path / "p.safetensors")
    out = tmp_path / "table.json"
    result = CliRunner().invoke(app, ["eval", "--model", model, "--task", str(path), "--method", "baseline,ban",
                                      "--profile", str(tmp_path / "p.safetensors"), "--lambda", "0.5",
                                      "--mc-scoring", "loglik", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert json.loads(out.read_text()) == data
    assert [r["label"] for r in data["rows"]] == ["baseline", "ban(λ=0.5)"]
    assert data["rows"][1]["avg_topk"] == 3.0 and math.isfinite(data["rows"][1]["speedup"])
    bad = CliRunner().invoke(app, ["eval", "--model", model, "--task", str(path), "--method", "ban"])
    assert bad.exit_code == 1 and "need a routing profile" in bad.output


def test_same_file_names_get_their_folder_and_cpu_clock(loaded, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = save_tasks(tmp_path / "a", mc_tasks(2)), save_tasks(tmp_path / "b", mc_tasks(3))
    settings = EvalSettings(tasks=(str(first), str(second)), options=EvalOptions(mc_scoring="loglik", clock="cpu"))
    report = run_eval(settings, loaded=loaded)
    assert [t.name for t in report.task_sets] == ["a/tasks", "b/tasks"]
    assert {n: len(r.outcomes) for n, r in report.baseline.runs.items()} == {"a/tasks": 2, "b/tasks": 3}
    assert report.baseline.seconds > 0
    with pytest.raises(BadSetting, match="--clock"):
        EvalOptions(clock="sundial")


def test_matched_budget_rows_carry_their_knob_avg_topk_and_paired_statistics(loaded, tmp_path):
    path = save_tasks(tmp_path, mc_tasks(8))
    ban_profile(loaded, tmp_path / "p.safetensors")
    settings = EvalSettings(tasks=(str(path),), methods=("baseline", "fixed-k", "ban", "des", "dynamic"),
                            target_avg_topk=3.0, calib_data=str(calib_file(tmp_path)), options=LOGLIK)
    report = run_eval(settings, model="tiny", profile=tmp_path / "p.safetensors", loaded=loaded)
    data = report.to_dict()
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["baseline", "fixed-k", "ban", "des", "dynamic"]
    assert rows["fixed-k"]["label"] == "fixed-k(k=3)" and rows["fixed-k"]["avg_topk"] == 3.0
    assert rows["baseline"]["experts_vs_baseline"] == 1.0 and rows["fixed-k"]["experts_vs_baseline"] == 0.75
    for row in data["rows"][1:]:
        assert abs(row["extra"]["expected_avg_topk"] - 3.0) <= 0.2 and row["extra"]["target_avg_topk"] == 3.0
        run = next(r for r in report.rows if r.label == row["label"])
        overall, _ = report.compare(run)
        assert row["ci95"] == [round(overall.ci95[0], 2), round(overall.ci95[1], 2)]
        assert row["p_value"] == round(overall.p_value, 4) and 0 < row["p_value"] <= 1
        assert row["accuracy"] == row["results"]["tasks"]["accuracy"] and "ci95" in row["results"]["tasks"]
    assert data["rows"][0]["ci95"] == [0.0, 0.0] and data["rows"][0]["p_value"] == 1.0


def test_fixed_k_rows_and_budget_flags(loaded, tmp_path):
    path = save_tasks(tmp_path, mc_tasks(4))
    report = run_eval(EvalSettings(tasks=(str(path),), methods=("fixed-k",), ks=(2, 4), options=LOGLIK),
                      model="tiny", loaded=loaded)
    assert [(r.label, r.avg_topk) for r in report.rows] == [("baseline", 4.0), ("fixed-k(k=2)", 2.0), ("fixed-k(k=4)", 4.0)]
    assert report.rows[2].runs["tasks"].outcomes == report.rows[0].runs["tasks"].outcomes  # k = K_base is the model
    with pytest.raises(BadSetting, match="fixed-k needs --k"):
        EvalSettings(tasks=("math",), methods=("fixed-k",))
    with pytest.raises(BadSetting, match="--lambda and --target-avg-topk"):
        EvalSettings(tasks=("math",), methods=("ban",), lambdas=(0.7,), target_avg_topk=4.0)
    with pytest.raises(BadSetting, match="--target-avg-topk"):
        EvalSettings(tasks=("math",), methods=("ban",), target_avg_topk=0.5)


def test_sigterm_while_eval_starts_exits_3_saying_nothing_was_saved(tmp_path, monkeypatch):
    import os
    import signal

    import banpick_cli.stages.eval as eval_stage

    def term(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop eval")

    monkeypatch.setattr(eval_stage, "load_task_set", term)
    result = CliRunner().invoke(app, ["eval", "--task", "math", "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 3, result.output
    assert "eval stopped before it saved anything" in result.output
    assert not (tmp_path / "t.json").exists()


def test_batch_aware_rows_sit_beside_their_method_keep_avg_topk_and_rerun_the_same(loaded, tmp_path):
    path = save_tasks(tmp_path, mc_tasks(8))
    ban_profile(loaded, tmp_path / "p.safetensors")
    options = EvalOptions(batch_size=1, mc_scoring="loglik")
    settings = EvalSettings(tasks=(str(path),), methods=("ban", "fixed-k"), ks=(2,), batch_aware=True, options=options)
    report = run_eval(settings, model="tiny", profile=tmp_path / "p.safetensors", loaded=loaded)
    rows = {r.label: r for r in report.rows}
    assert list(rows) == ["baseline", "ban", "ban+batch", "fixed-k(k=2)", "fixed-k(k=2)+batch"]
    # The step swaps slots: each token keeps its count (Avg-TopK unchanged) and a forward never touches more
    # distinct experts (the bit-for-bit batch-of-one case is tests/runtime/test_hf_batch.py).
    for plain, aware in (("ban", "ban+batch"), ("fixed-k(k=2)", "fixed-k(k=2)+batch")):
        assert rows[aware].avg_topk == pytest.approx(rows[plain].avg_topk)
        assert rows[aware].unique_experts <= rows[plain].unique_experts
    data = report.to_dict()
    assert [r["unique_experts"] for r in data["rows"]] == [round(r.unique_experts, 3) for r in report.rows]
    again = run_eval(settings, model="tiny", profile=tmp_path / "p.safetensors", loaded=loaded)
    assert [[o.correct for o in r.runs["tasks"].outcomes] for r in again.rows] == \
        [[o.correct for o in r.runs["tasks"].outcomes] for r in report.rows]  # fixed batches: a rerun agrees
