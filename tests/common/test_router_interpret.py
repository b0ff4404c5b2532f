"""The many-token router kernel (common/ops/triton_router.py) on the CPU interpreter.

Run as in test_triton_interpret.py, and with its `_setup` (interpreter switched on before Triton
is imported, poisoned torch.empty, fresh printed seed). The 3.6 interpreter keeps bf16 as raw
uint16 bits and its tl.dot multiplies those bits as integers, so the subprocess first teaches it
bf16 dots as the tensor cores do them (the exact values, products summed in fp32). The kernel's
split of w is integer and fp32 arithmetic only, which the interpreter does exactly; the kernel
then runs its real path, bf16 x and bf16 parts, on tiny shapes with several expert, token and K
blocks, uneven K and strided rows.
"""

from __future__ import annotations

import os
import sys

import pytest

GROUPS = ("split", "logits")

if not os.environ.get("CI"):  # in CI the dev extra installs triton: a missing one must fail
    pytest.importorskip("triton")


@pytest.mark.parametrize("group", GROUPS)
def test_router_interpret(group: str) -> None:
    from tests.common.test_triton_interpret import run_interpreted

    run_interpreted(__file__, group, 60)


# --------------------------------------------------------------------------- subprocess side
def _bf16_dots() -> None:
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    dot = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):  # type: ignore[no-untyped-def]
        # bf16 bits -> the same value in fp32 (exact), then the interpreter's fp32 matmul
        a, b = (interp.TensorHandle((v.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
                if v.dtype.scalar == tl.bfloat16 else v for v in (a, b))
        return dot(self, a, b, d, *args)

    interp.InterpreterBuilder.create_dot = create_dot


def _group_split() -> None:
    import torch

    from common.ops import triton_router as tr

    n = 20000
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    w = sign * (1 + torch.rand(n)) * torch.exp2(torch.randint(-100, 100, (n,)).float())
    w[:4] = torch.tensor([0.0, -0.0, 1.0, -3.0])
    hi, mid, lo = tr.split3(w.view(100, -1))
    hi, mid, lo = hi.reshape(-1), mid.reshape(-1), lo.reshape(-1)
    top = (w.view(torch.int32) & -65536).view(torch.float32)  # w's top 8 significant bits
    assert torch.equal(hi.float(), top), "hi must be w truncated to bf16"
    total = hi.double() + mid.double() + lo.double()
    assert torch.equal(total, w.double()), f"split not exact at {(total != w.double()).sum()} values"
    assert (mid.double().abs() <= hi.double().abs() * 2**-7).all() and (lo != 0).float().mean() > 0.5
    print(f"split3 exact over |w| in 2^[-100,100) ({n} values)")


def _group_logits() -> None:
    import torch

    from common.ops import triton_router as tr
    from tests.common.test_triton_interpret import _rel

    # (BE, BT, BK, splits, num_warps, num_stages): several expert, token and K blocks; uneven K
    forced = ((16, 16, 16, 3, 4, 2), (16, 32, 32, 2, 4, 2), (32, 16, 64, 1, 4, 2))
    for n in (5, 37):
        for e in (10, 16, 40):
            for h in (64, 200):
                x = torch.randn(n, h + 24, dtype=torch.bfloat16)[:, 3 : 3 + h]  # strided rows
                w = torch.randn(e, h) / h**0.5
                want = x.double() @ w.double().T
                for cfg in (None, *forced):
                    out = tr._router_mma(x, w, cfg)
                    err = _rel(out, want)
                    assert out.shape == (n, e) and out.dtype == torch.float32
                    # < 1e-6: hi + mid alone (no lo dot) reach ~1e-5
                    assert err < 1e-6, f"T={n} E={e} H={h} cfg={cfg}: rel {err:.2e}"
                print(f"router T={n:2d} E={e:2d} H={h:3d} rel {err:.2e}")
    x, w = torch.randn(37, 200, dtype=torch.bfloat16), torch.randn(16, 200) / 200**0.5
    assert torch.equal(tr.router_logits_mma(x, w), tr._router_mma(x, w))
    parts = tr._router_mma(x, w, forced[0], partial=True)  # 3 splits kept apart
    assert parts.shape == (3, 37, 16) and torch.equal(parts.sum(0), tr._router_mma(x, w, forced[0]))
    assert tr.router_logits_mma(x[:0], w, partial=True).shape == (1, 0, 16)
    f16, f32, bf16 = torch.float16, torch.float32, torch.bfloat16
    for xd, wd in ((f16, f32), (f32, f32), (bf16, bf16)):
        xo, wo = x.to(xd), w.to(wd)
        fallback = torch.nn.functional.linear(xo.float(), wo.float())
        assert torch.equal(tr.router_logits_mma(xo, wo), fallback), f"x {xd}, w {wd}: F.linear fallback"
    assert tr.router_logits_mma(x[:0], w).shape == (0, 16)
    print("router_logits_mma: bf16 kernel, fallbacks, T=0 ok")


if __name__ == "__main__":
    from tests.common.test_triton_interpret import _setup

    _setup()
    _bf16_dots()
    group = sys.argv[1]
    {"split": _group_split, "logits": _group_logits}[group]()
    print(f"OK {group}")
