"""Building blocks of the GLM-4 MoE model: norms, linears, RoPE table, gated MLP, paged attention.

Modules are built on the meta device and given their dtype by `cast_parameters`; the loader then
materialises them tensor by tensor on the target device.

Tensor parallelism lives here and only here (docs/model.md §5). A model built inside
`tensor_parallel(comm)` holds one rank's shard: `MergedLinear` (q|k|v by heads, gate|up) and the MoE
experts are column-parallel, `RowParallelLinear` (o_proj, down) splits its input and all-reduces its
output, `VocabParallelLinear` (lm_head) holds a block of vocabulary rows and gathers the logits to
rank 0; everything else is replicated. Each sharded module names the checkpoint region its rank
reads (`shard_region`), so the loader slices without knowing the rules. Outside any scope the model
is single-device (`SINGLE_RANK`).

FP8: a `Linear` (and the MoE `Experts`, common/model/moe.py) switched by `use_fp8(block)` holds its
weight in float8_e4m3fn with fp32 scales that multiply back — `weight_scale` [out,1] per output
channel (block 0) or [ceil(out/b), ceil(in/b)] per b x b block — and quantises its input
dynamically, per token (block 0) or per 1 x b group, before the FP8 GEMM. A producer that already
quantised the input (a norm fused with the quantiser) passes an `Fp8Activation` instead.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from common import ops
from common.attention import rope_store_attention
from common.forward.context import get_forward_context


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every floating parameter `dtype`, except those a module lists in `fp32_params`
    (the router's), which stay fp32. Meant for a model on the meta device (no data moves)."""
    for module in model.modules():
        keep = getattr(module, "fp32_params", ())
        for name, param in list(module.named_parameters(recurse=False)):
            want = torch.float32 if name in keep else dtype
            if param.is_floating_point() and param.dtype != want:
                setattr(module, name, nn.Parameter(param.to(want), requires_grad=False))


# ------------------------------------------------------------------------------------ tensor parallelism
WHOLE = slice(None)


class TPComm(Protocol):
    """The collectives of one tensor-parallel group that sharded layers call
    (common/runtime/distributed.py implements them over gloo and NCCL)."""

    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks in a fixed order: every rank gets the same bits (routing must agree)."""
        ...

    def gather_to_leader(self, x: torch.Tensor) -> torch.Tensor:
        """Shards [..., n] -> [..., n * size] on rank 0, in rank order (other ranks: any tensor)."""
        ...


class LocalRank:
    """Rank `rank` of a group of `size` whose collectives are the identity. Size 1 is the group of
    one device; a larger size builds and runs one rank's shard alone on one device (its own compute
    and memory, for measuring and testing a shard without its peers)."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_to_leader(self, x: torch.Tensor) -> torch.Tensor:
        return x


SINGLE_RANK = LocalRank()
_build = threading.local()


@contextmanager
def tensor_parallel(comm: TPComm) -> Iterator[TPComm]:
    """Modules built in this scope hold rank `comm.rank`'s shard of a `comm.size`-way split and call
    `comm`'s collectives in their forward. Scopes do not nest."""
    if getattr(_build, "comm", None) is not None:
        raise RuntimeError("tensor_parallel scopes do not nest")
    _build.comm = comm
    try:
        yield comm
    finally:
        _build.comm = None


def current_tp() -> TPComm:
    """The group of the enclosing `tensor_parallel` scope (SINGLE_RANK outside any)."""
    return getattr(_build, "comm", None) or SINGLE_RANK


def shard_range(total: int, tp: TPComm, what: str) -> slice:
    """Rank tp.rank's contiguous block of `total` rows (or columns, heads); ValueError naming `what`
    when tp.size does not divide it."""
    if total % tp.size:
        raise ValueError(f"--tp-size {tp.size} does not divide {what} ({total})")
    n = total // tp.size
    return slice(tp.rank * n, (tp.rank + 1) * n)


