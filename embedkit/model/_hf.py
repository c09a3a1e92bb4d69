"""Weight mapping from Hugging Face checkpoints into the Embedder (decoders and BERT encoders)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import EmbedderConfig, default_mrl_dims

DECODER_TYPES = ("llama", "qwen2", "qwen3", "gemma")
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "gelu": "gelu"}


def _load(path_or_model, tokenizer, auto_cls: str):
    """(transformers base model, tokenizer spec) from a path or a model object."""
    if isinstance(path_or_model, (str, Path)):
        import transformers

        path = str(path_or_model)
        hf = getattr(transformers, auto_cls).from_pretrained(path)
        if tokenizer is None and any((Path(path) / f).is_file()
                                     for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            tokenizer = path
    elif isinstance(path_or_model, torch.nn.Module) and hasattr(path_or_model, "config"):
        hf = path_or_model
    else:
        raise TypeError(f"path_or_model must be a checkpoint path or a transformers model, "
                        f"got {type(path_or_model).__name__}")
    base = getattr(hf, "base_model", hf)
    return base, tokenizer


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported (only plain rotary, 'default')")
    theta = getattr(cfg, "rope_theta", None) or params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _finish(model_cls, cfg: EmbedderConfig, tokenizer, mapped: dict, hf_keys: set, used: set, dtype, src_dtype):
    """Build the Embedder, copy the mapped weights, check nothing was left over."""
    leftover = sorted(k for k in hf_keys - used if not k.endswith("inv_freq") and not k.startswith("pooler."))
    if leftover:
        raise ValueError(f"checkpoint weights with no place in the Embedder: {leftover[:8]}")
    tok_spec = tokenizer if (tokenizer is None or isinstance(tokenizer, str)) else None
    cfg.tokenizer = tok_spec
    model = model_cls(cfg, tokenizer=tokenizer)
    state = model.state_dict()
    missing = sorted(set(mapped) - set(state))
    if missing:
        raise AssertionError(f"mapping targets unknown parameters {missing}")
    with torch.no_grad():
        for name, value in mapped.items():
            target = state[name]
            if name == "embed_tokens.weight":
                V = value.shape[0]
                target[:V].copy_(value)
                # Start/end tokens begin at the mean text embedding (small noise tells them apart).
                g = torch.Generator().manual_seed(0)
                noise = torch.randn(target.shape[0] - V, value.shape[1], generator=g) * value.float().std() * 0.1
                target[V:].copy_(value.float().mean(0) + noise)
            else:
                if target.shape != value.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != {tuple(target.shape)}")
                target.copy_(value)
    model.to(dtype or src_dtype)
    return model


def from_decoder(model_cls, path_or_model, *, tokenizer=None, dtype=None, **overrides):
    base, tokenizer = _load(path_or_model, tokenizer, "AutoModel")
    c = base.config
    mt = getattr(c, "model_type", None)
    if mt not in DECODER_TYPES:
        raise ValueError(f"from_hf_decoder supports model types {DECODER_TYPES}, got {mt!r}")
    if getattr(c, "use_sliding_window", False) or any(t != "full_attention" for t in (getattr(c, "layer_types", None) or [])):
        raise ValueError("sliding-window attention layers are not supported (every layer must be full attention)")
    sd = {k: v.detach() for k, v in base.state_dict().items()}
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "silu")
    if act not in _ACTS:
        raise ValueError(f"activation {act!r} is not supported")
    H = c.hidden_size
    cfg = dict(
        vocab_size=c.vocab_size, hidden_size=H, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or H // c.num_attention_heads, intermediate_size=c.intermediate_size,
        block_style="pre_norm", norm_type="rms", norm_eps=c.rms_norm_eps, hidden_act=_ACTS[act], mlp_gated=True,
        attention_bias="layers.0.self_attn.q_proj.bias" in sd, output_bias="layers.0.self_attn.o_proj.bias" in sd,
        mlp_bias="layers.0.mlp.gate_proj.bias" in sd, qk_norm="layers.0.self_attn.q_norm.weight" in sd,
        norm_offset=1.0 if mt == "gemma" else 0.0, embed_scale=math.sqrt(H) if mt == "gemma" else 1.0,
        rope_theta=_rope_theta(c), position_embedding="rope",
        max_position_embeddings=c.max_position_embeddings,
        max_seq_len=min(32768, c.max_position_embeddings),
    )
    cfg.update(overrides)
    config = EmbedderConfig(**cfg)
    mapped, used = {"embed_tokens.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}, \
        {"embed_tokens.weight", "norm.weight"}
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        pairs = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for p in ("weight", "bias"):
                pairs[f"self_attn.{proj}.{p}"] = f"attn.{proj}.{p}"
        for n in ("q_norm", "k_norm"):
            pairs[f"self_attn.{n}.weight"] = f"attn.{n}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for p in ("weight", "bias"):
                pairs[f"mlp.{proj}.{p}"] = f"mlp.{proj}.{p}"
        for s, d in pairs.items():
            if src + s in sd:
                mapped[dst + d] = sd[src + s]
                used.add(src + s)
    src_dtype = sd["embed_tokens.weight"].dtype
    return _finish(model_cls, config, tokenizer, mapped, set(sd), used, dtype, src_dtype)


def from_encoder(model_cls, path_or_model, *, tokenizer=None, out_dim=None, dtype=None, **overrides):
    base, tokenizer = _load(path_or_model, tokenizer, "AutoModel")
    c = base.config
    mt = getattr(c, "model_type", None)
    if mt != "bert":
        raise ValueError(f"from_hf_encoder supports BERT-style encoders (model_type 'bert'), got {mt!r}")
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if c.hidden_act not in ("gelu",):
        raise ValueError(f"activation {c.hidden_act!r} is not supported (BERT's exact 'gelu' is)")
    sd = {k: v.detach() for k, v in base.state_dict().items()}
    H = c.hidden_size
    identity = out_dim is None
    out = H if identity else int(out_dim)
    cfg = dict(
        vocab_size=c.vocab_size, hidden_size=H, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_attention_heads, head_dim=H // c.num_attention_heads,
        intermediate_size=c.intermediate_size, block_style="post_norm", norm_type="layer",
        norm_eps=c.layer_norm_eps, hidden_act="gelu", mlp_gated=False, attention_bias=True, output_bias=True,
        mlp_bias=True, position_embedding="learned", max_position_embeddings=c.max_position_embeddings,
        max_seq_len=c.max_position_embeddings, out_dim=out, mrl_dims=(H,) if identity else default_mrl_dims(out),
    )
    cfg.update(overrides)
    config = EmbedderConfig(**cfg)
    e = "embeddings."
    types = sd.get(e + "token_type_embeddings.weight")
    pos = sd[e + "position_embeddings.weight"]
    # Every token has token type 0: its embedding is folded into the learned positions.
    mapped = {"embed_tokens.weight": sd[e + "word_embeddings.weight"],
              "position_embed.weight": pos + (types[0] if types is not None else 0),
              "embed_norm.weight": sd[e + "LayerNorm.weight"], "embed_norm.bias": sd[e + "LayerNorm.bias"]}
    used = {e + "word_embeddings.weight", e + "position_embeddings.weight", e + "token_type_embeddings.weight",
            e + "LayerNorm.weight", e + "LayerNorm.bias", "embeddings.position_ids", "embeddings.token_type_ids"}
    for i in range(config.num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        pairs = {"attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
                 "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.o_proj",
                 "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "mlp.up_proj",
                 "output.dense": "mlp.down_proj", "output.LayerNorm": "mlp_norm"}
        for s, d in pairs.items():
            for p in ("weight", "bias"):
                mapped[f"{dst}{d}.{p}"] = sd[f"{src}{s}.{p}"]
                used.add(f"{src}{s}.{p}")
    if identity:
        mapped["projection.weight"] = torch.eye(H, dtype=pos.dtype)
    used |= {k for k in sd if k.startswith("embeddings.") and k.endswith("_ids")}
    return _finish(model_cls, config, tokenizer, mapped, set(sd), used, dtype, pos.dtype)

