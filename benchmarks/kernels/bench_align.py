"""The fused MoE's expert alignment at prefill sizes, per chunking of its count + scatter kernels;
and at decode and verify sizes, the scatter kernels against the one-program sort kernel (used up to
triton_moe.ALIGN_SORT_MAX assignments).

    python3 -m benchmarks.kernels.bench_align [--small-only]

For the model's layouts (Air 128+1 and GLM-4.5 160+1 experts, top-8 + shared) at M = 1024, 2048,
4096 and 8192 tokens with BLOCK_M = 128: the graph-replayed time of align_block_size for each
(assignments per program, program cap, ranking), the first column being the shipped default.
Every variant must produce exactly the default's block_expert and the used rows of sorted_ids (placement keeps
assignment order within an expert whatever the chunking), else the script fails.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import measure
from common.ops import triton_moe as tm

# (assignments per program, program cap, chunks ranked by a sort): the shipped default first
VARIANTS = ((tm.ALIGN_CHUNK, tm.ALIGN_MAX_CHUNKS, tm.ALIGN_RANK_SORT), (tm.ALIGN_CHUNK, tm.ALIGN_MAX_CHUNKS, False),
            (512, 64, True), (128, 256, True), (1024, 64, True), (128, 256, False))


def _align_variant(ids: torch.Tensor, experts: int, bm: int, sort_max: int, rank_sort: bool) -> tuple[list, float]:
    """(used rows of sorted_ids and block_expert, graph-replayed µs) of align_block_size with the
    given ALIGN_SORT_MAX and ALIGN_RANK_SORT (restored after)."""
    saved = tm.ALIGN_SORT_MAX, tm.ALIGN_RANK_SORT
    tm.ALIGN_SORT_MAX, tm.ALIGN_RANK_SORT = sort_max, rank_sort
    try:
        sorted_ids, block_expert = tm.align_block_size(ids, experts, bm)
        used = int((block_expert >= 0).sum()) * bm  # rows past the used blocks are never written
        us = measure.time_graph([lambda: tm.align_block_size(ids, experts, bm)], reps=50)
    finally:
        tm.ALIGN_SORT_MAX, tm.ALIGN_RANK_SORT = saved
    return [sorted_ids[:used], block_expert], us


def small_batches() -> list[str]:
    """Decode and verify batches (T * 9 assignments, BLOCK_M 16): the scatter kernels (ranked by
    one-hot steps: one program up to 1,024 assignments, count + scatter above; ranked by a sort: one
    program up to ALIGN_CHUNK) against the one-program sort kernel. All must give the same used rows and block owners; the
    largest size the one-program sort wins at bounds ALIGN_SORT_MAX."""
    lines = ["layout | tokens | assignments | scatter one-hot µs | scatter rank-sort µs | one-program sort µs"]
    print(lines[0], flush=True)
    for name, routed in (("air+1", 128), ("glm45+1", 160)):
        for m in (8, 32, 64, 113, 128, 227, 256, 455):
            _, ids = tm.grouped_topk(torch.randn(m, routed, device="cuda"), torch.zeros(routed, device="cuda"), 8, 1, 1,
                                     True, 1.0, 1)
            runs = [_align_variant(ids, routed + 1, 16, sort_max, rank)
                    for sort_max, rank in ((0, False), (0, True), (ids.numel(), True))]
            if not all(torch.equal(a, b) for out, _ in runs[1:] for a, b in zip(out, runs[0][0])):
                raise SystemExit(f"{name} M={m}: the alignments of the three kernels differ")
            lines.append(f"{name} | {m} | {ids.numel()} | " + " | ".join(f"{us:.1f}" for _, us in runs))
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
    print("layout | M | assignments | " + " | ".join(f"chunk {c} cap {n}{'' if r else ' one-hot'} µs"
                                                      for c, n, r in VARIANTS))
    default = (tm.ALIGN_CHUNK, tm.ALIGN_MAX_CHUNKS)
    lines = []
    for name, routed in (("air+1", 128), ("glm45+1", 160)):
        for m in (1024, 2048, 4096, 8192):
            _, ids = tm.grouped_topk(torch.randn(m, routed, device="cuda"), torch.zeros(routed, device="cuda"), 8, 1, 1,
                                     True, 1.0, 1)
            times, want = [], None
            for chunk, cap, rank in VARIANTS:
                tm.ALIGN_CHUNK, tm.ALIGN_MAX_CHUNKS = chunk, cap
                try:
                    got, us = _align_variant(ids, routed + 1, 128, tm.ALIGN_SORT_MAX, rank)
                finally:
                    tm.ALIGN_CHUNK, tm.ALIGN_MAX_CHUNKS = default
                if want is None:
                    want = got
                elif not all(torch.equal(a, b) for a, b in zip(got, want)):
                    raise SystemExit(f"{name} M={m}: chunk {chunk} cap {cap} differs from the default's alignment")
                times.append(us)
            lines.append(f"{name} | {m} | {ids.numel()} | " + " | ".join(f"{t:.1f}" for t in times))
            print(lines[-1], flush=True)
    measure.write_out("bench_align.md", "\n".join(small + [""] + lines) + "\n")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
