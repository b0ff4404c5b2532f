"""The FP8 ops: torch twins against float64, the Triton quantisers on the CPU interpreter against the twins.

E4M3 keeps 3 mantissa bits, so a quantised value x / scale is off by at most half a step: 2^-4 of
its binade (<= |x / scale| / 16) in the normal range and 2^-10 below 2^-6 (the subnormal step is
2^-9). The interpreter runs the kernels in fp16 and fp32 (it has no bf16 arithmetic); the codes and
scales must be bit-equal to the twins. bf16 and model shapes run in tests/gpu/test_fp8_gpu.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from common import ops
from common.ops import cublas_fp8
from common.ops import reference as ref

E4M3_HALF_STEP = 2.0**-4  # of the binade, relative
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10
FP32_EPS = 2.0**-24  # unit roundoff


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    torch.manual_seed(torch.seed())


def activations(num_tokens: int, k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Gaussian rows of varied magnitude, one outlier column (x50) and one all-zero row."""
    x = torch.randn(num_tokens, k, dtype=torch.float64) * torch.logspace(-3, 2, num_tokens, dtype=torch.float64)[:, None]
    x[:, k // 3] *= 50
    x[num_tokens // 2] = 0
    return x.to(dtype)


def assert_round_trip(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """x[R,n] against q[R,n] * scale[R,1]: scale = max(amax, floor) / 448 to fp32 rounding, each
    value within half an E4M3 step of x / scale, the amax element at +-448 exactly."""
    x64, s64 = x.double(), scale.double()
    amax = x64.abs().amax(dim=-1, keepdim=True)
    want_scale = amax.clamp_min(ref.FP8_AMAX_FLOOR) / ref.FP8_MAX
    assert scale.dtype == torch.float32 and torch.isfinite(scale).all() and (scale > 0).all()
    assert ((s64 - want_scale).abs() <= want_scale * FP32_EPS).all(), "scale is not max(amax, floor) / 448"
    v = x64 / s64
    bound = (v.abs() * E4M3_HALF_STEP).clamp_min(E4M3_SUBNORMAL_HALF_STEP) * (1 + 4 * FP32_EPS)
    err = (q.double() - v).abs()
    assert (err <= bound).all(), f"round trip off by {float((err / bound).max()):.3f} half-steps"
    peak = x64.abs().argmax(dim=-1, keepdim=True)
    nonzero = amax.squeeze(-1) > 0
    assert (q.double().gather(1, peak).abs()[nonzero] == ref.FP8_MAX).all(), "the row's amax must map to 448"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_token_round_trip(dtype: torch.dtype) -> None:
    x = activations(9, 320, dtype)
    q, scale = ref.quant_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (9, 1)
    assert_round_trip(x, q, scale)


@pytest.mark.parametrize("group", [128, 32])
def test_per_group_round_trip(group: int) -> None:
    x = activations(6, 3 * 128)
    q, scale = ref.quant_fp8_per_group(x, group)
    n_groups = x.shape[1] // group
    assert q.shape == x.shape and scale.shape == (6, n_groups)
    assert_round_trip(x.reshape(-1, group), q.reshape(-1, group), scale.reshape(-1, 1))
    # an outlier moves its own group's scale and no other
    y = x.clone()
    y[:, 0] = 1e4
    _, outlier_scale = ref.quant_fp8_per_group(y, group)
    assert (outlier_scale[:, 0] > scale[:, 0]).all() and torch.equal(outlier_scale[:, 1:], scale[:, 1:])


def test_group_must_divide_k() -> None:
    with pytest.raises(ValueError):
        ref.quant_fp8_per_group(torch.randn(2, 200), 128)


def test_zero_rows() -> None:
    x = torch.zeros(3, 256, dtype=torch.bfloat16)
    for q, scale in (ref.quant_fp8_per_token(x), ref.quant_fp8_per_group(x)):
        assert torch.isfinite(scale).all() and (scale == ref.FP8_AMAX_FLOOR / ref.FP8_MAX).all()
        assert (q.float() == 0).all()
    w_q, w_scale = ref.quant_fp8_per_token(torch.randn(32, 256))
    q, scale = ref.quant_fp8_per_token(x)
    y = ref.fp8_linear(q, scale, w_q, w_scale, out_dtype=torch.float32)
    assert (y == 0).all()


def fp64_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dequantised product in float64 and an fp32 rounding bound for it, elementwise."""
    x, w = x_q.double() * x_scale.double(), w_q.double() * w_scale.double()
    y = x @ w.T
    bound = (x.shape[1] + 3) * FP32_EPS * (x.abs() @ w.abs().T)  # dequantise, K products and sums
    if bias is not None:
        y = y + bias.double()
        bound = bound + FP32_EPS * y.abs()
    return y, bound


@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_linear_matches_fp64(with_bias: bool) -> None:
    x_q, x_scale = ref.quant_fp8_per_token(activations(7, 512))
    w_q, w_scale = ref.quant_fp8_per_token(torch.randn(48, 512) * 0.02)
    bias = torch.randn(48, dtype=torch.bfloat16) if with_bias else None
    y = ref.fp8_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32)
    want, bound = fp64_linear(x_q, x_scale, w_q, w_scale, bias)
    assert y.shape == (7, 48) and ((y.double() - want).abs() <= bound).all()
    y_bf16 = ref.fp8_linear(x_q, x_scale, w_q, w_scale, bias)
    assert y_bf16.dtype == torch.bfloat16 and torch.equal(y_bf16, y.bfloat16())


def test_fp8_linear_dispatch_on_cpu() -> None:
    """On CPU the op and the CUDA twin's own fallback both run the reference, bit for bit."""
    x_q, x_scale = ref.quant_fp8_per_token(torch.randn(5, 64))
    w_q, w_scale = ref.quant_fp8_per_token(torch.randn(32, 64))
    want = ref.fp8_linear(x_q, x_scale, w_q, w_scale)
    assert ops.resolve("fp8_linear", x_q.device) is ref.fp8_linear
    assert not cublas_fp8.scaled_mm_fits(x_q, x_scale, w_q, w_scale, None, torch.bfloat16)
    assert torch.equal(ops.fp8_linear(x_q, x_scale, w_q, w_scale), want)
    assert torch.equal(cublas_fp8.fp8_linear(x_q, x_scale, w_q, w_scale), want)
    q, scale = ops.quant_fp8_per_group(torch.zeros(2, 128))
    assert scale.shape == (2, 1) and (q.float() == 0).all()


@pytest.mark.parametrize(("m", "cublas_runs_it", "cublas_faster", "want"), [
    (1, True, False, "triton"), (64, True, True, "cublas"), (65, True, False, "cublas"),
    (4096, False, False, "triton"), (1, False, True, "triton")])
def test_fp8_linear_path_choice(m: int, cublas_runs_it: bool, cublas_faster: bool, want: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On Hopper: Triton for few tokens unless the sweep timed cuBLAS faster, cuBLAS for many, and
    Triton at any size for a call cuBLAS cannot run (Air's dense down at TP 8 has K = 1368)."""
    pytest.importorskip("triton")
    from common.ops import triton_fp8_gemm

    taken: list[str] = []
    monkeypatch.setattr(cublas_fp8, "_triton_fits", lambda *a: True)
    monkeypatch.setattr(cublas_fp8, "scaled_mm_fits", lambda *a: cublas_runs_it)
    monkeypatch.setattr(triton_fp8_gemm, "cublas_measured_faster", lambda *a: cublas_faster)
    monkeypatch.setattr(triton_fp8_gemm, "fp8_linear", lambda *a: taken.append("triton"))
    monkeypatch.setattr(cublas_fp8, "scaled_mm_linear", lambda *a: taken.append("cublas"))
    x_q, x_scale = ref.quant_fp8_per_token(torch.randn(m, 64))
    w_q, w_scale = ref.quant_fp8_per_token(torch.randn(32, 64))
    cublas_fp8.fp8_linear(x_q, x_scale, w_q, w_scale)
    assert taken == [want]


def test_quant_interpreted() -> None:
    pytest.importorskip("triton")
    from tests.common.test_triton_interpret import run_interpreted

    run_interpreted(__file__, "fp8", 120)


# --------------------------------------------------------------------------- subprocess side
def _same(name: str, got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    (q, s), (rq, rs) = got, want
    assert q.dtype == rq.dtype == torch.float8_e4m3fn and s.shape == rs.shape, name
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), f"{name}: E4M3 codes differ"
    assert torch.equal(s, rs), f"{name}: scales differ"
    print(f"{name:48s} bit-equal")


def _group_fp8() -> None:
    from common.ops import triton_fp8 as tf

    for dt in (torch.float16, torch.float32):
        edge = torch.zeros(1, 96, dtype=dt)  # scale 1: codes are the E4M3 rounding of the values
        edge[0, :9] = torch.tensor([448.0, 31.99, -15.996, 2.0**-10, 3 * 2.0**-10, -1e-4, -0.0, 300.0, 0.01])
        cases = {
            "strided rows, zero row, outlier": activations(6, 200, torch.float32).to(dt)[1:6, :96],
            "binade edges and subnormals": edge,
            "one pass, K=4096": activations(3, 4096, torch.float32).to(dt),
            "two passes, K=4100 (a 4-value tail block)": activations(3, 4100, torch.float32).to(dt),
            "two passes, K=12288 (Air's attention output)": activations(1, 12288, torch.float32).to(dt),
            "two passes, K over five blocks": activations(2, 16400, torch.float32).to(dt),
            "zero rows": torch.zeros(2, 384, dtype=dt),
        }
        for name, x in cases.items():
            _same(f"per_token {name} {dt}", tf.quant_fp8_per_token(x), ref.quant_fp8_per_token(x))
        saved = tf.MANY_ROWS
        tf.MANY_ROWS = 2  # the launch of many short rows (blocks of 512, 2 warps) on a few rows
        try:
            assert tf._token_launch(3, 1408) == (512, 2) and tf._token_launch(3, 4096)[0] == 4096
            for k in (1408, 300):  # three blocks of 512 (a tail of 384); one block, masked
                x = activations(3, k, torch.float32).to(dt)
                _same(f"per_token many short rows K={k} {dt}", tf.quant_fp8_per_token(x), ref.quant_fp8_per_token(x))
        finally:
            tf.MANY_ROWS = saved
        for t, k, group in ((5, 384, 128), (3, 640, 128), (4, 96, 32), (2, 384, 128)):
            x = activations(t, k, torch.float32).to(dt) if t != 2 else torch.zeros(t, k, dtype=dt)
            _same(f"per_group T={t} K={k} group={group} {dt}", tf.quant_fp8_per_group(x, group),
                  ref.quant_fp8_per_group(x, group))
    q, s = tf.quant_fp8_per_token(torch.randn(0, 64))
    assert q.shape == (0, 64) and s.shape == (0, 1)


if __name__ == "__main__":
    from tests.common.test_triton_interpret import _setup

    _setup()
    {"fp8": _group_fp8}[sys.argv[1]]()
    print(f"OK {sys.argv[1]}")
