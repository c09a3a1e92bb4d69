"""nce_loss: tiled large-batch InfoNCE with duplicate masking, hard negatives, symmetric mode, all
MRL levels in one pass, and torch.distributed candidates.

Layers (as pool_project): custom ops `embedkit::nce_fwd` / `embedkit::nce_bwd` (one loss
direction: rows against candidates) with fake implementations -> autograd registration -> the
public `nce_loss`, which validates, resolves the backend and composes the directions (and the
all-gathers of `group`) through `nce_combine`, shared by every backend.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import operator
import struct
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import _checks, _dispatch, _distributed, _triton_backend, reference

OP = "nce_loss"
_dispatch.register_op(OP, {_triton_backend.NAME})

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_REDUCTIONS = ("mean", "sum", "none")


def _kernels(backend: str):
    if backend == "triton":
        from embedkit._triton import nce as kernels

        return kernels
    raise AssertionError(f"no {backend} kernels for {OP}")


def _contiguous(*tensors):
    """The kernels' inputs made contiguous, here inside the custom op on the real tensors (flash-attn's
    maybe_contiguous): copies made before the op changed what torch.compile's graph computed."""
    return tuple(t.contiguous() if t is not None else None for t in tensors)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=like.device)


@torch.library.custom_op("embedkit::nce_fwd", mutates_args=())
def _fwd(rows: torch.Tensor, cands: torch.Tensor, shared_neg: torch.Tensor | None, row_neg: torch.Tensor | None,
         ids_a_r: torch.Tensor | None, ids_b_r: torch.Tensor | None, ids_a_c: torch.Tensor | None,
         ids_b_c: torch.Tensor | None, cand_mask: torch.Tensor | None, diag_offset: int, temperature: torch.Tensor,
         dims: list[int], weights: list[float], backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                    torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss [M] fp32, lse, pos, es (E_p[z] - z_pos) [L, M] in logit units, inverse norms of rows / cands / shared / row
    negatives, row-negative cosines [L, M, K]); absent inputs give empty tensors. cand_mask: bool
    [M, N + S + K] or None (see nce_loss's candidate_mask)."""
    rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask = _contiguous(
        rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask)
    inv_temp = temperature.detach().float().reciprocal().reshape(1)
    lse, pos, es, inv_r, inv_c, inv_s, inv_n, row_cos = _kernels(backend).nce_fwd(
        rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, inv_temp, tuple(dims),
        cand_mask=cand_mask)
    # Python-float weights: no host-to-device copy (a stream sync on CUDA).
    terms = lse - pos  # the kernels' lse, pos and es are logits (cosine / tau)
    loss = sum(float(wt) * terms[lvl] for lvl, wt in enumerate(weights))
    return (loss, lse, pos, es, inv_r, inv_c, inv_s if inv_s is not None else _empty(rows),
            inv_n if inv_n is not None else _empty(rows), row_cos)


@_fwd.register_fake
def _fwd_fake(rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask, diag_offset,
              temperature, dims, weights, backend):
    M, N, L = rows.shape[0], cands.shape[0], len(dims)
    f32 = dict(dtype=torch.float32, device=rows.device)
    K = row_neg.shape[1] if row_neg is not None else 0
    return (torch.empty(M, **f32), torch.empty(L, M, **f32), torch.empty(L, M, **f32), torch.empty(L, M, **f32),
            torch.empty(L, M, **f32), torch.empty(L, N, **f32),
            torch.empty(L, shared_neg.shape[0], **f32) if shared_neg is not None else torch.empty(0, **f32),
            torch.empty(L, M * K, **f32) if row_neg is not None else torch.empty(0, **f32),
            torch.empty(L, M, K, **f32))


@torch.library.custom_op("embedkit::nce_bwd", mutates_args=())
def _bwd(grad: torch.Tensor, rows: torch.Tensor, cands: torch.Tensor, shared_neg: torch.Tensor | None,
         row_neg: torch.Tensor | None, ids_a_r: torch.Tensor | None, ids_b_r: torch.Tensor | None,
         ids_a_c: torch.Tensor | None, ids_b_c: torch.Tensor | None, cand_mask: torch.Tensor | None,
         diag_offset: int, temperature: torch.Tensor, dims: list[int], weights: list[float], lse: torch.Tensor,
         pos: torch.Tensor,
         es: torch.Tensor, inv_r: torch.Tensor, inv_c: torch.Tensor, inv_s: torch.Tensor, inv_n: torch.Tensor,
         row_cos: torch.Tensor, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d_rows, d_cands, d_shared (empty if absent), d_row_neg (empty if absent), d_temperature)."""
    grad, rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask = _contiguous(
        grad, rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask)
    inv_temp = temperature.detach().float().reciprocal().reshape(1)
    g = torch.stack([grad.float() * float(wt) for wt in weights])                # [L, M], no host copy
    d_rows, d_cands, d_shared, d_neg = _kernels(backend).nce_bwd(
        g, rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, inv_temp,
        tuple(dims), lse, pos, inv_r, inv_c, inv_s if shared_neg is not None else None,
        inv_n if row_neg is not None else None, row_cos, cand_mask=cand_mask)
    # d loss_i / d tau = -(E_p[s] - s_pos) / tau^2 = -(E_p[z] - z_pos) / tau at every level (z = s / tau);
    # the kernels return es = E_p[z] - z_pos itself (taken about the max: no cancellation at small tau).
    d_temp = -(g * es).sum() * inv_temp[0]
    return (d_rows, d_cands, d_shared if d_shared is not None else rows.new_empty(0),
            d_neg if d_neg is not None else rows.new_empty(0), d_temp.to(temperature.dtype).reshape(temperature.shape))


@_bwd.register_fake
def _bwd_fake(grad, rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask, diag_offset,
              temperature, dims, weights, lse, pos, es, inv_r, inv_c, inv_s, inv_n, row_cos, backend):
    return (torch.empty_like(rows), torch.empty_like(cands),
            torch.empty_like(shared_neg) if shared_neg is not None else rows.new_empty(0),
            torch.empty_like(row_neg) if row_neg is not None else rows.new_empty(0), torch.empty_like(temperature))


def _setup_context(ctx, inputs, output):
    (rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask, diag_offset, temperature,
     dims, weights, backend) = inputs
    _, lse, pos, es, inv_r, inv_c, inv_s, inv_n, row_cos = output
    ctx.save_for_backward(rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask,
                          temperature, lse, pos, es, inv_r, inv_c, inv_s, inv_n, row_cos)
    ctx.args = (diag_offset, dims, weights, backend)


def _backward(ctx, grad, *_unused):
    (rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask, temperature,
     lse, pos, es, inv_r, inv_c, inv_s, inv_n, row_cos) = ctx.saved_tensors
    diag_offset, dims, weights, backend = ctx.args
    d_rows, d_cands, d_shared, d_neg, d_temp = _bwd(
        grad, rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask, diag_offset,
        temperature, dims, weights, lse, pos, es, inv_r, inv_c, inv_s, inv_n, row_cos, backend)
    return (d_rows, d_cands, d_shared if shared_neg is not None else None,
            d_neg if row_neg is not None else None, None, None, None, None, None, None, d_temp, None, None, None)


torch.library.register_autograd("embedkit::nce_fwd", _backward, setup_context=_setup_context)


def _kernel_direction(backend: str, temp_tensor: torch.Tensor):
    """nce_direction's signature, on the custom op (temperature is carried as a 0-dim tensor)."""

    def direction(rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset,
                  temperature, dims, weights, cand_mask=None):
        return _fwd(rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cand_mask,
                    int(diag_offset), temp_tensor, list(dims), [float(w) for w in weights], backend)[0]

    return direction


def _check_ids(ids, name, B, dev):
    """None, or a 1-D tensor of any integer dtype with B entries, returned as int64 (no copy if it is)."""
    if ids is None:
        return None
    _checks.check_tensor(ids, name, ndim=1, device=dev)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must have an integer dtype (int64, int32, int16, uint8, ...), "
                        f"got {str(ids.dtype).replace('torch.', '')}")
    if ids.shape[0] != B:
        raise ValueError(f"{name} must have B = {B} entries (query's rows), got {ids.shape[0]}")
    return ids.to(torch.int64)


