"""Every Triton kernel on the CPU interpreter (TRITON_INTERPRET=1) against its torch twin.

Each kernel group runs in its own subprocess with the interpreter switched on before Triton is
imported, so nothing leaks into other tests. Inside the subprocess `torch.empty` is poisoned (NaN
for floats, 1 for integers: a valid index that gives wrong answers if an internal buffer is read
before it is written), inputs are fresh random data each run (the seed is printed), and results are
compared by relative error of the norm against the reference run in float64. The interpreter
cannot do bf16 arithmetic, so the kernels run in fp16 and fp32 here (bf16 runs in tests/gpu).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GROUPS = ("norm", "kv", "moe", "attention", "batch")

if not os.environ.get("CI"):  # in CI the dev extra installs triton: a missing one must fail
    pytest.importorskip("triton")


def run_interpreted(script: str, group: str, timeout: int) -> None:
    """Run `script group` in a subprocess with the interpreter on and no GPU; it must print OK group."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, script, group], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)
    assert proc.returncode == 0, f"{group} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert f"OK {group}" in proc.stdout


@pytest.mark.parametrize("group", GROUPS)
def test_interpret(group: str) -> None:
    run_interpreted(__file__, group, 80)


def poisoned(empty):  # type: ignore[no-untyped-def]
    """torch.empty whose buffers are NaN (floats) or 1 (integers: a valid index that gives wrong
    answers), so a read of anything a kernel should have written first shows."""

    def poisoned_empty(*args, **kwargs):  # type: ignore[no-untyped-def]
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(1)

    return poisoned_empty


# --------------------------------------------------------------------------- subprocess side
def _setup() -> None:
    import numpy as np
    import torch
    import triton.runtime.interpreter as interp

    # numpy >= 2.4 refuses int() of 1-element arrays, which the 3.6 interpreter does for runtime
    # loop bounds; index through the one element instead.
    original = getattr(interp, "_patch_lang_tensor", None)
    if original is not None:  # later Triton versions may fix this themselves

        def patched(tensor, scope):  # type: ignore[no-untyped-def]
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        interp._patch_lang_tensor = patched
    torch.empty = poisoned(torch.empty)
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"seed {seed}")


def _rel(out, ref) -> float:  # type: ignore[no-untyped-def]
    import torch

    assert torch.isfinite(out).all(), "non-finite output (unwritten or NaN)"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _check(name: str, out, ref, dtype) -> None:  # type: ignore[no-untyped-def]
    import torch

    tol = 1e-5 if dtype == torch.float32 else 3e-3
    err = _rel(out, ref)
    print(f"{name:40s} {dtype!s:14s} rel {err:.2e}")
    assert err < tol, f"{name}: rel error {err:.2e} >= {tol}"


