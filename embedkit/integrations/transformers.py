"""Hugging Face transformers drop-in: the attention implementation ``"embedkit"``.

    import embedkit.integrations.transformers as ek_hf    # registers "embedkit" on import
    model = AutoModel.from_pretrained(path, attn_implementation="embedkit")

Every attention layer then runs `embedkit.ops.varlen_attention`. Two input layouts reach it:

- Padding-free (the fast path): one row holding the packed tokens of all sequences, with
  ``position_ids`` restarting at each sequence and ``cu_seq_lens_q/k`` + ``max_length_q/k`` passed
  as keyword arguments (the flash-attention padding-free convention of transformers; the models'
  ``**kwargs`` carry them down to every attention call). `packed_inputs` builds those arguments
  from a padded batch, `pack(model)` makes ``model(input_ids, attention_mask)`` unpad once before
  the embedding layer, run every layer packed and pad the outputs back. Tested on the BERT family
  (BERT / MiniLM: transformers 5 BERT passes ``position_ids`` to its embeddings and ``**kwargs`` down
  to attention, so no model surgery is needed; RoBERTa-style learned positions get the
  ``padding_idx + 1`` offset, untested) and on the decoders Llama, Qwen2/3, Mistral, Gemma (rotary
  tables are computed from ``position_ids``).
- Padded ``[B, L]`` batches with an attention mask: the mask function registered with
  ``AttentionMaskInterface`` hands the 2-D padding mask to the attention function, which unpads
  q/k/v, runs the varlen kernel and pads the result back, inside every layer. Correct for any
  padding side, but the dense layers still compute on padding: use `pack` for speed.

Causality: a call is causal when the ``is_causal`` keyword says so, else when both the module
(``module.is_causal``) and the config (``config.is_causal``, what transformers' mask builders read)
are causal. `make_bidirectional(model)` sets both to False: the LLM2Vec-style conversion of a
decoder (Llama, Qwen2/3, Mistral, Gemma) into a bidirectional encoder.

Not supported (each raises): attention dropout while training, KV caches / cross-attention
(query and key lengths differ), 4-D custom masks, logit soft-capping, attention sinks,
sliding windows shorter than a sequence, ``output_attentions=True``.
"""
from __future__ import annotations

import functools

import torch

import embedkit.ops as ops
from embedkit.batch import PackedBatch

NAME = "embedkit"
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# ---- the attention implementation -----------------------------------------------------------------

def _is_causal(module: torch.nn.Module, is_causal: bool | None) -> bool:
    if is_causal is not None:
        return bool(is_causal)
    config = getattr(module, "config", None)
    return bool(getattr(module, "is_causal", False)) and bool(getattr(config, "is_causal", True))