def _mask_columns(N: int, K: int, shared_negatives: bool) -> tuple[int, str]:
    """(C, what the columns are) of candidate_mask for N in-batch targets and K negatives per row."""
    if K == 0:
        return N, f"the N = {N} in-batch targets"
    if shared_negatives:
        return N + N * K, f"the N = {N} in-batch targets, then the N * K = {N * K} shared negatives"
    return N + K, f"the N = {N} in-batch targets, then the row's K = {K} negatives"


def _check_cand_mask(mask, B, dev):
    """None, or a 2-D bool tensor with B rows on query's device (its columns are checked by
    _check_cand_mask_columns once N is known)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"candidate_mask must be None or a bool tensor [B, C], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"candidate_mask must be a bool tensor (True = the candidate takes part), got "
                        f"{str(mask.dtype).replace('torch.', '')}")
    if mask.device != dev:
        raise ValueError(f"candidate_mask is on {mask.device} but query is on {dev} (mixed devices)")
    if mask.dim() != 2 or mask.shape[0] != B:
        raise ValueError(f"candidate_mask must have shape [B, C] with B = {B} (query's rows), "
                         f"got {list(mask.shape)}")
    return mask


def _check_cand_mask_columns(mask, N, K, shared_negatives):
    """Metadata only (no sync): checked whatever the validation setting, since the kernels address the
    mask by its shape."""
    if mask is None:
        return
    C, what = _mask_columns(N, K, shared_negatives)
    if mask.shape[1] != C:
        raise ValueError(f"candidate_mask must have shape [B, C] = {[mask.shape[0], C]} (columns: {what}), "
                         f"got {list(mask.shape)}")


def _as_list(value, name, what):
    """A sequence-like argument (list, tuple, NumPy array, 1-D tensor, ...) as a list."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a non-empty sequence of {what}, got {value!r}")
    items = list(value)
    if not items:
        raise TypeError(f"{name} must be a non-empty sequence of {what}, got {value!r}")
    return items


