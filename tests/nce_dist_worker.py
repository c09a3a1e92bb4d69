"""Worker process of the torch.distributed nce_loss tests (a module of its own so `spawn` can import it).

Each rank takes its B rows of every case, computes nce_loss(group=WORLD) on its rows, backpropagates,
and saves its loss and input gradients for the parent to compare with the concatenated-batch loss.
"""
import datetime
import os
import socket

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, backends: list, cases_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    import embedkit

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for backend in backends:
            _run_cases(rank, world, backend, cases_path, out_dir)
    finally:
        dist.destroy_process_group()


def _run_cases(rank, world, backend, cases_path, out_dir):
    import torch.distributed as dist

    import embedkit

    dtype = torch.float64 if backend == "reference" else torch.float32
    results = []
    for c in torch.load(cases_path, weights_only=True):
        B = c["q"].shape[0] // world
        rows = slice(rank * B, (rank + 1) * B)
        q = c["q"][rows].to(dtype).requires_grad_()
        t = c["t"][rows].to(dtype).requires_grad_()
        neg = c["neg"][rows].to(dtype).requires_grad_() if c["neg"] is not None else None
        temp = torch.tensor(0.1, dtype=dtype, requires_grad=True) if c["tensor_temp"] else 0.1
        with embedkit.use_backend(backend):
            loss = embedkit.nce_loss(
                q, t, negatives=neg, temperature=temp,
                query_ids=c["qid"][rows] if c["qid"] is not None else None,
                target_ids=c["tid"][rows] if c["tid"] is not None else None, symmetric=c["symmetric"],
                shared_negatives=c["shared"], mrl_dims=c["dims"], reduction=c["reduction"], group=dist.group.WORLD)
        go = c["go"][rows].to(loss.dtype) if c["reduction"] == "none" else None
        loss.backward(go)
        out = {"loss": loss.detach(), "d_q": q.grad, "d_t": t.grad}
        if neg is not None:
            out["d_neg"] = neg.grad
        if c["tensor_temp"]:
            out["d_temp"] = temp.grad
        results.append(out)
    torch.save(results, os.path.join(out_dir, f"{backend}-rank{rank}.pt"))
