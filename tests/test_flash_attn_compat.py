"""flash-attn's other entry points (embedkit.ops.flash_attn_compat) against torch's SDPA: values and
every gradient by the tolerance rule (oracle float64 SDPA, low-precision float32 SDPA), on every
varlen_attention backend present; their signatures against flash-attn 2's; what they refuse."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import embedkit
from embedkit.ops import flash_attn_compat as fac

from numerics import assert_by_rule, grads, leaf

BACKENDS = embedkit.available_backends("varlen_attention")

# flash-attn 2's signatures (Dao-AILab/flash-attention, flash_attn/flash_attn_interface.py): names,
# order and defaults, so positional calls written for flash-attn mean the same here.
_COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
           ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
FLASH_ATTN_SIGNATURES = {
    "flash_attn_func": ["q", "k", "v"] + _COMMON,
    "flash_attn_qkvpacked_func": ["qkv"] + _COMMON,
    "flash_attn_kvpacked_func": ["q", "kv"] + _COMMON,
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"] + _COMMON,
    "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                        "max_seqlen_k"] + _COMMON,
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_SIGNATURES))
def test_signatures_match_flash_attn(name):
    fn = getattr(fac, name)
    assert getattr(embedkit, name) is fn and getattr(embedkit.ops, name) is fn
    got = [(p.name, p.default) if p.default is not inspect.Parameter.empty else p.name
           for p in inspect.signature(fn).parameters.values()]
    assert got == FLASH_ATTN_SIGNATURES[name]


def _sdpa(q, k, v, causal, scale):
    """[B, S, H, D] attention by torch SDPA (GQA by repeating K/V heads)."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def _sdpa_lse(q, k, causal, scale):
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * (scale or q.shape[-1] ** -0.5)
    if causal:
        S = q.shape[1]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.logsumexp(s, dim=-1)  # [B, H, S]


def _check(name, fn, inputs, oracle_fn, gout):
    """fn's output and gradients vs float64 / float32 SDPA (oracle_fn on the given leaves)."""
    ours = fn(*[leaf(x) for x in inputs])
    oracle_in = [leaf(x, torch.float64) for x in inputs]
    lowp_in = [leaf(x) for x in inputs]
    oracle, lowp = oracle_fn(*oracle_in), oracle_fn(*lowp_in)
    assert_by_rule(name, ours[0], oracle[0], lowp[0])
    g_ours = grads(ours[0], ours[1], gout)
    g_or, g_lo = grads(oracle[0], oracle_in, gout), grads(lowp[0], lowp_in, gout)
    for i, (a, o, lo) in enumerate(zip(g_ours, g_or, g_lo)):
        assert_by_rule(f"{name} grad {i}", a, o, lo, factor=3)


def _run(fn):
    """Calls fn on leaves and returns (out, leaves) for _check."""
    def wrapped(*xs):
        return fn(*xs), xs
    return wrapped


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,scale,hk", [(False, None, 4), (True, 0.3, 2), (True, None, 1)])
def test_dense_functions_match_sdpa(backend, causal, scale, hk):
    g = torch.Generator().manual_seed(0)
    B, S, H, D = 2, 7, 4, 16
    q = torch.randn(B, S, H, D, generator=g)
    k, v = torch.randn(B, S, hk, D, generator=g), torch.randn(B, S, hk, D, generator=g)
    gout = torch.randn(B, S, H, D, generator=g)
    with embedkit.use_backend(backend):
        _check("flash_attn_func", _run(lambda q, k, v: fac.flash_attn_func(q, k, v, 0.0, scale, causal)),
               [q, k, v], lambda q, k, v: (_sdpa(q, k, v, causal, scale),), gout)
        kv = torch.stack([k, v], dim=2)
        _check("flash_attn_kvpacked_func",
               _run(lambda q, kv: fac.flash_attn_kvpacked_func(q, kv, softmax_scale=scale, causal=causal)),
               [q, kv], lambda q, kv: (_sdpa(q, kv[:, :, 0], kv[:, :, 1], causal, scale),), gout)
        if hk == H:
            qkv = torch.stack([q, k, v], dim=2)
            _check("flash_attn_qkvpacked_func",
                   _run(lambda qkv: fac.flash_attn_qkvpacked_func(qkv, softmax_scale=scale, causal=causal)),
                   [qkv], lambda qkv: (_sdpa(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal, scale),), gout)
        out, lse, probs = fac.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)
    assert lse.shape == (B, H, S) and probs.numel() == 0  # flash-attn's shapes (no dropout: empty S_dmask)
    torch.testing.assert_close(lse.double(), _sdpa_lse(q, k, causal, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, fac.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal))


def _varlen_oracle(lens, causal, scale):
    """Per-sequence SDPA over packed [T, ...] tensors (the varlen semantics, written plainly)."""
    def attend(q, k, v):
        outs, start = [], 0
        for n in lens:
            sl = slice(start, start + n)
            outs.append(_sdpa(q[None, sl], k[None, sl], v[None, sl], causal, scale)[0])
            start += n
        return torch.cat(outs)
    return attend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,scale", [(False, None), (True, 0.25)])
