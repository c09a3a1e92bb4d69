"""Multi-process training: 2 gloo CPU ranks match one process on the same global batch, through
torch's DistributedDataParallel, which all-reduces every gradient bucket once per step (also in the
cached step, whose re-forward chunks but the last run in no_sync)."""
import json
import multiprocessing as mp
import os
import socket

import pytest
import torch

from embedkit import Embedder, EmbedderConfig
from embedkit.train import Example, Stage, Task, Trainer
from embedkit.train.spawned_rank import end_spawned_rank

pytestmark = pytest.mark.slow  # spawned gloo ranks training

WORLD = 2


def make_trainer(group, cls=Trainer):
    torch.manual_seed(0)
    model = Embedder(EmbedderConfig.tiny(out_dim=32, mrl_dims=(16, 32))).double()
    exs = [Example(f"query {i} {'ab' * (i % 3)}", f"doc {i % 7} body {i}", (f"neg {i}", f"other {i * 3}"))
           for i in range(24)]
    exs[5] = Example(exs[5].query, exs[2].positive, exs[5].negatives)  # a duplicate target: masked
    stages = [Stage("pre", [Task("t", exs, task="find", batch_size=8)], steps=2, lr=1e-3),
              Stage("fine", [Task("t", exs, batch_size=8)], steps=2, lr=1e-3, hard_negatives=True,
                    learn_temperature=True, chunk_size=5)]
    return cls(model, stages, seed=3, progress=False, log_every=1, group=group)


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
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_spawned_rank()  # a finished gloo rank can abort in interpreter finalization


class RecordingTrainer(Trainer):
    """Records, per step, the forwards through the stage's DDP wrapper and the gradient buckets DDP
    all-reduces (a comm hook that notes the bucket, then does DDP's own all-reduce-and-average)."""

    steps_seen: list

    def _start_stage(self, stage, index):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        super()._start_stage(stage, index)
        assert isinstance(self._ddp, DistributedDataParallel), type(self._ddp)

        def count_forward(module, args):
            self._now["forwards"] += 1

        def reduce(state, bucket):
            self._now["reduced"].append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)

        self._ddp.register_forward_pre_hook(count_forward)
        self._ddp.register_comm_hook(None, reduce)

    def train_step(self, stage, **kw):
        self._now = {"stage": stage.name, "forwards": 0, "reduced": []}
        rec = super().train_step(stage, **kw)
        self.steps_seen = getattr(self, "steps_seen", []) + [self._now]
        return rec


def _count_main(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        tr = make_trainer(True, RecordingTrainer)
        tr.fit()
        with open(f"{out}.{rank}", "w") as f:
            json.dump(tr.steps_seen, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_spawned_rank()  # a finished gloo rank can abort in interpreter finalization


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(target, out):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, port, out)) for r in range(WORLD)]
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


def test_two_gloo_ranks_match_single_process(tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    _run_ranks(_rank_main, out)
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


def test_ddp_all_reduces_each_bucket_once_per_step_with_cached_chunks(tmp_path):
    out = str(tmp_path / "counts")
    _run_ranks(_count_main, out)
    for r in range(WORLD):
        with open(f"{out}.{r}") as f:
            steps = json.load(f)
        assert [s["stage"] for s in steps] == ["pre", "pre", "fine", "fine"], steps
        # "fine": 4 examples per rank x (query, positive, 2 negatives) = 16 sequences, chunks of 5.
        assert [s["forwards"] for s in steps] == [1, 1, 4, 4], steps
        for s in steps:  # every bucket once, however many chunks were backpropagated
            assert s["reduced"] and len(s["reduced"]) == len(set(s["reduced"])), (r, steps)


def test_end_spawned_rank_flushes_and_exits_with_its_code():
    import subprocess
    import sys

    code = ("import sys; from embedkit.train.spawned_rank import end_spawned_rank\n"
            "sys.stdout.write('out-no-newline'); sys.stderr.write('err-no-newline')\n"
            "import atexit; atexit.register(lambda: print('finalized'))\n"
            "end_spawned_rank(3)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out
    assert out.stdout == "out-no-newline" and out.stderr == "err-no-newline"  # flushed; no atexit ran
