"""Worker process of the torch.distributed nce_loss tests (a module of its own so `spawn` can import it).

Each rank takes its B rows of every case, computes nce_loss(group=WORLD) on its rows, backpropagates,
and saves its loss and input gradients for the parent to compare with the concatenated-batch loss.
"""
import datetime
import os
import socket

import torch

from embedkit.train.spawned_rank import end_spawned_rank


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(c, rank, world):
    """Rank `rank`'s rows of case c: c["sizes"][r] rows per rank (unequal B), or an equal split."""
    sizes = c.get("sizes") or [c["q"].shape[0] // world] * world
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _init(rank, world, port, timeout_s):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging CI.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def worker(rank: int, world: int, port: int, backends: list, cases_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    _init(rank, world, port, 60)
    try:
        for backend in backends:
            _run_cases(rank, world, backend, cases_path, out_dir)
        dist.barrier()  # every rank past its last collective before any tears gloo down
    finally:
        dist.destroy_process_group()
    end_spawned_rank()


def _run_cases(rank, world, backend, cases_path, out_dir):
    import torch.distributed as dist

    import embedkit

    dtype = torch.float64 if backend == "reference" else torch.float32
    results = []
    for c in torch.load(cases_path, weights_only=True):
        rows = rows_of(c, rank, world)
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


# ---- ranks that disagree: each case changes one thing on the last rank ----------------------------------

def mismatch_cases():
    """(name, words the error must contain, kwargs for the last rank) -- every other rank passes the base
    call. "invalid": the last rank's own inputs are bad (it raises its own error, the others hear of it)."""
    return [
        ("D", "D (", dict(D=24)),
        ("dtype", "dtype (", dict(dtype=torch.float64)),
        ("symmetric", "symmetric (", dict(symmetric=False)),
        ("K", "K (", dict(K=3)),
        ("negatives", "negatives (", dict(K=None)),
        ("query_ids", "query_ids (", dict(query_ids=False)),
        ("target_ids", "target_ids (", dict(target_ids=True)),
        ("mrl_dims", "mrl_dims (", dict(mrl_dims=[4, 16])),
        ("mrl_weights", "mrl_weights (", dict(mrl_weights=[1.0, 0.5])),
        ("tensor_temp", "temperature is a tensor (", dict(tensor_temp=True)),
        ("temperature", "temperature (", dict(temperature=0.2)),
        ("reduction", "reduction (", dict(reduction="sum")),
        ("shared", "shared_negatives (", dict(shared=True)),
        ("invalid", "rejected their inputs", dict(bad_target=True)),
    ]


def _mismatch_call(rank, world, over):
    import torch.distributed as dist

    import embedkit

    kw = dict(B=3 + rank, D=16, dtype=torch.float32, symmetric=True, K=2, query_ids=True, target_ids=False,
              mrl_dims=[8, 16], mrl_weights=[1.0, 1.0], tensor_temp=False, temperature=0.1, reduction="mean",
              shared=False, bad_target=False)
    if rank == world - 1:
        kw.update(over)
    g = torch.Generator().manual_seed(rank)
    B, D, dt = kw["B"], kw["D"], kw["dtype"]
    q = torch.randn(B, D, generator=g, dtype=dt).requires_grad_()
    t = torch.randn(B + kw["bad_target"], D, generator=g, dtype=dt).requires_grad_()
    neg = torch.randn(B, kw["K"], D, generator=g, dtype=dt) if kw["K"] else None
    temp = torch.tensor(kw["temperature"], requires_grad=True) if kw["tensor_temp"] else kw["temperature"]
    ids = torch.arange(B) + 100 * rank
    with embedkit.use_backend("reference"):
        return embedkit.nce_loss(q, t, negatives=neg, temperature=temp, query_ids=ids if kw["query_ids"] else None,
                                 target_ids=ids if kw["target_ids"] else None, symmetric=kw["symmetric"],
                                 shared_negatives=kw["shared"], mrl_dims=kw["mrl_dims"],
                                 mrl_weights=kw["mrl_weights"], reduction=kw["reduction"], group=dist.group.WORLD)


def mismatch_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Runs every mismatch case, then one agreeing call (unequal B), and saves what each raised."""
    import torch.distributed as dist

    _init(rank, world, port, 20)
    seen = {}
    try:
        for name, _, over in mismatch_cases():
            try:
                _mismatch_call(rank, world, over)
                seen[name] = "no error"
            except ValueError as e:
                seen[name] = "ValueError: " + str(e)
            except Exception as e:  # a crash or timeout of the collective: what this test exists to catch
                seen[name] = f"{type(e).__name__}: {e}"
                break
        else:
            loss = _mismatch_call(rank, world, {})  # the ranks are still in step: an agreeing call works
            loss.backward()
            seen["after"] = f"loss {float(loss.detach()):.6f}"
            dist.barrier()
    finally:
        torch.save(seen, os.path.join(out_dir, f"mismatch-rank{rank}.pt"))
        dist.destroy_process_group()
    end_spawned_rank()
