"""Safetensors checkpoints of a training run (nothing is pickled).

A checkpoint directory holds
    model.safetensors      the model's state_dict
    optimizer.safetensors  every tensor of the optimizer state, flattened ("state.<param>.<key>"),
                           plus RNG states and other tensors of the trainer ("trainer.<name>")
    trainer.json           everything else: step counters, the stages' names and steps, the
                           scheduler's state, the optimizer's param_groups and non-tensor state,
                           Python RNG state, the data position
    config.json (+ tokenizer/)  for an Embedder: what Embedder.save_pretrained writes, with the same
                           save id, so any checkpoint (a stage snapshot too) loads with
                           Embedder.from_pretrained

The file format (save / load) comes first; then the assembly of a Trainer's run state into those
files and back (trainer_state, restore_run_state, restore_stage_state), with the checks that refuse a
checkpoint that would resume something else than it was taken from.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable

import torch

MODEL_FILE = "model.safetensors"
STATE_FILE = "optimizer.safetensors"
META_FILE = "trainer.json"
ID_KEY = "embedkit_save_id"  # one random id per save, in every file of it


def flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """(tensors, json_meta) of an optimizer state_dict."""
    tensors, scalars = {}, {}
    for idx, st in state_dict["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    return x


def save(path: str | Path, model_state: dict, tensors: dict, meta: dict,
         extra: Callable[[Path, str], None] | None = None) -> Path:
    """Writes the checkpoint as one unit: into a temporary sibling directory, fsynced, then renamed
    into place (the previous checkpoint at `path` stays until the new one is complete). One save id
    is recorded in both safetensors files' metadata and in trainer.json; load() refuses a mix.
    extra(tmp_dir, save_id) writes further files of the same save (e.g. the model's config.json)."""
    from safetensors.torch import save_file

    from .._atomic import atomic_dir, new_save_id

    out = Path(path)
    save_id = new_save_id()
    md = {"format": "pt", "library": "embedkit", ID_KEY: save_id}
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / MODEL_FILE),
                  metadata=md)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_FILE),
                  metadata=md)
        (tmp / META_FILE).write_text(json.dumps({**_jsonable(meta), ID_KEY: save_id}, indent=1))
        if extra is not None:
            extra(tmp, save_id)
    return out


