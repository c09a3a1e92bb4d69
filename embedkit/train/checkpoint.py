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
"""
from __future__ import annotations

import json
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
