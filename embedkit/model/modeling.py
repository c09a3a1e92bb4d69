"""The Embedder: one bidirectional transformer over the packed multimodal token stream.

    token ids -> embedding table (text vocabulary + modality start/end tokens)
    vision patches -> linear, audio patches -> linear   (written into their rows of the stream)
    -> N blocks (attention through embedkit.ops.varlen_attention with multimodal rotary tables)
    -> final norm -> embedkit.ops.pool_project (masked mean + MRL projection)

Two block styles share the code (config.block_style):
- "pre_norm" (default; Llama / Qwen2 / Qwen3 / Gemma): RMSNorm -> GQA attention -> residual,
  RMSNorm -> gated MLP (SwiGLU, GeGLU) -> residual; a final RMSNorm; 3-axis rotary positions.
- "post_norm" (BERT-style encoder checkpoints such as all-MiniLM-L6-v2): learned absolute
  positions and a LayerNorm on the embeddings, attention -> residual -> LayerNorm,
  MLP -> residual -> LayerNorm; no final norm. Positions are each token's index in its sequence.

The model calls embedkit.ops only; which backend runs them is embedkit's global backend choice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import ops
from .._config import validation_enabled
from ..batch import PackedBatch
from ..ops._varlen import positions_in_sequence
from ._batching import windowed_batches
from .config import SPECIAL_TOKENS, EmbedderConfig, default_mrl_dims  # noqa: F401 (re-exported: it lived here)
from .inputs import SEGMENT_TYPES, Interleaved, ModelInputs, Text, as_input_list
from .processor import Processor
from .tokenizers import HFTokenizer

if TYPE_CHECKING:
    import numpy as np

WEIGHTS_NAME = "model.safetensors"
SAVE_ID_KEY = "embedkit_save_id"  # one random id per save_pretrained, in config and weights
CONFIG_NAME = "config.json"
TOKENIZER_DIR = "tokenizer"
# encode sorts its inputs by length within windows of this many batches (batch_tokens each): the
# processed inputs of one window are held at once (see _batching.windowed_batches).
ENCODE_WINDOW_BATCHES = 8


class Norm(nn.Module):
    """RMSNorm (Llama / Qwen; with Gemma's +1 offset when `offset` = 1) or LayerNorm (BERT)."""

    def __init__(self, dim: int, eps: float, kind: str = "rms", offset: float = 0.0):
        super().__init__()
        self.kind, self.eps, self.offset = kind, eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # fp64 stays fp64
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (y * (self.weight.to(y.dtype) + self.offset)).to(x.dtype)
        return self.weight * y.to(x.dtype)


def _act(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class Attention(nn.Module):
    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, D
        self.softmax_scale = cfg.softmax_scale
        self.q_proj = nn.Linear(H, cfg.num_heads * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, cfg.num_kv_heads * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, cfg.num_kv_heads * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * D, H, bias=cfg.output_bias)
        if cfg.qk_norm:
            self.q_norm = Norm(D, cfg.norm_eps, "rms", cfg.norm_offset)
            self.k_norm = Norm(D, cfg.norm_eps, "rms", cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, rotary) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False,
                                   softmax_scale=self.softmax_scale, rotary=rotary)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=cfg.mlp_bias) if cfg.mlp_gated else None
        self.up_proj = nn.Linear(H, I, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(I, H, bias=cfg.mlp_bias)
        self.act = _act(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        self.pre_norm = cfg.block_style == "pre_norm"
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm_eps, cfg.norm_type, cfg.norm_offset)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg.hidden_size, cfg.norm_eps, cfg.norm_type, cfg.norm_offset)
        self.mlp = MLP(cfg)

    def forward(self, x, cu_seqlens, max_seqlen, rotary):
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), cu_seqlens, max_seqlen, rotary)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, cu_seqlens, max_seqlen, rotary))
        return self.mlp_norm(x + self.mlp(x))


