"""The fused MoE's expert alignment at prefill sizes, per chunking of its count + scatter kernels;
and at decode sizes (one program), the scatter kernel against the sort kernel (triton_moe.ALIGN_SORT).

    python3 -m benchmarks.kernels.bench_align [--small-only]

For the model's layouts (Air 128+1 and GLM-4.5 160+1 experts, top-8 + shared) at M = 1024, 2048
and 4096 tokens with BLOCK_M = 128: the graph-replayed time of align_block_size for each
(assignments per program, program cap), the first row being the shipped default. Every variant
must produce exactly the default's block_expert and the used rows of sorted_ids (placement keeps
assignment order within an expert whatever the chunking), else the script fails.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import measure
from common.ops import triton_moe as tm

VARIANTS = ((tm.ALIGN_CHUNK, tm.ALIGN_MAX_CHUNKS), (512, 64), (256, 256), (128, 256), (1024, 64))


def small_batches() -> list[str]:
    """Decode and verify batches (T * 9 <= 1024 assignments, BLOCK_M 16): the one-program scatter
    kernel against the sort kernel; both must give the same used rows and block owners."""
    lines = ["layout | tokens | assignments | scatter µs | sort µs | scatter / sort"]
    print(lines[0], flush=True)
    for name, routed in (("air+1", 128), ("glm45+1", 160)):
        for m in (8, 32, 64, 113):
            _, ids = tm.grouped_topk(torch.randn(m, routed, device="cuda"), torch.zeros(routed, device="cuda"), 8, 1, 1,
                                     True, 1.0, 1)
            times, outs = [], []
            for sort in (False, True):
                tm.ALIGN_SORT = sort
                try:
                    sorted_ids, block_expert = tm.align_block_size(ids, routed + 1, 16)
                    used = int((block_expert >= 0).sum()) * 16
                    outs.append((sorted_ids[:used], block_expert))
                    times.append(measure.time_graph([lambda ids=ids, e=routed + 1: tm.align_block_size(ids, e, 16)],
                                                    reps=50))
                finally:
                    tm.ALIGN_SORT = False
            if not all(torch.equal(a, b) for a, b in zip(*outs)):
                raise SystemExit(f"{name} M={m}: the sort kernel's alignment differs from the scatter kernel's")
            lines.append(f"{name} | {m} | {ids.numel()} | {times[0]:.1f} | {times[1]:.1f} | {times[0] / times[1]:.2f}")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-only", action="store_true", help="only the decode-size comparison")
    args = ap.parse_args()
    info = measure.device_info()
    print(f"GPU {info['gpu']} | driver {info['driver']} | torch {info['torch']} | triton {info['triton']}")
    small = small_batches()
    if args.small_only:
        measure.write_out("bench_align.md", "\n".join(small) + "\n")
        return
    print("layout | M | assignments | " + " | ".join(f"chunk {c} cap {n} µs" for c, n in VARIANTS))
    default = (tm.ALIGN_CHUNK, tm.ALIGN_MAX_CHUNKS)
    lines = []
    for name, routed in (("air+1", 128), ("glm45+1", 160)):
        for m in (1024, 2048, 4096):
            _, ids = tm.grouped_topk(torch.randn(m, routed, device="cuda"), torch.zeros(routed, device="cuda"), 8, 1, 1,
                                     True, 1.0, 1)
            times, want = [], None
            for chunk, cap in VARIANTS:
                tm.ALIGN_CHUNK, tm.ALIGN_MAX_CHUNKS = chunk, cap
                sorted_ids, block_expert = tm.align_block_size(ids, routed + 1, 128)
                used = int((block_expert >= 0).sum()) * 128  # rows past the used blocks are never written
                got = (sorted_ids[:used], block_expert)
                if want is None:
                    want = got
                elif not all(torch.equal(a, b) for a, b in zip(got, want)):
                    raise SystemExit(f"{name} M={m}: chunk {chunk} cap {cap} differs from the default's alignment")
                times.append(measure.time_graph([lambda ids=ids, e=routed + 1: tm.align_block_size(ids, e, 128)], reps=50))
            tm.ALIGN_CHUNK, tm.ALIGN_MAX_CHUNKS = default
            lines.append(f"{name} | {m} | {ids.numel()} | " + " | ".join(f"{t:.1f}" for t in times))
            print(lines[-1], flush=True)
    measure.write_out("bench_align.md", "\n".join(small + [""] + lines) + "\n")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