def test_varlen_packed_functions_match_sdpa(backend, causal, scale):
    g = torch.Generator().manual_seed(1)
    lens = [5, 1, 9, 3]
    T, H, Hk, D = sum(lens), 4, 2, 16
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    attend = _varlen_oracle(lens, causal, scale)
    qkv = torch.randn(T, 3, H, D, generator=g)
    q, kv = torch.randn(T, H, D, generator=g), torch.randn(T, 2, Hk, D, generator=g)
    gout = torch.randn(T, H, D, generator=g)
    with embedkit.use_backend(backend):
        _check("flash_attn_varlen_qkvpacked_func",
               _run(lambda qkv: fac.flash_attn_varlen_qkvpacked_func(qkv, cu, 9, 0.0, scale, causal)),
               [qkv], lambda qkv: (attend(qkv[:, 0], qkv[:, 1], qkv[:, 2]),), gout)
        _check("flash_attn_varlen_kvpacked_func",
               _run(lambda q, kv: fac.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 9, 9, softmax_scale=scale,
                                                                      causal=causal)),
               [q, kv], lambda q, kv: (attend(q, kv[:, 0], kv[:, 1]),), gout)
        out, lse, probs = fac.flash_attn_varlen_qkvpacked_func(qkv, cu, 9, causal=causal, return_attn_probs=True)
        # The same as flash_attn_varlen_func on the unpacked tensors (same backend), exactly.
        unpacked = embedkit.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 9, 9, causal=causal)
    assert out.shape == (T, H, D) and lse.shape == (H, T) and probs.numel() == 0
    torch.testing.assert_close(out, unpacked, rtol=0, atol=0)


def test_refusals_are_clear():
    q = torch.randn(2, 6, 4, 8)
    with pytest.raises(NotImplementedError, match="cross-attention .*seqlen_q = 6, seqlen_k = 3"):
        fac.flash_attn_func(q, torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8))
    with pytest.raises(ValueError, match="batch size"):
        fac.flash_attn_func(q, torch.randn(1, 6, 4, 8), torch.randn(1, 6, 4, 8))
    with pytest.raises(ValueError, match=r"q must have shape \[batch, seqlen, nheads, headdim\]"):
        fac.flash_attn_func(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        fac.flash_attn_func(q, None, q)
    with pytest.raises(NotImplementedError, match="dropout"):
        fac.flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="window"):
        fac.flash_attn_func(q, q, q, window_size=(4, 4))
    with pytest.raises(ValueError, match=r"qkv must have shape \[batch, seqlen, 3, nheads, headdim\]"):
        fac.flash_attn_qkvpacked_func(torch.randn(2, 6, 2, 4, 8))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv must have shape \[total_k, 2, nheads_k, headdim\]"):
        fac.flash_attn_varlen_kvpacked_func(torch.randn(10, 4, 8), torch.randn(10, 3, 4, 8), cu, cu, 6, 6)
    cu_k = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cross-attention"):
        fac.flash_attn_varlen_kvpacked_func(torch.randn(10, 4, 8), torch.randn(10, 2, 4, 8), cu, cu_k, 6, 5)
    with pytest.raises(ValueError, match=r"qkv must have shape \[total, 3, nheads, headdim\]"):
        fac.flash_attn_varlen_qkvpacked_func(torch.randn(10, 4, 8), cu, 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_varlen_deterministic_flag_matches_sdpa(backend, deterministic, causal, monkeypatch):
    """flash-attn 2's flag: deterministic=False (its default) lets the Triton backend take its
    one-kernel backward (dq by atomics) on sequences longer than one tile; True keeps the
    bit-reproducible pair of kernels. Values and every gradient against SDPA either way, and the
    launched kernel is the flag's (the reference backend ignores the flag: deterministic anyway)."""
    from embedkit._triton import attention as kernels

    launches = {"fused": 0}
    launcher = kernels._fused_bwd_launch

    class Counting:
        def __getitem__(self, grid):
            launches["fused"] += 1
            return launcher[grid]

    monkeypatch.setattr(kernels, "_fused_bwd_launch", Counting())
    g = torch.Generator().manual_seed(2)
    lens = [5, 1, 30, 0, 18]
    T, H, Hk, D = sum(lens), 4, 2, 16
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hk, Hk))
    gout = torch.randn(T, H, D, generator=g)
    attend = _varlen_oracle(lens, causal, 0.3)
    with embedkit.use_backend(backend):
        _check("flash_attn_varlen_func",
               _run(lambda q, k, v: embedkit.flash_attn_varlen_func(q, k, v, cu, cu, 30, 30, 0.0, 0.3, causal,
                                                                    deterministic=deterministic)),
               [q, k, v], lambda q, k, v: (attend(q, k, v),), gout)
    assert launches["fused"] == (1 if backend == "triton" and not deterministic else 0)