def check_state_dtypes(model: nn.Module, state: dict, where: str) -> None:
    """Refuse weights whose dtype differs from the model's tensor of the same name: load_state_dict
    would cast them silently (a mixed-dtype file is a different model, not a cheaper copy)."""
    own = model.state_dict()
    for k, v in state.items():
        if k in own and isinstance(v, torch.Tensor) and v.dtype != own[k].dtype:
            raise ValueError(f"{where}: {k} has dtype {str(v.dtype).replace('torch.', '')} but the model's is "
                             f"{str(own[k].dtype).replace('torch.', '')} (a dtype mismatch is refused, not cast)")


def _tokenizer_in_dir(root: Path, spec, *, explicit: bool):
    """config.json's tokenizer, allowed only inside the model directory: "bytes", None, or a
    relative path that stays in `root`. A hub id would trigger a network fetch and "../x" or an
    absolute path would read outside the directory; both are refused (pass tokenizer= to use one)."""
    if explicit or spec is None or spec == "bytes":
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"{root / CONFIG_NAME}: tokenizer must be 'bytes', null or a path inside the model "
                        f"directory, got {spec!r}")
    base = root.resolve()
    p = (base / spec).resolve()
    if Path(spec).is_absolute() or not p.is_relative_to(base) or not p.is_dir():
        raise ValueError(f"{root / CONFIG_NAME}: tokenizer {spec!r} is not a directory inside the model directory "
                         f"{root} (hub ids and paths outside it are refused; pass tokenizer= explicitly)")
    return str(p)


