"""Multi-process training: 2 gloo CPU ranks match one process on the same global batch."""
import multiprocessing as mp
import os
import socket

import pytest
import torch

from embedkit import Embedder, EmbedderConfig
from embedkit.train import Example, Stage, Task, Trainer

pytestmark = pytest.mark.slow  # spawned gloo ranks training

WORLD = 2


def make_trainer(group):
    torch.manual_seed(0)
    model = Embedder(EmbedderConfig.tiny(out_dim=32, mrl_dims=(16, 32))).double()
    exs = [Example(f"query {i} {'ab' * (i % 3)}", f"doc {i % 7} body {i}", (f"neg {i}", f"other {i * 3}"))
           for i in range(24)]
    exs[5] = Example(exs[5].query, exs[2].positive, exs[5].negatives)  # a duplicate target: masked
    stages = [Stage("pre", [Task("t", exs, task="find", batch_size=8)], steps=2, lr=1e-3),
              Stage("fine", [Task("t", exs, batch_size=8)], steps=2, lr=1e-3, hard_negatives=True,
                    learn_temperature=True, chunk_size=5)]
    return Trainer(model, stages, seed=3, progress=False, log_every=1, group=group)


def _rank_main(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        tr = make_trainer(True)
        tr.fit()
        if rank == 0:
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in tr.model.state_dict().items()}
            state["__log_temperature"] = tr.log_temperature.detach().reshape(1)
            save_file(state, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_single_process(tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, out)) for r in range(WORLD)]
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env
    assert [p.exitcode for p in procs] == [0, 0]
    from safetensors.torch import load_file

    ddp = load_file(out)
    single = make_trainer(None)
    single.fit()
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-9, atol=1e-11, msg=k)
    torch.testing.assert_close(ddp["__log_temperature"][0], single.log_temperature.detach(), rtol=1e-9, atol=1e-12)
    # And training moved the weights (the comparison is not between two untouched models).
    torch.manual_seed(0)
    fresh = Embedder(EmbedderConfig.tiny(out_dim=32, mrl_dims=(16, 32))).double()
    assert not torch.equal(fresh.projection.weight, single.model.projection.weight)