def _is_bool(x) -> bool:
    return isinstance(x, bool) or type(x).__name__ == "bool_"  # NumPy's bool is no Python bool


def _check_temperature(temperature, dev):
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0 or not temperature.is_floating_point():
            raise ValueError(f"temperature must be a float or a 0-dim floating tensor, got a tensor of "
                             f"shape {tuple(temperature.shape)} and dtype {temperature.dtype}")
        if temperature.device != dev:
            raise ValueError(f"temperature is on {temperature.device} but query is on {dev} (mixed devices)")
        if _checks.sync_checks_enabled():
            value = float(temperature.detach())  # one host read
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"temperature must be finite and > 0, got {value}")
        return
    if _is_bool(temperature) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")


def _check_levels(mrl_dims, mrl_weights, D):
    """(dims, weights) as Python ints / floats; any integral numbers (NumPy ints, int tensors) and real
    numbers are accepted."""
    if mrl_dims is None:
        dims = (D,)
    else:
        dims = []
        for d in _as_list(mrl_dims, "mrl_dims", "ints"):
            try:
                if _is_bool(d):
                    raise TypeError
                d = operator.index(d)
            except TypeError:
                raise TypeError(f"mrl_dims must be integers, got {d!r} in {mrl_dims!r}") from None
            dims.append(_checks.check_int(d, "mrl_dims", low=1, high=D))
        dims = tuple(dims)
        if any(b <= a for a, b in zip(dims, dims[1:])):
            raise ValueError(f"mrl_dims must be strictly increasing, got {list(dims)}")
    if mrl_weights is None:
        return dims, (1.0,) * len(dims)
    items = _as_list(mrl_weights, "mrl_weights", "floats")
    if len(items) != len(dims):
        raise ValueError(f"mrl_weights must have one weight per MRL level ({len(dims)}), got {mrl_weights!r}")
    weights = []
    for w in items:
        if isinstance(w, torch.Tensor) and w.dim() == 0 and w.dtype != torch.bool:
            w = w.item()  # a host read: weights are Python floats from here on
        if _is_bool(w) or not isinstance(w, numbers.Real):
            raise TypeError(f"mrl_weights must be floats, got {w!r}")
        if not math.isfinite(float(w)):
            raise ValueError(f"mrl_weights must be finite, got {w!r} in {list(items)!r}")
        weights.append(float(w))
    return dims, tuple(weights)