def file_save_id(path: str | Path) -> str | None:
    """The save id in a safetensors file's metadata (None: written before ids existed)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(ID_KEY)


def load(path: str | Path) -> tuple[dict, dict, dict]:
    """(model_state, tensors, meta) of a checkpoint directory, checked to be one save."""
    from safetensors.torch import load_file

    from .._atomic import resolve_dir

    root = resolve_dir(path)
    for f in (MODEL_FILE, STATE_FILE, META_FILE):
        if not (root / f).is_file():
            raise FileNotFoundError(f"{root} is not a complete training checkpoint: {f} is missing")
    meta = json.loads((root / META_FILE).read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{root / META_FILE} must hold a JSON object")
    ids = {META_FILE: meta.get(ID_KEY), MODEL_FILE: file_save_id(root / MODEL_FILE),
           STATE_FILE: file_save_id(root / STATE_FILE)}
    if len(set(ids.values())) != 1:
        raise ValueError(f"{root} mixes files of different saves (save ids {ids}): refusing to resume "
                         f"from a torn checkpoint")
    return load_file(str(root / MODEL_FILE)), load_file(str(root / STATE_FILE)), meta


def load_model_state(ckpt) -> dict:
    """A state dict from an nn.Module, a dict of tensors, a .safetensors file, or a directory holding
    model.safetensors (a training checkpoint or Embedder.save_pretrained output)."""
    if isinstance(ckpt, torch.nn.Module):
        return {k: v.detach() for k, v in ckpt.state_dict().items()}
    if isinstance(ckpt, dict):
        return ckpt
    if isinstance(ckpt, (str, Path)):
        from safetensors.torch import load_file

        p = Path(ckpt)
        if p.is_dir():
            p = p / MODEL_FILE
        if not p.is_file():
            raise FileNotFoundError(f"no model weights at {p} (expected a .safetensors file or a directory "
                                    f"holding {MODEL_FILE})")
        return load_file(str(p))
    raise TypeError(f"a checkpoint must be an nn.Module, a state dict, or a path, got {type(ckpt).__name__}")


# ---- a Trainer's run state ------------------------------------------------------------------------

def stage_record(stage) -> dict:
    """What trainer.json records of a Stage: enough to tell the stage list a checkpoint ran."""
    return {"name": stage.name, "steps": stage.steps}


def trainer_state(tr) -> tuple[dict, dict]:
    """(tensors, meta) of a Trainer's run: counters, history, stages, optimizer / scheduler / sampler
    state of the current stage (when one has started), learned temperature, RNG states."""
    tensors, meta = {}, {"stage_index": tr.stage_index, "stage_step": tr.stage_step,
                         "global_step": tr.global_step, "seed": tr.seed, "history": tr.history,
                         "stages": [stage_record(s) for s in tr.stages]}
    if tr.optimizer is not None:
        t, m = flatten_optimizer(tr.optimizer.state_dict())
        tensors.update(t)
        meta["optimizer"] = m
        meta["scheduler"] = tr.scheduler.state_dict()
        s = tr._sampler.state_dict()
        tensors["trainer.sampler_generator"] = s.pop("generator")
        meta["sampler"] = s
    if tr.log_temperature is not None:
        tensors["trainer.log_temperature"] = tr.log_temperature.detach()
    tensors["trainer.torch_rng"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"trainer.cuda_rng.{i}"] = st
    meta["python_rng"] = random.getstate()
    meta["drop_rng"] = tr._drop_rng.getstate()
    return tensors, meta


def check_model_dtypes(model_state: dict, own: dict, path) -> None:
    """A checkpoint tensor of another dtype than the model's is refused, not cast."""
    for k, v in model_state.items():
        if k in own and v.dtype != own[k].dtype:
            raise ValueError(f"checkpoint {path}: {k} has dtype {str(v.dtype).replace('torch.', '')} but the "
                             f"model's is {str(own[k].dtype).replace('torch.', '')} (refused, not cast)")


