"""GLM-4.5-Air-shaped random models for the step benchmarks.

`AIR` is the 4-layer slice most benchmarks run: Air's widths (H 4096, 96/8 heads of 128, 128 experts
top-8 of I_e 1408, dense I 10944, vocab 151552), 1 dense + 3 MoE layers and the MTP layer.
`AIR_FULL` is the whole GLM-4.5-Air: 46 layers (1 dense + 45 MoE) plus the MTP layer, 131072
positions. Random weights (common.model.loader.dummy_weights, one generator per checkpoint tensor): norms 1,
biases N(0, 0.02), projections N(0, 1/fan_in).

`random_model(..., fp8=True)` builds the model in the FP8 checkpoints' layout (every module that
`fp8_capable` lists holds E4M3 weights with one fp32 scale per output row; embedding, lm_head, norms
and biases in the model dtype, routers fp32) straight on the device: built on meta, switched to FP8,
each checkpoint tensor drawn and quantised on the device one at a time (an expert's projection at
most, beside the embedding), so no high-precision copy of a big stack ever exists.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from common.model import Glm4MoeForCausalLM, build_model
from common.model.config import ModelConfig
from common.model.layers import SINGLE_RANK, TPComm
from common.model.loader import dummy_weights, fp8_capable
from common.model.moe import MoE

AIR = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 96,
    "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5, "rope_theta": 1e6,
    "rms_norm_eps": 1e-5, "attention_bias": True, "use_qk_norm": False, "n_routed_experts": 128,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0, "norm_topk_prob": True, "max_position_embeddings": 16384,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
}
AIR_FULL = dict(AIR, num_hidden_layers=46, max_position_embeddings=131072)
# GLM-4.5 / 4.6 / 4.7 widths (H 5120, 96/8 heads, 160 experts of 1536, dense I 12288, QK-norm); the slice
# keeps Air's 1 dense + 3 MoE layers, the full model has 3 dense + 89 MoE
GLM45 = dict(AIR, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160,
             use_qk_norm=True, routed_scaling_factor=2.5)
GLM45_FULL = dict(GLM45, num_hidden_layers=92, first_k_dense_replace=3, max_position_embeddings=131072)
TINY_WIDTHS = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "n_routed_experts": 16}


def random_model(fields: dict, device: torch.device | str, dtype: torch.dtype, fp8: bool = False,
                 seed: int = 0, tp: TPComm = SINGLE_RANK) -> Glm4MoeForCausalLM:
    """build_model(fields) with the MTP layer and seeded random weights (what a worker's
    `--load-format dummy` draws: common.model.loader.dummy_weights); `fp8`: in the FP8 layout; `tp`:
    one rank's shard of a TP group (common/model/layers.py), the slice of the TP 1 weights."""
    config = ModelConfig.from_dict(fields)
    model = build_model(config, "meta", dtype, with_mtp=True, tp=tp)
    dummy_weights(model, config, device, seed, fp8=fp8)
    return model.eval()


def deepen(model: Glm4MoeForCausalLM, layers: int) -> None:
    """Extend the model to `layers` decoder layers in place: each new layer shares the weights of one of
    the existing MoE layers, taken in turn, and has its own KV pool layer; the MTP layer moves to pool
    layer `layers` and the config says `layers`.

    For timing a full-depth step on a GPU that cannot hold every layer's weights: a layer reads its
    weights from memory all the same (one Air layer reads over 250 MB a step even at batch 1, and the
    same weights come back only after every other MoE layer has run, far beyond any GPU's L2), so
    the step's time and bytes are the full-depth model's; its memory footprint and KV capacity are
    not."""
    stack = model.model.layers
    k = len(stack)
    moe = [layer for layer in stack if hasattr(layer.mlp, "experts")]
    if layers <= k:
        return
    if not moe:
        raise ValueError("deepen: the model has no MoE layer to repeat")
    for i in range(k, layers):
        src = moe[(i - k) % len(moe)]
        keep: dict[int, object] = {}
        for m in src.modules():  # every tensor the layer holds is shared, never copied
            keep.update((id(v), v) for v in vars(m).values() if isinstance(v, torch.Tensor))
            keep.update((id(t), t) for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
        layer = copy.deepcopy(src, keep)
        layer.self_attn.attn.layer_id = i
        stack.append(layer)
    model.mtp.decoder.self_attn.attn.layer_id = layers
    model.config = dataclasses.replace(model.config, num_hidden_layers=layers)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (a shared one counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def weight_bytes_at(fields: dict, layers: int, dtype: torch.dtype, fp8: bool, tp: TPComm = SINGLE_RANK) -> int:
    """Parameter bytes of random_model(fields with `layers` layers) without building it (meta)."""
    model = build_model(ModelConfig.from_dict(dict(fields, num_hidden_layers=layers)), "meta", dtype, with_mtp=True,
                        tp=tp)
    if fp8:
        for name in fp8_capable(model):
            model.get_submodule(name).use_fp8(0)
    return parameter_bytes(model)


def make_agreeing(model: Glm4MoeForCausalLM) -> None:
    """Turn the model into one whose MTP draft always predicts the target's next (greedy) token, in place
    (common/tools/agreeing_draft.py's construction, made exact under FP8 activations too).

    Every residual branch is zeroed (o_proj, dense and expert down projections, main and MTP layers),
    so the target's last hidden is RMSNorm(embed(t); w_norm): its next token is f(t). The MTP layer
    gets enorm 1, hnorm 0 and eh_proj = [I, 0], and shared_head.norm = w_norm. Embedding rows are
    +-1: then enorm(e) is exactly +-1 in bf16, its per-token FP8 quantisation is exact (amax 1 ->
    codes +-448) with the hidden half all zero, so eh_proj returns +-1 = e exactly and the draft
    computes the same f. Kernel costs do not change: the same shapes and bytes run."""
    h = model.config.hidden_size
    layers = [*model.model.layers, model.mtp.decoder]
    with torch.no_grad():
        for layer in layers:
            _zero(layer.self_attn.o_proj.weight)
            mlp = layer.mlp
            _zero(mlp.experts.w2 if isinstance(mlp, MoE) else mlp.down_proj.weight)
        emb = model.model.embed_tokens.weight
        emb.sign_().add_(0.5).sign_()  # -1, 0, 1 -> -1, 1, 1
        mtp = model.mtp
        mtp.enorm.weight.fill_(1.0)
        mtp.hnorm.weight.zero_()
        mtp.shared_head_norm.weight.copy_(model.model.norm.weight)
        eye = torch.zeros(h, 2 * h, device=emb.device)
        eye[:, :h] = torch.eye(h, device=emb.device)
        mtp.eh_proj.weight.copy_(eye.to(mtp.eh_proj.weight.dtype))
        if mtp.eh_proj.fp8_block is not None:
            mtp.eh_proj.weight_scale.fill_(1.0)


def _zero(p: torch.Tensor) -> None:
    (p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p).zero_()
