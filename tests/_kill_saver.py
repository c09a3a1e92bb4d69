"""Child of tests/test_safety_persist.py's kill test: imports torch once, then per line on stdin
forks a saver that overwrites one checkpoint in a loop (until SIGKILLed) and prints its pid."""
import os
import sys

import torch

from embedkit import Embedder, EmbedderConfig
from embedkit.train import checkpoint as ckpt_io


def trainer_saves(path):
    n = int(open(path + ".next").read()) if os.path.exists(path + ".next") else 1
    while True:
        big = torch.full((256, 1024), float(n))  # 1 MiB per file: kills land mid-write
        ckpt_io.save(path, {"w": big}, {"state.0.exp_avg": big * 2}, {"n": n, "global_step": n})
        n += 1
        with open(path + ".next.tmp", "w") as f:
            f.write(str(n))
        os.replace(path + ".next.tmp", path + ".next")  # the counter itself must not tear


def embedder_saves(path):
    n = 1
    while True:
        torch.manual_seed(n)
        Embedder(EmbedderConfig.tiny(norm_eps=1e-6 * n)).save_pretrained(path)
        n += 1


def make_trainer():
    from embedkit.train import Example, Stage, Task, Trainer

    torch.manual_seed(0)
    model = Embedder(EmbedderConfig.tiny(out_dim=32, mrl_dims=(8, 16, 32)))
    exs = [Example(query=f"q{i}", positive=f"p{i} text") for i in range(8)]
    st = Stage("s", [Task("t", exs, batch_size=4)], steps=10 ** 6, lr=1e-3, schedule="constant", bf16=False)
    return Trainer(model, [st], progress=False, seed=1)


def fit_saves(path):
    """A real Trainer: one step, one checkpoint, overwriting the same directory, until killed."""
    t = make_trainer()
    if os.path.exists(path):
        t.load_checkpoint(path)
    while True:
        t.fit(max_steps=1)
        t.save_checkpoint(path)
        with open(path + ".saves.tmp", "w") as f:  # how many saves completed: the test waits for one
            f.write(str(t.global_step if hasattr(t, "global_step") else 0))
        os.replace(path + ".saves.tmp", path + ".saves")


SAVERS = {"trainer": trainer_saves, "embedder": embedder_saves, "fit": fit_saves}

if __name__ == "__main__":
    for line in sys.stdin:
        kind, path = line.split()
        pid = os.fork()
        if pid == 0:
            sys.stdin.close()
            try:
                SAVERS[kind](path)
            finally:
                os._exit(1)
        print(pid, flush=True)
        sys.stdout.flush()
        line2 = sys.stdin.readline()  # "reap" once the test has killed it
        os.waitpid(pid, 0)
        print("reaped", flush=True)
