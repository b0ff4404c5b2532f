"""GLM-4.5 / 4.6 / 4.7 MoE (`Glm4MoeForCausalLM`), the math of docs/model.md §2.

Read top-down: attention -> decoder layer -> model -> causal LM. Batch metadata (slots, pages,
masks) never appears here: the paged attention layer reads it from the forward context.
Tensors are flattened over the batch: T tokens, hidden size H.
"""

from __future__ import annotations

import torch
from torch import nn

import common.model.layers as model_layers
import common.model.moe as moe_block
from common.forward.context import get_forward_context
from common.model.config import ModelConfig
from common.model.layers import (
    Embedding,
    Fp8Activation,
    GatedMLP,
    PagedAttention,
    QKVLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelLinear,
    rope_cos_sin,
)
from common.model.moe import MoE


class Glm4MoeAttention(nn.Module):
    """q/k/v projections with bias, optional per-head QK-norm, partial NeoX RoPE, GQA, o_proj.
    Heads are this rank's (all of them on one device): qkv_proj knows which."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.rope_theta = config.rope_theta
        self.max_positions = config.max_position_embeddings
        self.eps = config.rms_norm_eps
        self.qkv_proj = QKVLinear(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                  config.head_dim, bias=config.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.use_qk_norm else None
        self.attn = PagedAttention(layer_id, scale=config.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor | Fp8Activation, unsummed: bool = False) -> torch.Tensor:
        # positions [T] int64, x [T,H] (or quantised for an FP8 qkv_proj) -> [T,H], or with unsummed
        # possibly o_proj's split-K slices [T,S,H] (RowParallelLinear.forward)
        q, k, v = self.qkv_proj.forward_parts(x)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T,Hq,D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T,Hk,D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # [T,Hk,D]
        cos_sin = rope_cos_sin(self.rotary_dim, self.rope_theta, self.max_positions, positions.device)
        amax = None  # each head's max |o| for an FP8 o_proj's quantiser, at few tokens
        if self.o_proj.fp8_block == 0 and q.shape[0] <= model_layers.AMAX_HANDOFF_ROWS:
            amax = torch.empty(q.shape[0], self.num_heads, dtype=torch.float32, device=q.device)
        o = self.attn(q, k, v, positions, cos_sin, self.rotary_dim,  # norm + RoPE + K/V store, attention
                      self.q_norm.weight if self.q_norm is not None else None,
                      self.k_norm.weight if self.k_norm is not None else None, self.eps, amax)  # [T,Hq,D]
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim), unsummed, amax)


class Glm4MoeDecoderLayer(nn.Module):
    """x += Attention(norm1(x)); x += MLP(norm2(x)), MLP dense or MoE.

    The residual stream is carried separately so the add fuses into the next norm: the layer
    takes (delta, residual) and returns (delta, residual), with x = delta + residual. A MoE layer's
    delta may be the FP8 MoE's per-assignment rows [T,k,H] (`moe_block.COMBINE_IN_NORM`): the next
    add_and_norm sums them as it loads them.
    """

    def __init__(self, config: ModelConfig, layer_id: int, moe: bool) -> None:
        super().__init__()
        self.self_attn = Glm4MoeAttention(config, layer_id)
        self.mlp = MoE(config) if moe else GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # an FP8 consumer gets its input quantised by the norm that produces it (one kernel)
        qkv_quant = self.self_attn.qkv_proj.fp8_block
        if residual is None:
            residual, h = x, self.input_layernorm(x, qkv_quant)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual, qkv_quant)
        h = self.self_attn(positions, h, unsummed=model_layers.SPLIT_K_IN_NORM)  # the norm below adds any slices
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual, self.mlp.input_fp8_block,
                                                                 self.mlp.input_needs_normed)
        if isinstance(self.mlp, MoE):  # its rows may come unsummed: every consumer is an add_and_norm
            return self.mlp(h, combine=not moe_block.COMBINE_IN_NORM), residual
        return self.mlp(h), residual


class Glm4MoeModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Glm4MoeDecoderLayer(config, i, moe=config.is_moe_layer(i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids [T], positions [T] -> post-final-norm hidden [T,H]
        x, residual = self.embed_tokens(input_ids), None
        ctx = get_forward_context()
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual)
            ctx.layer_done(i)
        return self.norm.add_and_norm(x, residual)[0]


class Glm4MoeForCausalLM(nn.Module):
    """The target model. `mtp` is the NextN draft layer (common.model.mtp.Glm4MoeMTP, built on this file's
    decoder layer), attached by common.model.build_model when wanted; mtp.py imports this file, not the
    other way round."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Glm4MoeModel(config)
        self.lm_head = VocabParallelLinear(config.hidden_size, config.vocab_size)
        self.mtp: nn.Module | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)  # [T,H], post final norm

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [R,V] fp32
