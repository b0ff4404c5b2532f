"""The fused FP8 producers and the block-FP8 linear: torch twins against their definitions, the
Triton kernels on the CPU interpreter against the twins.

The fused twins must equal their unfused composition (producer, then quantiser) bit for bit, and
the RMS statistic must not depend on reduction order: it is what makes the kernels' codes and scales
bit-equal to the twins on every backend. The interpreter runs fp16 and fp32 (no bf16 arithmetic);
bf16 and model shapes run in tests/gpu/test_fp8_fused_gpu.py.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from common import ops
from common.ops import reference as ref
from tests.common.test_fp8_ops import activations
from tests.common.test_fused_moe_fp8 import quantize_weights

FP32_EPS = 2.0**-24


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    torch.manual_seed(torch.seed())


def same_bits(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> bool:
    (q, s), (rq, rs) = got[:2], want[:2]
    return q.dtype == rq.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) \
        and s.dtype == rs.dtype == torch.float32 and torch.equal(s, rs)


def quant(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.quant_fp8_per_token(x) if group == 0 else ref.quant_fp8_per_group(x, group)


# ------------------------------------------------------------------------------------ the statistic
def test_inv_rms_is_order_free_and_accurate() -> None:
    """Any permutation of a row gives the same bits; the value is the fp64 one to fp32 rounding."""
    x = activations(7, 5120, torch.float32)
    x[3, :100] = 1e-30  # tiny entries beside large ones: truncated terms
    eps = 1e-5
    inv = ref.inv_rms(x, eps)
    assert inv.shape == (7, 1) and inv.dtype == torch.float32
    for _ in range(3):
        perm = torch.randperm(x.shape[1])
        assert torch.equal(ref.inv_rms(x[:, perm], eps), inv)
    x64 = x.double()
    want = 1 / torch.sqrt(x64.pow(2).mean(dim=-1, keepdim=True) + ref._fp32(eps))
    assert ((inv.double() - want).abs() <= 2 * FP32_EPS * want).all()
    zero = ref.inv_rms(torch.zeros(2, 64), eps)
    assert torch.equal(zero, torch.full((2, 1), 1 / math.sqrt(ref._fp32(eps))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_fp64(dtype: torch.dtype) -> None:
    x = activations(6, 4096, dtype)
    w = (1 + 0.1 * torch.randn(4096)).to(dtype)
    y = ref.rms_norm(x, w, 1e-6)
    x64 = x.double()
    want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    unit = 2.0**-8 if dtype == torch.bfloat16 else FP32_EPS  # unit roundoff of the dtype
    bound = (2 * unit + 4 * FP32_EPS) * want.abs()  # two roundings to dtype, the fp32 statistic and products
    assert ((y.double() - want).abs() <= bound).all()


# ------------------------------------------------------------------------------------ fused twins
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [0, 128, 32])
def test_norm_quant_twins_compose(dtype: torch.dtype, group: int) -> None:
    x, r = activations(9, 512, dtype), torch.randn(9, 512).to(dtype)
    w = (1 + 0.1 * torch.randn(512)).to(dtype)
    got = ref.rms_norm_quant_fp8(x, w, 1e-5, group)
    assert same_bits(got, quant(ref.rms_norm(x, w, 1e-5), group))
    assert got[1].shape == ((9, 1) if group == 0 else (9, 512 // group))
    q, scale, new_res, normed = ref.fused_add_rms_norm_quant_fp8(x, r, w, 1e-5, group, keep_normed=True)
    want_normed, want_res = ref.fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(new_res, x + r) and torch.equal(new_res, want_res) and torch.equal(normed, want_normed)
    assert same_bits((q, scale), quant(want_normed, group))
    assert ref.fused_add_rms_norm_quant_fp8(x, r, w, 1e-5, group)[3] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norms_take_moe_rows(dtype: torch.dtype) -> None:
    """x as a fused MoE's rows [T,k,H]: summed in fp32 in index order and cast to the residual's dtype
    (`combine_rows`), then the same add + norm (+ quantiser) as a combined x."""
    rows, r = activations(4 * 9, 256, dtype).view(4, 9, 256), torch.randn(4, 256).to(dtype)
    rows[1, :, :8] = -0.0  # a column of negative zeros sums to +0.0, as the combine kernel's does
    w = (1 + 0.1 * torch.randn(256)).to(dtype)
    acc = torch.zeros(4, 256)
    for j in range(9):
        acc = acc + rows[:, j].float()
    x = acc.to(dtype)
    assert torch.equal(ref.combine_rows(rows, dtype), x)
    assert not torch.signbit(ref.combine_rows(rows, dtype)[1, :8]).any()
    for a, b in zip(ref.fused_add_rms_norm(rows, r, w, 1e-5), ref.fused_add_rms_norm(x, r, w, 1e-5), strict=True):
        assert torch.equal(a, b)
    got, want = (ref.fused_add_rms_norm_quant_fp8(v, r, w, 1e-5, 0, True) for v in (rows, x))
    assert same_bits(got, want) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])


@pytest.mark.parametrize("block", [0, 128])
def test_moe_twin_rows_combine_to_its_output(block: int) -> None:
    """fused_moe_fp8(combine=False) returns the per-assignment rows whose combine is its output."""
    torch.manual_seed(5)
    e, h, i, t, k = 6, 256, 256, 5, 3
    w13, s13 = quantize_weights(torch.randn(e, 2 * i, h) * h**-0.5, block)
    w2, s2 = quantize_weights(torch.randn(e, h, i) * i**-0.5, block)
    x = torch.randn(t, h).bfloat16()
    weights, ids = torch.rand(t, k), torch.stack([torch.randperm(e)[:k] for _ in range(t)]).int()
    rows = ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block, combine=False)
    assert rows.shape == (t, k, h) and rows.dtype == x.dtype
    assert torch.equal(ref.combine_rows(rows, x.dtype), ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block))
    assert ref.fused_moe_fp8(x[:0], w13, s13, w2, s2, weights[:0], ids[:0], block, combine=False).shape == (0, k, h)


@pytest.mark.parametrize("block", [0, 128])
def test_unsummed_linear_twin_adds_up_to_the_linear(block: int) -> None:
    """fp8_linear_dynamic(unsummed=True) hands fp32 slices [T,S,N] (S = 1 on the CPU) whose combine to
    the output dtype is the linear's result; with a bias it returns the summed [T,N]."""
    x = activations(5, 256)
    w = torch.randn(64, 256) * 0.05
    w_q, w_s = ref.quant_fp8_weight_blocks(w, block) if block else ref.quant_fp8_per_token(w)
    want = ref.fp8_linear_dynamic(x, w_q, w_s, None, torch.bfloat16, block)
    slices = ops.fp8_linear_dynamic(x, w_q, w_s, None, torch.bfloat16, block, True)
    assert slices.shape == (5, 1, 64) and slices.dtype == torch.float32
    assert torch.equal(ref.combine_rows(slices, torch.bfloat16), want)
    bias = torch.randn(64).bfloat16()
    assert torch.equal(ops.fp8_linear_dynamic(x, w_q, w_s, bias, torch.bfloat16, block, True),
                       ref.fp8_linear_dynamic(x, w_q, w_s, bias, torch.bfloat16, block))


