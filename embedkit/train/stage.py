"""Stage: one phase of a training run (its tasks, steps, optimizer settings, loss options), and the
learning-rate schedules a stage can follow (linear warm-up, then cosine / linear / constant)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .data import Task

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, *, steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the base lr at `step` (0-based) of a `steps`-step phase: linear warm-up over
    warmup_steps (reaching 1 at its last step), then `schedule` from 1 down to min_lr_ratio at the end."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup_steps)
    frac = min(1.0, (step - warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac
    return min_lr_ratio + (1 - min_lr_ratio) * decay


@dataclass
class Stage:
    """One training phase.

    Pre-fine-tuning: large batches, no hard negatives (hard_negatives=False). Fine-tuning: hard
    negatives (hard_negatives=True; num_negatives per example, None: as many as every example of the
    batch has), per-task batch sizes (Task.batch_size).
    lr / weight_decay / betas / eps: AdamW; warmup_steps then `schedule` ("cosine" | "linear" |
    "constant") down to min_lr_ratio * lr. mrl_dims / mrl_weights: nce_loss's MRL levels (None: the
    model config's mrl_dims when it has them). temperature: the initial value; learn_temperature
    makes it a trained parameter (as log temperature). task_drop_prob: the probability that a query
    is embedded without its task string. chunk_size: sequences per chunk of the cached step (None:
    one plain step). max_grad_norm: gradient clipping (None: off). freeze: parameter-name prefixes
    not trained in this stage. lr_multipliers: {parameter-name prefix: factor} (e.g. a higher lr for
    freshly initialized patch embedders). bf16: autocast to bfloat16 on CUDA.
    """
    name: str
    tasks: Sequence[Task]
    steps: int
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    mrl_dims: Sequence[int] | None = None
    mrl_weights: Sequence[float] | None = None
    temperature: float = 0.05
    learn_temperature: bool = False
    task_drop_prob: float = 0.0
    hard_negatives: bool = False
    num_negatives: int | None = None
    symmetric: bool = False
    chunk_size: int | None = None
    max_grad_norm: float | None = 1.0
    freeze: tuple[str, ...] = ()
    lr_multipliers: dict | None = None
    bf16: bool = True

    def __post_init__(self):
        self.tasks = list(self.tasks)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"Stage {self.name!r}: steps must be an int >= 0, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"Stage {self.name!r}: lr must be > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Stage {self.name!r}: schedule must be 'cosine', 'linear' or 'constant', "
                             f"got {self.schedule!r}")
        if not self.temperature > 0:
            raise ValueError(f"Stage {self.name!r}: temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.task_drop_prob <= 1.0:
            raise ValueError(f"Stage {self.name!r}: task_drop_prob must lie in [0, 1], got {self.task_drop_prob!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"Stage {self.name!r}: chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if isinstance(self.freeze, str):
            self.freeze = (self.freeze,)
        self.freeze = tuple(self.freeze)
        self.betas = tuple(self.betas)

    def lr_factor(self, step: int) -> float:
        """The lr multiplier at `step` of this stage (see lr_factor)."""
        return lr_factor(step, steps=self.steps, warmup_steps=self.warmup_steps, schedule=self.schedule,
                         min_lr_ratio=self.min_lr_ratio)
