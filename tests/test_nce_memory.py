"""nce_loss's reference backend keeps peak RSS linear in B as the process sees it, under the default
allocator (glibc malloc, no MALLOC_* tuning): a fresh process runs forward + backward at growing B
and reports how far its high-water mark (VmHWM, ru_maxrss) rose."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # NCE losses at B=16K in a subprocess

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import resource, sys, time, torch
import embedkit
torch.set_num_threads(1)

def hwm():  # bytes; VmHWM is what ru_maxrss reports, read both and keep the larger
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                kb = max(kb, int(line.split()[1]))
    return kb * 1024

def run(B):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 64, generator=g).requires_grad_()
    t = torch.randn(B, 64, generator=g).requires_grad_()
    ids = torch.randint(0, B // 2, (B,), generator=g)
    with embedkit.use_backend("reference"):
        loss = embedkit.nce_loss(q, t, query_ids=ids, symmetric=True)
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(t.grad).all()

run(64)  # warm-up: lazy imports and thread pools are not the loss's memory
before = hwm()
for B in map(int, sys.argv[1:]):
    t0 = time.time()
    run(B)
    print(B, hwm() - before, round(time.time() - t0, 1), flush=True)
"""


def test_reference_peak_rss_is_linear_in_batch_with_default_allocator():
    """B = 4096 then 16384, D = 64, symmetric, forward + backward, default chunk size: the high-water
    mark grows by less than 400 MB (the inputs, gradients and one chunk's buffers; a [B, B] fp32 matrix
    is 1 GiB). With thousands of chunk-sized checkpoint temporaries it grew 1.1-2.2 GB (heap
    fragmentation below glibc's dynamic mmap threshold)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _SCRIPT, "4096", "16384"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    grown = {int(b): int(n) for b, n, _ in (line.split() for line in out.stdout.split("\n") if line.strip())}
    assert set(grown) == {4096, 16384}, out.stdout
    assert grown[16384] < 400e6, f"peak RSS grew by {grown[16384] / 1e6:.0f} MB at B = 16384 ({out.stdout})"
    # And it is the O(B) part that grows: 4x the rows stay far from 16x the memory.
    assert grown[16384] < 8 * grown[4096] + 100e6, out.stdout
