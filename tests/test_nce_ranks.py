"""nce_loss(group=) with ranks that disagree (real gloo processes on loopback, 2 and 4 ranks): every rank
gets a ValueError naming what differs -- never a peer crash (gloo SIGABRT), a hang, or a silently wrong
loss -- and the ranks stay in step for the next call. Unequal B (the last batch of an epoch) is correct:
tests/test_nce.py's distributed test holds it to the single-process loss of the concatenated batch."""
import time

import pytest
import torch

from nce_dist_worker import free_port, mismatch_cases, mismatch_worker

pytestmark = pytest.mark.slow  # spawned gloo ranks


@pytest.mark.parametrize("world", [2, 4])
def test_disagreeing_ranks_all_get_a_value_error_naming_it(world, tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(mismatch_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.time() + 240
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.time())):
            if time.time() > deadline:
                raise TimeoutError("mismatch workers did not finish in 240 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    seen = [torch.load(tmp_path / f"mismatch-rank{r}.pt") for r in range(world)]
    for name, words, _ in mismatch_cases():
        for r in range(world):
            got = seen[r].get(name, "not reached")
            if name == "invalid" and r == world - 1:  # the bad rank raises its own, specific error
                assert got.startswith("ValueError") and "target" in got, (name, r, got)
                continue
            assert got.startswith("ValueError") and words in got, (name, r, got)
    for r in range(world):
        assert seen[r].get("after", "").startswith("loss"), seen[r]
