"""Multi-process NCE training with DistributedDataParallel: the global batch is every rank's rows.

    python -m embedkit.train.ddp_nce_example --world-size 2            # CPU, gloo (runs anywhere)
    torchrun --nproc-per-node 8 -m embedkit.train.ddp_nce_example      # one process per GPU, nccl

Each rank encodes its own rows; `nce_loss(..., group=WORLD)` all-gathers the targets (and ids, and
the queries when symmetric) so every query is scored against the candidates of all ranks; gradients
flow back to the rank that owns each row. The rank's gradient is world_size x the global-batch
gradient of its rows, so DDP's gradient averaging gives exactly the gradient of the loss on the
concatenated batch.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import embedkit
from embedkit.train.spawned_rank import end_spawned_rank


class TwoTower(torch.nn.Module):
    """A toy encoder: one MLP for queries and targets (stands in for the embedding model)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x):
        return self.net(x)


def train(rank: int, world: int, args) -> None:
    use_cuda = torch.cuda.is_available() and not args.cpu
    spawned = "RANK" not in os.environ  # spawned by this script, not by torchrun
    if spawned:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda", rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = DDP(TwoTower(args.in_dim, args.dim).to(device), device_ids=[device.index] if use_cuda else None)
    temperature = torch.nn.Parameter(torch.tensor(0.05, device=device))
    opt = torch.optim.AdamW(list(model.parameters()) + [temperature], lr=1e-3)
    gen = torch.Generator().manual_seed(1234 + rank)  # each rank draws its own rows
    for step in range(args.steps):
        x = torch.randn(args.batch, args.in_dim, generator=gen)
        pos = x + 1.0 * torch.randn(args.batch, args.in_dim, generator=gen)
        labels = torch.randint(0, 4 * args.batch, (args.batch,), generator=gen)
        q, t = model(x.to(device)), model(pos.to(device))
        # DDP averages the gradients of `temperature` only if it is a module parameter; here we do it.
        loss = embedkit.nce_loss(q, t, temperature=temperature, target_ids=labels.to(device), symmetric=True,
                                 mrl_dims=args.mrl_dims, group=dist.group.WORLD)
        opt.zero_grad()
        loss.backward()
        dist.all_reduce(temperature.grad)
        temperature.grad /= world
        opt.step()
        with torch.no_grad():
            temperature.clamp_(min=0.01)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)  # mean of the ranks' losses = the loss of the global batch
        if rank == 0:
            print(f"step {step}: loss {float(global_loss) / world:.4f} "
                  f"(global batch {world * args.batch}, temperature {temperature.item():.4f})", flush=True)
    # Every rank past its last collective before any rank tears gloo down. (The SIGABRT CI saw, "terminate
    # called without an active exception", came later, in interpreter finalization: end_spawned_rank.)
    dist.barrier()
    dist.destroy_process_group()
    if spawned:  # a finished gloo rank can still abort in interpreter finalization: see spawned_rank
        end_spawned_rank()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="rows per rank")
    p.add_argument("--in-dim", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--mrl-dims", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--port", type=int, default=0, help="rendezvous port (0: a free one)")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even when a GPU is present")
    args = p.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    if args.port == 0:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    torch.multiprocessing.spawn(train, args=(args.world_size, args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
