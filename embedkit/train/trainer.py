"""The Trainer: multi-task, multi-stage contrastive training of an embedding model (the stages
themselves: stage.py; checkpoint files and the run state in them: checkpoint.py).

The loss is embedkit.ops.nce_loss (in-batch negatives, hard negatives, all MRL levels), with
duplicate masking ids from embedkit.ops.sequence_fingerprint of each query's / target's packed
content. A step embeds the queries, positives and hard negatives of one single-task batch in one
packed forward pass, or, with `Stage.chunk_size`, in chunks through the cached (GradCache-style)
step, so that the batch size is bounded by the loss's O(B) memory rather than by activations.
Across ranks, torch's DistributedDataParallel averages the gradients (once per step, also in the
cached step).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import random
import resource
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .. import ops
from . import checkpoint as ckpt_io
from .data import Example, Task, TaskSampler
from ..model.inputs import fingerprint_inputs  # also importable from here, where it used to live
from .stage import Stage  # also importable from here, where it used to live


class Trainer:
    """Runs `stages` in order on `model`.

    model: an embedkit.Embedder, or any nn.Module whose forward maps the output of `collate` to
    embeddings [B, D]. collate(inputs, task_strings) -> model input (default: the model's processor,
    packed into one ModelInputs on the model's device). fingerprint(model_input) -> int64 [B]
    duplicate-masking ids (default: fingerprint_inputs). seed: seeds the task sampler, the task-string
    drop and (at construction) torch's RNG. output_dir + checkpoint_every: periodic checkpoints
    (`step-<n>/`), plus one at the end of every stage (`stage-<name>/`). group: a torch.distributed
    process group (or True for the default one): each rank embeds its slice of every global batch,
    nce_loss gathers the candidates of all ranks, and torch's DistributedDataParallel averages the
    gradients across ranks before clipping (see _wrap_ddp). log_every: steps between history
    records, the only steps that read results back to the host (loss, grad norm, temperature,
    timings: a read per step would stall the GPU's queue every step); progress: tqdm bars (their
    figures change on those steps).
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
        self._trained = _Trained(model, None)  # what a step runs forward (the stage's, once one starts)
        self._ddp = None  # its DistributedDataParallel wrapper, when there are several ranks
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
        """(embeddings, fingerprints, model input) of a forward of the bare model (no DDP)."""
        x = self.collate(inputs, task_strings)
        return self.model(x), self.fingerprint(x), x

    def _forward(self):
        """The module a step backpropagates through: the DDP wrapper when distributed."""
        return self._ddp if self._ddp is not None else self._trained

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

    def loss_from_embeddings(self, stage: Stage, task: Task, emb: torch.Tensor, ids: torch.Tensor, B: int, K: int,
                             temperature: torch.Tensor | None = None):
        """nce_loss of one batch's embeddings (queries, positives, negatives). temperature: the
        tensor to use (the step's forward output); None: the stage's (fixed or learned) value."""
        q, t = emb[:B], emb[B:2 * B]
        negs = emb[2 * B:].view(B, K, -1) if K else None
        qid, tid = ids[:B], ids[B:2 * B]
        if not task.in_batch_negatives:  # every other row's target shares the query id: masked out
            qid = torch.zeros_like(qid)
        dims, weights = self._mrl(stage, emb.shape[1])
        temp = self._temperature(stage) if temperature is None else temperature
        return ops.nce_loss(q, t, negatives=negs, temperature=temp, query_ids=qid,
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
            x = self.collate(inputs, tasks)
            emb, temp = self._forward()(x)
            ids = self.fingerprint(x)
        loss = self.loss_from_embeddings(stage, task, emb, ids, B, K, temperature=temp)
        loss.backward()  # under DDP: gradients all-reduced during this backward
        return loss.detach(), _num_tokens(x)

    def cached_step(self, stage: Stage, task: Task, examples: list[Example], chunk_size: int):
        """GradCache: embed every chunk without a graph, take the loss and its gradient w.r.t. the
        embeddings, then re-embed each chunk with a graph (same RNG state, so dropout matches) and
        backpropagate that gradient. Gives the plain step's gradients with one chunk's activations.

        The learned temperature enters the loss as a detached copy; its gradient is backpropagated
        through the temperature output of the last chunk's forward. Under DDP every re-forward but
        the last runs in no_sync, so gradients accumulate locally and are all-reduced once, in the
        last chunk's backward, with the temperature's among them (DDP's find_unused_parameters also
        reduces what only earlier chunks reached)."""
        inputs, tasks, B, K = self._batch_parts(stage, task, examples)
        chunks = [(inputs[i:i + chunk_size], tasks[i:i + chunk_size]) for i in range(0, len(inputs), chunk_size)]
        rng, embs, ids, tokens = [], [], [], 0
        with torch.no_grad(), self._autocast(stage):  # no graph: the bare model, nothing for DDP to reduce
            for ci, ct in chunks:
                rng.append(_get_rng(self.device))
                e, fp, x = self._embed(ci, ct)
                embs.append(e)
                ids.append(fp)
                tokens += _num_tokens(x)
        after = _get_rng(self.device)
        emb = torch.cat(embs).requires_grad_(True)
        temp = self._temperature(stage)
        if isinstance(temp, torch.Tensor):
            temp = temp.detach().requires_grad_(True)
        loss = self.loss_from_embeddings(stage, task, emb, torch.cat(ids), B, K, temperature=temp)
        loss.backward()  # grads of the loss w.r.t. the embeddings (and the temperature)
        grad = emb.grad
        module, start = self._forward(), 0
        for i, ((ci, ct), state) in enumerate(zip(chunks, rng)):
            last = i == len(chunks) - 1
            _set_rng(self.device, state)
            sync = contextlib.nullcontext() if last or self._ddp is None else self._ddp.no_sync()
            with sync:  # the forward must run inside no_sync too (DDP decides there)
                with self._autocast(stage):
                    e, t = module(self.collate(ci, ct))
                outputs, grads = [e], [grad[start:start + e.shape[0]]]
                if last and t is not None and temp.grad is not None:  # (None would mean d/dt = 1)
                    outputs.append(t)
                    grads.append(temp.grad)
                torch.autograd.backward(outputs, grads)
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
        self._trained = _Trained(self.model, self.log_temperature)
        self._ddp = None  # the previous stage's: built for other trainable parameters
        if self._distributed and self.world_size > 1:
            self._ddp = _wrap_ddp(self._trained, self.device, self.group)  # broadcasts rank 0's weights
        self.optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, eps=stage.eps,
                                           weight_decay=stage.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: stage.lr_factor(s))
        self._sampler = TaskSampler(stage.tasks, seed=self.seed * 1009 + index)
        if self._pending is not None:
            self._apply_pending()

    def train_step(self, stage: Stage, *, log: bool = True) -> dict:
        """One optimizer step of `stage`. Returns its record. log=False (fit's steps between log
        steps) reads nothing back to the host: no loss / grad norm / temperature values, no timing
        (which needs a synchronize); the record then has only stage, task, step and lr, plus loss
        and grad_norm as unread device tensors. Clipping itself runs on every step."""
        task, examples = self._sampler.next()
        examples = self._local(examples)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        cuda = self.device.type == "cuda"
        if log and cuda:  # time this step, not the queue of the unsynchronized steps before it
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        if stage.chunk_size is None:
            loss, tokens = self.plain_step(stage, task, examples)
        else:
            loss, tokens = self.cached_step(stage, task, examples, stage.chunk_size)
        grad_norm = None
        if stage.max_grad_norm is not None:  # a device tensor: clipping does not read it
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, stage.max_grad_norm)
        lr = stage.lr * stage.lr_factor(self.stage_step)
        self.optimizer.step()
        self.scheduler.step()
        rec = {"stage": stage.name, "task": task.name, "step": self.global_step}
        if not log:
            return {**rec, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        if cuda:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        temp = self._temperature(stage)
        temp = temp.detach() if isinstance(temp, torch.Tensor) else temp
        return {**rec, "loss": float(loss), "temperature": float(temp), "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm), "seconds": dt,
                "examples_per_s": len(examples) / dt, "tokens_per_s": tokens / dt, "memory_mb": _memory_mb(self.device)}

    def fit(self, *, max_steps: int | None = None) -> list[dict]:
        """Runs the remaining steps of every stage (or at most max_steps of them). Returns the history.
        Distributed, every rank starts a stage from rank 0's weights (DDP's broadcast at wrapping)."""
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
                    n = self.stage_step + 1
                    log = bool(self.log_every) and (n % self.log_every == 0 or n == stage.steps)
                    rec = self.train_step(stage, log=log)
                    self.stage_step += 1
                    self.global_step += 1
                    done += 1
                    if log:
                        self.history.append(rec)
                        if self.callback is not None:
                            self.callback(rec)
                    if bar is not None:
                        bar.update(1)
                        if log:
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
            self.optimizer = self.scheduler = self._ddp = None
        for p, flag in zip(self.model.parameters(), self._requires_grad):  # undo the stages' freezing
            p.requires_grad_(flag)
        return self.history

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path | None:
        """Writes model, optimizer, scheduler, RNG and data position (rank 0 only when distributed)."""
        if self.rank != 0:
            return None
        tensors, meta = ckpt_io.trainer_state(self)
        return ckpt_io.save(path, self.model.state_dict(), tensors, meta, extra=ckpt_io.pretrained_files(self.model))

    def load_checkpoint(self, path: str | Path) -> None:
        """Restores a checkpoint; the next fit() continues exactly where it was taken."""
        model_state, tensors, meta = ckpt_io.load(path)
        ckpt_io.check_meta(meta, self.stages, path)
        ckpt_io.check_model_dtypes(model_state, self.model.state_dict(), path)
        self.model.load_state_dict(model_state, strict=True)
        ckpt_io.restore_run_state(self, tensors, meta)
        self.optimizer = self.scheduler = self._ddp = None
        self._pending = {"tensors": tensors, "meta": meta} if "optimizer" in meta else None

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, None
        ckpt_io.restore_stage_state(self, pending["tensors"], pending["meta"])


class _Trained(nn.Module):
    """What a step trains, as one module: the model and the stage's learned log temperature (None:
    fixed), so that DDP averages the temperature's gradient with the model's. forward(x) ->
    (embeddings, temperature or None); the temperature is exp(log temperature) computed outside
    autocast, as the loss takes it. The model's state_dict is unaffected (it stays the model's)."""

    def __init__(self, model: nn.Module, log_temperature: nn.Parameter | None):
        super().__init__()
        self.model = model
        self.log_temperature = log_temperature

    def forward(self, x):
        emb = self.model(x)
        if self.log_temperature is None:
            return emb, None
        with torch.autocast(self.log_temperature.device.type, enabled=False):
            return emb, self.log_temperature.exp()


def _wrap_ddp(module: nn.Module, device: torch.device, group):
    """torch's DistributedDataParallel around `module`, for one stage (DDP reduces the parameters
    that require grad when it is built, and a stage freezes its own set). Construction broadcasts
    rank 0's parameters and buffers. find_unused_parameters: a batch need not reach every parameter
    (a text batch never reaches the patch embedders); DDP then reduces a parameter some rank used
    (zeros elsewhere) and leaves one no rank used without a gradient, as one process would. Buffers
    are synced at construction only, not before every forward. device_ids stays None: inputs are
    already on the device (DDP would otherwise copy every ModelInputs)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = {}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:  # torch >= 2.13
        kw["forward_sync_buffers"] = False
    return DDP(module, device_ids=None, process_group=group, find_unused_parameters=True, **kw)


def _num_tokens(x) -> int:
    """Tokens of a model input, from host-side counts where it has them (no device read)."""
    n = getattr(x, "num_tokens", None)
    if n is not None:
        return int(n)
    b = getattr(x, "batch", x)
    total = getattr(b, "total_tokens", None)
    if isinstance(total, int):
        return total
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

