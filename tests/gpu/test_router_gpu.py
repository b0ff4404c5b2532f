"""The many-token router kernel (common/ops/triton_router.py) at GLM-4.5 / Air shapes on CUDA.

bf16 x and fp32 w, fresh random data each run; the reference is the fp64 product of the same
inputs. The kernel must reach fp32-GEMM accuracy (relative error by norm < 1e-5), be finite, and
give bit-identical results on a repeat (split-K partials are added in a fixed order).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from tests.gpu.numerics import fresh_seed, rel  # noqa: F401 (fresh_seed: autouse fixture)
from tests.gpu.test_kernels_gpu import DEV


@pytest.mark.parametrize("n", [5, 64, 2048, 4096])
@pytest.mark.parametrize(("e", "h"), [(128, 4096), (160, 5120)])
def test_router_logits_mma(n: int, e: int, h: int) -> None:
    from common.ops import triton_router as tr

    x = torch.randn(n, h, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(e, h, device=DEV) / h**0.5
    out = tr.router_logits_mma(x, w)
    assert out.shape == (n, e) and out.dtype == torch.float32
    assert rel(out, x.double() @ w.double().T) < 1e-5
    assert torch.equal(out, tr.router_logits_mma(x, w)), "not deterministic"


def test_router_logits_mma_strided_and_fallback() -> None:
    from common.ops import triton_router as tr

    big = torch.randn(37, 4096 + 64, device=DEV, dtype=torch.bfloat16)
    x, w = big[:, 32 : 32 + 4096], torch.randn(128, 4096, device=DEV) / 64
    assert rel(tr.router_logits_mma(x, w), x.double() @ w.double().T) < 1e-5
    xh = x.half()  # fp16 x: the F.linear fallback
    assert torch.equal(tr.router_logits_mma(xh, w), torch.nn.functional.linear(xh.float(), w))


def test_split3_exact() -> None:
    from common.ops import triton_router as tr

    n = 1 << 16
    sign = torch.where(torch.rand(n, device=DEV) < 0.5, -1.0, 1.0)
    scale = torch.exp2(torch.randint(-100, 100, (n,), device=DEV).float())
    w = sign * (1 + torch.rand(n, device=DEV)) * scale
    hi, mid, lo = tr.split3(w)
    assert torch.equal(hi.float(), (w.view(torch.int32) & -65536).view(torch.float32)), "hi: w truncated"
    assert torch.equal(hi.double() + mid.double() + lo.double(), w.double())


def test_router_logits_mma_cuda_graph() -> None:
    from common.ops import triton_router as tr

    x = torch.randn(300, 4096, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(128, 4096, device=DEV) / 64
    tr.router_logits_mma(x, w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tr.router_logits_mma(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, tr.router_logits_mma(x, w))