class Embedder(nn.Module):
    """The multimodal embedding model. See the module docstring; `encode` is the user entry point."""

    def __init__(self, config: EmbedderConfig | None = None, tokenizer=None):
        super().__init__()
        cfg = EmbedderConfig() if config is None else config
        if not isinstance(cfg, EmbedderConfig):
            raise TypeError(f"config must be an EmbedderConfig, got {type(cfg).__name__}")
        self.config = cfg
        H = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size + len(SPECIAL_TOKENS), H)
        self.vision_embed = nn.Linear(cfg.vision_patch_dim, H)
        self.audio_embed = nn.Linear(cfg.audio_patch_dim, H)
        learned = cfg.position_embedding == "learned"
        self.position_embed = nn.Embedding(cfg.max_position_embeddings, H) if learned else None
        post = cfg.block_style == "post_norm"
        self.embed_norm = Norm(H, cfg.norm_eps, cfg.norm_type, cfg.norm_offset) if post else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = None if post else Norm(H, cfg.norm_eps, cfg.norm_type, cfg.norm_offset)
        self.projection = nn.Linear(H, cfg.out_dim, bias=cfg.projection_bias)
        self.processor = Processor(cfg, tokenizer)
        # Trainers may set this: blocks are recomputed in backward (training mode only).
        self.gradient_checkpointing = False
        # sentence-transformers' prompt table, for encode(prompt_name=...); not saved with the weights.
        self.prompts: dict[str, str] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh weights: N(0, 0.02) matrices and embeddings, zero biases, unit norm scales."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Norm):
                nn.init.constant_(m.weight, 1.0 - m.offset)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- forward --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projection.weight.dtype

    def _check_inputs(self, inputs: ModelInputs) -> None:
        if not isinstance(inputs, ModelInputs):
            raise TypeError(f"inputs must be ModelInputs (from Embedder.processor), got {type(inputs).__name__}")
        cfg = self.config
        ids = inputs.input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("input_ids must be an int64 / int32 tensor of shape [T]")
        for name, dim in (("vision", cfg.vision_patch_dim), ("audio", cfg.audio_patch_dim)):
            p, idx = getattr(inputs, f"{name}_patches"), getattr(inputs, f"{name}_index")
            if (p is None) != (idx is None):
                raise ValueError(f"{name}_patches and {name}_index must be given together")
            if p is None:
                continue
            if p.dim() != 2 or p.shape[1] != dim:
                raise ValueError(f"{name}_patches must have shape [N, {dim}], got {tuple(p.shape)}")
            if idx.dim() != 1 or idx.shape[0] != p.shape[0] or idx.dtype != torch.int64:
                raise ValueError(f"{name}_index must be int64 [N = {p.shape[0]}], got {idx.dtype} "
                                 f"{tuple(idx.shape)}")
        if self.position_embed is not None and inputs.batch.max_seqlen > cfg.max_position_embeddings:
            raise ValueError(f"a sequence of {inputs.batch.max_seqlen} tokens exceeds the "
                             f"{cfg.max_position_embeddings} learned positions")
        if validation_enabled() and not torch.compiler.is_compiling():  # content checks: a host sync
            T = ids.shape[0]
            if inputs.batch.total_tokens != T:
                raise ValueError(f"input_ids has {T} tokens but the batch packs {inputs.batch.total_tokens}")
            if T and (int(ids.min()) < 0 or int(ids.max()) >= self.embed_tokens.num_embeddings):
                raise ValueError(f"input_ids must lie in [0, {self.embed_tokens.num_embeddings}) (vocabulary "
                                 "plus modality start/end tokens)")
            for name in ("vision", "audio"):
                idx = getattr(inputs, f"{name}_index")
                if idx is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= T):
                    raise ValueError(f"{name}_index must point at rows of the token stream, in [0, {T})")

    def embed_inputs(self, inputs: ModelInputs) -> torch.Tensor:
        """[T, H] input states: token embeddings with the patch embeddings written into their rows."""
        cfg = self.config
        x = self.embed_tokens(inputs.input_ids)
        if cfg.embed_scale != 1.0:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if inputs.vision_patches is not None:
            x = x.index_copy(0, inputs.vision_index,
                             self.vision_embed(inputs.vision_patches.to(x.dtype)))
        if inputs.audio_patches is not None:
            x = x.index_copy(0, inputs.audio_index, self.audio_embed(inputs.audio_patches.to(x.dtype)))
        b = inputs.batch
        if self.position_embed is not None:
            T = x.shape[0]  # (x's rows rather than b.total_tokens: a traced size under torch.compile)
            x = x + self.position_embed(positions_in_sequence(b.cu_seqlens, T))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def rotary(self, batch: PackedBatch):
        """(cos, sin) for the batch's positions (None with learned positions)."""
        cfg = self.config
        if cfg.position_embedding != "rope":
            return None
        pos = batch.positions()
        if pos.dim() == 1:
            pos = pos.expand(3, -1)
        return ops.rotary_tables(pos, cfg.rope_dim, cfg.rope_theta, cfg.sections)

    def hidden_states(self, inputs: ModelInputs, *, all_layers: bool = False):
        """[T, H] final token states (after the final norm); with all_layers, the list of the input
        states and every block's output as well (the last entry is the final-norm output)."""
        self._check_inputs(inputs)
        b = inputs.batch
        x = self.embed_inputs(inputs)
        rotary = self.rotary(b)
        states = [x] if all_layers else None  # kept only when asked: L + 1 [T, H] tensors otherwise
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpoint:  # recompute each block in backward: activation memory of one block
                x = torch.utils.checkpoint.checkpoint(layer, x, b.cu_seqlens, b.max_seqlen, rotary,
                                                      use_reentrant=False)
            else:
                x = layer(x, b.cu_seqlens, b.max_seqlen, rotary)
            if all_layers:
                states.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
            if all_layers:
                states.append(x)
        return states if all_layers else x

    def pool(self, hidden: torch.Tensor, batch: PackedBatch, *, dim: int | None = None,
             normalize: bool = False) -> torch.Tensor:
        """[B, dim] masked mean of each sequence's pooled tokens through the MRL projection."""
        p = self.projection
        return ops.pool_project(hidden, batch.cu_seqlens, p.weight, p.bias, pool_mask=batch.pool_mask,
                                out_dim=self._check_dim(dim), normalize=normalize)

    def forward(self, inputs: ModelInputs, *, dim: int | None = None, normalize: bool = False,
                return_hidden: bool = False):
        """Embeddings [B, dim] (dim None: out_dim) of packed inputs; with return_hidden, (emb, [T, H])."""
        hidden = self.hidden_states(inputs)
        emb = self.pool(hidden, inputs.batch, dim=dim, normalize=normalize)
        return (emb, hidden) if return_hidden else emb

    def compile(self, *args, fullgraph: bool = True, dynamic: bool | None = True, **kwargs) -> None:
        """nn.Module.compile (in place: calling the model, and so `encode`, runs compiled) with the
        packed-batch defaults fullgraph=True, dynamic=True; other arguments go to torch.compile.

        The batch is built outside the compiled call (encode packs on the host), so one graph
        serves every batch of every size and length, a one-input batch included (see
        embedkit._compile). torch.compile(model) returns a wrapper whose `encode` is NOT compiled
        (it calls the plain module): use model.compile() for encode."""
        from .._compile import size_oblivious

        super().compile(*args, fullgraph=fullgraph, dynamic=dynamic, **kwargs)
        self._compiled_call_impl = size_oblivious(self._compiled_call_impl)

    def embed_packed(self, batch: PackedBatch, input_ids: torch.Tensor, vision_patches=None, vision_index=None,
                     audio_patches=None, audio_index=None, *, dim: int | None = None,
                     normalize: bool = False) -> torch.Tensor:
        """The trainer's entry: a PackedBatch plus token ids / patches -> embeddings [B, dim]."""
        return self(ModelInputs(batch, input_ids, vision_patches, vision_index, audio_patches, audio_index),
                    dim=dim, normalize=normalize)

    def _check_dim(self, dim):
        if dim is None:
            return self.config.out_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= self.config.out_dim:
            raise ValueError(f"dim must be an int in [1, out_dim = {self.config.out_dim}] (MRL dims "
                             f"{self.config.mrl_dims}), got {dim!r}")
        return dim

    # ---- encode ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, inputs, task: str | None = None, dim: int | None = None, *, batch_tokens: int = 16384,
               normalize: bool | None = None, show_progress: bool | None = None, truncate: bool = True,
               prompt: str | None = None, prompt_name: str | None = None,
               show_progress_bar: bool | None = None, normalize_embeddings: bool | None = None,
               truncate_dim: int | None = None, convert_to_numpy: bool | None = None,
               convert_to_tensor: bool | None = None) -> torch.Tensor | np.ndarray | list[torch.Tensor]:
        """L2-normalized embeddings (float32, CPU) of the inputs: [N, dim], or [dim] for one input.

        inputs: a list of embedkit.Interleaved (or segments / strs, each one input), or one input.
        A dict is refused (its keys are not an input; build an Interleaved), as is anything else
        that is not an input or a list of inputs.
        task: an instruction attended to by every input but left out of the pooled mean.
        dim: an MRL prefix (one of config.mrl_dims); None: the model's own output size, out_dim.
        batch_tokens: inputs are packed, longest first, into batches of at most this many tokens (an
        input longer than that is a batch of its own); the embeddings come back in input order. The
        sort runs within windows of 8 batches' worth of inputs (ENCODE_WINDOW_BATCHES), so that only
        one window of processed images / audio is held. show_progress: a bar counting inputs
        (default: on for >= 256 inputs) on a terminal, else one final line on stderr.
        truncate: an input longer than config.max_seq_len keeps its first text tokens (plus bos /
        eos), as sentence-transformers truncates; False makes it a ValueError. Image / video /
        audio tokens are never cut (that is an error either way).

        sentence-transformers' names are accepted too (giving both names with different values is a
        ValueError): show_progress_bar = show_progress, normalize_embeddings = normalize,
        truncate_dim = dim; prompt: a string prepended to each input's text (pooled, like
        sentence-transformers' default include_prompt=True; `task` is the unpooled instruction);
        prompt_name: a key of `self.prompts`; convert_to_numpy=True: a NumPy array;
        convert_to_tensor=False alone also gives NumPy, both False a list of 1-D tensors.

        After model.compile() (see Embedder.compile) each batch's forward runs compiled; batches
        are packed on the host either way.
        """
        dim = _alias("dim", dim, "truncate_dim", truncate_dim)
        normalize = _alias("normalize", normalize, "normalize_embeddings", normalize_embeddings)
        normalize = True if normalize is None else normalize
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        show_progress = _alias("show_progress", show_progress, "show_progress_bar", show_progress_bar)
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be a bool, got {type(truncate).__name__}")
        output = _output_kind(convert_to_numpy, convert_to_tensor)
        prompt = self._resolve_prompt(prompt, prompt_name)
        single, items = as_input_list(inputs)
        if prompt is not None:
            items = [_with_prompt(prompt, x, i) for i, x in enumerate(items)]
        if not items:
            raise ValueError("inputs is empty: pass at least one input to embed")
        dim = self._check_dim(dim)
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        was_training = self.training
        self.eval()
        from .._progress import Progress

        bar = Progress(len(items), "encode", enabled=show_progress or (show_progress is None and len(items) >= 256))
        processed = (self.processor.item(x, task, i, truncate=truncate) for i, x in enumerate(items))
        emb = None
        try:
            for sel, batch in windowed_batches(processed, lambda it: it.length, batch_tokens,
                                               ENCODE_WINDOW_BATCHES * batch_tokens):
                packed = self.processor.pack(batch).to(self.device, self.dtype)
                out = self(packed, dim=dim, normalize=normalize).float().cpu()
                if emb is None:
                    emb = out.new_empty(len(items), out.shape[1])
                emb[torch.from_numpy(sel)] = out
                bar.update(len(batch))
        finally:
            bar.close()
            self.train(was_training)
        emb = emb[0] if single else emb
        if output == "numpy":
            return emb.numpy()
        if output == "list":
            return [emb] if single else list(emb)
        return emb

    def _resolve_prompt(self, prompt, prompt_name):
        """The prompt string from prompt / prompt_name (a key of self.prompts), as sentence-transformers."""
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or None, got {type(prompt).__name__}")
        if prompt_name is None:
            return prompt
        prompts = getattr(self, "prompts", None) or {}
        if prompt_name not in prompts:
            raise ValueError(f"prompt_name {prompt_name!r} is not in this model's prompts "
                             f"({sorted(prompts) or 'none are set; assign model.prompts = {name: text}'})")
        if prompt is not None and prompt != prompts[prompt_name]:
            raise ValueError(f"prompt {prompt!r} and prompt_name {prompt_name!r} (= {prompts[prompt_name]!r}) "
                             "disagree: pass one of them")
        return prompts[prompt_name]

    # ---- save / load ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Writes config.json and model.safetensors (and the tokenizer, if it is a Hugging Face one)
        as one unit: into a temporary sibling directory, fsynced, then renamed into place (other
        files already in `path` are carried over). One save id in config.json and in the weights'
        metadata lets from_pretrained refuse a config and weights of different saves."""
        from safetensors.torch import save_file

        from .._atomic import atomic_dir, new_save_id

        out = Path(path)
        cfg = self.config.to_dict()
        save_id = new_save_id()
        cfg[SAVE_ID_KEY] = save_id
        with atomic_dir(out, keep_foreign=True) as tmp:
            # A Hugging Face tokenizer (given as a path or an object) is saved beside the weights, so
            # the directory is self-contained; the built-in byte tokenizer is just named.
            tok = self.processor.tokenizer
            if isinstance(tok, HFTokenizer):
                tok.tok.save_pretrained(str(tmp / TOKENIZER_DIR))
                cfg["tokenizer"] = "./" + TOKENIZER_DIR
            elif tok is not None:
                cfg["tokenizer"] = "bytes"
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME),
                      metadata={"format": "pt", "library": "embedkit", SAVE_ID_KEY: save_id})
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype: torch.dtype | None = None,
                        tokenizer=None) -> "Embedder":
        """Loads what save_pretrained wrote (safetensors + JSON; nothing is unpickled)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from .._atomic import resolve_dir

        root = resolve_dir(path)
        if not (root / CONFIG_NAME).is_file() or not (root / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{root} must hold {CONFIG_NAME} and {WEIGHTS_NAME} (from save_pretrained)")
        d = json.loads((root / CONFIG_NAME).read_text())
        if not isinstance(d, dict):
            raise ValueError(f"{root / CONFIG_NAME} must hold a JSON object")
        cfg_id = d.pop(SAVE_ID_KEY, None)
        with safe_open(str(root / WEIGHTS_NAME), framework="pt") as f:
            w_id = (f.metadata() or {}).get(SAVE_ID_KEY)
        if cfg_id != w_id:
            raise ValueError(f"{root}: {CONFIG_NAME} (save id {cfg_id}) and {WEIGHTS_NAME} (save id {w_id}) "
                             f"come from different saves: refusing to load a torn model directory")
        d["tokenizer"] = _tokenizer_in_dir(root, d.get("tokenizer", "bytes"), explicit=tokenizer is not None)
        model = cls(EmbedderConfig.from_dict(d), tokenizer=tokenizer)
        state = load_file(str(root / WEIGHTS_NAME))
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(dtypes) == 1:
            model.to(dtypes.pop())
        check_state_dtypes(model, state, str(root / WEIGHTS_NAME))
        model.load_state_dict(state, strict=True)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model

    # ---- initialisation from Hugging Face checkpoints -------------------------------------------
    @classmethod
    def from_hf_decoder(cls, path_or_model, *, tokenizer=None, dtype: torch.dtype | None = None,
                        **config_overrides) -> "Embedder":
        """An Embedder whose backbone holds a Llama / Qwen2 / Qwen3 / Gemma decoder's weights.

        Attention becomes bidirectional (the causal mask is dropped); the text embeddings, blocks
        and final norm are copied; the modality start/end tokens, patch embedders and MRL
        projection are fresh. path_or_model: a checkpoint directory (its tokenizer is used when it
        has one) or a transformers model (XxxModel or XxxForCausalLM). config_overrides set
        EmbedderConfig fields (out_dim, mrl_dims, patch_size, ...).
        """
        from . import _hf

        return _hf.from_decoder(cls, path_or_model, tokenizer=tokenizer, dtype=dtype, **config_overrides)

    @classmethod
    def from_hf_encoder(cls, path_or_model, *, tokenizer=None, out_dim: int | None = None,
                        dtype: torch.dtype | None = None, **config_overrides) -> "Embedder":
        """A text-first Embedder from a BERT-style encoder (e.g. the packaged all-MiniLM-L6-v2).

        Uses block_style "post_norm" with learned absolute positions (the checkpoint's own
        architecture). out_dim None: the projection is the identity at out_dim = hidden size, so
        that encode() reproduces the checkpoint's sentence-transformers mean-pooled embeddings;
        an int: a fresh projection to out_dim (mrl_dims default to out_dim/4, out_dim/2, out_dim).
        """
        from . import _hf

        return _hf.from_encoder(cls, path_or_model, tokenizer=tokenizer, out_dim=out_dim, dtype=dtype,
                                **config_overrides)

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n


def _alias(name: str, value, st_name: str, st_value):
    """One value from embedkit's name and sentence-transformers' name for the same argument."""
    if st_value is None:
        return value
    if value is not None and value != st_value:
        raise ValueError(f"{name}={value!r} and {st_name}={st_value!r} are the same argument (the "
                         f"sentence-transformers name) with different values: pass one of them")
    return st_value


def _output_kind(convert_to_numpy, convert_to_tensor) -> str:
    """"tensor" (the default), "numpy" or "list", following sentence-transformers' two flags."""
    for name, v in (("convert_to_numpy", convert_to_numpy), ("convert_to_tensor", convert_to_tensor)):
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    if convert_to_numpy and convert_to_tensor:
        raise ValueError("convert_to_numpy=True and convert_to_tensor=True contradict each other: pass one")
    if convert_to_numpy or convert_to_tensor is False and convert_to_numpy is None:
        return "numpy"
    if convert_to_numpy is False and convert_to_tensor is False:
        return "list"
    return "tensor"


def _with_prompt(prompt: str, x, index: int):
    """x with `prompt` prepended to its text (to a str, or to its first Text segment), or as a Text."""
    if isinstance(x, str):
        return prompt + x
    if isinstance(x, Text):
        return Text(prompt + x.text)
    segs = list(x) if isinstance(x, (Interleaved, list, tuple)) else [x]
    if segs and isinstance(segs[0], (str, Text)):
        first = segs[0] if isinstance(segs[0], str) else segs[0].text
        return Interleaved([Text(prompt + first), *segs[1:]])
    if isinstance(x, (Interleaved, list, tuple, *SEGMENT_TYPES)):
        return Interleaved([Text(prompt), *segs])
    return x  # not an input: the processor names it with its index