def _validate(query, target, negatives, temperature, query_ids, target_ids, mrl_dims, mrl_weights, reduction,
              symmetric, shared_negatives, candidate_mask=None, group=None):
    """Checks every argument; returns (dims, weights, query_ids, target_ids) normalized (ids int64). The
    candidate mask's columns are checked here without a group, by nce_loss once the ranks' B are known with
    one."""
    query = _checks.check_float(query, "query", ndim=2, allowed=_FLOATS + (torch.float64,))
    dev = query.device
    B, D = query.shape
    if B == 0 or D == 0:
        raise ValueError(f"query must have at least one row and one column, got shape {tuple(query.shape)}")
    target = _checks.check_float(target, "target", ndim=2, device=dev, allowed=_FLOATS + (torch.float64,))
    _checks.check_same_dtype(target, "target", query.dtype, "query")
    if tuple(target.shape) != (B, D):
        raise ValueError(f"target must have query's shape [B, D] = {[B, D]}, got {list(target.shape)}")
    if negatives is not None:
        _checks.check_float(negatives, "negatives", ndim=3, device=dev, allowed=_FLOATS + (torch.float64,))
        _checks.check_same_dtype(negatives, "negatives", query.dtype, "query")
        if negatives.shape[0] != B or negatives.shape[2] != D:
            raise ValueError(f"negatives must have shape [B, K, D] with B = {B}, D = {D}, "
                             f"got {list(negatives.shape)}")
    _check_temperature(temperature, dev)
    query_ids = _check_ids(query_ids, "query_ids", B, dev)
    target_ids = _check_ids(target_ids, "target_ids", B, dev)
    dims, weights = _check_levels(mrl_dims, mrl_weights, D)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    for flag, name in ((symmetric, "symmetric"), (shared_negatives, "shared_negatives")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    _check_cand_mask(candidate_mask, B, dev)
    if candidate_mask is not None and group is not None and symmetric:
        # The reverse direction needs the other ranks' mask rows (their queries' columns of this rank's
        # targets): not gathered.
        raise NotImplementedError("nce_loss: candidate_mask with symmetric=True and group= is not supported "
                                  "(pass the reverse direction's masking through query_ids / target_ids, or "
                                  "compute it without group)")
    if candidate_mask is not None and group is None:
        K = negatives.shape[1] if negatives is not None else 0
        _check_cand_mask_columns(candidate_mask, B, K, shared_negatives)
    return dims, weights, query_ids, target_ids


# ---- ranks that must agree (group=) ---------------------------------------------------------------
# One all_gather of a small int64 vector before any gather of rows: every rank then holds the same
# table, so every rank raises the same ValueError (never a peer crash, a hang, or a silently wrong loss),
# and the table's B column sizes the pad-gather-trim of unequal batches.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAGIC = 0x4E4345_0002  # "NCE", layout version 2 (candidate_mask added)
_FIELDS = ("magic", "failed", "B", "D", "dtype", "symmetric", "shared_negatives", "negatives", "K", "query_ids",
           "target_ids", "temperature is a tensor", "temperature", "reduction", "mrl_dims", "mrl_weights",
           "candidate_mask")


def _digest(value) -> int:
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


def _rank_metadata(query, negatives, temperature, query_ids, target_ids, symmetric, shared_negatives, dims,
                   weights, reduction, device, candidate_mask=None):
    temp_bits = 0
    if not isinstance(temperature, torch.Tensor):
        temp_bits = struct.unpack("<q", struct.pack("<d", float(temperature)))[0]
    meta = torch.tensor([_MAGIC, 0, query.shape[0], query.shape[1], _DTYPES.index(query.dtype), symmetric,
                         shared_negatives, negatives is not None, negatives.shape[1] if negatives is not None else 0,
                         query_ids is not None, target_ids is not None, isinstance(temperature, torch.Tensor),
                         temp_bits, _REDUCTIONS.index(reduction), _digest(tuple(dims)), _digest(tuple(weights)),
                         candidate_mask is not None],
                        dtype=torch.int64, device=device)
    if isinstance(temperature, torch.Tensor):  # its value, without a host read
        meta[12] = temperature.detach().to(device=device, dtype=torch.float64).view(torch.int64)
    return meta


def _exchange(group, meta):
    """All ranks' metadata rows (one collective); `meta` None: this rank failed its own checks."""
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
        torch.device("cpu")
    if meta is None:
        meta = torch.zeros(len(_FIELDS), dtype=torch.int64, device=dev)
        meta[0], meta[1] = _MAGIC, 1
    meta = meta.to(dev)
    parts = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, meta, group=group)
    return torch.stack(parts).tolist()