def restore_run_state(tr, tensors: dict, meta: dict) -> None:
    """Counters, history and RNG states of a checked checkpoint back into Trainer `tr`."""
    tr.stage_index, tr.stage_step = int(meta["stage_index"]), int(meta["stage_step"])
    tr.global_step = int(meta["global_step"])
    tr.history = list(meta.get("history", []))
    torch.set_rng_state(tensors["trainer.torch_rng"])
    cuda_keys = [k for k in tensors if k.startswith("trainer.cuda_rng.")]
    cuda = [tensors[k] for k in sorted(cuda_keys, key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuplify(meta["python_rng"]))
    tr._drop_rng.setstate(_tuplify(meta["drop_rng"]))


def restore_stage_state(tr, tensors: dict, meta: dict) -> None:
    """The optimizer, scheduler, sampler and learned temperature of the checkpoint's stage, into
    Trainer `tr` once that stage has started (its optimizer built)."""
    check_param_groups(tr.optimizer, meta["optimizer"]["param_groups"])
    if "trainer.log_temperature" in tensors:
        if tr.log_temperature is None:
            raise ValueError("the checkpoint has a learned temperature but this stage's is fixed")
        with torch.no_grad():
            tr.log_temperature.copy_(tensors["trainer.log_temperature"])
    tr.optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    tr.scheduler.load_state_dict(meta["scheduler"])
    s = dict(meta["sampler"])
    s["generator"] = tensors["trainer.sampler_generator"]
    tr._sampler.load_state_dict(s)


def check_meta(meta: dict, stages: list, path) -> None:
    """trainer.json against the stages of the Trainer resuming it: a position outside them, or
    counters of the wrong type, would resume nonsense."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"checkpoint {path}: trainer.json {msg}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for k in ("stage_index", "stage_step", "global_step"):
        need(k in meta and is_int(meta[k]) and meta[k] >= 0, f"{k} must be an int >= 0, got {meta.get(k)!r}")
    check_stages(meta, stages, path)  # first: a different stage list explains the checks below
    n = len(stages)
    need(meta["stage_index"] <= n, f"stage_index {meta['stage_index']} is outside the {n} stages given")
    if meta["stage_index"] < n:
        steps = stages[meta["stage_index"]].steps
        need(meta["stage_step"] <= steps, f"stage_step {meta['stage_step']} exceeds stage "
             f"{stages[meta['stage_index']].name!r}'s {steps} steps")
    elif "optimizer" in meta:
        need(False, "has optimizer state but stage_index is past the last stage")
    need(meta["global_step"] >= meta["stage_step"], f"global_step {meta['global_step']} < stage_step "
         f"{meta['stage_step']}")


def check_stages(meta: dict, stages: list, path) -> None:
    """The stages the checkpoint has run (every stage up to and including its current one) must
    be the resuming Trainer's first stages, by name and steps: a different list would resume at a
    position that means something else (e.g. past the last step of a renamed stage, so fit()
    trains nothing). Later stages may differ (stages can be appended). Checkpoints written
    before stages were recorded are not checked."""
    saved = meta.get("stages")
    if saved is None:
        return
    if not isinstance(saved, list) or not all(isinstance(s, dict) for s in saved):
        raise ValueError(f"checkpoint {path}: trainer.json stages must be a list of objects, got {saved!r}")
    ran = saved[:min(meta["stage_index"] + 1, len(saved))]
    if len(stages) < len(ran):
        raise ValueError(f"checkpoint {path} was taken in stage {len(ran) - 1} "
                         f"({ran[-1].get('name')!r}) but this Trainer has only {len(stages)} stage(s) "
                         f"{[s.name for s in stages]}: pass the stages the checkpoint was trained with")
    for i, rec in enumerate(ran):
        mine = stage_record(stages[i])
        if rec.get("name") != mine["name"] or rec.get("steps") != mine["steps"]:
            raise ValueError(f"checkpoint {path}: stage {i} was {rec.get('name')!r} with {rec.get('steps')!r} "
                             f"steps, but this Trainer's stage {i} is {mine['name']!r} with {mine['steps']} "
                             f"steps: resume with the stage list the checkpoint was trained with (saved: "
                             f"{[(r.get('name'), r.get('steps')) for r in saved]})")


def check_param_groups(optimizer, saved: list) -> None:
    """The checkpoint's optimizer groups must be this stage's: same count, same initial lr
    (stage lr x multiplier), current lr finite in [0, initial lr] (the schedule never exceeds it)."""
    own = optimizer.param_groups
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


def pretrained_files(model: torch.nn.Module):
    """For an Embedder: a writer of config.json (+ its Hugging Face tokenizer), as save_pretrained
    writes them, with the checkpoint's save id, so the checkpoint directory loads with
    Embedder.from_pretrained. None for other models."""
    from ..model import modeling

    if not isinstance(model, modeling.Embedder):
        return None

    def write(tmp: Path, save_id: str) -> None:
        cfg = model.config.to_dict()
        cfg[modeling.SAVE_ID_KEY] = save_id
        tok = model.processor.tokenizer
        if isinstance(tok, modeling.HFTokenizer):
            tok.tok.save_pretrained(str(tmp / modeling.TOKENIZER_DIR))
            cfg["tokenizer"] = "./" + modeling.TOKENIZER_DIR
        elif tok is not None:
            cfg["tokenizer"] = "bytes"
        (tmp / modeling.CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))

    assert ID_KEY == modeling.SAVE_ID_KEY  # from_pretrained compares config and weights ids
    return write


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