@pytest.mark.parametrize("group", [0, 128])
def test_silu_quant_twin_composes(group: int) -> None:
    gate_up = activations(5, 2 * 384)
    got = ref.silu_and_mul_quant_fp8(gate_up, group)
    assert got[0].shape == (5, 384) and same_bits(got, quant(ref.silu_and_mul(gate_up), group))


def test_ops_dispatch_the_twins_on_cpu() -> None:
    x, r, w = activations(3, 256), torch.randn(3, 256).bfloat16(), torch.ones(256).bfloat16()
    for op in ("rms_norm_quant_fp8", "fused_add_rms_norm_quant_fp8", "silu_and_mul_quant_fp8", "fp8_block_linear"):
        assert ops.resolve(op, x.device) is getattr(ref, op)
    assert same_bits(ops.rms_norm_quant_fp8(x, w, 1e-5, 128), ref.rms_norm_quant_fp8(x, w, 1e-5, 128))
    assert same_bits(ops.fused_add_rms_norm_quant_fp8(x, r, w, 1e-5), ref.fused_add_rms_norm_quant_fp8(x, r, w, 1e-5))
    assert same_bits(ops.silu_and_mul_quant_fp8(x), ref.silu_and_mul_quant_fp8(x))


# ------------------------------------------------------------------------------------ block linear
def blockwise_fp64(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over K blocks of (codes product) * x_scale * w_scale, in float64, and an fp32 rounding bound."""
    n, k = w_q.shape
    y = torch.zeros(x_q.shape[0], n, dtype=torch.float64)
    mag = torch.zeros_like(y)
    for kb in range(k // block):
        cols = slice(kb * block, (kb + 1) * block)
        sw = w_scale[torch.arange(n) // block, kb].double()  # [N]
        part = x_q[:, cols].double() @ w_q[:, cols].double().T  # exact: small integers times powers of two
        y += part * x_scale[:, kb : kb + 1].double() * sw
        mag += (x_q[:, cols].double().abs() @ w_q[:, cols].double().abs().T) * x_scale[:, kb : kb + 1].double() * sw
    return y, (k + 3) * FP32_EPS * mag


def test_block_weight_quant_layout() -> None:
    w = torch.randn(200, 256) * torch.logspace(-2, 1, 200)[:, None]
    q, scale = ref.quant_fp8_weight_blocks(w, 128)
    assert q.shape == (200, 256) and scale.shape == (2, 2)
    for i, j in ((0, 0), (1, 1)):  # block (1, *) is the partial one: rows 128..199
        blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
        assert scale[i, j] == blk.abs().max() / ref.FP8_MAX
        assert torch.equal(q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].view(torch.uint8),
                           (blk / scale[i, j]).to(torch.float8_e4m3fn).view(torch.uint8))
    with pytest.raises(ValueError):
        ref.quant_fp8_weight_blocks(torch.randn(8, 200), 128)


@pytest.mark.parametrize(("n", "k", "block"), [(200, 384, 128), (96, 256, 64)])
def test_block_linear_matches_fp64(n: int, k: int, block: int) -> None:
    x_q, x_scale = ref.quant_fp8_per_group(activations(7, k), block)
    w_q, w_scale = ref.quant_fp8_weight_blocks(torch.randn(n, k) * 0.05, block)
    bias = torch.randn(n).bfloat16()
    y = ref.fp8_block_linear(x_q, x_scale, w_q, w_scale, None, torch.float32, block)
    want, bound = blockwise_fp64(x_q, x_scale, w_q, w_scale, block)
    assert y.shape == (7, n) and ((y.double() - want).abs() <= bound).all()
    y_bias = ref.fp8_block_linear(x_q, x_scale, w_q, w_scale, bias, torch.bfloat16, block)
    assert torch.equal(y_bias, (y + bias.float()).bfloat16())
    with pytest.raises(ValueError):
        ref.fp8_block_linear(x_q[:, :100], x_scale, w_q[:, :100], w_scale, None, torch.float32, block)


def test_fp8_gemm_tuned_table_is_well_formed() -> None:
    """Every tuned entry names a bucket the lookup uses and tiles the kernel takes (power-of-two N
    tiles, whole K steps per slice)."""
    import json

    from common.ops import triton_fp8_gemm as tg

    tables = json.loads(tg.TUNED_PATH.read_text())["tables"]
    assert tables
    for shapes in tables.values():
        for shape, buckets in shapes.items():
            n, k = map(int, shape.split(","))
            assert set(buckets) <= {"1", "64"} and n > 0
            for entry in buckets.values():
                assert entry["block_n"] in (16, 32, 64, 128) and 1 <= entry["split_k"] <= 8
                assert k // entry["split_k"] >= 128 and entry["num_stages"] >= 2
                assert entry.get("swap", False) in (False, True)


def test_tuned_table_round_trip_and_the_faster_library(tmp_path, monkeypatch) -> None:
    """The sweep's winners written by the benchmark are what the lookup returns, bucket by bucket,
    and a bucket whose sweep timed cuBLAS faster than its best tiles is sent to cuBLAS."""
    import json

    pytest.importorskip("triton")
    from benchmarks.kernels.bench_fp8_linear import update_table
    from common.ops import triton_fp8_gemm as tg

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"_doc": "test", "tables": {}}))
    sweep = [{"n": 512, "k": 1024, "m": 1, "best": list(tg.GemmConfig(16, 32, 128, 1, 4, 6, 4)), "best_us": 5.0,
              "cublas_us": 9.0},
             {"n": 512, "k": 1024, "m": 64, "best": list(tg.GemmConfig(64, 64, 128, 1, 4, 4, 2, True)), "best_us": 8.0,
              "cublas_us": 7.5}]
    assert update_table(path, "GPU X", sweep) == 2
    monkeypatch.setattr(tg, "_tuned_tables", lambda: json.loads(path.read_text())["tables"])
    monkeypatch.setattr(tg, "_device_name", lambda index: "GPU X")
    cuda = torch.device("cuda", 0)
    assert tg.tuned_config(1, 512, 1024, cuda) == tg.GemmConfig(16, 32, 128, 1, 4, 6, 4)
    assert tg.tuned_config(40, 512, 1024, cuda) == tg.GemmConfig(64, 64, 128, 1, 4, 4, 2, True)  # swapped tile
    assert not tg.cublas_measured_faster(8, 512, 1024, cuda)
    assert tg.cublas_measured_faster(64, 512, 1024, cuda)
    assert not tg.cublas_measured_faster(65, 512, 1024, cuda) and tg.tuned_config(65, 512, 1024, cuda) is None
    assert not tg.cublas_measured_faster(64, 512, 2048, cuda)  # a shape never swept
    assert not tg.cublas_measured_faster(64, 512, 1024, torch.device("cpu"))


def test_sweep_tries_every_tile_then_refines_the_leaders_depth() -> None:
    """The few-token sweep's first pass covers every N tile and K split (swapped where the tile can
    fill the 64-row side) at one depth; the second times only the three fastest at the other depths."""
    pytest.importorskip("triton")
    from benchmarks.kernels import bench_fp8_linear as bench

    first = list(bench._sweep_configs(1, 4096))
    assert {(c.block_n, c.split_k, c.swap, c.tma) for c in first} == {
        (bn, s, sw, tma) for bn in (32, 64, 128) for s in (1, 2, 4, 8) for sw in (False, True) for tma in (False, True)
        if (bn >= 64 or not sw) and (sw or not tma)}
    assert {c.num_stages for c in first} == {bench.SWEEP_STAGES} and {c.block_m for c in first} == {16}
    assert max(c.split_k for c in bench._sweep_configs(64, 1024)) == 2  # each slice keeps >= 4 K steps
    assert not any(c.swap for c in bench._sweep_configs(64, 4096))  # a 64-row tile is a warpgroup MMA as it is
    timed = [(float(len(first) - i), c) for i, c in enumerate(first)]  # the last listed is the fastest
    refined = list(bench._refined(timed))
    assert [c._replace(num_stages=bench.SWEEP_STAGES) for c in refined[::2]] == first[:-4:-1]
    assert {c.num_stages for c in refined} == {3, 6}


def test_fused_interpreted() -> None:
    pytest.importorskip("triton")
    from tests.common.test_triton_interpret import run_interpreted

    run_interpreted(__file__, "fused", 200)


# --------------------------------------------------------------------------- subprocess side
def _check_same(name: str, got: tuple, want: tuple) -> None:  # type: ignore[type-arg]
    assert same_bits(got, want), f"{name}: codes or scales differ"
    for i, (a, b) in enumerate(zip(got[2:], want[2:], strict=True)):
        assert (a is None and b is None) or torch.equal(a, b), f"{name}: output {2 + i} differs"
    print(f"{name:60s} bit-equal")


def _norm_cases(dt: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (x, residual): strided rows, H not a power of two, zero rows, one row, no rows."""
    big = activations(8, 300, torch.float32).to(dt)
    return {
        "strided rows H=96": (big[1:8, :96], torch.randn(7, 96).to(dt)),
        "T=3 H=256": (activations(3, 256, torch.float32).to(dt), torch.randn(3, 256).to(dt)),
        "T=1 H=384": (activations(1, 384, torch.float32).to(dt), torch.randn(1, 384).to(dt)),
        "zero rows H=128": (torch.zeros(2, 128, dtype=dt), torch.zeros(2, 128, dtype=dt)),
        "T=0 H=256": (torch.zeros(0, 256, dtype=dt), torch.zeros(0, 256, dtype=dt)),
    }


