"""OPT (the DistServe paper's family): learned positions (offset 2), LayerNorm, ReLU MLP, biases, tied head.

Module and parameter names follow HF `OPTForCausalLM`; `self_attn.out_proj` and `fc2` are the
row-parallel layers for DeepSpeed AutoTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .base import CausalLM
from .config import ModelConfig

if TYPE_CHECKING:
    from ..engine.attention import AttentionContext

POSITION_OFFSET = 2  # OPT reserves the first two position rows (a fairseq padding convention)


class OPTAttention(nn.Module):
    """Multi-head attention; `num_heads`/`num_kv_heads` are this shard's counts (AutoTP divides them)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.head_dim ** -0.5
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, h, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, h, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, h, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(h, h, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        t = x.shape[0]
        # OPT scales q before the product (not the scores); doing the same keeps float32 results bit-equal to HF.
        q = (self.q_proj(x) * self.scaling).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        out = attn(self.layer_idx, q, k, v, 1.0)
        return self.out_proj(out.reshape(t, self.num_heads * self.head_dim))


class OPTDecoderLayer(nn.Module):
    """Pre-LN (or post-LN when `do_layer_norm_before` is false) attention + fc1/fc2 block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.pre_ln = cfg.do_layer_norm_before
        self.act = F.relu if cfg.activation == "relu" else F.gelu
        self.self_attn = OPTAttention(cfg, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=cfg.layer_norm_affine)
        self.fc1 = nn.Linear(h, cfg.ffn_size, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.ffn_size, h, bias=cfg.mlp_bias)
        self.final_layer_norm = nn.LayerNorm(h, elementwise_affine=cfg.layer_norm_affine)

    def forward(self, x: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x), attn)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, attn))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTDecoder(nn.Module):
    """Token + learned position embeddings, optional projections, layers, optional final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.embed_positions = nn.Embedding(cfg.max_context + POSITION_OFFSET, h)
        proj = cfg.word_embed_proj_dim is not None
        self.project_in = nn.Linear(cfg.embed_dim, h, bias=False) if proj else None
        self.project_out = nn.Linear(h, cfg.embed_dim, bias=False) if proj else None
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_layer_norm = (nn.LayerNorm(h, elementwise_affine=cfg.layer_norm_affine)
                                 if cfg.final_layer_norm else None)


class OPTModel(nn.Module):
    """Holds the decoder (HF nests it as `model.decoder`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTForCausalLM(CausalLM):
    """OPT causal LM over the paged KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = OPTModel(cfg)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def input_embedding(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + dec.embed_positions(positions + POSITION_OFFSET)
        for layer in dec.layers:
            x = layer(x, attn)
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        return x