def _group_norm() -> None:
    import itertools
    from unittest import mock

    import torch

    from common.ops import reference as ref
    from common.ops import triton_norm as tn

    for dt in (torch.float16, torch.float32):
        big = torch.randn(6, 200, dtype=dt)
        x = big[1:6, :96]  # strided rows, H not a power of two
        r, w = torch.randn(5, 96, dtype=dt), torch.randn(96, dtype=dt)
        _check("rms_norm", tn.rms_norm(x, w, 1e-5), ref.rms_norm(x.double(), w.double(), 1e-5), dt)
        out, res = tn.fused_add_rms_norm(x, r, w, 1e-6)
        ro, rr = ref.fused_add_rms_norm(x, r, w, 1e-6)  # same-dtype sum, as the kernel does
        _check("fused_add_rms_norm.out", out, ro, dt)
        _check("fused_add_rms_norm.residual", res, rr, dt)
        n, hq, hk, d, rot = 4, 6, 2, 48, 32
        qkv = torch.randn(n, (hq + 2 * hk) * d, dtype=dt)
        q, k = qkv[:, : hq * d].view(n, hq, d), qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
        pos = torch.randint(0, 64, (n,))
        inv = 10000.0 ** (-torch.arange(0, rot, 2).float() / rot)
        ang = torch.arange(64).float()[:, None] * inv[None]
        cos_sin = torch.cat((ang.cos(), ang.sin()), -1)
        for qw, kw in ((torch.randn(d, dtype=dt), torch.randn(d, dtype=dt)), (None, None)):
            a, b = tn.qk_norm_rope(q, k, pos, cos_sin, rot, qw, kw, 1e-6)
            ra, rb = ref.qk_norm_rope(q, k, pos, cos_sin, rot, qw, kw, 1e-6)
            tag = "weights" if qw is not None else "no-norm"
            _check(f"qk_norm_rope.q ({tag})", a, ra, dt)
            _check(f"qk_norm_rope.k ({tag})", b, rb, dt)
        v = qkv[:, (hq + hk) * d :].view(n, hk, d)
        # the fused norm + RoPE + paged K/V write (a negative slot writes nothing); q is rotated in place
        # (ROPE_IN_PLACE) or into a new tensor, and k, v and the rest of the qkv row stay as they were
        for (qw, kw), in_place in itertools.product(
                ((torch.randn(d, dtype=dt), torch.randn(d, dtype=dt)), (None, None)), (True, False)):
            qkv_in = qkv.clone()
            qi, ki, vi = (qkv_in[:, a * d:b * d].view(n, -1, d) for a, b in ((0, hq), (hq, hq + hk), (hq + hk, hq + 2 * hk)))
            caches = [torch.randn(5, 4, hk, d, dtype=dt) for _ in range(2)]
            want = [c.clone() for c in caches]
            slots = torch.tensor([3, 17, -1, 8])
            rq, rk = ref.qk_norm_rope(q, k, pos, cos_sin, rot, qw, kw, 1e-6)
            with mock.patch.object(tn, "ROPE_IN_PLACE", in_place):
                qo = tn.qk_norm_rope_store(qi, ki, vi, pos, cos_sin, rot, qw, kw, 1e-6, *caches, slots)
            keep = slots >= 0
            ref.store_kv(*want, rk[keep], v[keep], slots[keep])
            _check("qk_norm_rope_store.q", qo, rq, dt)
            assert (qo.data_ptr() == qi.data_ptr()) == in_place
            if in_place:
                assert torch.equal(qi, qo)
                if qw is None:  # unnormed pass-through dims are not rewritten: still the input's bits
                    assert torch.equal(qi[..., rot:], q[..., rot:])
            else:
                assert torch.equal(qi, q), "the out-of-place launch leaves q as it was"
            assert torch.equal(qkv_in[:, hq * d:], qkv[:, hq * d:]), "k and v are read, never written"
            _check("qk_norm_rope_store.k_cache", caches[0], want[0], dt)
            assert torch.equal(caches[1], want[1]), "v copied bit-exact into its slots, nothing else touched"
            qr = q.clone()  # the twin writes over its q too
            assert ref.qk_norm_rope_store(qr, k, v, pos, cos_sin, rot, qw, kw, 1e-6,
                                          *[c.clone() for c in caches], slots.abs()) is qr
            assert torch.equal(qr, rq)
        gate_up = torch.randn(7, 2 * 100, dtype=dt)  # I not a power of two
        _check("silu_and_mul", tn.silu_and_mul(gate_up), ref.silu_and_mul(gate_up), dt)


def _group_kv() -> None:
    import torch

    from common.ops import reference as ref
    from common.ops import triton_kv as tk

    for dt in (torch.float16, torch.float32):
        p, s, hk, d, n = 12, 4, 3, 24, 9
        kc = torch.full((p, s, hk, d), float("nan"), dtype=dt)
        vc = torch.full((p, s, hk, d), float("nan"), dtype=dt)
        slots = torch.randperm(p * s)[:n]
        kv = torch.randn(n, 2, hk, d, dtype=dt)  # strided k/v views
        k, v = kv[:, 0], kv[:, 1]
        rk, rv = kc.clone(), vc.clone()
        ref.store_kv(rk, rv, k, v, slots)
        tk.store_kv(kc, vc, k, v, slots)
        assert torch.equal(kc.nan_to_num(7.0), rk.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0), rv.nan_to_num(7.0))
        print(f"store_kv {dt} exact")


