"""Ending a rank process that torch.multiprocessing (or multiprocessing) spawned for gloo.

A spawned gloo rank that has finished its work -- past a barrier, its process group destroyed -- can
still abort while the interpreter finalizes: C++ objects that own gloo / c10d threads are destroyed
with those threads still joinable, and std::terminate kills the process ("terminate called without
an active exception", SIGABRT) after every step succeeded. It is rare (about 1 run in 30 of
ddp_nce_example on a 2-core machine, after the last step's output; a fix proposed in torch,
pytorch/pytorch#179291, was abandoned), but it turns a successful run into a failed one. A rank that
has nothing left to do therefore leaves with os._exit once its output is flushed: no finalization.
"""
from __future__ import annotations

import os
import sys


def end_spawned_rank(code: int = 0) -> None:
    """Flush stdout / stderr and leave the process now with `code`, skipping interpreter finalization.

    Call it last in a spawned rank's function, on success only (an exception should still reach the
    spawner's error report), after `dist.barrier()` and `dist.destroy_process_group()`. Never call it
    in a process you did not spawn (a torchrun rank, a notebook): it ends that process.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or redirected to nowhere: nothing left to lose
            pass
    os._exit(code)