def _max_len(value) -> int:
    if isinstance(value, torch.SymInt):  # under torch.compile: int() would specialize it (a recompile per length)
        return value
    return int(value.max()) if isinstance(value, torch.Tensor) and value.dim() > 0 else int(value)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                      cu_seq_lens_k: torch.Tensor | None = None, max_length_q: int | None = None,
                      max_length_k: int | None = None, s_aux: torch.Tensor | None = None, **kwargs):
    """AttentionInterface entry: query [B, Hq, L, D], key / value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
    name = type(module).__name__
    if dropout:
        raise ValueError(f"{name}: attention implementation 'embedkit' has no attention dropout (got p={dropout}); "
                         "call model.eval() or set the attention dropout probability of the config to 0")
    if softcap is not None:
        raise NotImplementedError(f"{name}: attention logit soft-capping is not supported by 'embedkit'")
    if s_aux is not None:
        raise NotImplementedError(f"{name}: attention sinks (s_aux) are not supported by 'embedkit'")
    if kwargs.get("output_attentions"):
        raise ValueError("attention implementation 'embedkit' never materializes attention weights: "
                         "output_attentions=True needs attn_implementation='eager'")
    B, Hq, L, D = query.shape
    if key.shape[2] != L:
        raise NotImplementedError(f"{name}: query length {L} != key length {key.shape[2]} (KV cache or "
                                  "cross-attention); 'embedkit' attends each sequence to itself only")
    if value.shape[-1] != D:
        raise NotImplementedError(f"{name}: value head dim {value.shape[-1]} != query head dim {D}")
    causal = _is_causal(module, is_causal)
    # [B, H, L, D] -> [B * L, H, D]: a no-copy view when the projections were viewed / transposed.
    q = query.transpose(1, 2).reshape(B * L, Hq, D)
    k = key.transpose(1, 2).reshape(B * L, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * L, value.shape[1], D)

    indices = None
    if cu_seq_lens_q is not None:  # padding-free: the row holds whole packed sequences
        if B != 1:
            raise ValueError(f"cu_seq_lens_q (padding-free inputs) needs a batch of 1 packed row, got batch {B}")
        if attention_mask is not None:
            raise ValueError("got both cu_seq_lens_q (padding-free inputs) and a padding attention_mask")
        if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(
                cu_seq_lens_k, cu_seq_lens_q):
            raise NotImplementedError("cu_seq_lens_k != cu_seq_lens_q: 'embedkit' attends each sequence to itself")
        cu = cu_seq_lens_q.to(torch.int32)
        max_len = _max_len(max_length_q) if max_length_q is not None else _max_len(cu[1:] - cu[:-1])
    elif attention_mask is None:  # B full-length sequences
        cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=q.device)
        max_len = L
    else:
        if attention_mask.dim() != 2 or attention_mask.shape != (B, L):
            raise ValueError(f"{name}: 'embedkit' takes a 2-D padding mask [B={B}, L={L}] (from its registered "
                             f"mask function), got a mask of shape {tuple(attention_mask.shape)}; custom 4-D "
                             "masks need attn_implementation='eager' or 'sdpa'")
        batch = PackedBatch.from_attention_mask(attention_mask)
        indices, cu, max_len = batch.token_indices, batch.cu_seqlens, batch.max_seqlen
        q, k, v = q.index_select(0, indices), k.index_select(0, indices), v.index_select(0, indices)
    if sliding_window is not None and max_len > sliding_window:
        raise NotImplementedError(f"{name}: sequences of {max_len} tokens exceed the sliding window "
                                  f"({sliding_window}); 'embedkit' attends to the whole sequence")
    # Strided views are fine (the kernels need unit stride in the head dim only): no copies per layer.
    out = ops.varlen_attention(q, k, v, cu, max_len, causal=causal, softmax_scale=scaling)
    if indices is not None:
        out = out.new_zeros(B * L, Hq, D).index_copy(0, indices, out)
    return out.view(B, L, Hq, D), None


def attention_mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                            kv_offset: int = 0, mask_function=None, attention_mask: torch.Tensor | None = None,
                            **kwargs) -> torch.Tensor | None:
    """AttentionMaskInterface entry: the 2-D bool padding mask [B, kv_length], or None without padding.

    The pattern (causal or bidirectional) is decided per call in `attention_forward`; the mask only
    says which positions hold tokens. Without a registered mask function transformers would pass
    no mask at all and padding would be attended to.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if bool(attention_mask.all()):  # one sync per forward; spares every layer the unpadding
        return None
    return attention_mask


