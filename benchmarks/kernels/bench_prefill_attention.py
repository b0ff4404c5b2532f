"""Prefill attention: the Triton paged kernel against torch's SDPA backends on the same shapes.

    python3 -m benchmarks.kernels.bench_prefill_attention [--tokens 1024,8192]

One sequence of T prompt tokens, causal, GLM-4.5-Air heads (96 query heads, 8 KV heads, head 128).
Ours reads K/V from the paged pool (page 16) as the prefill worker's forward does; each SDPA backend
(cuDNN, FlashAttention, memory-efficient) reads contiguous [1, H, T, 128] tensors, with GQA through
`enable_gqa` and, where a backend refuses that, with K/V expanded to 96 heads (the copy not timed).
Eager calls from an idle GPU (CUDA-event medians: at these sizes launches are noise). Prints time,
TFLOP/s and the fraction of the measured bf16 GEMM peak per backend, and each backend's largest
difference from ours. With OUT set, writes $OUT/bench_prefill_attention.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import measure
from common.attention import triton_paged as tp
from common.forward.batch import ForwardBatch, SeqSpec

HQ, HK, D, PAGE = 96, 8, 128, 16
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def case(n: int, dev: torch.device, peak: float) -> list[str]:
    scale = D ** -0.5
    pages = -(-n // PAGE)
    kc = torch.randn(pages + 1, PAGE, HK, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(n, HQ, D, device=dev, dtype=torch.bfloat16)
    batch = ForwardBatch.build([SeqSpec([0] * n, range(n), n, list(range(1, pages + 1)))], PAGE, dev)
    flops = 4 * HQ * D * n * (n + 1) / 2
    ours_out = tp.paged_attention(q, kc, vc, batch, scale)
    t = measure.median_event_us(lambda: tp.paged_attention(q, kc, vc, batch, scale), 10)
    rows = [f"| 1x{n} | ours (Triton, paged) | {t:.0f} | {flops / t / 1e6:.0f} | {flops / t / 1e6 / peak:.0%} | |"]
    k = kc[1:].reshape(-1, HK, D)[:n].transpose(0, 1).unsqueeze(0)  # [1,HK,T,D]
    v = vc[1:].reshape(-1, HK, D)[:n].transpose(0, 1).unsqueeze(0)
    k, v = k.contiguous(), v.contiguous()
    qs = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1,HQ,T,D]
    kx, vx = k.repeat_interleave(HQ // HK, 1), v.repeat_interleave(HQ // HK, 1)
    for name, backend in BACKENDS.items():
        for gqa in (True, False):
            kk, vv = (k, v) if gqa else (kx, vx)

            def call(kk: torch.Tensor = kk, vv: torch.Tensor = vv, gqa: bool = gqa,
                     backend: SDPBackend = backend) -> torch.Tensor:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)

            try:
                out = call()
                t = measure.median_event_us(call, 10)
            except Exception as exc:  # noqa: BLE001 - a backend that refuses the shape is a result too
                rows.append(f"| 1x{n} | {name}{' gqa' if gqa else ' expanded'} | refused: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | | |")
                continue
            diff = (out[0].transpose(0, 1).float() - ours_out.float()).abs().max().item()
            rows.append(f"| 1x{n} | {name}{' gqa' if gqa else ' expanded'} | {t:.0f} | {flops / t / 1e6:.0f} | "
                        f"{flops / t / 1e6 / peak:.0%} | {diff:.3g} |")
            break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,8192")
    args = ap.parse_args()
    dev = torch.device("cuda")
    peak = measure.measure_ceilings(None)["gemm_tflops"]
    lines = [f"# prefill attention on {torch.cuda.get_device_name(0)} (bf16 GEMM peak {peak:.0f} TFLOP/s)", "",
             "| shape | kernel | µs | TFLOP/s | of bf16 peak | max abs diff vs ours |", "|---|---|---|---|---|---|"]
    for n in (int(x) for x in args.tokens.split(",")):
        lines += case(n, dev, peak)
        print("\n".join(lines[-4:]), flush=True)
    text = "\n".join(lines)
    print(text)
    measure.write_out("bench_prefill_attention.md", text + "\n")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