def _group_moe() -> None:
    import torch

    from common.ops import reference as ref
    from common.ops import triton_moe as tm

    for n, e, k, g, tg, shared in ((5, 16, 4, 1, 1, 0), (6, 32, 4, 4, 2, 1), (7, 20, 3, 1, 1, 2)):
        logits, bias = torch.randn(n, e), torch.randn(e) * 0.1
        w, i = tm.grouped_topk(logits, bias, k, g, tg, True, 2.5, shared)
        rw, ri = ref.grouped_topk(logits, bias, k, g, tg, True, 2.5, shared)
        assert i.shape == (n, k + shared) and torch.equal(i[:, k:], ri[:, k:]), "shared columns: ids E.. last"
        assert (w[:, k:] == 1.0).all() and (i[:, k:] == torch.arange(e, e + shared)).all()
        si, oi = i.sort(1)
        sr, orr = ri.sort(1)
        assert torch.equal(si, sr), f"grouped_topk ids differ (E={e}, G={g})"
        _check(f"grouped_topk E={e} G={g} shared={shared}", w.gather(1, oi), rw.gather(1, orr), torch.float32)
    # logits given as split-K terms: the kernel adds them in index order, exactly as the twin does
    terms, bias = torch.randn(3, 5, 24), torch.randn(24) * 0.1
    got, want = tm.grouped_topk(terms, bias, 4, 2, 1, True, 2.5, 1), ref.grouped_topk(terms, bias, 4, 2, 1, True, 2.5, 1)
    (si, oi), (sr, orr) = got[1].sort(1), want[1].sort(1)
    assert torch.equal(si, sr), "ids from summed terms"
    assert torch.equal(want[1], ref.grouped_topk(terms[0] + terms[1] + terms[2], bias, 4, 2, 1, True, 2.5, 1)[1])
    _check("grouped_topk of 3 terms", got[0].gather(1, oi), want[0].gather(1, orr), torch.float32)
    for n in (1, 3, 6):  # the few-token router kernel (6: the cuBLAS fallback)
        x, w = torch.randn(n, 600, dtype=torch.float16), torch.randn(10, 600)
        _check(f"router_logits T={n}", tm.router_logits(x, w), x.double() @ w.double().T, torch.float32)
        parts = tm.router_logits(x, w, partial=True)
        assert parts.dim() == 3 and parts.shape[1:] == (n, 10), "partial: [S,T,E]"
        _check(f"router_logits T={n} partial", parts.sum(0), x.double() @ w.double().T, torch.float32)
    # the scatter kernels (one program, then count + scatter for the last: multi-chunk) against the
    # one-program sort; min_bm < bm: tail blocks
    for n, k, e, bm in ((3, 4, 16, 16), (40, 8, 16, 16), (37, 9, 129, 16), (200, 8, 24, 32)):
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)]).int()
        saved = tm.ALIGN_SORT_MAX, tm.ALIGN_RANK_SORT
        try:
            tm.ALIGN_SORT_MAX, tm.ALIGN_RANK_SORT = 0, False  # one-hot ranking
            sorted_ids, block_expert = tm.align_block_size(ids, e, bm)
            tm.ALIGN_RANK_SORT = True  # multi-chunk: each chunk ranked by a sort
            r_ids, r_blocks = tm.align_block_size(ids, e, bm)
            tm.ALIGN_SORT_MAX = n * k  # one program's sort
            s_ids, s_blocks = tm.align_block_size(ids, e, bm)
        finally:
            tm.ALIGN_SORT_MAX, tm.ALIGN_RANK_SORT = saved
        flat, numel = ids.reshape(-1), n * k
        placed = torch.zeros(numel, dtype=torch.int64)
        for blk, ex in enumerate(block_expert.tolist()):
            rows = sorted_ids[blk * bm : (blk + 1) * bm]
            if ex < 0:
                continue
            real = rows[rows < numel].long()
            assert (rows[rows >= numel] == numel).all(), "padding must hold the sentinel"
            assert (flat[real] == ex).all(), "row placed under the wrong expert"
            placed[real] += 1
        assert (placed == 1).all(), "every assignment placed exactly once"
        used = int((block_expert >= 0).sum()) * bm  # the sort gives the scatter kernels' outputs exactly
        for got_ids, got_blocks in ((r_ids, r_blocks), (s_ids, s_blocks)):
            assert torch.equal(got_blocks, block_expert) and torch.equal(got_ids[:used], sorted_ids[:used]), \
                "sorted alignment differs from the one-hot scatter's"
        print(f"align_block_size T={n} k={k} E={e} BM={bm} ok")
    big = {"BLOCK_M": 64, "up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
           "down": {"BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}}
    tma = {"BLOCK_M": 32, "up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2, "tma": True},
           "down": {"BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2, "tma": True}}
    for dt in (torch.float16, torch.float32):
        for n, e, k, h, inter, cfg in ((3, 8, 2, 64, 48, None), (20, 8, 4, 128, 128, None), (40, 6, 3, 64, 40, big),
                                       (24, 6, 3, 64, 40, tma), (17, 5, 2, 96, 64, tma)):
            x = torch.randn(n, h, dtype=dt)
            w13 = torch.randn(e, 2 * inter, h, dtype=dt) / h**0.5
            w2 = torch.randn(e, h, inter, dtype=dt) / inter**0.5
            w, i = ref.grouped_topk(torch.randn(n, e), torch.zeros(e), k, 1, 1, True, 1.5)
            out = tm.fused_moe_with_config(x, w13, w2, w, i, cfg)
            want = ref.fused_moe(x.double(), w13.double(), w2.double(), w, i)
            _check(f"fused_moe T={n} E={e} k={k} H={h} I={inter}", out, want, dt)
        assert tm.fused_moe(x, w13, w2, w, i).shape == x.shape
        # one token: no alignment, one block per assignment (N, K not tile multiples; TMA too)
        for e, k, h, inter, cfg in ((8, 3, 64, 48, None), (6, 4, 96, 40, big), (9, 5, 80, 24, tma)):
            x = torch.randn(1, h, dtype=dt)
            w13 = torch.randn(e, 2 * inter, h, dtype=dt) / h**0.5
            w2 = torch.randn(e, h, inter, dtype=dt) / inter**0.5
            w, i = ref.grouped_topk(torch.randn(1, e - 1), torch.zeros(e - 1), k - 1, 1, 1, True, 1.5, 1)
            want = ref.fused_moe(x.double(), w13.double(), w2.double(), w, i)
            _check(f"fused_moe one token E={e} k={k} H={h} I={inter}", tm.fused_moe_with_config(x, w13, w2, w, i, cfg),
                   want, dt)
    # TMA descriptors live on the weight tensor and die with it (a module-level cache kept every
    # weight it ever saw alive)
    import gc
    import weakref

    w13 = torch.randn(4, 32, 64)
    desc = tm._weight_descriptor(w13, 16, 32)
    assert tm._weight_descriptor(w13, 16, 32) is desc and desc.base.data_ptr() == w13.data_ptr()
    alive = weakref.ref(w13)
    del w13, desc
    gc.collect()
    assert alive() is None, "a TMA descriptor keeps its weight alive"


def _group_attention() -> None:
    import torch

    from common.attention import torch_ref
    from common.attention import triton_paged as tp
    from common.forward.batch import ForwardBatch, SeqSpec

    def build(specs, page, pages_total, hk, hq, d, dt):  # type: ignore[no-untyped-def]
        perm = (torch.randperm(pages_total - 1) + 1).tolist()  # page 0 stays the dummy page
        seqs, used = [], 0
        for q, seq_len, prefix, masked in specs:
            prefix = seq_len - q if prefix is None else prefix
            need = -(-seq_len // page)
            mask = None
            if masked:  # random tree-like block; every query sees its own slot
                cols = seq_len - prefix
                mask = torch.rand(q, cols) < 0.5
                mask[torch.arange(q), cols - q + torch.arange(q)] = True
            seqs.append(SeqSpec(input_ids=[1] * q, positions=list(range(q)), seq_len=seq_len,
                                pages=perm[used : used + need], prefix_len=prefix, mask=mask))
            used += need
        batch = ForwardBatch.build(seqs, page)
        kc = torch.randn(pages_total, page, hk, d).to(dt)
        vc = torch.randn(pages_total, page, hk, d).to(dt)
        return torch.randn(batch.num_tokens, hq, d).to(dt), kc, vc, batch

    cases = [  # (name, [(q, seq_len, prefix|None, masked)], page, hk, hq, d, forced splits)
        ("decode", [(1, 37, None, False), (1, 5, None, False)], 8, 2, 6, 32, None),
        ("decode split-K=3", [(1, 100, None, False), (1, 70, None, False)], 8, 2, 6, 32, 3),
        ("decode no split, G=1, D=24", [(1, 41, None, False)], 4, 4, 4, 24, 1),
        ("extend with prefix (small)", [(7, 30, 10, False), (20, 20, 0, False)], 8, 2, 6, 32, None),
        ("extend with prefix (BM=128)", [(30, 50, 5, False), (2, 9, None, False)], 4, 2, 6, 32, None),
        ("verify mask", [(4, 40, 30, True), (3, 25, 12, True)], 8, 2, 6, 32, None),
        ("verify mask split-K=4", [(4, 60, 30, True), (3, 25, 12, False)], 8, 2, 6, 32, 4),
        ("extend mask (BM=128)", [(30, 50, 20, True), (1, 9, None, True)], 4, 2, 6, 32, None),
    ]
    for dt in (torch.float16, torch.float32):
        for name, specs, page, hk, hq, d, splits in cases:
            q, kc, vc, batch = build(specs, page, 48, hk, hq, d, dt)
            out = tp.paged_attention_splits(q, kc, vc, batch, d**-0.5, splits)
            want = torch_ref.paged_attention(q.double(), kc.double(), vc.double(), batch, d**-0.5)
            _check(f"paged_attention {name}", out, want, dt)
            if splits != 1 and specs[0][0] == 1:  # decode: the split merge writes each head's max |o| beside o
                amax = torch.full((q.shape[0], hq), float("nan"))
                out = tp.paged_attention_splits(q, kc, vc, batch, d**-0.5, splits, amax)
                assert torch.equal(amax, out.float().abs().amax(-1)), f"{name}: the merge's head amax"
    _rope_in_attention(build)
    # a verify batch over VERIFY_ROWS16_MAX sequences: 4 queries x 12 heads in one 64-row block of
    # 32-slot tiles, as plan() serves it
    specs = [(4, 16 + i % 9, 6 + i % 5, True) for i in range(tp.VERIFY_ROWS16_MAX + 1)]
    q, kc, vc, batch = build(specs, 4, 220, 2, 24, 16, torch.float32)
    assert tp.plan(batch.num_seqs, 2, 12, 4, 132)[:4] == (64, 32, 4, 3)
    for splits in (1, None):
        out = tp.paged_attention_splits(q, kc, vc, batch, 0.25, splits)
        want = torch_ref.paged_attention(q.double(), kc.double(), vc.double(), batch, 0.25)
        _check(f"paged_attention verify x{batch.num_seqs} splits={splits}", out, want, torch.float32)


def _rope_in_attention(build) -> None:  # type: ignore[no-untyped-def]
    """rope_store_attention's one launch (the new tokens' norm, RoPE and K/V store in the attention's
    prologue) against the two launches it replaces, on the same inputs: the same cache bits, the same
    output bits, q left as it was; and both within tolerance of the float64 twins."""
    import itertools
    from unittest import mock

    import torch

    from common.attention import torch_ref
    from common.attention import triton_paged as tp
    from common.ops import reference as ref
    from common.ops import triton_norm as tn

    served = tp.plan
    tp.ROPE_IN_ATTENTION_QUERIES = 64  # verify batches too (this subprocess only)
    cases = [  # (name, specs, page, hk, hq, d, rot, forced plan tile or None)
        ("decode, plan's split", [(1, 37, None, False), (1, 5, None, False)], 8, 2, 6, 32, 16, None),
        ("decode split 3", [(1, 100, None, False), (1, 70, None, False)], 8, 2, 6, 32, 32, (16, 16, 4, 2, 3)),
        ("decode no split, D=24", [(1, 41, None, False)], 4, 4, 8, 24, 8, (16, 16, 4, 2, 1)),
        ("verify mask, 2 row blocks", [(4, 40, 30, True), (3, 25, 12, True)], 8, 2, 12, 32, 16, None),
        ("verify mask split 4", [(4, 60, 30, True), (3, 25, 12, False)], 8, 2, 12, 32, 16, (16, 16, 4, 2, 4)),
        ("verify causal no split", [(4, 60, None, False), (2, 9, None, False)], 4, 2, 12, 32, 16, (16, 16, 4, 2, 1)),
    ]
    for (dt, flip), (c, (name, specs, page, hk, hq, d, rot, tile)) in itertools.product(
            ((torch.float16, 0), (torch.float32, 1)), enumerate(cases)):
        weights = (c + flip) % 2 == 0  # each case with and without QK-norm, one of them in each dtype
        q0, kc, vc, batch = build(specs, page, 48, hk, hq, d, dt)
        n = q0.shape[0]
        qkv = torch.randn(n, (hq + 2 * hk) * d).to(dt)
        q, k, v = qkv[:, :hq * d].view(n, hq, d), qkv[:, hq * d:(hq + hk) * d].view(n, hk, d), qkv[:, (hq + hk) * d:].view(n, hk, d)
        pos = torch.randint(0, 64, (n,))
        inv = 10000.0 ** (-torch.arange(0, rot, 2).float() / rot)
        ang = torch.arange(64).float()[:, None] * inv[None]
        cos_sin = torch.cat((ang.cos(), ang.sin()), -1)
        qw, kw = (torch.randn(d, dtype=dt), torch.randn(d, dtype=dt)) if weights else (None, None)
        if name.startswith("decode, plan"):
            batch.out_slots[1] = -1  # a padding row: nothing stored, in either path
        plan = served if tile is None else (lambda *a, tile=tile: tile)
        raw = qkv.clone()
        caches, twice = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
        with mock.patch.object(tp, "plan", plan):
            assert tp.plan(batch.num_seqs, hk, hq // hk, batch.max_query_len, 132)[0] == 16
            out = tp.rope_store_attention(q, k, v, pos, cos_sin, rot, qw, kw, 1e-6, *caches, batch, d**-0.5)
            tag = f"rope in attention {name} ({'qk-norm' if weights else 'no norm'})"
            assert torch.equal(qkv, raw), f"{tag}: q, k, v are read, never written"
            q2 = tn.qk_norm_rope_store(q.clone(), k, v, pos, cos_sin, rot, qw, kw, 1e-6, *twice, batch.out_slots)
            want = tp.paged_attention_splits(q2, *twice, batch, d**-0.5, None)
        assert torch.equal(caches[0], twice[0]) and torch.equal(caches[1], twice[1]), f"{tag}: cache bits"
        assert torch.equal(out, want), f"{tag}: output bits"
        rq, rk = ref.qk_norm_rope(q.double(), k.double(), pos, cos_sin, rot, None if qw is None else qw.double(),
                                  None if kw is None else kw.double(), 1e-6)
        rc, keep = (kc.clone().double(), vc.clone().double()), batch.out_slots >= 0
        ref.store_kv(*rc, rk[keep], v.double()[keep], batch.out_slots[keep])
        _check(f"{tag} vs twins", out, torch_ref.paged_attention(rq, *rc, batch, d**-0.5), dt)
        print(f"{tag} {dt} ok")
    # q, k, v that are not one qkv row take the two launches (same result)
    q0, kc, vc, batch = build([(1, 37, None, False)], 8, 48, 2, 6, 32, torch.float32)
    q, k, v = torch.randn(1, 6, 32), torch.randn(1, 2, 32), torch.randn(1, 2, 32)
    assert not tp._one_qkv_row(q, k, v)
    qkv = torch.randn(2, 10 * 32)  # two tokens of one qkv row each: the launch with the prologue
    assert tp._one_qkv_row(qkv[:, :192].view(2, 6, 32), qkv[:, 192:256].view(2, 2, 32), qkv[:, 256:].view(2, 2, 32))
    assert not tp._one_qkv_row(qkv[:, :192].view(2, 6, 32), qkv[:, 256:].view(2, 2, 32), qkv[:, 192:256].view(2, 2, 32))
    one = qkv[:1].clone()  # one token: its row stride is whatever view() gives, and it takes the prologue too
    assert tp._one_qkv_row(one[:, :192].view(1, 6, 32), one[:, 192:256].view(1, 2, 32), one[:, 256:].view(1, 2, 32))
    out = tp.rope_store_attention(q.clone(), k, v, torch.tensor([3]), cos_sin[:, :32], 32, None, None, 1e-6,
                                  kc.clone(), vc.clone(), batch, 0.2)
    q2 = tn.qk_norm_rope_store(q.clone(), k, v, torch.tensor([3]), cos_sin[:, :32], 32, None, None, 1e-6, kc, vc,
                               batch.out_slots)
    assert torch.equal(out, tp.paged_attention_splits(q2, kc, vc, batch, 0.2, None))


def _group_batch() -> None:
    """The one-launch CUDA-graph batch load against its torch twins (cuda_graphs.load_*_batch), into
    static batches full of an earlier step's leftovers: decode and tree (EAGLE) batches, buckets
    larger than the batch and exactly its size, page tables narrower than the bucket's."""
    import torch

    from common.forward.batch import ForwardBatch
    from common.ops import triton_batch
    from common.runtime import cuda_graphs as cg

    page = 4

    def dirty(static):  # type: ignore[no-untyped-def]
        for name in ("input_ids", "positions", "out_slots", "prefix_lens", "seq_lens", "page_table", "logit_rows"):
            getattr(static, name).fill_(99)
        if static.mask is not None:
            static.mask.fill_(False)
        return static

    def same(a, b, what):  # type: ignore[no-untyped-def]
        for name in ("input_ids", "positions", "out_slots", "prefix_lens", "seq_lens", "page_table", "logit_rows",
                     "mask"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), f"{what}: {name} differs\n{x}\n{y}"

    for n, bs in ((1, 1), (3, 4), (5, 8)):
        runner = cg.GraphRunner(lambda b: b.input_ids, [bs], 7, page, "cpu")
        kv = torch.randint(0, 20, (n,)).tolist()
        pages = [torch.randperm(30)[: kv_b // page + 1 + int(torch.randint(0, 2, ()))].tolist() for kv_b in kv]
        batch = ForwardBatch.decode(torch.randint(0, 500, (n,)).tolist(), kv, pages, page)
        want, got = dirty(runner._static_batch(bs)), dirty(runner._static_batch(bs))
        cg.load_decode_batch(want, batch)
        triton_batch.load_batch(got, batch, 1, 0, 1, None)
        same(got, want, f"decode n={n} bucket={bs}")
        print(f"load decode n={n} bucket={bs} ok")
    for n, bs, q, w, per_seq in ((2, 4, 4, 4, False), (3, 3, 2, 6, True), (1, 2, 4, 4, True)):
        runner = cg.GraphRunner(lambda b: b.input_ids, [bs], 6, page, "cpu", queries=q, window=w, outputs_per_seq=per_seq)
        prefix = torch.randint(0, 12, (n,)).tolist()
        pages = [torch.randperm(40)[: (p_b + w) // page + 1].tolist() for p_b in prefix]
        tokens, depth = torch.randint(0, 500, (n, q)), torch.randint(0, 4, (n, q))
        batch = ForwardBatch.tree(tokens, depth, torch.rand(n, q, w) < 0.5, prefix, pages, page)
        if per_seq:
            batch.logit_rows = torch.arange(n) * q + torch.randint(0, q, (n,))
        pad = runner._pad_rows if per_seq else None
        want, got = dirty(runner._static_batch(bs)), dirty(runner._static_batch(bs))
        cg.load_tree_batch(want, batch)
        if per_seq:
            want.logit_rows[:n].copy_(batch.logit_rows)
            want.logit_rows[n:].copy_(pad[n:bs])
        triton_batch.load_batch(got, batch, q, w, w, pad)
        if not per_seq:
            got.logit_rows.copy_(want.logit_rows)  # (a bucket loads logit rows only with one per sequence)
        same(got, want, f"tree n={n} bucket={bs} q={q} w={w}")
        print(f"load tree n={n} bucket={bs} q={q} w={w} per_seq={per_seq} ok")


if __name__ == "__main__":
    _setup()
    group = sys.argv[1]
    {"norm": _group_norm, "kv": _group_kv, "moe": _group_moe, "attention": _group_attention,
     "batch": _group_batch}[group]()
    print(f"OK {group}")
