"""Stages and the Trainer: multi-task, multi-stage contrastive training of an embedding model.

The loss is embedkit.ops.nce_loss (in-batch negatives, hard negatives, all MRL levels), with
duplicate masking ids from embedkit.ops.sequence_fingerprint of each query's / target's packed
content. A step embeds the queries, positives and hard negatives of one single-task batch in one
packed forward pass, or, with `Stage.chunk_size`, in chunks through the cached (GradCache-style)
step, so that the batch size is bounded by the loss's O(B) memory rather than by activations.
"""
from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .. import ops
from . import checkpoint as ckpt_io
from .data import Example, Task, TaskSampler


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
        if self.schedule not in ("cosine", "linear", "constant"):
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
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if self.schedule == "cosine" else 1.0 - frac
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


def fingerprint_inputs(inputs) -> torch.Tensor:
    """int64 [B] content ids of packed ModelInputs: the token ids of each sequence, combined with the
    bytes of its image / video / audio patches (so two different images are never duplicates)."""
    cu = inputs.batch.cu_seqlens
    fp = ops.sequence_fingerprint(inputs.input_ids, cu)
    B = cu.shape[0] - 1
    for patches, index in ((inputs.vision_patches, inputs.vision_index), (inputs.audio_patches, inputs.audio_index)):
        if patches is None or patches.shape[0] == 0:
            continue
        seq = torch.searchsorted(cu[1:].to(index.dtype), index, right=True)
        order = torch.argsort(seq, stable=True)
        counts = torch.zeros(B, dtype=torch.long, device=seq.device).index_add_(0, seq, torch.ones_like(seq))  # no sync
        pcu = torch.zeros(B + 1, dtype=torch.int32, device=cu.device)
        pcu[1:] = torch.cumsum(counts, 0).to(torch.int32)
        fp = fp * 1_000_003 + ops.sequence_fingerprint(patches[order].contiguous(), pcu)  # wraps mod 2^64
    return fp


