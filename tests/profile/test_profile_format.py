"""The profile file: round trip, readable with safetensors alone, atomic, and strict on bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from banpick_cli.errors import FingerprintMismatch, OutputError, ProfileError
from banpick_cli.profile.identity import ModelIdentity
from banpick_cli.routing import RouterSpec
from banpick_cli.profile import SCHEMA_VERSION, merge_profiles, new_profile, read_profile, write_profile
from banpick_cli.profile.stats import CandidateRule, candidate_mask

IDENT = ModelIdentity("tiny", "Qwen3MoeForCausalLM", "qwen3_moe", 3, (0, 2), 320,
                      RouterSpec(8, 4, "softmax", True, weights_in_logits_dtype=True))
FP = "sha256:" + "ab" * 32


def _profile(counts=None, domain="math"):
    prof = new_profile(IDENT, FP)
    counts = counts if counts is not None else torch.arange(16, dtype=torch.int64).reshape(2, 8)
    tokens = counts.sum(-1) // 4
    prof.domain(domain).put("expert_counts", counts)
    prof.domain(domain).put("token_counts", tokens)
    prof.domain(domain).put("candidates", candidate_mask(counts, tokens, CandidateRule(1.5)))
    prof.settings[f"domain/{domain}"] = {"candidates": CandidateRule(1.5).to_dict()}
    prof.provenance[f"profile/{domain}"] = {"stage": "profile", "samples": 3}
    return prof


def test_round_trip(tmp_path):
    prof = _profile()
    prof.put("ban/layer_kl", torch.tensor([0.1, 0.4]))
    path = write_profile(prof, tmp_path / "p.safetensors")
    back = read_profile(path, fingerprint=FP)
    assert back.model == IDENT and back.domains() == ["math"]
    assert torch.equal(back.get("domain/math/expert_counts"), prof.get("domain/math/expert_counts"))
    assert back.provenance["profile/math"]["samples"] == 3 and back.created_utc.endswith("Z")
    assert os.listdir(tmp_path) == ["p.safetensors"]  # no temporary file left


def test_readable_with_safetensors_alone(tmp_path):
    path = write_profile(_profile(), tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert meta["format"] == "banpick.routing_profile" and meta["schema_version"] == str(SCHEMA_VERSION)
        assert json.loads(meta["model"])["num_experts"] == 8 and meta["fingerprint"] == FP
        assert handle.get_tensor("domain/math/candidates").dtype == torch.bool


def test_candidates_rule():
    counts = torch.tensor([[10, 3, 1, 1, 1, 1, 1, 0]])
    tokens = torch.tensor([4])
    assert candidate_mask(counts, tokens, CandidateRule(2.0)).nonzero()[:, 1].tolist() == [0]
    assert candidate_mask(counts, tokens, CandidateRule(100.0, top_n=2)).nonzero()[:, 1].tolist() == [0, 1]
    assert not candidate_mask(counts, tokens, CandidateRule(0.1))[0, 7]  # never-used experts never count


def test_fingerprint_mismatch(tmp_path):
    path = write_profile(_profile(), tmp_path / "p.safetensors")
    with pytest.raises(FingerprintMismatch, match="another model"):
        read_profile(path, fingerprint="sha256:" + "cd" * 32)


@pytest.mark.parametrize(
    "writer, message",
    [
        (lambda p: p.write_bytes(b"\x00garbage that is not safetensors"), "not a banpick profile"),
        (lambda p: save_file({"x": torch.zeros(1)}, str(p)), "not a banpick profile"),
        (lambda p: save_file({"x": torch.zeros(1)}, str(p), metadata={"format": "banpick.routing_profile", "schema_version": "2"}), "newer"),
    ],
)
def test_bad_files(tmp_path, writer, message):
    path = tmp_path / "bad.safetensors"
    writer(path)
    with pytest.raises(ProfileError, match=message):
        read_profile(path)


def test_truncated_file(tmp_path):
    path = write_profile(_profile(), tmp_path / "p.safetensors")
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ProfileError):
        read_profile(path)


def test_misshaped_and_missing_tensors(tmp_path):
    prof = _profile()
    with pytest.raises(ProfileError, match="shape"):
        prof.put("domain/math/kl", torch.zeros(3, 8))
    with pytest.raises(ProfileError, match="unknown tensor"):
        prof.put("domain/math/whatever", torch.zeros(2, 8))
    with pytest.raises(ProfileError, match="run `banpick kl-scan --domain math` first"):
        prof.get("domain/math/kl")
    # A file whose metadata is right but lacks a required tensor is refused on read.
    path = write_profile(prof, tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.endswith("candidates")}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ProfileError, match="lacks tensor"):
        read_profile(path)


def test_write_to_missing_folder_leaves_nothing(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_profile(_profile(), tmp_path / "no" / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_merge_adds_counts_and_unions_domains():
    a = _profile(torch.full((2, 8), 4, dtype=torch.int64))
    b = _profile(torch.tensor([[20, 4, 4, 4, 4, 4, 4, 4]] * 2))
    c = _profile(torch.ones(2, 8, dtype=torch.int64), domain="code")
    merged = merge_profiles([a, b, c])
    assert merged.domains() == ["code", "math"]
    assert merged.get("domain/math/expert_counts")[0].tolist() == [24, 8, 8, 8, 8, 8, 8, 8]
    assert merged.get("domain/math/token_counts").tolist() == [20, 20]
    # candidates recomputed on the sum with the stored rule (ratio 1.5): only expert 0
    assert merged.get("domain/math/candidates")[0].nonzero().flatten().tolist() == [0]


def test_merge_refuses_other_model():
    other = _profile()
    other.fingerprint = "sha256:" + "ef" * 32
    with pytest.raises(FingerprintMismatch):
        merge_profiles([_profile(), other])


def _run_record(prof, when="2025-01-01T00:00:00Z", domain="math"):
    prof.provenance[f"profile/{domain}"] = {"stage": "profile", "samples": 3, "finished_utc": when, "command": "banpick profile"}
    return prof


def test_merge_refuses_the_same_run_twice():
    a, b = _run_record(_profile()), _run_record(_profile())
    with pytest.raises(ProfileError, match="same 'math' run as a.safetensors .*count its tokens twice"):
        merge_profiles([a, b], names=["a.safetensors", "b.safetensors"])
    # A merged profile merged again with one of its parts is refused too.
    both = merge_profiles([a, _run_record(_profile(), when="2025-01-02T00:00:00Z")])
    with pytest.raises(ProfileError, match="count its tokens twice"):
        merge_profiles([both, a])


def test_merge_refuses_different_candidate_rules():
    a, b = _profile(), _profile()
    b.settings["domain/math"] = {"candidates": CandidateRule(2.0, 3).to_dict()}
    with pytest.raises(ProfileError, match="ratio 2, top 3, the others with ratio 1.5, top 0"):
        merge_profiles([a, b], names=["a", "b"])


def test_merge_files_checks_paths_first(tmp_path):
    from banpick_cli.errors import BadSetting
    from banpick_cli.profile.merge import merge_files

    a = write_profile(_run_record(_profile()), tmp_path / "a.safetensors")
    b = write_profile(_run_record(_profile(), when="2025-01-02T00:00:00Z"), tmp_path / "b.safetensors")
    before = a.read_bytes()
    with pytest.raises(OutputError, match="is also an input"):
        merge_files([a, b], a)
    with pytest.raises(BadSetting, match="given twice"):
        merge_files([a, tmp_path / "." / "a.safetensors"], tmp_path / "m.safetensors")
    with pytest.raises(BadSetting, match="at least two"):
        merge_files([a], tmp_path / "m.safetensors")
    assert a.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    merged = merge_files([a, b], tmp_path / "m.safetensors")
    assert merged.get("domain/math/token_counts").tolist() == read_profile(a).get("domain/math/token_counts").mul(2).tolist()


def test_negative_counts_are_refused_on_read(tmp_path):
    path = write_profile(_profile(), tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["domain/math/expert_counts"][1, 2] = -1
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ProfileError, match="negative counts"):
        read_profile(path)
