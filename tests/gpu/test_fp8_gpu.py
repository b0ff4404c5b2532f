"""The FP8 ops on CUDA at GLM shapes, on fresh random bf16 data each run.

The Triton quantisers must be bit-equal to their torch twins (codes and scales). fp8_linear through
cuBLAS is compared with the reference twin on the same FP8 operands: the exact products are the
same, so the two differ only by accumulation order in fp32 (~1e-6 relative) and by the bf16 output
rounding (at most 2^-9 relative per element, ~2e-3 by norm); fast accumulation (`FAST_ACCUM_ROWS`) adds
the tensor cores' own accumulator rounding. A 1e-2 bound by norm leaves room for these and still
catches a wrong scale, layout or operand (those give errors of order 1).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.numerics import fresh_seed, rel  # noqa: F401 (fresh_seed: autouse fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
LINEAR_TOL = 1e-2


def activations(num_tokens: int, k: int) -> torch.Tensor:
    """bf16 Gaussian rows with one outlier column (x50) and, from two rows on, one all-zero row."""
    x = torch.randn(num_tokens, k, device=DEV)
    x[:, k // 7] *= 50
    if num_tokens > 1:
        x[num_tokens // 2] = 0
    return x.bfloat16()


def assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    (q, s), (rq, rs) = got, want
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), "E4M3 codes differ"
    assert torch.equal(s, rs), "scales differ"


@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
@pytest.mark.parametrize("k", [4096, 5120, 12288])
def test_quant_bit_equal(num_tokens: int, k: int) -> None:
    from common.ops import reference as ref
    from common.ops import triton_fp8 as tf

    x = activations(num_tokens, k)
    assert_same(tf.quant_fp8_per_token(x), ref.quant_fp8_per_token(x))
    assert_same(tf.quant_fp8_per_group(x, 128), ref.quant_fp8_per_group(x, 128))


def test_quant_strided_rows() -> None:
    from common.ops import reference as ref
    from common.ops import triton_fp8 as tf

    x = activations(33, 6144)[:, 1024:5120]  # a column slice of a fused projection
    assert_same(tf.quant_fp8_per_token(x), ref.quant_fp8_per_token(x))
    assert_same(tf.quant_fp8_per_group(x, 128), ref.quant_fp8_per_group(x, 128))


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 255, 1000])
@pytest.mark.parametrize(("n", "k"), [(4096, 5120), (5120, 12288), (1536, 4096)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_linear_scaled_mm(num_tokens: int, n: int, k: int, with_bias: bool, fast_accum: bool,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """cuBLAS against the fp32 twin, with and without fast accumulation (both within LINEAR_TOL)."""
    from common.ops import cublas_fp8
    from common.ops import reference as ref

    monkeypatch.setattr(cublas_fp8, "FAST_ACCUM_ROWS", 0 if fast_accum else 1 << 62)
    x_q, x_scale = ref.quant_fp8_per_token(activations(num_tokens, k))
    w_q, w_scale = ref.quant_fp8_per_token((torch.randn(n, k, device=DEV) * k**-0.5).bfloat16())
    bias = torch.randn(n, device=DEV).bfloat16() if with_bias else None
    assert cublas_fp8.scaled_mm_fits(x_q, x_scale, w_q, w_scale, bias, torch.bfloat16)
    y = cublas_fp8.fp8_linear(x_q, x_scale, w_q, w_scale, bias)
    want = ref.fp8_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32)
    assert y.dtype == torch.bfloat16 and y.shape == (num_tokens, n)
    assert rel(y, want) < LINEAR_TOL


def test_fp8_linear_falls_back() -> None:
    """Shapes and dtypes cuBLAS cannot take run the reference twin on the cuBLAS path, bit for bit (few
    tokens go to the Triton GEMM first, which takes them: test_fp8_fused_gpu checks it against the twin)."""
    from common.ops import cublas_fp8
    from common.ops import reference as ref

    x_q, x_scale = ref.quant_fp8_per_token(activations(5, 512))
    w_q, w_scale = ref.quant_fp8_per_token(torch.randn(100, 512, device=DEV).bfloat16())  # N % 16 != 0
    for out_dtype in (torch.bfloat16, torch.float32):
        assert not cublas_fp8.scaled_mm_fits(x_q, x_scale, w_q, w_scale, None, out_dtype)
        assert torch.equal(cublas_fp8.scaled_mm_linear(x_q, x_scale, w_q, w_scale, None, out_dtype),
                           ref.fp8_linear(x_q, x_scale, w_q, w_scale, None, out_dtype))


def test_dispatch_on_cuda() -> None:
    from common import ops
    from common.ops import cublas_fp8, triton_fp8

    dev = torch.device(DEV)
    assert ops.resolve("quant_fp8_per_token", dev) is triton_fp8.quant_fp8_per_token
    assert ops.resolve("quant_fp8_per_group", dev) is triton_fp8.quant_fp8_per_group
    assert ops.resolve("fp8_linear", dev) is cublas_fp8.fp8_linear