class Trainer:
    """Runs `stages` in order on `model`.

    model: an embedkit.Embedder, or any nn.Module whose forward maps the output of `collate` to
    embeddings [B, D]. collate(inputs, task_strings) -> model input (default: the model's processor,
    packed into one ModelInputs on the model's device). fingerprint(model_input) -> int64 [B]
    duplicate-masking ids (default: fingerprint_inputs). seed: seeds the task sampler, the task-string
    drop and (at construction) torch's RNG. output_dir + checkpoint_every: periodic checkpoints
    (`step-<n>/`), plus one at the end of every stage (`stage-<name>/`). group: a torch.distributed
    process group (or True for the default one): each rank embeds its slice of every global batch,
    nce_loss gathers the candidates of all ranks, and gradients are averaged across ranks (DDP's
    rule) before clipping. log_every: steps between history records; progress: tqdm bars.
    """

    def __init__(self, model: nn.Module, stages: Sequence[Stage], *, collate: Callable | None = None,
                 fingerprint: Callable | None = None, device=None, seed: int = 0, output_dir: str | Path | None = None,
                 checkpoint_every: int = 0, log_every: int = 10, progress: bool = True, group=None,
                 callback: Callable[[dict], None] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        stages = list(stages)
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise TypeError("stages must be a non-empty list of embedkit.train.Stage")
        if collate is None and not hasattr(model, "processor"):
            raise TypeError("model has no .processor: pass collate=fn(inputs, task_strings) -> model input")
        self.model, self.stages = model, stages
        self._requires_grad = [p.requires_grad for p in model.parameters()]
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.collate = collate or self._default_collate
        self.fingerprint = fingerprint or fingerprint_inputs
        self.seed = int(seed)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.checkpoint_every, self.log_every, self.progress = int(checkpoint_every), int(log_every), progress
        self.callback = callback
        self.group = None
        self.rank, self.world_size = 0, 1
        if group is not None and group is not False:
            import torch.distributed as dist

            self.group = dist.group.WORLD if group is True else group
            self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
            if self.world_size == 1:
                self.group = None
            self._distributed = True
        else:
            self._distributed = False
        torch.manual_seed(self.seed)
        self.history: list[dict] = []
        self.stage_index, self.stage_step, self.global_step = 0, 0, 0
        self._drop_rng = random.Random(self.seed)
        self._sampler: TaskSampler | None = None
        self.optimizer = self.scheduler = None
        self.log_temperature: nn.Parameter | None = None
        self._pending: dict | None = None  # loaded checkpoint state, applied when its stage starts

    # ---- inputs ----------------------------------------------------------------------------------
    def _default_collate(self, inputs, task_strings):
        proc = self.model.processor
        items = [proc.item(x, t, i) for i, (x, t) in enumerate(zip(inputs, task_strings))]
        return proc.pack(items).to(self.device)

    def _autocast(self, stage: Stage):
        if self.device.type == "cuda" and stage.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _batch_parts(self, stage: Stage, task: Task, examples: list[Example]):
        """(inputs, task strings, B, K) of one batch: the B queries, B positives, then B*K negatives."""
        B = len(examples)
        K = 0
        if stage.hard_negatives:
            have = min(len(ex.negatives) for ex in examples)
            K = have if stage.num_negatives is None else stage.num_negatives
            if K > have:
                raise ValueError(f"task {task.name!r}: stage {stage.name!r} asks for {K} hard negatives per "
                                 f"example, but an example has only {have}")
        queries = [ex.query for ex in examples]
        q_tasks = [None if (task.task is None or (stage.task_drop_prob and
                                                  self._drop_rng.random() < stage.task_drop_prob)) else task.task
                   for _ in examples]
        targets = [ex.positive for ex in examples] + [n for ex in examples for n in ex.negatives[:K]]
        return queries + targets, q_tasks + [task.target_task] * len(targets), B, K

    def _embed(self, inputs, task_strings):
        x = self.collate(inputs, task_strings)
        return self.model(x), self.fingerprint(x), x

    # ---- loss ------------------------------------------------------------------------------------
    def _temperature(self, stage: Stage):
        return self.log_temperature.exp() if self.log_temperature is not None else stage.temperature

    def _mrl(self, stage: Stage, D: int):
        dims = stage.mrl_dims
        if dims is None:
            dims = getattr(getattr(self.model, "config", None), "mrl_dims", None)
            if dims is not None and (max(dims) != D):
                dims = None
        return (tuple(dims) if dims is not None else None), stage.mrl_weights

    def loss_from_embeddings(self, stage: Stage, task: Task, emb: torch.Tensor, ids: torch.Tensor, B: int, K: int):
        q, t = emb[:B], emb[B:2 * B]
        negs = emb[2 * B:].view(B, K, -1) if K else None
        qid, tid = ids[:B], ids[B:2 * B]
        if not task.in_batch_negatives:  # every other row's target shares the query id: masked out
            qid = torch.zeros_like(qid)
        dims, weights = self._mrl(stage, emb.shape[1])
        return ops.nce_loss(q, t, negatives=negs, temperature=self._temperature(stage), query_ids=qid,
                            target_ids=tid, symmetric=stage.symmetric, mrl_dims=dims, mrl_weights=weights,
                            group=self.group if self._distributed else None)

    def _local(self, examples: list[Example]) -> list[Example]:
        if not self._distributed:
            return examples
        n = len(examples)
        if n % self.world_size:
            raise ValueError(f"the global batch of {n} examples does not split over {self.world_size} ranks")
        per = n // self.world_size
        return examples[self.rank * per:(self.rank + 1) * per]

    def plain_step(self, stage: Stage, task: Task, examples: list[Example]) -> tuple[torch.Tensor, int]:
        """Forward + backward of one batch in one packed pass. Returns (loss, tokens)."""
        inputs, tasks, B, K = self._batch_parts(stage, task, examples)
        with self._autocast(stage):
            emb, ids, x = self._embed(inputs, tasks)
        loss = self.loss_from_embeddings(stage, task, emb, ids, B, K)
        loss.backward()
        return loss.detach(), _num_tokens(x)

    def cached_step(self, stage: Stage, task: Task, examples: list[Example], chunk_size: int):
        """GradCache: embed every chunk without a graph, take the loss and its gradient w.r.t. the
        embeddings, then re-embed each chunk with a graph (same RNG state, so dropout matches) and
        backpropagate that gradient. Gives the plain step's gradients with one chunk's activations."""
        inputs, tasks, B, K = self._batch_parts(stage, task, examples)
        chunks = [(inputs[i:i + chunk_size], tasks[i:i + chunk_size]) for i in range(0, len(inputs), chunk_size)]
        rng, embs, ids, tokens = [], [], [], 0
        with torch.no_grad(), self._autocast(stage):
            for ci, ct in chunks:
                rng.append(_get_rng(self.device))
                e, fp, x = self._embed(ci, ct)
                embs.append(e)
                ids.append(fp)
                tokens += _num_tokens(x)
        after = _get_rng(self.device)
        emb = torch.cat(embs).requires_grad_(True)
        loss = self.loss_from_embeddings(stage, task, emb, torch.cat(ids), B, K)
        loss.backward()  # grads of the loss w.r.t. the embeddings (and the temperature)
        grad = emb.grad
        start = 0
        for (ci, ct), state in zip(chunks, rng):
            _set_rng(self.device, state)
            with self._autocast(stage):
                e, _, _ = self._embed(ci, ct)
            e.backward(grad[start:start + e.shape[0]])
            start += e.shape[0]
        _set_rng(self.device, after)
        return loss.detach(), tokens

    # ---- optimisation ------------------------------------------------------------------------------
    def _trainable(self, stage: Stage) -> list[dict]:
        """AdamW parameter groups: one per lr multiplier (the first matching prefix wins)."""
        mults = dict(stage.lr_multipliers or {})
        groups: dict[float, list] = {}
        for name, p in self.model.named_parameters():
            train = not any(name.startswith(f) for f in stage.freeze)
            p.requires_grad_(train)
            if train:
                m = next((v for k, v in mults.items() if name.startswith(k)), 1.0)
                groups.setdefault(float(m), []).append(p)
        if not groups:
            raise ValueError(f"stage {stage.name!r} freezes every parameter of the model")
        return [{"params": ps, "lr": stage.lr * m} for m, ps in sorted(groups.items())]

    def _start_stage(self, stage: Stage, index: int) -> None:
        groups = self._trainable(stage)
        self.log_temperature = None
        if stage.learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(stage.temperature), device=self.device))
            groups.append({"params": [self.log_temperature], "lr": stage.lr, "weight_decay": 0.0})
        self._params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, eps=stage.eps,
                                           weight_decay=stage.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: stage.lr_factor(s))
        self._sampler = TaskSampler(stage.tasks, seed=self.seed * 1009 + index)
        if self._pending is not None:
            self._apply_pending()

    def _sync_grads(self) -> None:
        import torch.distributed as dist

        # A parameter no rank used keeps grad None (the optimizer skips it, as in one process); one
        # that some rank used gets zeros on the others before averaging.
        used = torch.tensor([p.grad is not None for p in self._params], dtype=torch.int32, device=self.device)
        dist.all_reduce(used, group=self.group)
        for p, u in zip(self._params, used.tolist()):
            if not u:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)
            p.grad.div_(self.world_size)

    def train_step(self, stage: Stage) -> dict:
        task, examples = self._sampler.next()
        examples = self._local(examples)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if stage.chunk_size is None:
            loss, tokens = self.plain_step(stage, task, examples)
        else:
            loss, tokens = self.cached_step(stage, task, examples, stage.chunk_size)
        if self._distributed:
            self._sync_grads()
        grad_norm = None
        if stage.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, stage.max_grad_norm))
        lr = stage.lr * stage.lr_factor(self.stage_step)
        self.optimizer.step()
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        temp = self._temperature(stage)
        temp = temp.detach() if isinstance(temp, torch.Tensor) else temp
        return {"stage": stage.name, "task": task.name, "step": self.global_step, "loss": float(loss),
                "temperature": float(temp), "lr": lr, "grad_norm": grad_norm, "seconds": dt,
                "examples_per_s": len(examples) / dt, "tokens_per_s": tokens / dt, "memory_mb": _memory_mb(self.device)}

    def fit(self, *, max_steps: int | None = None) -> list[dict]:
        """Runs the remaining steps of every stage (or at most max_steps of them). Returns the history."""
        if self._distributed:
            import torch.distributed as dist

            for p in self.model.state_dict().values():  # same start on every rank, as DDP does
                dist.broadcast(p, 0, group=self.group)
        done = 0
        while self.stage_index < len(self.stages):
            stage = self.stages[self.stage_index]
            if self.optimizer is None or self._pending is not None:
                self._start_stage(stage, self.stage_index)
            bar = None
            if self.progress and self.rank == 0:
                try:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=stage.steps, initial=self.stage_step, desc=f"train[{stage.name}]", unit="step")
                except ImportError:
                    bar = None
            try:
                while self.stage_step < stage.steps:
                    if max_steps is not None and done >= max_steps:
                        return self.history
                    rec = self.train_step(stage)
                    self.stage_step += 1
                    self.global_step += 1
                    done += 1
                    if self.log_every and (self.stage_step % self.log_every == 0 or self.stage_step == stage.steps):
                        self.history.append(rec)
                        if self.callback is not None:
                            self.callback(rec)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", T=f"{rec['temperature']:.3f}",
                                        ex_s=f"{rec['examples_per_s']:.1f}")
                    if (self.output_dir is not None and self.checkpoint_every
                            and self.global_step % self.checkpoint_every == 0):
                        self.save_checkpoint(self.output_dir / f"step-{self.global_step}")
            finally:
                if bar is not None:
                    bar.close()
            if self.output_dir is not None:
                self.save_checkpoint(self.output_dir / f"stage-{stage.name}")
            self.stage_index += 1
            self.stage_step = 0
            self.optimizer = self.scheduler = None
        for p, flag in zip(self.model.parameters(), self._requires_grad):  # undo the stages' freezing
            p.requires_grad_(flag)
        return self.history

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path | None:
        """Writes model, optimizer, scheduler, RNG and data position (rank 0 only when distributed)."""
        if self.rank != 0:
            return None
        tensors, meta = {}, {"stage_index": self.stage_index, "stage_step": self.stage_step,
                             "global_step": self.global_step, "seed": self.seed, "history": self.history,
                             "stages": [_stage_record(s) for s in self.stages]}
        if self.optimizer is not None:
            t, m = ckpt_io.flatten_optimizer(self.optimizer.state_dict())
            tensors.update(t)
            meta["optimizer"] = m
            meta["scheduler"] = self.scheduler.state_dict()
            s = self._sampler.state_dict()
            tensors["trainer.sampler_generator"] = s.pop("generator")
            meta["sampler"] = s
        if self.log_temperature is not None:
            tensors["trainer.log_temperature"] = self.log_temperature.detach()
        tensors["trainer.torch_rng"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, st in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"trainer.cuda_rng.{i}"] = st
        meta["python_rng"] = random.getstate()
        meta["drop_rng"] = self._drop_rng.getstate()
        return ckpt_io.save(path, self.model.state_dict(), tensors, meta, extra=_pretrained_files(self.model))

    def load_checkpoint(self, path: str | Path) -> None:
        """Restores a checkpoint; the next fit() continues exactly where it was taken."""
        model_state, tensors, meta = ckpt_io.load(path)
        self._check_meta(meta, path)
        own = self.model.state_dict()
        for k, v in model_state.items():
            if k in own and v.dtype != own[k].dtype:
                raise ValueError(f"checkpoint {path}: {k} has dtype {str(v.dtype).replace('torch.', '')} but the "
                                 f"model's is {str(own[k].dtype).replace('torch.', '')} (refused, not cast)")
        self.model.load_state_dict(model_state, strict=True)
        self.stage_index, self.stage_step = int(meta["stage_index"]), int(meta["stage_step"])
        self.global_step = int(meta["global_step"])
        self.history = list(meta.get("history", []))
        torch.set_rng_state(tensors["trainer.torch_rng"])
        cuda_keys = [k for k in tensors if k.startswith("trainer.cuda_rng.")]
        cuda = [tensors[k] for k in sorted(cuda_keys, key=lambda k: int(k.rsplit(".", 1)[1]))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(_tuplify(meta["python_rng"]))
        self._drop_rng.setstate(_tuplify(meta["drop_rng"]))
        self.optimizer = self.scheduler = None
        self._pending = {"tensors": tensors, "meta": meta} if "optimizer" in meta else None

    def _check_meta(self, meta: dict, path) -> None:
        """trainer.json against the stages this Trainer was given: a position outside them, or
        counters of the wrong type, would resume nonsense."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"checkpoint {path}: trainer.json {msg}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for k in ("stage_index", "stage_step", "global_step"):
            need(k in meta and is_int(meta[k]) and meta[k] >= 0, f"{k} must be an int >= 0, got {meta.get(k)!r}")
        self._check_stages(meta, path)  # first: a different stage list explains the checks below
        n = len(self.stages)
        need(meta["stage_index"] <= n, f"stage_index {meta['stage_index']} is outside the {n} stages given")
        if meta["stage_index"] < n:
            steps = self.stages[meta["stage_index"]].steps
            need(meta["stage_step"] <= steps, f"stage_step {meta['stage_step']} exceeds stage "
                 f"{self.stages[meta['stage_index']].name!r}'s {steps} steps")
        elif "optimizer" in meta:
            need(False, "has optimizer state but stage_index is past the last stage")
        need(meta["global_step"] >= meta["stage_step"], f"global_step {meta['global_step']} < stage_step "
             f"{meta['stage_step']}")

    def _check_stages(self, meta: dict, path) -> None:
        """The stages the checkpoint has run (every stage up to and including its current one) must
        be this Trainer's first stages, by name and steps: a different list would resume at a
        position that means something else (e.g. past the last step of a renamed stage, so fit()
        trains nothing). Later stages may differ (stages can be appended). Checkpoints written
        before stages were recorded are not checked."""
        saved = meta.get("stages")
        if saved is None:
            return
        if not isinstance(saved, list) or not all(isinstance(s, dict) for s in saved):
            raise ValueError(f"checkpoint {path}: trainer.json stages must be a list of objects, got {saved!r}")
        ran = saved[:min(meta["stage_index"] + 1, len(saved))]
        if len(self.stages) < len(ran):
            raise ValueError(f"checkpoint {path} was taken in stage {len(ran) - 1} "
                             f"({ran[-1].get('name')!r}) but this Trainer has only {len(self.stages)} stage(s) "
                             f"{[s.name for s in self.stages]}: pass the stages the checkpoint was trained with")
        for i, rec in enumerate(ran):
            mine = _stage_record(self.stages[i])
            if rec.get("name") != mine["name"] or rec.get("steps") != mine["steps"]:
                raise ValueError(f"checkpoint {path}: stage {i} was {rec.get('name')!r} with {rec.get('steps')!r} "
                                 f"steps, but this Trainer's stage {i} is {mine['name']!r} with {mine['steps']} "
                                 f"steps: resume with the stage list the checkpoint was trained with (saved: "
                                 f"{[(r.get('name'), r.get('steps')) for r in saved]})")

    def _check_param_groups(self, saved: list) -> None:
        """The checkpoint's optimizer groups must be this stage's: same count, same initial lr
        (stage lr x multiplier), current lr finite in [0, initial lr] (the schedule never exceeds it)."""
        own = self.optimizer.param_groups
        if not isinstance(saved, list) or len(saved) != len(own):
            raise ValueError(f"the checkpoint's optimizer has {len(saved) if isinstance(saved, list) else saved!r} "
                             f"param groups but this stage has {len(own)}")
        for i, (g, mine) in enumerate(zip(saved, own)):
            lr, init = g.get("lr"), g.get("initial_lr")
            want = mine.get("initial_lr", mine["lr"])
            ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (lr, init))
            if not ok or not math.isclose(init, want, rel_tol=1e-9) or not 0 <= lr <= init * (1 + 1e-9):
                raise ValueError(f"the checkpoint's optimizer group {i} has lr {lr!r} (initial {init!r}) but this "
                                 f"stage's is {want!r}: lr must match the stage and lie in [0, initial lr]")

    def _apply_pending(self) -> None:
        tensors, meta = self._pending["tensors"], self._pending["meta"]
        self._pending = None
        self._check_param_groups(meta["optimizer"]["param_groups"])
        if "trainer.log_temperature" in tensors:
            if self.log_temperature is None:
                raise ValueError("the checkpoint has a learned temperature but this stage's is fixed")
            with torch.no_grad():
                self.log_temperature.copy_(tensors["trainer.log_temperature"])
        opt = ckpt_io.unflatten_optimizer(tensors, meta["optimizer"])
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(meta["scheduler"])
        s = dict(meta["sampler"])
        s["generator"] = tensors["trainer.sampler_generator"]
        self._sampler.load_state_dict(s)


def _stage_record(stage: Stage) -> dict:
    return {"name": stage.name, "steps": stage.steps}


def _pretrained_files(model: nn.Module):
    """For an Embedder: a writer of config.json (+ its Hugging Face tokenizer), as save_pretrained
    writes them, with the checkpoint's save id, so the checkpoint directory loads with
    Embedder.from_pretrained. None for other models."""
    from ..model import modeling

    if not isinstance(model, modeling.Embedder):
        return None

    def write(tmp: Path, save_id: str) -> None:
        import json

        cfg = model.config.to_dict()
        cfg[modeling.SAVE_ID_KEY] = save_id
        tok = model.processor.tokenizer
        if isinstance(tok, modeling.HFTokenizer):
            tok.tok.save_pretrained(str(tmp / modeling.TOKENIZER_DIR))
            cfg["tokenizer"] = "./" + modeling.TOKENIZER_DIR
        elif tok is not None:
            cfg["tokenizer"] = "bytes"
        (tmp / modeling.CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))

    assert ckpt_io.ID_KEY == modeling.SAVE_ID_KEY  # from_pretrained compares config and weights ids
    return write


def _num_tokens(x) -> int:
    n = getattr(x, "num_tokens", None)
    if n is not None:
        return int(n)
    b = getattr(x, "batch", x)
    cu = getattr(b, "cu_seqlens", None)
    return int(cu[-1]) if cu is not None else 0


def _get_rng(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
