"""The NextN / MTP layer of GLM-4 MoE (docs/model.md §3.2), used as the EAGLE draft network.

For slot i: e = enorm(Embed(t_{i+1})), h = hnorm(h_i) with h_i the target's post-final-norm hidden
(or the draft's own previous output), z = eh_proj([e, h]) — embedding first —, one always-MoE
decoder layer with its own KV at pool layer num_hidden_layers, then shared_head.norm.
The embedding and the LM head are the target's.
"""

from __future__ import annotations

import torch
from torch import nn

from common.model.config import ModelConfig
from common.model.glm4_moe import Glm4MoeDecoderLayer
from common.model.layers import Embedding, Linear, RMSNorm


class Glm4MoeMTP(nn.Module):
    def __init__(self, config: ModelConfig, embed_tokens: Embedding) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.embed_tokens = embed_tokens  # shared with the target model
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = Linear(2 * hidden, hidden, bias=False)
        self.decoder = Glm4MoeDecoderLayer(config, layer_id=config.mtp_layer_index, moe=True)
        self.shared_head_norm = RMSNorm(hidden, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_in: torch.Tensor) -> torch.Tensor:
        # input_ids [T] (the next tokens), positions [T], hidden_in [T,H] -> hidden_out [T,H]
        e = self.enorm(self.embed_tokens(input_ids))  # [T,H]
        h = self.hnorm(hidden_in)  # [T,H]
        z = self.eh_proj(torch.cat((e, h), dim=-1))  # [T,H]
        z, residual = self.decoder(positions, z, None)
        return self.shared_head_norm.add_and_norm(z, residual)[0]
