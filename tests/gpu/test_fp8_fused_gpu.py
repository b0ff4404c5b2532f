"""The fused FP8 producers and the FP8 GEMMs on CUDA at GLM shapes, on fresh random bf16 data.

Fused producers (RMSNorm / add+RMSNorm / silu·mul, each with the FP8 quantiser): codes and scales
bit-equal to the torch twins run on the same GPU, and to the unfused Triton pair; the bf16 side
outputs (new residual, normed) bit-equal too. Block-FP8 GEMM (1 x 128 activation groups, 128 x 128
weight blocks), through the Triton kernel and the op's dispatch: against the twin on the same FP8 operands (they differ by fp32 accumulation
order and the bf16 output rounding: < 1e-2 by norm) and, for the whole quantise-then-GEMM pipeline,
against the dequantised weights times the exact activations (<= 0.04 by norm up to K = 12288; the
measured value is printed). The Triton channel-scaled GEMM likewise against `fp8_linear`'s twin.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.numerics import assert_prefetch_equals_plain, fresh_seed, rel  # noqa: F401 (fresh_seed: autouse fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
TOKENS = [1, 3, 17, 255, 4096]
TWIN_TOL = 1e-2  # same FP8 operands: accumulation order and the bf16 output rounding
PIPELINE_TOL = 0.04  # activation quantisation error included (e4m3 keeps 3 mantissa bits)


def activations(num_tokens: int, k: int, scale: float = 1.0) -> torch.Tensor:
    """bf16 Gaussian rows with one outlier column (x50) and, from two rows on, one all-zero row."""
    x = torch.randn(num_tokens, k, device=DEV) * scale
    x[:, k // 7] *= 50
    if num_tokens > 1:
        x[num_tokens // 2] = 0
    return x.bfloat16()


def assert_same(name: str, got: tuple, want: tuple) -> None:  # type: ignore[type-arg]
    (q, s), (rq, rs) = got[:2], want[:2]
    assert q.dtype == rq.dtype == torch.float8_e4m3fn and s.shape == rs.shape, name
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), f"{name}: E4M3 codes differ"
    assert torch.equal(s, rs), f"{name}: scales differ"
    for i, (a, b) in enumerate(zip(got[2:], want[2:], strict=True)):
        assert (a is None and b is None) or torch.equal(a, b), f"{name}: output {2 + i} differs"


def quant(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    from common.ops import triton_fp8 as tf

    return tf.quant_fp8_per_token(x) if group == 0 else tf.quant_fp8_per_group(x, group)


# ------------------------------------------------------------------------------------ fused producers
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("h", [4096, 5120])
def test_rms_norm_bit_equal(num_tokens: int, h: int) -> None:
    """The exact statistic makes the Triton norms bit-equal to their twins."""
    from common.ops import reference as ref
    from common.ops import triton_norm as tn

    x, r = activations(num_tokens, h), activations(num_tokens, h)
    w = (1 + 0.1 * torch.randn(h, device=DEV)).bfloat16()
    assert torch.equal(tn.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    out, res = tn.fused_add_rms_norm(x, r, w, 1e-5)
    ro, rr = ref.fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res, rr) and torch.equal(out, ro)


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("h", [4096, 5120])
@pytest.mark.parametrize("group", [0, 128])
def test_norm_quant_bit_equal(num_tokens: int, h: int, group: int) -> None:
    from common.ops import reference as ref
    from common.ops import triton_fp8 as tf
    from common.ops import triton_norm as tn

    x, r = activations(num_tokens, h), activations(num_tokens, h)
    w = (1 + 0.1 * torch.randn(h, device=DEV)).bfloat16()
    got = tf.rms_norm_quant_fp8(x, w, 1e-5, group)
    assert got[1].shape == ((num_tokens, 1) if group == 0 else (num_tokens, h // group))
    assert_same("rms_norm_quant_fp8 vs twin", got, ref.rms_norm_quant_fp8(x, w, 1e-5, group))
    assert_same("rms_norm_quant_fp8 vs unfused", got, quant(tn.rms_norm(x, w, 1e-5), group))
    for keep in (True, False):
        got4 = tf.fused_add_rms_norm_quant_fp8(x, r, w, 1e-5, group, keep)
        assert_same(f"fused_add_rms_norm_quant_fp8 keep={keep} vs twin", got4,
                    ref.fused_add_rms_norm_quant_fp8(x, r, w, 1e-5, group, keep))
    normed, new_res = tn.fused_add_rms_norm(x, r, w, 1e-5)
    assert_same("fused_add_rms_norm_quant_fp8 vs unfused", got4[:3] + (None,),
                quant(normed, group) + (new_res, None))


def test_norm_quant_strided_rows() -> None:
    from common.ops import reference as ref
    from common.ops import triton_fp8 as tf

    x = activations(33, 6144)[:, 1024:5120]  # a column slice of a wider activation
    w = (1 + 0.1 * torch.randn(4096, device=DEV)).bfloat16()
    for group in (0, 128):
        assert_same("strided rows", tf.rms_norm_quant_fp8(x, w, 1e-6, group), ref.rms_norm_quant_fp8(x, w, 1e-6, group))


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("inter", [12288, 10944, 6144, 5472, 1536, 1368])
def test_silu_quant_bit_equal(num_tokens: int, inter: int) -> None:
    from common.ops import reference as ref
    from common.ops import triton_fp8 as tf
    from common.ops import triton_norm as tn

    gate_up = activations(num_tokens, 2 * inter, 0.5)
    for group in (0, 128) if inter % 128 == 0 else (0,):
        got = tf.silu_and_mul_quant_fp8(gate_up, group)
        assert got[0].shape == (num_tokens, inter)
        assert_same(f"silu_and_mul_quant_fp8 group={group} vs twin", got, ref.silu_and_mul_quant_fp8(gate_up, group))
        assert_same(f"silu_and_mul_quant_fp8 group={group} vs unfused", got, quant(tn.silu_and_mul(gate_up), group))


def test_fused_ops_in_a_graph() -> None:
    """Captured once, replayed on new inputs: the same bits as eager."""
    from common.ops import triton_fp8 as tf

    x, r = activations(64, 5120), activations(64, 5120)
    gate_up = activations(64, 2 * 1536)
    w = (1 + 0.1 * torch.randn(5120, device=DEV)).bfloat16()

    def step():  # type: ignore[no-untyped-def]
        return (tf.fused_add_rms_norm_quant_fp8(x, r, w, 1e-5, 0, True), tf.rms_norm_quant_fp8(x, w, 1e-5, 128),
                tf.silu_and_mul_quant_fp8(gate_up, 0))

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for t in (x, r, gate_up):
        t.copy_(torch.randn_like(t))
    graph.replay()
    for got, want in zip(out, step(), strict=True):
        assert_same("graph replay", got, want)


# ------------------------------------------------------------------------------------ block GEMM
BLOCK_SHAPES = [(14336, 5120), (5120, 12288), (1792, 4096), (4096, 1536), (1000, 2048)]  # (N, K); last: N tail


def _block_path(path: str):  # type: ignore[no-untyped-def]
    """The block GEMM `path` names."""
    from common import ops
    from common.ops import triton_fp8_gemm as tg

    return {"triton": lambda *a: tg.fp8_gemm(*a, 128), "dispatch": lambda *a: ops.fp8_block_linear(*a, 128)}[path]


@pytest.mark.parametrize("path", ["triton", "dispatch"])
@pytest.mark.parametrize(("n", "k"), BLOCK_SHAPES)
def test_block_linear(path: str, n: int, k: int) -> None:
    from common.ops import reference as ref

    fn = _block_path(path)
    w = (torch.randn(n, k, device=DEV) * k**-0.5).bfloat16()
    w_q, w_scale = ref.quant_fp8_weight_blocks(w, 128)
    w_deq = w_q.float() * w_scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)  # [N,K]
    bias = torch.randn(n, device=DEV).bfloat16()
    for num_tokens in TOKENS:
        x = activations(num_tokens, k)
        x_q, x_scale = ref.quant_fp8_per_group(x, 128)
        for b in (None, bias):
            y = fn(x_q, x_scale, w_q, w_scale, b, torch.bfloat16)
            assert y.dtype == torch.bfloat16 and y.shape == (num_tokens, n)
            err = rel(y, ref.fp8_block_linear(x_q, x_scale, w_q, w_scale, b, torch.float32))
            assert err < TWIN_TOL, f"{path} N={n} K={k} M={num_tokens}: rel {err:.2e} vs twin"
        want = x.float() @ w_deq.T
        err = rel(fn(x_q, x_scale, w_q, w_scale, None, torch.bfloat16), want)
        print(f"{path} N={n} K={k} M={num_tokens}: rel {err:.4f} vs dequantised weights x exact activations")
        assert err <= PIPELINE_TOL


def test_block_linear_fp32_output_and_fallback() -> None:
    """An fp32 output and K off a 512 grid through the op."""
    from common import ops
    from common.ops import reference as ref

    for k, out_dtype in ((2048, torch.float32), (1152, torch.bfloat16)):
        x_q, x_scale = ref.quant_fp8_per_group(activations(17, k), 128)
        w_q, w_scale = ref.quant_fp8_weight_blocks((torch.randn(768, k, device=DEV) * k**-0.5).bfloat16(), 128)
        y = ops.fp8_block_linear(x_q, x_scale, w_q, w_scale, None, out_dtype, 128)
        assert y.dtype == out_dtype
        assert rel(y, ref.fp8_block_linear(x_q, x_scale, w_q, w_scale, None, torch.float32)) < TWIN_TOL


# ------------------------------------------------------------------------------------ channel GEMM (Triton)
@pytest.mark.parametrize(("n", "k"), [(14336, 5120), (5120, 12288), (4096, 1368), (100, 512)])
def test_triton_channel_linear(n: int, k: int) -> None:
    """K = 1368 (Air's dense down at TP 8) and N = 100 are shapes cuBLAS refuses."""
    from common.ops import reference as ref
    from common.ops import triton_fp8_gemm as tg

    w_q, w_scale = ref.quant_fp8_per_token((torch.randn(n, k, device=DEV) * k**-0.5).bfloat16())
    bias = torch.randn(n, device=DEV).bfloat16()
    for num_tokens in TOKENS:
        x_q, x_scale = ref.quant_fp8_per_token(activations(num_tokens, k))
        y = tg.fp8_linear(x_q, x_scale, w_q, w_scale, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (num_tokens, n)
        err = rel(y, ref.fp8_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32))
        assert err < TWIN_TOL, f"N={n} K={k} M={num_tokens}: rel {err:.2e}"


@pytest.mark.parametrize("block", [0, 128])
def test_swapped_tiles(block: int) -> None:
    """The swapped tile (W x^T: the weight rows on the warpgroup MMA's 64-row side) against the twin,
    channel and block scales, one to 64 tokens, with and without split K, weights by loads and by TMA."""
    from common.ops import reference as ref
    from common.ops import triton_fp8_gemm as tg

    n, k = 1792, 4096
    x_full = activations(64, k)
    w_q, w_scale = _quantised_weight((torch.randn(n, k, device=DEV) * k**-0.5).bfloat16(), block)
    for m in (1, 5, 16, 40, 64):
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        x = x_full[:m]
        x_q, x_scale = ref.quant_fp8_per_group(x, block) if block else ref.quant_fp8_per_token(x)
        want = (ref.fp8_block_linear(x_q, x_scale, w_q, w_scale, None, torch.float32, block) if block
                else ref.fp8_linear(x_q, x_scale, w_q, w_scale, None, torch.float32))
        for bn, split, stages, tma in ((64, 1, 4, False), (128, 4, 6, False), (64, 2, 4, True), (128, 1, 6, True)):
            cfg = tg.GemmConfig(bm, bn, block or 128, 1, 4, stages, split, True, tma)
            err = rel(tg.fp8_gemm(x_q, x_scale, w_q, w_scale, None, torch.bfloat16, block, cfg), want)
            assert err < TWIN_TOL, f"swapped BN={bn} split={split} tma={tma} M={m} block={block}: rel {err:.2e}"


def test_tuned_tiles_of_this_gpu() -> None:
    """Every tuned entry of this GPU's table, at both ends of its token bucket ('1': M 1-16, '64': 17-64),
    through the Triton GEMM and fp8_linear's dispatch, against the twin."""
    from common.ops import cublas_fp8
    from common.ops import reference as ref
    from common.ops import triton_fp8_gemm as tg

    table = tg._tuned_tables().get(torch.cuda.get_device_name(), {})
    if not table:  # a GPU without a table: no tuned tiles, the default ones
        assert tg.tuned_config(1, 4096, 12288, torch.device(DEV)) is None
    ends = {"1": (1, 16), "64": (17, 64)}
    for shape, buckets in table.items():
        n, k = (int(v) for v in shape.split(","))
        w_q, w_scale = ref.quant_fp8_per_token((torch.randn(n, k, device=DEV) * k**-0.5).bfloat16())
        for key in buckets:
            for m in ends[key]:
                assert tg.tuned_config(m, n, k, w_q.device) is not None
                x_q, x_scale = ref.quant_fp8_per_token(activations(m, k))
                want = ref.fp8_linear(x_q, x_scale, w_q, w_scale, None, torch.float32)
                for y in (tg.fp8_linear(x_q, x_scale, w_q, w_scale), cublas_fp8.fp8_linear(x_q, x_scale, w_q, w_scale)):
                    err = rel(y, want)
                    assert err < TWIN_TOL, f"N={n} K={k} M={m} (bucket {key}): rel {err:.2e}"


@pytest.mark.parametrize("budget_mb", [8, 1000])  # 1000: every program prefetches its slice
@pytest.mark.parametrize("block", [0, 128])
def test_weight_prefetch_changes_no_bit(budget_mb: int, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under PDL the few-token GEMM's first programs ask L2 for their weights before the wait: a
    graph of quantiser -> GEMM -> quantiser -> GEMM replayed on new inputs equals plain launches bit
    for bit."""
    from common.ops import pdl
    from common.ops import triton_fp8 as tf
    from common.ops import triton_fp8_gemm as tg

    if not pdl.supported(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs sm_90+")
    n, k = 14336, 4096  # Air's qkv, then its square back to K
    quantise = (lambda t: tf.quant_fp8_per_group(t, block)) if block else tf.quant_fp8_per_token
    weights = []
    for rows, cols in ((n, k), (k, n)):
        w = (torch.randn(rows, cols, device=DEV) * cols**-0.5).bfloat16()
        weights.append(_quantised_weight(w, block))
    x = activations(1, k)

    def step() -> torch.Tensor:
        y = x
        for w_q, w_s in weights:
            y = tg.fp8_gemm(*quantise(y), w_q, w_s, None, torch.bfloat16, block)
        return y

    assert_prefetch_equals_plain(step, lambda: x.copy_(activations(1, k)), budget_mb, monkeypatch)


def _quantised_weight(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes and fp32 scales of w [N,K]: per output row, or per block x block tile."""
    if not block:
        s = w.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448
        return (w.float() / s).to(torch.float8_e4m3fn), s
    n, k = w.shape
    tiles = w.float().view(n // block, block, k // block, block)
    s = tiles.abs().amax((1, 3)).clamp_min(1e-12) / 448
    return (tiles / s[:, None, :, None]).view(n, k).to(torch.float8_e4m3fn), s


@pytest.mark.parametrize(("n", "k", "block"), [
    (4096, 12288, 0), (14336, 4096, 0), (5120, 12288, 0), (100, 1368, 0),  # K = 1368, N = 100: channel only
    (4096, 12288, 128), (14336, 4096, 128), (5120, 12288, 128)])
def test_quantised_in_the_gemm_bit_equal(n: int, k: int, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few-token linear of an unquantised bf16 x (o_proj after attention) quantised inside the GEMM:
    with the served tiles (tuned or default, split K included) the output equals the quantiser then
    the same GEMM bit for bit, and fp8_linear_dynamic takes that path up to QUANT_IN_GEMM_ROWS tokens
    (switched on here: off as served)."""
    from common.ops import cublas_fp8
    from common.ops import reference as ref
    from common.ops import triton_fp8_gemm as tg

    monkeypatch.setattr(cublas_fp8, "QUANT_IN_GEMM_ROWS", 16)
    w_q, w_scale = _quantised_weight((torch.randn(n, k, device=DEV) * k**-0.5).bfloat16(), block)
    bias = torch.randn(n, device=DEV).bfloat16()
    for m in (1, 4, 16, 17):
        x = activations(m, k)
        want = tg.fp8_gemm(*quant(x, block), w_q, w_scale, bias, torch.bfloat16, block)
        assert torch.equal(tg.fp8_gemm(x, None, w_q, w_scale, bias, torch.bfloat16, block), want), f"M={m}"
        assert cublas_fp8._quant_in_gemm(m, n, k, w_q, w_scale, block) == (m <= cublas_fp8.QUANT_IN_GEMM_ROWS) or (
            not block and tg.cublas_measured_faster(m, n, k, w_q.device))
        y = cublas_fp8.fp8_linear_dynamic(x, w_q, w_scale, bias, torch.bfloat16, block)
        err = rel(y, ref.fp8_linear_dynamic(x, w_q, w_scale, bias, torch.float32, block))
        assert err < TWIN_TOL, f"fp8_linear_dynamic N={n} K={k} M={m} block={block}: rel {err:.2e}"


def test_quantised_in_the_gemm_in_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under PDL with prefetch, a graph of GEMM (in-GEMM quantisation) -> GEMM replayed on new inputs
    equals plain launches bit for bit."""
    from common.ops import cublas_fp8, pdl

    if not pdl.supported(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs sm_90+")
    monkeypatch.setattr(cublas_fp8, "QUANT_IN_GEMM_ROWS", 16)
    weights = [_quantised_weight((torch.randn(r, c, device=DEV) * c**-0.5).bfloat16(), 0)
               for r, c in ((12288, 4096), (4096, 12288))]
    x = activations(1, 4096)

    def step() -> torch.Tensor:
        y = x
        for w_q, w_s in weights:
            y = cublas_fp8.fp8_linear_dynamic(y, w_q, w_s)
        return y

    assert_prefetch_equals_plain(step, lambda: x.copy_(activations(1, 4096)), 16, monkeypatch)


@pytest.mark.parametrize(("n", "k"), [(4096, 12288), (5120, 12288), (4096, 1536)])
def test_amax_handed_over_bit_equal(n: int, k: int) -> None:
    """o_proj of the attention output with each head's max |o| handed over (`x_amax`, 128-wide parts):
    fp8_linear_dynamic's few-token path gives the quantiser-then-GEMM bits, split-K slices included, at
    1 to 64 tokens, and a graph of the paged attention's merge writing the amax into that GEMM under
    PDL equals plain launches."""
    from common.ops import cublas_fp8
    from common.ops import triton_fp8_gemm as tg

    w_q, w_scale = _quantised_weight((torch.randn(n, k, device=DEV) * k**-0.5).bfloat16(), 0)
    for m in (1, 4, 16, 64):
        x = activations(m, k)
        amax = x.float().abs().view(m, k // 128, 128).amax(-1)
        want = tg.fp8_gemm(*quant(x, 0), w_q, w_scale, None, torch.bfloat16, 0)
        got = cublas_fp8.fp8_linear_dynamic(x, w_q, w_scale, None, torch.bfloat16, 0, False, amax)
        assert torch.equal(got, want), f"N={n} K={k} M={m}"
        slices = cublas_fp8.fp8_linear_dynamic(x, w_q, w_scale, None, torch.bfloat16, 0, True, amax)
        plain = cublas_fp8.fp8_linear_dynamic(x, w_q, w_scale, None, torch.bfloat16, 0, True)
        assert torch.equal(slices, plain), f"N={n} K={k} M={m}: split-K slices"


def test_attention_amax_into_o_proj_in_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """One decode token of Air's attention (96 query heads, 8 KV heads, 1024-token context, split KV):
    the merge's head amaxes equal max |o| and o_proj from them equals the quantiser's path, eagerly
    and in a PDL graph with prefetch replayed on new queries."""
    from common.attention import triton_paged as tp
    from common.forward.batch import ForwardBatch
    from common.ops import cublas_fp8, pdl

    if not pdl.supported(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs sm_90+")
    hq, hk, d, page, ctx = 96, 8, 128, 16, 1024
    kc = torch.randn(ctx // page + 1, page, hk, d, device=DEV).bfloat16()
    vc = torch.randn_like(kc)
    batch = ForwardBatch.decode([0], [ctx - 1], [list(range(ctx // page + 1))], page, DEV)
    q = torch.randn(1, hq, d, device=DEV).bfloat16()
    w_q, w_s = _quantised_weight((torch.randn(4096, hq * d, device=DEV) * (hq * d) ** -0.5).bfloat16(), 0)
    amax = torch.empty(1, hq, device=DEV)
    o = tp.paged_attention(q, kc, vc, batch, d**-0.5, amax)
    assert torch.equal(amax, o.float().abs().amax(-1))
    assert torch.equal(cublas_fp8.fp8_linear_dynamic(o.view(1, -1), w_q, w_s, None, torch.bfloat16, 0, False, amax),
                       cublas_fp8.fp8_linear_dynamic(o.view(1, -1), w_q, w_s))

    def step() -> torch.Tensor:
        out = tp.paged_attention(q, kc, vc, batch, d**-0.5, amax)
        return cublas_fp8.fp8_linear_dynamic(out.view(1, -1), w_q, w_s, None, torch.bfloat16, 0, False, amax)

    assert_prefetch_equals_plain(step, lambda: q.copy_(torch.randn_like(q)), 16, monkeypatch)


def test_dispatch_on_cuda() -> None:
    from common import ops
    from common.ops import cublas_fp8, triton_fp8, triton_fp8_gemm

    dev = torch.device(DEV)
    for op in ("rms_norm_quant_fp8", "fused_add_rms_norm_quant_fp8", "silu_and_mul_quant_fp8"):
        assert ops.resolve(op, dev) is getattr(triton_fp8, op)
    assert ops.resolve("fp8_block_linear", dev) is triton_fp8_gemm.fp8_block_linear
    assert ops.resolve("fp8_linear_dynamic", dev) is cublas_fp8.fp8_linear_dynamic


@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_split_k_slices_summed_by_the_norm_equal_the_reduce(m: int) -> None:
    """o_proj's few-token GEMM with unsummed=True hands its fp32 split-K slices on; the add + norm +
    quantiser over them gives the bits of the reduce launch then the norm (Air's o shape)."""
    from common import ops
    from common.ops import reference as ref
    from common.ops import triton_fp8 as tf

    n, k = 4096, 12288
    x = torch.randn(m, k, device=DEV).bfloat16()
    w_q, w_s = ref.quant_fp8_per_token((torch.randn(n, k, device=DEV) * k**-0.5).bfloat16())
    residual, norm_w = torch.randn(m, n, device=DEV).bfloat16(), (1 + 0.1 * torch.randn(n, device=DEV)).bfloat16()
    summed = ops.fp8_linear_dynamic(x, w_q, w_s, None, torch.bfloat16, 0)
    slices = ops.fp8_linear_dynamic(x, w_q, w_s, None, torch.bfloat16, 0, True)
    assert slices.dim() == 3 and slices.shape[::2] == (m, n)
    for got, want in zip(tf.fused_add_rms_norm_quant_fp8(slices, residual, norm_w, 1e-5, 0, True),
                         tf.fused_add_rms_norm_quant_fp8(summed, residual, norm_w, 1e-5, 0, True), strict=True):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)
