"""Bytes and FLOPs of one forward of the GLM-4 MoE model, by kind of op, and the floors they set.

Bytes: each weight the forward touches, read once (FP8 weights 1 byte plus one fp32 scale per
output row; routers fp32; embedding rows, lm_head, norms and biases in the activation dtype), routed
experts only for the distinct experts the tokens pick (the shared expert always), plus the KV it
reads and writes. Activations are left out: small next to the weights at decode, and prefill is
compute-bound. FLOPs: 2 per multiply-add of every GEMM (attention projections, dense MLP, the top-k
and shared experts of each token, eh_proj: FP8 tensor cores in the FP8 model; router in fp32; lm_head
in bf16) and 4 * query-key pairs * q width for attention (QK^T and PV, bf16).

Floors over measured ceilings: bytes / read bandwidth; compute = FP8 FLOPs / FP8 GEMM peak + the rest
/ bf16 GEMM peak; roofline = max of the two; per-op = sum over parts of each part's own max (the ops
run one after another, so a memory-bound MoE cannot hide a compute-bound GEMM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.model.config import ModelConfig

SCALE_BYTES = 4  # one fp32 scale per output row of an FP8 weight


@dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    flops: float
    fp8: bool  # its FLOPs run on the FP8 tensor cores


@dataclass(frozen=True)
class Ceilings:
    read_gbs: float
    bf16_tflops: float
    fp8_tflops: float

    def floors(self, parts: Sequence[Part]) -> dict[str, float]:
        """{bytes_us, compute_us, roofline_us (max of the two), per_op_us} of a sequence of parts."""
        bw = self.read_gbs * 1e3  # bytes per us

        def peak(p: Part) -> float:  # flops per us
            return (self.fp8_tflops if p.fp8 else self.bf16_tflops) * 1e6

        bytes_us = sum(p.bytes for p in parts) / bw
        compute_us = sum(p.flops / peak(p) for p in parts)
        per_op = sum(max(p.bytes / bw, p.flops / peak(p)) for p in parts)
        return {"bytes_us": bytes_us, "compute_us": compute_us, "roofline_us": max(bytes_us, compute_us),
                "per_op_us": per_op}


def expected_distinct(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct routed experts that `tokens` tokens pick, k distinct each, uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclass(frozen=True)
class Shape:
    """The byte sizes of the model's pieces: config, FP8 or not, activation element bytes."""

    c: ModelConfig
    fp8: bool
    act: int  # bytes of one activation / KV / high-precision weight element

    def linear(self, rows: int, cols: int) -> float:
        """An [rows, cols] projection: its weight and (FP8) its per-row scales."""
        return rows * cols * (1 if self.fp8 else self.act) + (rows * SCALE_BYTES if self.fp8 else 0)

    @property
    def qkv_rows(self) -> int:
        return self.c.q_size + 2 * self.c.kv_size

    def attention(self, tokens: int) -> Part:
        c, h = self.c, self.c.hidden_size
        b = self.linear(self.qkv_rows, h) + self.linear(h, c.q_size) + 2 * h * self.act  # + the 2 layer norms
        b += self.qkv_rows * self.act if c.attention_bias else 0
        b += 2 * c.head_dim * self.act if c.use_qk_norm else 0
        return Part("attention proj", b, 2 * tokens * (self.qkv_rows + c.q_size) * h, self.fp8)

    def attention_core(self, tokens: int, kv_read: int, pairs: int) -> Part:
        kv = 2 * self.c.kv_size * self.act  # K and V of one token, one layer
        return Part("attention core", (kv_read + tokens) * kv, 4 * pairs * self.c.q_size, False)

    def dense(self, tokens: int) -> Part:
        h, i = self.c.hidden_size, self.c.intermediate_size
        return Part("dense mlp", self.linear(2 * i, h) + self.linear(h, i), 6 * tokens * h * i, self.fp8)

    def expert(self) -> float:
        h, i = self.c.hidden_size, self.c.moe_intermediate_size
        return self.linear(2 * i, h) + self.linear(h, i)

    def experts(self, tokens: int, distinct: float) -> Part:
        c = self.c
        used = (c.num_experts_per_tok + c.n_shared_experts) * tokens
        return Part("experts", (distinct + c.n_shared_experts) * self.expert(),
                    6 * used * c.hidden_size * c.moe_intermediate_size, self.fp8)

    def router(self, tokens: int) -> Part:
        e, h = self.c.n_routed_experts, self.c.hidden_size
        return Part("router", (e * h + e) * 4, 2 * tokens * e * h, False)

    def head(self, tokens: int, logit_rows: int) -> Part:
        """Embedding rows of the tokens, the final norm (the MTP layer's shared_head.norm) and lm_head."""
        h, v = self.c.hidden_size, self.c.vocab_size
        return Part("embed + lm_head", (v * h + tokens * h + h) * self.act, 2 * logit_rows * v * h, False)

    def mtp_input(self, tokens: int) -> Part:
        """enorm, hnorm and eh_proj [H, 2H] of the MTP layer."""
        h = self.c.hidden_size
        return Part("mtp eh_proj", self.linear(h, 2 * h) + 2 * h * self.act, 4 * tokens * h * h, self.fp8)


def target_parts(shape: Shape, tokens: int, kv_read: int, pairs: int, distinct: Sequence[float],
                 logit_rows: int) -> list[Part]:
    """One target forward of `tokens` tokens: every layer reads `kv_read` cached tokens' K/V (summed
    over sequences) and scores `pairs` query-key pairs; `distinct`: routed experts picked per MoE layer."""
    c = shape.c
    layers, dense = c.num_hidden_layers, c.first_k_dense_replace
    if len(distinct) != layers - dense:
        raise ValueError(f"{len(distinct)} distinct-expert counts for {layers - dense} MoE layers")
    parts = [shape.attention(tokens), shape.attention_core(tokens, kv_read, pairs)] * layers
    parts += [shape.dense(tokens)] * dense
    parts += [p for d in distinct for p in (shape.experts(tokens, d), shape.router(tokens))]
    return [*parts, shape.head(tokens, logit_rows)]


def mtp_parts(shape: Shape, tokens: int, kv_read: int, pairs: int, distinct: float, logit_rows: int) -> list[Part]:
    """One MTP (draft) forward: its input projection, its one MoE layer, and the shared lm_head."""
    return [shape.mtp_input(tokens), shape.attention(tokens), shape.attention_core(tokens, kv_read, pairs),
            shape.experts(tokens, distinct), shape.router(tokens), shape.head(tokens, logit_rows)]


def total(parts: Sequence[Part]) -> tuple[float, float, float]:
    """(bytes, FP8 FLOPs, other FLOPs)."""
    return (sum(p.bytes for p in parts), sum(p.flops for p in parts if p.fp8),
            sum(p.flops for p in parts if not p.fp8))