def _show(field, v):
    if field == "dtype":
        return str(_DTYPES[v]).replace("torch.", "") if 0 <= v < len(_DTYPES) else str(v)
    if field == "reduction":
        return repr(_REDUCTIONS[v]) if 0 <= v < len(_REDUCTIONS) else str(v)
    if field == "temperature":
        return repr(struct.unpack("<d", struct.pack("<q", v))[0])
    if field in ("mrl_dims", "mrl_weights"):
        return f"#{v & 0xFFFF:04x}"  # a digest: equal values, equal digests
    if field in ("symmetric", "shared_negatives", "negatives", "query_ids", "target_ids",
                 "temperature is a tensor", "candidate_mask"):
        return ("no", "yes")[v] if field in ("negatives", "query_ids", "target_ids", "candidate_mask") \
            else str(bool(v))
    return str(v)


def _agree(group, table, dims, weights):
    """Raises (the same error on every rank) unless the ranks agree on everything but B; returns the
    ranks' B."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    failed = [r for r, row in enumerate(table) if row[1]]
    if failed:
        raise ValueError(f"nce_loss(group=...): rank(s) {failed} rejected their inputs (see the error there); "
                         "no rank computed the loss")
    bad = []
    for k, field in enumerate(_FIELDS):
        if field in ("B", "failed"):
            continue
        values = [row[k] for row in table]
        if len(set(values)) > 1:
            if field == "magic":
                raise ValueError("nce_loss(group=...): the ranks run different embedkit versions (metadata layout)")
            shown = ", ".join(f"rank {r}: {_show(field, v)}" for r, v in enumerate(values))
            if field == "mrl_dims":
                shown += f"; this rank ({rank}) has mrl_dims={list(dims)}"
            if field == "mrl_weights":
                shown += f"; this rank ({rank}) has mrl_weights={list(weights)}"
            bad.append(f"{field} ({shown})")
    if bad:
        raise ValueError("nce_loss(group=...): the ranks disagree on " + "; ".join(bad) +
                         ". Every rank must pass the same D, dtype, K and options (only B may differ).")
    return [row[2] for row in table]


def _rank_check_on(check_ranks) -> bool:
    if check_ranks is None:
        return _checks.sync_checks_enabled()
    return check_ranks


def nce_combine(direction, query, target, *, negatives=None, temperature=0.05, query_ids=None,
                target_ids=None, symmetric=False, shared_negatives=False, mrl_dims=None, mrl_weights=None,
                reduction="mean", group=None, rank_sizes=None, candidate_mask=None):
    """The NCE loss from a one-direction implementation `direction` (reference.nce_direction's
    signature minus chunk_rows): gathers candidates across `group`, adds the symmetric direction,
    reduces. Shared by every backend (the reference backend composes reference.nce_direction).

    rank_sizes[r]: rank r's number of rows B_r (None: every rank has this rank's B). Rank r's rows
    are rows [sum(B_<r), sum(B_<=r)) of the global batch of N = sum(B_r) rows. With a group,
    "mean" is sum(this rank's row losses) * world / N: the ranks' losses average to the global mean
    (for equal B, each rank's own mean), so DDP's gradient averaging gives the global-batch gradient.
    candidate_mask: bool [B, C] (see nce_loss), passed to `direction` as cand_mask= (only when given); the
    symmetric direction gets its transposed [B, B] target block (not supported with a group)."""
    B, D = query.shape
    dims = tuple(mrl_dims) if mrl_dims is not None else (D,)
    weights = tuple(float(w) for w in mrl_weights) if mrl_weights is not None else (1.0,) * len(dims)
    K = negatives.shape[1] if negatives is not None else 0
    offset = 0
    all_q, all_t, all_qid, all_tid = query, target, query_ids, target_ids
    shared = negatives.reshape(B * K, D) if (negatives is not None and shared_negatives) else None
    if group is not None:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = list(rank_sizes) if rank_sizes is not None else [B] * world
        if len(sizes) != world or sizes[rank] != B:
            raise ValueError(f"rank_sizes must list every rank's B ({world} entries, this rank's = {B}), "
                             f"got {sizes}")
        offset = sum(sizes[:rank])
        all_t = _distributed.all_gather_with_grad(target, group, sizes)
        if symmetric:
            all_q = _distributed.all_gather_with_grad(query, group, sizes)
        if query_ids is not None:
            all_qid = _distributed.all_gather_with_grad(query_ids, group, sizes)
        if target_ids is not None:
            all_tid = _distributed.all_gather_with_grad(target_ids, group, sizes)
        if shared is not None:
            shared = _distributed.all_gather_with_grad(shared, group, [s * K for s in sizes])
    row_neg = negatives if (negatives is not None and not shared_negatives and K > 0) else None
    if shared is not None and shared.shape[0] == 0:
        shared = None
    fwd_mask = {} if candidate_mask is None else {"cand_mask": candidate_mask}
    loss = direction(query, all_t, shared, row_neg, query_ids, target_ids, all_qid, all_tid, offset,
                     temperature, dims, weights, **fwd_mask)
    if symmetric:
        if candidate_mask is not None and group is not None:
            raise NotImplementedError("nce_loss: candidate_mask with symmetric=True and group= is not supported")
        # Pair (i, j) is one pair both ways: target j's row of the reverse direction is column j of the mask.
        back_mask = {} if candidate_mask is None else {"cand_mask": candidate_mask[:, :B].t()}
        back = direction(target, all_q, None, None, query_ids, target_ids, all_qid, all_tid, offset,
                         temperature, dims, weights, **back_mask)
        loss = (loss + back) * 0.5
    if reduction == "mean":
        if group is not None:
            return loss.sum() * (len(sizes) / sum(sizes))
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def nce_loss(query: torch.Tensor, target: torch.Tensor, *, negatives: torch.Tensor | None = None,
             temperature: float | torch.Tensor = 0.05, query_ids: torch.Tensor | None = None,
             target_ids: torch.Tensor | None = None, symmetric: bool = False, shared_negatives: bool = False,
             mrl_dims: Sequence[int] | None = None, mrl_weights: Sequence[float] | None = None,
             reduction: str = "mean", group: Any = None, check_ranks: bool | None = None,
             candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with in-batch negatives on cosine similarity (see DESIGN.md, nce_loss).

    query, target [B, D]; negatives [B, K, D] (row i's own hard negatives, or with
    shared_negatives=True every row's candidates); query_ids / target_ids [B], any integer dtype: target j != i is
    masked out of row i when either id matches (duplicates, same label). A row whose every candidate
    but its positive is masked has loss exactly 0. candidate_mask: bool [B, C] over row i's candidates in the
    order they are scored -- the N in-batch targets (N = B, or the sum of the ranks' B with `group`: the
    gathered targets), then the negatives (row i's K own ones, or with shared_negatives=True all N * K
    shared ones, rank by rank) -- True = the candidate takes part (SDPA's attn_mask convention), False =
    it is left out of row i's softmax (GISTEmbedLoss's guide filter). The positive (column i, or the rank's
    offset + i) always takes part whatever the mask says. It combines with the ids (a candidate is kept
    only if neither drops it); with symmetric=True the reverse direction uses the transposed [B, N] target
    block (pair (i, j) is one pair both ways; not supported together with `group`: NotImplementedError).
    Its shape is checked whatever the validation setting (the kernels read B x C bytes of it). temperature: float > 0, or a 0-dim tensor (then it
    gets a gradient). mrl_dims: increasing prefix widths, each re-normalized, the levels summed with
    mrl_weights. reduction "mean" | "sum" | "none" ([B], summed over levels, averaged over the two
    directions when symmetric).

    group: a torch.distributed process group; candidates (targets, shared negatives, ids) are gathered
    from all ranks. B may differ between ranks (the last batch of an epoch): with N = sum of the ranks'
    B and W ranks, "mean" returns W / N x the sum of this rank's row losses, so the mean of the ranks'
    losses is the mean over the N global rows, each rank's input gradient is W x that global mean's
    gradient of its rows, and DDP's gradient averaging gives exactly the global-batch gradient (for
    equal B this is each rank's own mean). "sum" / "none": this rank's rows' sum / losses.
    check_ranks: before any gather, the ranks all-gather one small metadata vector (B, D, dtype, K,
    symmetric, shared_negatives, which of negatives / ids / candidate_mask are given, mrl_dims, mrl_weights,
    temperature and whether it is a tensor, reduction) and every rank raises the same ValueError naming what differs
    (also when a rank rejected its own inputs). It costs one collective and a host read; None (default)
    follows embedkit.set_validation (and is off under torch.compile); False skips it, and then every rank
    must pass the same B and options (unchecked: a mismatch can hang or crash the collectives).

    The loss is fp32 (fp64 for fp64 inputs on the reference backend). Never materializes [B, B]:
    the Triton kernels stream tiles with an online logsumexp, the reference processes row chunks.
    """
    if check_ranks is not None and not isinstance(check_ranks, bool):
        raise TypeError(f"check_ranks must be None or a bool, got {type(check_ranks).__name__}")
    checking = group is not None and _rank_check_on(check_ranks)
    try:
        dims, weights, query_ids, target_ids = _validate(query, target, negatives, temperature, query_ids,
                                                         target_ids, mrl_dims, mrl_weights, reduction, symmetric,
                                                         shared_negatives, candidate_mask, group)
        backend = _dispatch.resolve(OP, query.device)
        if backend != "reference" and query.dtype == torch.float64:
            raise TypeError(f"query: the {backend} backend of {OP} takes float16, bfloat16 or float32, "
                            "got float64 (use backend 'reference' for float64)")
    except Exception:
        if checking:  # the peers are waiting in the metadata collective: tell them, then raise here
            try:
                _exchange(group, None)
            except Exception:
                pass
        raise
    sizes = None
    if checking:
        meta = _rank_metadata(query, negatives, temperature, query_ids, target_ids, symmetric, shared_negatives,
                              dims, weights, reduction, query.device, candidate_mask)
        sizes = _agree(group, _exchange(group, meta), dims, weights)
    if candidate_mask is not None and group is not None:
        # The columns count the gathered targets: known once the ranks' B are (every rank has the same N,
        # so a wrong mask fails on its own rank before any gather).
        import torch.distributed as dist

        N = sum(sizes) if sizes is not None else query.shape[0] * dist.get_world_size(group)
        _check_cand_mask_columns(candidate_mask, N, negatives.shape[1] if negatives is not None else 0,
                                 shared_negatives)
    kwargs = dict(negatives=negatives, query_ids=query_ids, target_ids=target_ids, symmetric=symmetric,
                  shared_negatives=shared_negatives, mrl_dims=dims, mrl_weights=weights, reduction=reduction,
                  group=group, rank_sizes=sizes, candidate_mask=candidate_mask)
    if backend == "reference":
        return nce_combine(reference.nce_direction, query, target, temperature=temperature, **kwargs)
    if isinstance(temperature, torch.Tensor):
        temp = temperature if temperature.dtype == torch.float32 else temperature.float()
    else:
        temp = torch.full((), float(temperature), dtype=torch.float32, device=query.device)  # no host copy
    return nce_combine(_kernel_direction(backend, temp), query, target, temperature=temp, **kwargs)
