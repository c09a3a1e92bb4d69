"""Training data: Examples, Tasks, and the weighted single-task batch sampler.

An Example is (query, positive, hard negatives) where each side is anything the model's processor
takes (an embedkit.Interleaved, a segment, a str, a list of segments): any modality on any side.
A Task is a named source of Examples with its own task string, batch size, sampling weight and
in-batch-negatives switch. Every batch holds examples of one task; the task is drawn by weight
(the Gemini Embedding recipe). The sampler's whole state (its generator and each task's epoch and
cursor) is saved in checkpoints, so a resumed run sees exactly the batches the uninterrupted run
would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Example:
    """One training example: a query, its positive, and optional hard negatives (any modality)."""
    query: Any
    positive: Any
    negatives: tuple = ()

    def __post_init__(self):
        negs = self.negatives
        if negs is None:
            negs = ()
        elif not isinstance(negs, (list, tuple)):
            negs = (negs,)
        object.__setattr__(self, "negatives", tuple(negs))


@dataclass
class Task:
    """A named source of Examples.

    examples: a sequence (len + indexing) of Example, or of (query, positive[, negatives]) tuples.
    task: the instruction string given to the queries (None: no instruction); target_task the one
    given to positives and negatives (default None, as the Gemini recipe does for documents).
    batch_size: examples per batch (the global batch when training on several ranks).
    weight: the task's sampling weight. in_batch_negatives: False keeps only each query's own
    positive and hard negatives as candidates (the other rows' targets are masked out).
    """
    name: str
    examples: Sequence
    task: str | None = None
    batch_size: int = 32
    weight: float = 1.0
    in_batch_negatives: bool = True
    target_task: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task name must be a non-empty str, got {self.name!r}")
        try:
            n = len(self.examples)
        except TypeError:
            raise TypeError(f"Task {self.name!r}: examples must be a sequence (len and indexing), "
                            f"got {type(self.examples).__name__}") from None
        if n == 0:
            raise ValueError(f"Task {self.name!r} has no examples")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"Task {self.name!r}: batch_size must be a positive int, got {self.batch_size!r}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"Task {self.name!r}: weight must be a number > 0, got {self.weight!r}")
        for t in (self.task, self.target_task):
            if t is not None and not isinstance(t, str):
                raise TypeError(f"Task {self.name!r}: task strings must be str or None, got {type(t).__name__}")

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, i: int) -> Example:
        ex = self.examples[i]
        if isinstance(ex, Example):
            return ex
        if isinstance(ex, (tuple, list)) and len(ex) in (2, 3):
            return Example(*ex)
        raise TypeError(f"Task {self.name!r}: example {i} must be an Example or a (query, positive[, negatives]) "
                        f"tuple, got {type(ex).__name__}")


class TaskSampler:
    """Draws single-task batches: a task by weight, then the next examples of that task's shuffled order.

    Each task walks through a permutation of its examples (a fresh one per epoch, seeded by
    (seed, task, epoch)); a batch that runs past the end continues into the next epoch.
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 0):
        tasks = list(tasks)
        if not tasks:
            raise ValueError("tasks is empty: a stage needs at least one Task")
        for t in tasks:
            if not isinstance(t, Task):
                raise TypeError(f"tasks must be embedkit.train.Task objects, got {type(t).__name__}")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.tasks, self.seed = tasks, int(seed)
        self.weights = torch.tensor([float(t.weight) for t in tasks], dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epochs = [0] * len(tasks)
        self.cursors = [0] * len(tasks)
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def _perm(self, t: int, epoch: int) -> torch.Tensor:
        key = (t, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != t}  # keep one epoch per task
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + t * 7_919 + epoch) % (2**63))
            self._perms[key] = torch.randperm(len(self.tasks[t]), generator=g)
        return self._perms[key]

    def next(self) -> tuple[Task, list[Example]]:
        t = int(torch.multinomial(self.weights, 1, generator=self.generator))
        task = self.tasks[t]
        out = []
        while len(out) < task.batch_size:
            perm = self._perm(t, self.epochs[t])
            take = min(task.batch_size - len(out), len(perm) - self.cursors[t])
            out += [task.example(int(i)) for i in perm[self.cursors[t]:self.cursors[t] + take]]
            self.cursors[t] += take
            if self.cursors[t] == len(perm):
                self.epochs[t], self.cursors[t] = self.epochs[t] + 1, 0
        return task, out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state(), "epochs": list(self.epochs),
                "cursors": list(self.cursors), "tasks": [t.name for t in self.tasks]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["tasks"]) != [t.name for t in self.tasks]:
            raise ValueError(f"checkpoint was taken with tasks {state['tasks']}, this stage has "
                             f"{[t.name for t in self.tasks]}")
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])
        self.epochs = [int(e) for e in state["epochs"]]
        self.cursors = [int(c) for c in state["cursors"]]
        self._perms = {}
