"""CPU-side microbenchmarks (pytest-benchmark): the host overheads around the kernels, which a GPU
run cannot hide -- building a PackedBatch, re-validating a cu_seqlens already checked (what every
layer of a model forward does), resolving a backend, packing processed inputs.

    python -m pytest bench/micro_cpu.py                 # timings (pytest-benchmark's table)
    python -m pytest bench/micro_cpu.py --benchmark-json out.json

Not timed unit tests: nothing here asserts a speed. tests/test_micro_cpu.py runs this file with
--benchmark-disable (each function once) so it cannot rot.
"""
import pytest
import torch

import embedkit
from embedkit.ops import _checks, _dispatch

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module")
def lengths():
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 512, (256,), generator=g).tolist()


def test_packed_batch_from_lengths(benchmark, lengths):
    batch = benchmark(embedkit.PackedBatch.from_lengths, lengths)
    assert batch.batch_size == len(lengths)


def test_packed_batch_from_attention_mask(benchmark, lengths):
    L = max(lengths)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    batch = benchmark(embedkit.PackedBatch.from_attention_mask, mask)
    assert batch.total_tokens == sum(lengths)


def test_revalidate_checked_cu_seqlens(benchmark, lengths):
    """What each layer pays to check a cu_seqlens already validated (remembered: no device read)."""
    batch = embedkit.PackedBatch.from_lengths(lengths)
    T = batch.total_tokens
    benchmark(_checks.check_cu_seqlens, batch.cu_seqlens, T, batch.device)


def test_first_validation_of_cu_seqlens(benchmark, lengths):
    """The one content check (one host read) a new cu_seqlens costs."""
    batch = embedkit.PackedBatch.from_lengths(lengths)
    T = batch.total_tokens

    def fresh():
        _checks.check_cu_seqlens(batch.cu_seqlens.clone(), T, batch.device)

    benchmark(fresh)


def test_resolve_backend(benchmark):
    assert benchmark(_dispatch.resolve, "pool_project", torch.device("cpu")) in ("native", "reference")


def test_processor_pack(benchmark):
    model = embedkit.Embedder(embedkit.EmbedderConfig.tiny(out_dim=32, mrl_dims=(8, 16, 32)))
    proc = model.processor
    items = [proc.item(f"sentence number {i} with a few words", None, i) for i in range(64)]
    inputs = benchmark(proc.pack, items)
    assert inputs.batch_size == 64
