"""A data-parallel rank, as torchrun would start it (same environment variables); run by test_distributed."""

from __future__ import annotations

import os


def rank_main(rank: int, world: int, port: int, model: str, data: str, out: str, result_dir: str, stream: bool = False) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import json

    import torch

    torch.set_num_threads(1)  # a forked child never enters the parent's OpenMP pool

    from banpick_cli.passes.distributed import init_from_env
    from banpick_cli.stages.profile import ProfileSettings, run_profile
    from banpick_cli.passes.usage_pass import RunOptions

    # The group is ours; run_profile finds it initialised, uses it and leaves it open (a second
    # init_process_group on the same port after a destroy would hang).
    dist = init_from_env()
    settings = ProfileSettings(domain="math", data=data, samples=11, seq_len=16, batch_size=2)
    result = run_profile(settings, out=out, model=model, device="cpu", options=RunOptions(checkpoint_every=2, stream=stream))
    facts = {"rank": result.rank, "world": result.world, "wrote": result.profile is not None,
             "tokens": result.usage.tokens, "samples": result.usage.samples, "layer_loads": result.layer_loads}

    # The reduction helpers on their own: exact int64 sums past 2**53, MIN/MAX, mean of sums over counts.
    big = torch.tensor([2**53 + rank + 1], dtype=torch.int64)
    lo, hi = torch.tensor([float(rank) - 5.0]), torch.tensor([float(rank) * 10.0])
    total, count = torch.tensor([10.0 * (rank + 1) ** 2], dtype=torch.float64), torch.tensor([rank + 1], dtype=torch.int64)
    dist.sum_(big), dist.min_(lo), dist.max_(hi)
    mean = dist.mean(total, count)
    facts.update(big=int(big), lo=float(lo), hi=float(hi), mean=float(mean), agree=dist.agree(rank == 0))
    dist.close()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(facts, handle)
