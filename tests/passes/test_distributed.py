"""Data-parallel `profile` on torch.distributed (gloo, 2 CPU processes) counts exactly what one process counts."""

from __future__ import annotations

import json
import socket
import time

import torch
import torch.multiprocessing as mp

from banpick_cli.passes.distributed import Dist, world_from_env
from banpick_cli.stages.profile import ProfileSettings, run_profile
from banpick_cli.profile import read_profile
from dist_worker import rank_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(model: str, data, out, folder, stream: bool = False) -> list[dict]:
    """Runs `profile` as two gloo ranks (dist_worker.rank_main); returns each rank's facts."""
    # fork: the ranks start with torch and transformers already imported (spawn re-imports them: ~10 s a rank here).
    ranks = mp.start_processes(rank_main, args=(2, _free_port(), model, str(data), str(out), str(folder), stream), nprocs=2,
                               join=False, start_method="fork")
    deadline = time.time() + 120
    while not ranks.join(timeout=2):
        if time.time() > deadline:
            for proc in ranks.processes:
                proc.kill()
            raise AssertionError("the data-parallel ranks did not finish in 120 s")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _calibration(folder):
    data = folder / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"case {i}: {i} * 7 = {i * 7} " + "fox " * (i % 5)}) for i in range(11)) + "\n")
    return data


def _two_ranks_against_one_process(model, tmp_path, monkeypatch, **kw):
    """Runs two gloo ranks and one process on the same data; asserts their counts are equal; returns both."""
    data = _calibration(tmp_path)
    out = tmp_path / "dp.safetensors"
    ranks = _run_ranks(model, data, out, tmp_path, **kw)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    single = run_profile(ProfileSettings(domain="math", data=str(data), samples=11, seq_len=16, batch_size=2),
                         out=tmp_path / "one.safetensors", model=model, device="cpu")
    dp = read_profile(out)
    for name in ("expert_counts", "token_counts", "candidates"):
        assert torch.equal(dp.get(f"domain/math/{name}"), single.profile.get(f"domain/math/{name}")), name
    return ranks, single, dp


def test_two_ranks_count_exactly_what_one_process_counts(tiny_models, tmp_path, monkeypatch):
    ranks, single, dp = _two_ranks_against_one_process(str(tiny_models["deepseek_v2"]), tmp_path, monkeypatch)
    assert [r["wrote"] for r in ranks] == [True, False]  # rank 0 writes, rank 1 does not
    assert {r["tokens"] for r in ranks} == {single.usage.tokens} and {r["samples"] for r in ranks} == {11}
    assert dp.provenance["profile/math"]["world_size"] == 2 and dp.provenance["profile/math"]["samples"] == 11
    assert not list(tmp_path.glob("*.partial"))  # both ranks' sidecars are gone after the write
    for r in ranks:
        assert r["big"] == 2 * 2**53 + 3  # int64, exact (float64 would round this)
        assert (r["lo"], r["hi"], r["agree"]) == (-5.0, 10.0, False)
        assert r["mean"] == (10.0 + 40.0) / 3  # sum of sums over sum of counts, not (10/1 + 40/2) / 2 = 15


def test_two_streaming_ranks_each_read_every_layer_and_count_what_one_process_counts(tiny_models, tmp_path, monkeypatch):
    ranks, single, dp = _two_ranks_against_one_process(str(tiny_models["qwen3_moe"]), tmp_path, monkeypatch, stream=True)
    # 6 batches of 2 texts: 3 a rank, in windows of 2 batches (--checkpoint-every 2): 2 windows, each reading
    # every layer up to the last MoE layer (all 3 of the tiny model's) on both ranks.
    assert [r["layer_loads"] for r in ranks] == [2 * 3, 2 * 3]
    assert dp.provenance["profile/math"]["stream"] is True and dp.provenance["profile/math"]["world_size"] == 2


def test_shards_cover_every_batch_once():
    shards = [Dist(rank=r, world=3).shard(10) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10)) and shards[1] == [1, 4, 7]
    assert world_from_env() == (0, 1, 0)