def register() -> None:
    """Register attention implementation "embedkit" (and its mask function) with transformers. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask_function)


# ---- packing: unpad once at the embedding layer ------------------------------------------------

def position_offset(model: torch.nn.Module) -> int:
    """First position id of a sequence: 0, or padding_idx + 1 for RoBERTa-family learned positions."""
    for module in model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if isinstance(padding_idx, int) and isinstance(getattr(module, "position_embeddings", None),
                                                       torch.nn.Embedding):
            return padding_idx + 1
    return 0


def packed_kwargs(batch: PackedBatch, *, offset: int = 0) -> dict:
    """Padding-free keyword arguments (position_ids [1, T], cu_seq_lens_q/k, max_length_q/k) of a batch."""
    positions = batch.positions()
    if positions.dim() != 1:
        raise ValueError("packed_kwargs takes 1-D position ids")
    cu = batch.cu_seqlens
    return {"position_ids": (positions.long() + offset)[None], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}


def packed_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, offset: int = 0,
                  **token_inputs: torch.Tensor) -> tuple[dict, PackedBatch]:
    """(model kwargs, PackedBatch) of a padded batch: input_ids [1, T] (and any other per-token input
    given, e.g. token_type_ids) packed once, plus the padding-free kwargs. Left or right padding."""
    batch = PackedBatch.from_attention_mask(attention_mask)
    # torch's gather, as in the attention function above (batch.unpad is ops.pack: no 'triton' backend).
    unpad = lambda x: x.flatten(0, 1).index_select(0, batch.token_indices)  # noqa: E731
    kwargs = {"input_ids": unpad(input_ids)[None], **packed_kwargs(batch, offset=offset)}
    for key, value in token_inputs.items():
        if value is not None:
            kwargs[key] = unpad(value)[None]
    return kwargs, batch


def _padded_kwargs(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, offset: int = 0,
                   **token_inputs) -> tuple[dict, torch.Tensor]:
    """Padding-free kwargs of a padded batch that keep all B * L positions (static shapes, for
    torch.compile): each row is cut into three sequences -- the padding before its tokens, its
    tokens, the padding after -- so every real token attends to its own sequence only, exactly as
    when unpadded; padding rows attend among themselves and are zeroed afterwards. Rows must hold
    their tokens contiguously (left or right padding, as tokenizers make; not checked: that would
    be a data-dependent branch). Returns (kwargs, float keep-mask [B, L, 1])."""
    B, L = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    first = torch.where(lengths > 0, mask.int().argmax(dim=1), 0)  # first token of each row
    row = torch.arange(B, device=mask.device) * L
    cu = torch.stack([row, row + first, row + first + lengths], dim=1).flatten()
    cu = torch.cat([cu, cu.new_full((1,), B * L)]).to(torch.int32)
    pos = torch.arange(L, device=mask.device)[None, :] - first[:, None]
    pos = torch.where(mask, pos, 0) + offset
    kwargs = {"input_ids": input_ids.reshape(1, B * L), "position_ids": pos.reshape(1, B * L),
              "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": L, "max_length_k": L}
    for key, value in token_inputs.items():
        if value is not None:
            kwargs[key] = value.reshape(1, B * L)
    return kwargs, mask[..., None]


def pack(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model(input_ids=..., attention_mask=...)`` unpad once and run every layer packed.

    Wraps ``model.forward`` (in place; idempotent; returns the model): a padded call becomes one
    padding-free call (batch of 1, cu_seq_lens in kwargs) and ``last_hidden_state`` /
    ``hidden_states`` come back padded [B, L, H] (zeros at padding); a BERT-style pooler output is
    recomputed from the padded states. Calls with ``inputs_embeds``, a KV cache or no attention mask
    pass through unchanged. The model must use attn_implementation "embedkit".

    Under torch.compile (fullgraph, dynamic shapes) the padded positions are kept (the unpadded
    token count is data-dependent): one graph for every batch, same outputs, but the dense layers
    compute on padding too (see _padded_kwargs).
    """
    if getattr(model.forward, "_embedkit_packed", False):
        return model
    if getattr(model.config, "_attn_implementation", None) != NAME:
        raise ValueError(f"pack(model) needs attn_implementation='{NAME}', got "
                         f"{getattr(model.config, '_attn_implementation', None)!r}: load the model with "
                         f"attn_implementation='{NAME}' or call model.set_attn_implementation('{NAME}')")
    inner = model.forward
    offset = position_offset(model)

    @functools.wraps(inner)
    def forward(input_ids=None, attention_mask=None, *args, **kwargs):
        token_type_ids = kwargs.pop("token_type_ids", None)
        if (input_ids is None or attention_mask is None or args or kwargs.get("inputs_embeds") is not None
                or kwargs.get("past_key_values") is not None or kwargs.get("position_ids") is not None
                or any(key in kwargs for key in _PACKED_KEYS)):
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return inner(input_ids, attention_mask, *args, **kwargs)
        kwargs.setdefault("use_cache", False)
        return_dict = kwargs.pop("return_dict", None)
        if torch.compiler.is_compiling():
            # Unpadding has a data-dependent token count (no static shape for the compiler): keep the
            # B * L tokens and run each row's padding as sequences of their own (see _padded_kwargs).
            packed, keep = _padded_kwargs(input_ids, attention_mask, offset=offset, token_type_ids=token_type_ids)
            shape = tuple(input_ids.shape)
            restore = lambda h: h[0].view(*shape, *h.shape[2:]) * keep  # noqa: E731  (zeros at padding)
        else:
            packed, batch = packed_inputs(input_ids, attention_mask, offset=offset, token_type_ids=token_type_ids)
            shape = tuple(input_ids.shape)
            restore = lambda h: h.new_zeros(shape[0] * shape[1], *h.shape[2:]).index_copy(  # noqa: E731
                0, batch.token_indices, h[0]).view(*shape, *h.shape[2:])
        out = inner(**packed, **kwargs, return_dict=True)
        if getattr(out, "last_hidden_state", None) is not None:
            out.last_hidden_state = restore(out.last_hidden_state)
            pooler = getattr(model, "pooler", None)
            if getattr(out, "pooler_output", None) is not None and callable(pooler):
                out.pooler_output = pooler(out.last_hidden_state)
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(restore(h) for h in out.hidden_states)
        return out.to_tuple() if return_dict is False else out

    forward._embedkit_packed = True
    model.forward = forward
    return model


def make_bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """LLM2Vec-style: every attention layer of a decoder attends both ways. In place; returns the model.

    Sets ``config.is_causal = False`` (read by transformers' mask builders, hence by eager / sdpa
    attention with padding) and ``is_causal = False`` on every module that has the attribute (read
    by the attention functions, embedkit's included).
    """
    configs = {id(model.config): model.config}
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = False
        config = getattr(module, "config", None)
        if config is not None:
            configs[id(config)] = config
    for config in configs.values():
        config.is_causal = False
        if hasattr(config, "use_bidirectional_attention"):
            config.use_bidirectional_attention = True
    return model


def from_pretrained(path: str, *, bidirectional: bool = False, **kwargs) -> torch.nn.Module:
    """``AutoModel.from_pretrained(path, attn_implementation="embedkit", **kwargs)``, packed (see `pack`),
    made bidirectional when asked (see `make_bidirectional`)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation=NAME, **kwargs)
    if bidirectional:
        make_bidirectional(model)
    return pack(model)


register()