def _gemm_operands(quantisers, x: torch.Tensor, n: int, block: int) -> tuple:  # type: ignore[no-untyped-def]
    """(x_q, x_scale, w_q, w_scale) for an FP8 GEMM of x [T,K] and a random [n,K] weight: x by
    `quantisers` (the torch twins or the Triton module) per token or per 1 x block group, the weight
    per channel or per block x block tile."""
    w = torch.randn(n, x.shape[1]) * 0.05
    if block:
        return (*quantisers.quant_fp8_per_group(x, block), *ref.quant_fp8_weight_blocks(w, block))
    return (*quantisers.quant_fp8_per_token(x), *ref.quant_fp8_per_token(w))


def _group_fused() -> None:
    from common.ops import cublas_fp8
    from common.ops import triton_fp8 as tf
    from common.ops import triton_fp8_gemm as tg
    from common.ops import triton_norm as tn
    from tests.common.test_triton_interpret import _rel

    for dt in (torch.float16, torch.float32):
        for name, (x, r) in _norm_cases(dt).items():
            h = x.shape[1]
            w = (1 + 0.1 * torch.randn(h)).to(dt)
            assert torch.equal(tn.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)), f"rms_norm {name}"
            for group in (0, 32) + ((128,) if h % 128 == 0 else ()):
                tag = f"{name} group={group} {dt}"
                _check_same(f"rms_norm_quant_fp8 {tag}", tf.rms_norm_quant_fp8(x, w, 1e-6, group),
                            ref.rms_norm_quant_fp8(x, w, 1e-6, group))
                for keep in (True, False):
                    _check_same(f"fused_add_rms_norm_quant_fp8 keep={keep} {tag}",
                                tf.fused_add_rms_norm_quant_fp8(x, r, w, 1e-6, group, keep),
                                ref.fused_add_rms_norm_quant_fp8(x, r, w, 1e-6, group, keep))
        # a fused MoE's rows [T,k,H] as x: combined in the norm kernels as the twin combines them
        for t, k, h in ((3, 9, 256), (1, 9, 384), (2, 1, 96), (0, 9, 256)):
            rows = (activations(max(t, 1) * k, h, torch.float32) * 0.3).to(dt)[:t * k].view(t, k, h)
            rows[..., :4] = -0.0  # negative-zero columns: the sum starts from +0.0 in kernel and twin
            r, w = torch.randn(t, h).to(dt), (1 + 0.1 * torch.randn(h)).to(dt)
            for group in (0, 32):
                _check_same(f"fused_add_rms_norm_quant_fp8 rows T={t} k={k} H={h} group={group} {dt}",
                            tf.fused_add_rms_norm_quant_fp8(rows, r, w, 1e-6, group, True),
                            ref.fused_add_rms_norm_quant_fp8(rows, r, w, 1e-6, group, True))
            for a, b in zip(tn.fused_add_rms_norm(rows, r, w, 1e-6), ref.fused_add_rms_norm(rows, r, w, 1e-6),
                            strict=True):
                assert torch.equal(a, b), f"fused_add_rms_norm rows T={t} k={k} H={h} {dt}"
        # silu: the CPU twin's exp differs from the interpreter's in the last fp32 bit, so the fused
        # kernel is held to the quantiser twin on the unfused Triton silu_and_mul (the fusion adds
        # nothing); that silu against its twin is in test_triton_interpret. On the GPU both are exact.
        for t, inter, group in ((3, 96, 0), (1, 4100, 0), (1, 16500, 0), (5, 256, 128), (2, 384, 32), (0, 128, 0),
                                (2, 64, 0)):
            gate_up = (activations(max(t, 1), 2 * inter, torch.float32) * 0.02).to(dt)[:t]  # fp16: no overflow
            if t == 2 and inter == 64:
                gate_up = torch.zeros(2, 128, dtype=dt)
            act = tn.silu_and_mul(gate_up)
            _check_same(f"silu_and_mul_quant_fp8 T={t} I={inter} group={group} {dt}",
                        tf.silu_and_mul_quant_fp8(gate_up, group), quant(act, group))
    # the GEMMs: odd T, no rows, N tails (partial weight blocks), bias, fp16/fp32 outputs
    gemms = ((1, 48, 256, 128), (3, 200, 384, 128), (37, 96, 192, 64), (130, 160, 256, 128), (0, 64, 128, 128))
    for t, n, k, block in gemms:
        x = activations(max(t, 2), k, torch.float32)[:t]
        x_q, x_scale = ref.quant_fp8_per_group(x, block)
        w_q, w_scale = ref.quant_fp8_weight_blocks(torch.randn(n, k) * 0.05, block)
        bias = torch.randn(n)
        for out_dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3)):
            y = tg.fp8_block_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype, block)
            assert y.shape == (t, n) and y.dtype == out_dtype
            if t:
                err = _rel(y, ref.fp8_block_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32, block))
                assert err < tol, f"fp8_block_linear T={t} N={n} K={k} b={block}: rel {err:.2e}"
                print(f"fp8_block_linear T={t} N={n} K={k} b={block} {out_dtype}: rel {err:.2e}")
        kc = k - 28  # the channel kernel takes a K tail
        c_q, c_scale = ref.quant_fp8_per_token(x[:, :kc])
        wc_q, wc_scale = ref.quant_fp8_per_token(torch.randn(n, kc) * 0.05)
        y = tg.fp8_linear(c_q, c_scale, wc_q, wc_scale, None, torch.float32)
        assert y.shape == (t, n)
        if t:
            err = _rel(y, ref.fp8_linear(c_q, c_scale, wc_q, wc_scale, None, torch.float32))
            assert err < 1e-6, f"fp8_linear (Triton) T={t} N={n} K={kc}: rel {err:.2e}"
            print(f"fp8_linear (Triton) T={t} N={n} K={kc}: rel {err:.2e}")
    # split K: slices of whole K steps (the last may be short or hold a K tail), partials summed in order
    # by the reduce kernel, bias added once; both scale layouts; the swapped tile (W x^T) alike
    for t, n, k, split, block in ((3, 48, 500, 3, 0), (1, 40, 640, 2, 0), (2, 48, 640, 4, 128), (2, 40, 720, 2, 0)):
        x = activations(t, k, torch.float32)
        x_q, x_scale, w_q, w_scale = _gemm_operands(ref, x, n, block)
        bias = torch.randn(n)
        cfg = tg.GemmConfig(16, 32, block or 64, 1, 4, 2, split)
        want = (ref.fp8_block_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32, block) if block
                else ref.fp8_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32))
        err = _rel(tg.fp8_gemm(x_q, x_scale, w_q, w_scale, bias, torch.float32, block, cfg), want)
        assert err < 1e-6, f"split-K {split} T={t} N={n} K={k} block={block}: rel {err:.2e}"
        for tma in (False, True):  # (K = 500: rows of 500 bytes, which TMA cannot stride; loads instead)
            swapped = tg.GemmConfig(16, 64, block or 64, 1, 4, 2, split, True, tma)
            err = _rel(tg.fp8_gemm(x_q, x_scale, w_q, w_scale, bias, torch.float32, block, swapped), want)
            assert err < 1e-6, f"swapped split-K {split} T={t} N={n} K={k} block={block} tma={tma}: rel {err:.2e}"
        # unsummed (no bias): the slices [T,S,N], which the next add + norm adds up exactly as the reduce
        summed = tg.fp8_gemm(x_q, x_scale, w_q, w_scale, None, torch.float16, block, cfg)
        slices = tg.fp8_gemm(x_q, x_scale, w_q, w_scale, None, torch.float16, block, cfg, unsummed=True)
        assert slices.shape[::2] == (t, n) and 1 < slices.shape[1] <= split and slices.dtype == torch.float32
        assert torch.equal(ref.combine_rows(slices, torch.float16), summed)
        r, nw = torch.randn(t, n).half(), (1 + 0.1 * torch.randn(n)).half()
        _check_same(f"add + norm + quantiser of split-K slices T={t} S={slices.shape[1]} N={n} block={block}",
                    tf.fused_add_rms_norm_quant_fp8(slices, r, nw, 1e-6, 0, True),
                    tf.fused_add_rms_norm_quant_fp8(summed, r, nw, 1e-6, 0, True))
        assert torch.equal(tg.fp8_gemm(x_q, x_scale, w_q, w_scale, bias, torch.float16, block, cfg, unsummed=True),
                           tg.fp8_gemm(x_q, x_scale, w_q, w_scale, bias, torch.float16, block, cfg)), \
            "with a bias the slices are reduced (the bias is added once, after the sum)"
    # x quantised inside the GEMM (x_scale None): the quantisers' codes and scales, so the same bits as
    # the quantised call; channel with split K (each slice takes the whole row's amax), a K tail and a
    # row of zeros; block groups; fp8_linear_dynamic's few-token path (switched on) and its twin
    cublas_fp8.QUANT_IN_GEMM_ROWS = 16
    for t, n, k, split, block in ((3, 48, 1100, 3, 0), (1, 40, 640, 2, 0), (2, 48, 640, 4, 128), (5, 64, 256, 1, 64)):
        x = activations(t, k, torch.float32).to(torch.float16)
        x[t - 1] = 0
        x_q, x_scale, w_q, w_scale = _gemm_operands(tf, x, n, block)
        bias = torch.randn(n)
        cfg = tg.GemmConfig(16, 32, block or 64, 1, 4, 2, split)
        fused = tg.fp8_gemm(x, None, w_q, w_scale, bias, torch.float32, block, cfg)
        assert torch.equal(fused, tg.fp8_gemm(x_q, x_scale, w_q, w_scale, bias, torch.float32, block, cfg)), \
            f"quantised in the GEMM T={t} K={k} split={split} block={block}: differs from the quantised call"
        err = _rel(fused, ref.fp8_linear_dynamic(x, w_q, w_scale, bias, torch.float32, block))
        assert err < 1e-6, f"quantised in the GEMM T={t} K={k} block={block}: rel {err:.2e} against the twin"
        print(f"quantised in the GEMM T={t} N={n} K={k} split={split} block={block}: bit-equal, rel {err:.2e}")
        if block:  # the dispatching op takes the in-GEMM path at few tokens (channel needs a GPU to decide)
            assert cublas_fp8._quant_in_gemm(t, n, k, w_q, w_scale, block)
            err = _rel(cublas_fp8.fp8_linear_dynamic(x, w_q, w_scale, bias, torch.float32, block),
                       ref.fp8_linear_dynamic(x, w_q, w_scale, bias, torch.float32, block))
            assert err < 1e-6, f"fp8_linear_dynamic T={t} block={block}: rel {err:.2e}"
    assert not cublas_fp8._quant_in_gemm(cublas_fp8.QUANT_IN_GEMM_ROWS + 1, 64, 256, w_q, w_scale, 64)
    # one token (ONE_ROW: only row 0 of the padded tile quantised): a row over three ROW_CHUNKs with a
    # K tail inside the last step, split K, the same bits as the quantised call
    for k, split in ((1100, 3), (640, 1)):
        x = (torch.randn(1, k) * 3).to(torch.float16)
        x_q, x_scale, w_q, w_scale = _gemm_operands(tf, x, 40, 0)
        for cfg in (tg.GemmConfig(16, 32, 64, 1, 4, 2, split), tg.GemmConfig(16, 64, 64, 1, 4, 2, split, True)):
            assert torch.equal(tg.fp8_gemm(x, None, w_q, w_scale, None, torch.float32, 0, cfg),
                               tg.fp8_gemm(x_q, x_scale, w_q, w_scale, None, torch.float32, 0, cfg)), \
                f"one token quantised in the GEMM K={k} split={split} swap={cfg.swap}: differs from the quantised call"
        print(f"one token quantised in the GEMM K={k} split={split}: bit-equal")
    # channel, x's amax handed over by its producer as per-part maxima (attention: per head): the same
    # scale as the row's own amax, so the same bits; parts with a non-power-of-two count, split K
    for t, n, k, parts, split in ((1, 40, 640, 5, 2), (4, 48, 768, 6, 3), (3, 32, 256, 1, 1)):
        x = (torch.randn(t, k) * 3).to(torch.bfloat16)
        x[1:2] = 0  # a zero row where there are several
        x_q, x_scale, w_q, w_scale = _gemm_operands(tf, x, n, 0)
        amax = x.float().abs().view(t, parts, k // parts).amax(-1)  # [T, parts]
        cfg = tg.GemmConfig(16, 32, 64, 1, 4, 2, split)
        handed = tg.fp8_gemm(x, None, w_q, w_scale, None, torch.float32, 0, cfg, x_amax=amax)
        assert torch.equal(handed, tg.fp8_gemm(x_q, x_scale, w_q, w_scale, None, torch.float32, 0, cfg)), \
            f"amax handed over T={t} K={k} parts={parts} split={split}: differs from the quantised call"
        wrong = tg.fp8_gemm(x, None, w_q, w_scale, None, torch.float32, 0, cfg, x_amax=amax * 1.5)
        assert not torch.equal(wrong, handed), "the handed amax is not what sets the scale"
        print(f"amax handed over T={t} N={n} K={k} parts={parts} split={split}: bit-equal")
    # the few-token heuristic splits K only where every slice keeps >= 4 K steps
    cpu = torch.device("cpu")
    assert tg.default_config(1, 4096, 128, cpu, 12288).split_k > 1
    assert tg.tuned_config(1, 4096, 12288, cpu) is None  # CPU: no table
    assert tg.default_config(1, 4096, 128, cpu, 256).split_k == 1
    assert tg.default_config(256, 4096, 128, cpu, 12288).split_k == 1


if __name__ == "__main__":
    from tests.common.test_triton_interpret import _setup

    _setup()
    {"fused": _group_fused}[sys.argv[1]]()
    print(f"OK {sys.argv[1]}")