def kv_head_block(kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """(first, count) of the global kv heads rank `rank` holds: kv_heads / tp_size heads while
    tp_size <= kv_heads, else one head replicated on tp_size / kv_heads ranks (rank r holds head
    r // replicas). The KV transfer plans with the same rule (common/transport/handshake.py)."""
    if kv_heads % tp_size == 0:
        n = kv_heads // tp_size
        return rank * n, n
    if tp_size % kv_heads == 0:
        return rank // (tp_size // kv_heads), 1
    raise ValueError(f"--tp-size {tp_size} cannot split {kv_heads} kv heads (one must divide the other)")


class Shard(NamedTuple):
    """What one rank holds of a checkpoint tensor of shape `full`: `region`, one slice per dim."""

    region: tuple[slice, ...]
    full: tuple[int, ...]

    def bias(self) -> Shard:
        """The shard of the bias [out] of a weight shard."""
        return Shard(self.region[:1], self.full[:1])

    def scale(self, block: int) -> Shard:
        """The shard of the FP8 scales of a weight shard: per output row [out, 1] (block 0) or per
        block [ceil(out/b), ceil(in/b)] (the region on whole blocks: `splits_fp8_blocks` refused the rest)."""
        rows, cols = self.region
        out, inp = self.full
        if block == 0:
            return Shard((rows, WHOLE), (out, 1))
        return Shard(tuple(WHOLE if s == WHOLE else slice(s.start // block, -(-s.stop // block))
                           for s in (rows, cols)), (-(-out // block), -(-inp // block)))


def cut_blocks(what: str, full: int, start: int, local: int, block: int) -> str | None:
    """Why a shard [start, start + local) of `full` rows or columns cuts b x b FP8 blocks, or None."""
    if full % block or (start % block == 0 and local % block == 0):
        return None  # whole blocks (or no whole blocks even unsharded: the loader dequantises then)
    return f"{what}: {full} -> {local} per rank, not a multiple of {block}"


FP8_DTYPE = torch.float8_e4m3fn


class Fp8Activation(NamedTuple):
    """An activation already quantised for an FP8 linear: q [T,K] e4m3 and its fp32 scales
    ([T,1] per token, or [T,K/b] per 1 x b group); `dtype` is the dtype the linear returns;
    `normed` the value itself in that dtype when a consumer needs both (the MoE's router)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    normed: torch.Tensor | None = None


def fp8_scale_shape(rows: int, cols: int, block: int) -> tuple[int, int]:
    """Shape of the fp32 scales of an FP8 [rows, cols] weight: per row (block 0) or per b x b block."""
    return (rows, 1) if block == 0 else (-(-rows // block), -(-cols // block))


# o_proj's few-token split-K GEMM hands its fp32 slices to the next add + norm, which adds them up as
# it loads them (the reduce's own arithmetic) instead of a reduce launch between the two
# (docs/performance.md §7p: 0.8-1.3 % off the one-token decode step). False: the reduce launch, for
# timing the two (`bench_full_depth --ab split-k-reduce`).
SPLIT_K_IN_NORM = True

# Up to this many tokens the paged attention hands o_proj each head's max |o| (its split merge writes
# it beside o) and an FP8 o_proj on the few-token GEMM quantises o from them as it loads it: no
# quantiser launch between attention and o_proj, and no program reads the whole row for its amax
# (the re-read that made QUANT_IN_GEMM_ROWS lose, docs/performance.md §7n). Off (0, the quantiser's
# launch): at one token that GEMM now quantises only its real row and runs as long as the quantiser +
# GEMM (25.1 / 25.4 us at o_proj's shape on an H100), and the full-depth step on Air measured the same
# with and without the hand-off (6228 / 6228 us, §7s); at 4 tokens the GEMM is 3.4x slower; variant
# amax-handoff=R.
AMAX_HANDOFF_ROWS = 0


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)  # [size]
        self.eps = eps

    def forward(self, x: torch.Tensor, quant: int | None = None) -> torch.Tensor | Fp8Activation:
        """norm(x); with `quant` (the FP8 block of the consuming linear, 0 = per token) the norm's output
        comes quantised for that linear, in the same kernel."""
        if quant is None:
            return ops.rms_norm(x, self.weight, self.eps)
        q, scale = ops.rms_norm_quant_fp8(x, self.weight, self.eps, quant)
        return Fp8Activation(q, scale, x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor, quant: int | None = None,
                     keep_normed: bool = False) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
        """(norm(x + residual), x + residual); the norm quantised for its consumer as in `forward`,
        with the unquantised norm kept alongside when `keep_normed`. x may be rows [T,k,H] to add up
        first (`reference.combine_rows`): a fused MoE's rows, o_proj's split-K slices."""
        if quant is None:
            return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        q, scale, residual, normed = ops.fused_add_rms_norm_quant_fp8(x, residual, self.weight, self.eps, quant,
                                                                     keep_normed)
        return Fp8Activation(q, scale, residual.dtype, normed), residual  # x may be fp32 slices


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)  # [V,H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # [T,H]


class Linear(nn.Linear):
    """y = x W^T (+ b), W [out, in]; inference-only parameters. After `use_fp8`, an FP8 W8A8 linear."""

    fp8_block: int | None = None  # None: high precision; 0: FP8 per output channel; b: FP8 per b x b block

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def reset_parameters(self) -> None:  # weights come from the checkpoint
        pass

    def use_fp8(self, block: int) -> None:
        """Hold W in FP8 with its scales (fresh uninitialised storage on W's device; meta before loading)."""
        device = self.weight.device
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.empty(fp8_scale_shape(self.out_features, self.in_features, block), dtype=torch.float32,
                        device=device), requires_grad=False)
        self.fp8_block = block

    def fp8_blocks_fit(self, block: int) -> bool:
        """Whether block FP8 is computable: the input width falls on whole blocks (activation groups)."""
        return self.in_features % block == 0

    def scale_rows(self, rows: slice) -> slice:
        """The rows of `weight_scale` that scale weight rows `rows` (whole blocks when block FP8)."""
        if not self.fp8_block:
            return rows
        b = self.fp8_block
        return slice(rows.start // b, -(-rows.stop // b))

    def shard(self, part: str | None = None) -> Shard | None:
        """What this rank holds of the checkpoint tensor of `part` (None: the whole tensor, replicated)."""
        return None

    def splits_fp8_blocks(self, block: int) -> str | None:
        """Why this rank's shard would cut b x b FP8 blocks, or None."""
        return None

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        return self._product(x, self.bias)

    def _product(self, x: torch.Tensor | Fp8Activation, bias: torch.Tensor | None,
                 unsummed: bool = False, x_amax: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias); unsummed (a 2-D unquantised x into FP8 weights): possibly the GEMM's fp32
        split-K slices [T,S,N] for a fused_add_rms_norm to add up; x_amax: the max |x| of each row as
        the max over its columns, from x's producer (both `ops.fp8_linear_dynamic`'s)."""
        if self.fp8_block is None:
            return F.linear(x, self.weight, bias)
        if not isinstance(x, Fp8Activation):  # quantised dynamically: inside the GEMM at few tokens
            lead = x.shape[:-1]
            y = ops.fp8_linear_dynamic(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale, bias, x.dtype,
                                       self.fp8_block, unsummed and x.dim() == 2, x_amax)
            return y if y.dim() == 3 else y.view(*lead, -1)
        if self.fp8_block == 0:
            return ops.fp8_linear(x.q, x.scale, self.weight, self.weight_scale, bias, x.dtype)
        return ops.fp8_block_linear(x.q, x.scale, self.weight, self.weight_scale, bias, x.dtype, self.fp8_block)


class MergedLinear(Linear):
    """Several linears on the same input stacked along the output dim (e.g. q|k|v, gate|up),
    column-parallel: each part keeps this rank's block of its rows, stacked in part order.

    `parts` maps a part name to its full output width, in row order. `sources` (default: an even
    split of every part) gives the rows of each part's checkpoint tensor this rank holds. `rows(part)`
    is the part's row slice in this rank's weight, which is where the loader writes those rows.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool,
                 sources: dict[str, slice] | None = None) -> None:
        tp = current_tp()
        if sources is None:
            sources = {name: shard_range(width, tp, f"{name} rows") for name, width in parts.items()}
        local = {name: src.stop - src.start for name, src in sources.items()}
        super().__init__(in_features, sum(local.values()), bias)
        self.parts = local
        self.full_parts = dict(parts)
        self.sources = sources
        self.sharded = tp.size > 1

    def rows(self, part: str) -> slice:
        start = 0
        for name, width in self.parts.items():
            if name == part:
                return slice(start, start + width)
            start += width
        raise KeyError(f"{part!r} is not a part of this merged linear ({list(self.parts)})")

    def shard(self, part: str | None = None) -> Shard | None:
        if not self.sharded or part is None:
            return None
        return Shard((self.sources[part], WHOLE), (self.full_parts[part], self.in_features))

    def splits_fp8_blocks(self, block: int) -> str | None:
        if self.in_features % block:
            return None
        cuts = [cut_blocks(f"{name} rows", self.full_parts[name], src.start, self.parts[name], block)
                for name, src in self.sources.items()]
        return "; ".join(c for c in cuts if c) or None

    def fp8_blocks_fit(self, block: int) -> bool:
        """Whether every part and the input width fall on whole b x b blocks (block FP8 computable)."""
        return self.in_features % block == 0 and all(w % block == 0 for w in self.parts.values())

    def forward_parts(self, x: torch.Tensor | Fp8Activation) -> tuple[torch.Tensor, ...]:
        return tuple(self(x).split(list(self.parts.values()), dim=-1))


class QKVLinear(MergedLinear):
    """q|k|v projections split by heads: this rank's num_heads / tp query heads and its block of kv
    heads (`kv_head_block`: one head replicated when tp exceeds the kv heads)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> None:
        tp = current_tp()
        q = shard_range(num_heads, tp, "num_attention_heads")
        first, n = kv_head_block(num_kv_heads, tp.size, tp.rank)
        kv = slice(first * head_dim, (first + n) * head_dim)
        super().__init__(hidden_size, {"q_proj": num_heads * head_dim, "k_proj": num_kv_heads * head_dim,
                                       "v_proj": num_kv_heads * head_dim}, bias,
                         sources={"q_proj": slice(q.start * head_dim, q.stop * head_dim), "k_proj": kv, "v_proj": kv})
        self.num_heads, self.num_kv_heads = q.stop - q.start, n  # this rank's


class RowParallelLinear(Linear):
    """y = sum over ranks of x_r W_r^T (+ b): this rank holds its block of the input columns of W
    and of the input x (the output of a column-parallel layer), the partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        tp = current_tp()
        source = shard_range(in_features, tp, "input columns")
        super().__init__(source.stop - source.start, out_features, bias)
        self.tp, self.source, self.full_in = tp, source, in_features

    def shard(self, part: str | None = None) -> Shard | None:
        return None if self.tp.size == 1 else Shard((WHOLE, self.source), (self.out_features, self.full_in))

    def splits_fp8_blocks(self, block: int) -> str | None:
        return cut_blocks("input columns", self.full_in, self.source.start, self.in_features, block)

    def forward(self, x: torch.Tensor | Fp8Activation, unsummed: bool = False,
                x_amax: torch.Tensor | None = None) -> torch.Tensor:
        """unsummed: one rank may hand on the split-K slices (`Linear._product`); the all-reduce of
        several ranks needs the sum. x_amax: x's partial row amaxes (`ops.fp8_linear_dynamic`)."""
        if self.tp.size == 1:
            return self._product(x, self.bias, unsummed, x_amax)
        y = self.tp.all_reduce(self._product(x, None, x_amax=x_amax))
        return y if self.bias is None else y + self.bias


class VocabParallelLinear(Linear):
    """The LM head over this rank's block of vocabulary rows; the logits [R, V/tp] of every rank are
    gathered to rank 0 in rank order ([R, V] there, bit-identical to one device's GEMM output)."""

    def __init__(self, in_features: int, vocab_size: int) -> None:
        tp = current_tp()
        source = shard_range(vocab_size, tp, "vocab_size")
        super().__init__(in_features, source.stop - source.start, bias=False)
        self.tp, self.source, self.full_vocab = tp, source, vocab_size

    def shard(self, part: str | None = None) -> Shard | None:
        return None if self.tp.size == 1 else Shard((self.source, WHOLE), (self.full_vocab, self.in_features))

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        return self.tp.gather_to_leader(self._product(x, None))


class GatedMLP(nn.Module):
    """down(silu(gate x) * up x); the dense MLP of the first layers."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate_proj": intermediate_size,
                                                       "up_proj": intermediate_size}, bias=False)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False)

    input_needs_normed = False

    @property
    def input_fp8_block(self) -> int | None:
        """What the producer of this MLP's input should quantise for (None: nothing)."""
        return self.gate_up_proj.fp8_block

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T,2I/tp]
        block = self.down_proj.fp8_block
        if block is None:
            return self.down_proj(ops.silu_and_mul(gate_up))  # [T,I/tp] -> [T,H] (all-reduced)
        q, scale = ops.silu_and_mul_quant_fp8(gate_up, block)  # SiLU·mul quantised for down in one kernel
        return self.down_proj(Fp8Activation(q, scale, gate_up.dtype))


@functools.lru_cache(maxsize=8)
def rope_cos_sin(rotary_dim: int, theta: float, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, rotary_dim] fp32 table: row p = concat(cos(p * inv_freq), sin(p * inv_freq)),
    inv_freq_j = theta^(-2j / rotary_dim). Shared by every layer on a device."""
    # computed on the CPU so that every device sees bit-identical values
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (theta**exponent)  # [rot/2]
    angles = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)


class PagedAttention(nn.Module):
    """Per-head QK-norm and partial RoPE, this layer's new K/V into the pool, then attention over the
    batch's paged KV (`common.attention.rope_store_attention`: one launch for small-query batches on
    the GPU, two otherwise).

    The batch description and pool come from the forward context; `layer_id` selects the pool
    layer (the MTP layer uses index num_hidden_layers).
    """

    def __init__(self, layer_id: int, scale: float) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                cos_sin: torch.Tensor, rotary_dim: int, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                eps: float, amax: torch.Tensor | None = None) -> torch.Tensor:
        # q [T,Hq,D] (may be rotated in place), k/v [T,Hk,D] before norm and RoPE -> [T,Hq,D]; amax [T,Hq]
        # fp32 given: filled with each head's max |o| (common.attention.paged_attention)
        ctx = get_forward_context()
        k_cache, v_cache = ctx.kv_pool.k[self.layer_id], ctx.kv_pool.v[self.layer_id]
        return rope_store_attention(q, k, v, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps, k_cache,
                                    v_cache, ctx.batch, self.scale, amax)
