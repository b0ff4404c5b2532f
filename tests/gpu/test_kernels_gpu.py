"""Each Triton kernel against its torch twin at real GLM-4.5 / Air shapes on CUDA, in bf16.

Inputs are fresh random bf16 each run; references run in fp32 on the same (upcast) inputs;
errors are relative by norm (bf16 operands land between 1e-3 and 1e-2 against a float64 reference). Outputs must
be finite (unwritten elements of a NaN-poisoned buffer or NaNs fail).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.numerics import fresh_seed, rel  # noqa: F401 (fresh_seed: autouse fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_TOL = 1e-2
DEV = "cuda"


@pytest.mark.parametrize("n", [1, 7, 4096])
@pytest.mark.parametrize("h", [4096, 5120])
def test_rms_norms(n: int, h: int) -> None:
    from common.ops import reference as ref
    from common.ops import triton_norm as tn

    x, r = torch.randn(n, h, device=DEV, dtype=torch.bfloat16), torch.randn(n, h, device=DEV, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(h, device=DEV)).bfloat16()
    assert rel(tn.rms_norm(x, w, 1e-5), ref.rms_norm(x.float(), w.float(), 1e-5)) < BF16_TOL
    out, res = tn.fused_add_rms_norm(x, r, w, 1e-5)
    ro, rr = ref.fused_add_rms_norm(x, r, w, 1e-5)  # bf16 reference: same cast order, near-exact
    assert torch.equal(res, rr)
    assert rel(out, ro) < 2e-3


@pytest.mark.parametrize("n", [1, 33, 2048])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_rope(n: int, qk_norm: bool) -> None:
    from common.ops import reference as ref
    from common.ops import triton_norm as tn

    hq, hk, d, rot = 96, 8, 128, 64
    qkv = torch.randn(n, (hq + 2 * hk) * d, device=DEV, dtype=torch.bfloat16)
    q, k = qkv[:, : hq * d].view(n, hq, d), qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
    inv = 1.0 / (1e6 ** (torch.arange(0, rot, 2).float() / rot))
    ang = torch.arange(131072).float()[:, None] * inv[None]
    cos_sin = torch.cat((ang.cos(), ang.sin()), -1).to(DEV)
    pos = torch.randint(0, 131072, (n,), device=DEV)
    qw = (1 + 0.1 * torch.randn(d, device=DEV)).bfloat16() if qk_norm else None
    kw = (1 + 0.1 * torch.randn(d, device=DEV)).bfloat16() if qk_norm else None
    a, b = tn.qk_norm_rope(q, k, pos, cos_sin, rot, qw, kw, 1e-5)
    ra, rb = ref.qk_norm_rope(q, k, pos, cos_sin, rot, qw, kw, 1e-5)
    assert rel(a, ra) < 2e-3 and rel(b, rb) < 2e-3


@pytest.mark.parametrize("n", [1, 64, 2048])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_rope_store(n: int, qk_norm: bool) -> None:
    """The fused norm + RoPE + paged K/V write equals qk_norm_rope then store_kv, at Air shapes."""
    from common.model.layers import rope_cos_sin
    from common.ops import reference as ref
    from common.ops import triton_norm as tn

    pages, page, hq, hk, d = 512, 16, 96, 8, 128
    qkv = torch.randn(n, (hq + 2 * hk) * d, device=DEV, dtype=torch.bfloat16)
    q, k, v = (t.view(n, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=1))
    pos = torch.randint(0, 8192, (n,), device=DEV)
    cos_sin = rope_cos_sin(64, 1e6, 8192, torch.device(DEV))
    qw, kw = (torch.randn(d, device=DEV, dtype=torch.bfloat16) if qk_norm else None for _ in range(2))
    caches = [torch.full((pages, page, hk, d), float("nan"), device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    want = [c.clone() for c in caches]
    slots = torch.randperm(pages * page, device=DEV)[:n]
    wq, wk = tn.qk_norm_rope(q, k, pos, cos_sin, 64, qw, kw, 1e-5)
    kv_before = qkv[:, hq * d:].clone()
    out = tn.qk_norm_rope_store(q, k, v, pos, cos_sin, 64, qw, kw, 1e-5, *caches, slots)
    ref.store_kv(*want, wk, v, slots)
    assert out.data_ptr() == q.data_ptr() and torch.equal(out, wq)  # rotated in place
    assert torch.equal(qkv[:, hq * d:], kv_before)
    assert all(torch.equal(c.nan_to_num(3.0), w.nan_to_num(3.0)) for c, w in zip(caches, want))


@pytest.mark.parametrize("n", [1, 64, 2048])
def test_store_kv(n: int) -> None:
    from common.ops import reference as ref
    from common.ops import triton_kv as tk

    pages, page, hk, d = 512, 16, 8, 128
    kc = torch.full((pages, page, hk, d), float("nan"), device=DEV, dtype=torch.bfloat16)
    vc = kc.clone()
    kv = torch.randn(n, 2, hk, d, device=DEV, dtype=torch.bfloat16)
    slots = torch.randperm(pages * page, device=DEV)[:n]
    rk, rv = kc.clone(), vc.clone()
    ref.store_kv(rk, rv, kv[:, 0], kv[:, 1], slots)
    tk.store_kv(kc, vc, kv[:, 0], kv[:, 1], slots)
    assert torch.equal(kc.nan_to_num(3.0), rk.nan_to_num(3.0)) and torch.equal(vc.nan_to_num(3.0), rv.nan_to_num(3.0))


@pytest.mark.parametrize("n", [1, 64, 4096])
@pytest.mark.parametrize("e,groups", [(160, 1), (128, 1), (128, 8)])
def test_grouped_topk(n: int, e: int, groups: int) -> None:
    from common.ops import reference as ref
    from common.ops import triton_moe as tm

    logits, bias = torch.randn(n, e, device=DEV), 0.1 * torch.randn(e, device=DEV)
    w, i = tm.grouped_topk(logits, bias, 8, groups, min(groups, 4), True, 2.5)
    rw, ri = ref.grouped_topk(logits, bias, 8, groups, min(groups, 4), True, 2.5)
    si, oi = i.sort(1)
    sr, orr = ri.sort(1)
    assert torch.equal(si, sr)
    assert rel(w.gather(1, oi), rw.gather(1, orr)) < 1e-6


MOE_SHAPES = {"air": (128, 4096, 1408), "glm45": (160, 5120, 1536), "glm45-tp8": (160, 5120, 192),
              "air-tp4": (128, 4096, 352)}


@pytest.fixture(scope="module")
def moe_weights() -> dict:
    return {}


TMA_CFG = {"BLOCK_M": 64, "up": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3, "tma": True},
           "down": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4, "tma": True}}


@pytest.mark.parametrize("shape", list(MOE_SHAPES))
@pytest.mark.parametrize("n,mode", [(1, "auto"), (2, "auto"), (3, "auto"), (64, "auto"), (512, "auto"),
                                    (2048, "auto"), (64, "tma"), (2048, "tma")])
def test_fused_moe(shape: str, n: int, mode: str, moe_weights: dict) -> None:
    """Routed top-8 plus the shared expert stacked after them (the model's layout), through the
    heuristic/tuned path and with TMA weight loads."""
    from common.ops import reference as ref
    from common.ops import triton_moe as tm

    e, h, inter = MOE_SHAPES[shape]
    if shape not in moe_weights:
        moe_weights.clear()  # one shape's weights on the GPU at a time
        moe_weights[shape] = (torch.randn(e + 1, 2 * inter, h, device=DEV, dtype=torch.bfloat16) / h**0.5,
                              torch.randn(e + 1, h, inter, device=DEV, dtype=torch.bfloat16) / inter**0.5)
    w13, w2 = moe_weights[shape]
    x = torch.randn(n, h, device=DEV, dtype=torch.bfloat16)
    weights, ids = ref.grouped_topk(torch.randn(n, e, device=DEV), torch.zeros(e, device=DEV), 8, 1, 1, True, 2.5, 1)
    cfg = {"auto": None, "tma": TMA_CFG}[mode]
    out = tm.fused_moe_with_config(x, w13, w2, weights, ids, cfg)
    used, remap = torch.unique(ids.long(), return_inverse=True)  # fp32 copies of the touched experts only
    want = ref.fused_moe(x.float(), w13[used].float(), w2[used].float(), weights, remap.int())
    assert rel(out, want) < BF16_TOL


@pytest.mark.parametrize("n", [2, 8, 32, 64, 113, 128, 227, 455])
@pytest.mark.parametrize("e", [129, 161])
def test_align_sort_equals_scatter(n: int, e: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-program sort and the chunks ranked by a sort give the one-hot scatter kernels' block
    owners and rows (up to 455 tokens: 4,095 assignments, past one scatter program's 1,024)."""
    from common.ops import triton_moe as tm

    _, ids = tm.grouped_topk(torch.randn(n, e - 1, device=DEV), torch.zeros(e - 1, device=DEV), 8, 1, 1, True, 1.0, 1)
    monkeypatch.setattr(tm, "ALIGN_SORT_MAX", 0)
    monkeypatch.setattr(tm, "ALIGN_RANK_SORT", False)
    want_ids, want_blocks = tm.align_block_size(ids, e, 16)
    used = int((want_blocks >= 0).sum()) * 16
    monkeypatch.setattr(tm, "ALIGN_RANK_SORT", True)  # the chunks (past 1,024 assignments) ranked by a sort
    got = [tm.align_block_size(ids, e, 16)]
    monkeypatch.setattr(tm, "ALIGN_SORT_MAX", ids.numel())
    got.append(tm.align_block_size(ids, e, 16))
    for got_ids, got_blocks in got:
        assert torch.equal(got_blocks, want_blocks) and torch.equal(got_ids[:used], want_ids[:used])


@pytest.mark.parametrize("n", [3, 128, 2048])
def test_topk_adds_router_terms(n: int) -> None:
    """grouped_topk on the router's split-K terms routes as on the summed logits."""
    from common.ops import triton_moe as tm

    x = torch.randn(n, 4096, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(128, 4096, device=DEV) / 4096**0.5
    bias = torch.randn(128, device=DEV) * 0.01
    terms = tm.router_logits(x, w, partial=True)
    assert n <= tm.ROUTER_MAX_TOKENS or terms.shape[0] > 1, "the tensor-core router splits K at these sizes"
    got = tm.grouped_topk(terms, bias, 8, 1, 1, True, 2.5, 1)
    want = tm.grouped_topk(tm.router_logits(x, w), bias, 8, 1, 1, True, 2.5, 1)
    (gi, go), (wi, wo) = got[1].sort(1), want[1].sort(1)
    assert torch.equal(gi, wi)
    assert rel(got[0].gather(1, go), want[0].gather(1, wo)) < 1e-6


@pytest.mark.parametrize("n", [1, 3, 4, 64])
def test_router_logits(n: int) -> None:
    from common.ops import triton_moe as tm

    x = torch.randn(n, 5120, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(160, 5120, device=DEV) / 5120**0.5
    assert rel(tm.router_logits(x, w), x.double() @ w.double().T) < 1e-5


@pytest.mark.parametrize("n", [1, 2048])
def test_silu_and_mul(n: int) -> None:
    from common.ops import reference as ref
    from common.ops import triton_norm as tn

    gate_up = torch.randn(n, 2 * 10944, device=DEV, dtype=torch.bfloat16)
    assert torch.equal(tn.silu_and_mul(gate_up), ref.silu_and_mul(gate_up))


def _attn_batch(specs, hk=8, hq=96, d=128, page=16, dtype=torch.bfloat16):  # type: ignore[no-untyped-def]
    from common.forward.batch import ForwardBatch, SeqSpec

    need = sum(-(-s // page) for _, s, _, _ in specs)
    perm = (torch.randperm(need + 7)[: need] + 1).tolist()
    seqs, used = [], 0
    for q, seq_len, prefix, masked in specs:
        prefix = seq_len - q if prefix is None else prefix
        n_pages = -(-seq_len // page)
        mask = None
        if masked:
            cols = seq_len - prefix
            mask = torch.rand(q, cols) < 0.5
            mask[torch.arange(q), cols - q + torch.arange(q)] = True
        seqs.append(SeqSpec(input_ids=[1] * q, positions=list(range(q)), seq_len=seq_len,
                            pages=perm[used : used + n_pages], prefix_len=prefix, mask=mask))
        used += n_pages
    batch = ForwardBatch.build(seqs, page, DEV)
    kc = torch.randn(need + 8, page, hk, d, device=DEV, dtype=dtype)
    vc = torch.randn(need + 8, page, hk, d, device=DEV, dtype=dtype)
    return torch.randn(batch.num_tokens, hq, d, device=DEV, dtype=dtype), kc, vc, batch


ATTN_CASES = {
    "decode b1 8k": [(1, 8192, None, False)],
    "decode b32 1k": [(1, 1024 - 7 * i, None, False) for i in range(32)],
    "decode b4 mixed": [(1, 1, None, False), (1, 17, None, False), (1, 5000, None, False), (1, 300, None, False)],
    "extend 1x2048": [(2048, 2048, 0, False)],
    "extend prefix 1024 + 1000": [(1000, 2024, None, False)],
    "chunked prefix + causal window": [(300, 2000, 1500, False), (64, 64, 0, False)],
    "verify b4 q4 mask": [(4, 2000 + 37 * i, 1996 + 37 * i, True) for i in range(4)],
    "verify b2 q16 mask": [(16, 900, 884, True), (16, 3000, 2984, True)],
    "long prefill after a cached prefix": [(1024, 3072, None, False)],
    "two long prefills": [(1200, 1200, 0, False), (1024, 1536, None, False)],
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_paged_attention(case: str) -> None:
    from common.attention import torch_ref
    from common.attention import triton_paged as tp

    q, kc, vc, batch = _attn_batch(ATTN_CASES[case])
    out = tp.paged_attention(q, kc, vc, batch, 128**-0.5)
    want = torch_ref.paged_attention(q.float(), kc.float(), vc.float(), batch, 128**-0.5)
    assert rel(out, want) < BF16_TOL
    if batch.max_query_len <= 5:  # forced split counts agree too
        for splits in (1, 7):
            assert rel(tp.paged_attention_splits(q, kc, vc, batch, 128**-0.5, splits), want) < BF16_TOL


@pytest.mark.parametrize("case", ["decode b1 8k", "decode b32 1k", "decode b4 mixed", "verify b4 q4 mask",
                                  "decode b64 1k"])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_rope_in_attention_equals_two_launches(case: str, qk_norm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small-query batches store the new K/V and rotate q inside the attention launch: the same cache
    bits and output bits as qk_norm_rope_store's launch then paged_attention, eagerly and in a graph
    replayed on new q, k, v (the prologue's stores are ordered before its loads inside each program)."""
    from common.attention import triton_paged as tp
    from common.model.layers import rope_cos_sin
    from common.ops import triton_norm as tn

    monkeypatch.setattr(tp, "ROPE_IN_ATTENTION_QUERIES", 64)  # verify batches too
    specs = ATTN_CASES.get(case) or [(1, 1024 - 5 * i, None, False) for i in range(64)]
    _, kc, vc, batch = _attn_batch(specs)
    n, hq, hk, d = batch.num_tokens, 96, 8, 128
    qkv = torch.randn(n, (hq + 2 * hk) * d, device=DEV, dtype=torch.bfloat16)
    q, k, v = (t.view(n, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=1))
    pos = torch.randint(0, 8192, (n,), device=DEV)
    cos_sin = rope_cos_sin(64, 1e6, 8192, torch.device(DEV))
    qw, kw = ((1 + 0.1 * torch.randn(d, device=DEV)).bfloat16() if qk_norm else None for _ in range(2))

    def fused(caches):  # type: ignore[no-untyped-def]
        return tp.rope_store_attention(q, k, v, pos, cos_sin, 64, qw, kw, 1e-5, *caches, batch, 128**-0.5)

    def two(caches):  # type: ignore[no-untyped-def]
        q2 = tn.qk_norm_rope_store(q.clone(), k, v, pos, cos_sin, 64, qw, kw, 1e-5, *caches, batch.out_slots)
        return tp.paged_attention(q2, *caches, batch, 128**-0.5)

    raw = qkv.clone()
    a, b = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
    out, want = fused(a), two(b)
    assert torch.equal(qkv, raw), "q, k, v are read, never written"
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(out, want)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused(a)
    for _ in range(3):
        qkv.copy_(torch.randn_like(qkv))
        graph.replay()
        want = two(b)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(out, want)


@pytest.mark.parametrize("case", ["extend 1x2048", "long prefill after a cached prefix", "two long prefills"])
def test_sdpa_prefill_serves_long_prefills(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long unmasked prefill goes to torch SDPA (cuDNN or flash) and matches the reference and the
    Triton kernel it replaces; a refused shape would fall back, which this test counts as a failure
    for the causal no-prefix case every allowed backend supports."""
    from common.attention import torch_ref
    from common.attention import triton_paged as tp

    q, kc, vc, batch = _attn_batch(ATTN_CASES[case])
    want = torch_ref.paged_attention(q.float(), kc.float(), vc.float(), batch, 128**-0.5)
    via_sdpa = tp.sdpa_prefill(q, kc, vc, batch, 128**-0.5)
    if case == "extend 1x2048":
        assert via_sdpa is not None
    if via_sdpa is not None:
        assert rel(via_sdpa, want) < BF16_TOL
    monkeypatch.setattr(tp, "USE_SDPA_PREFILL", False)
    assert tp.sdpa_prefill(q, kc, vc, batch, 128**-0.5) is None
    assert rel(tp.paged_attention(q, kc, vc, batch, 128**-0.5), want) < BF16_TOL


def test_decode_attention_graph_replay() -> None:
    """Capture decode once, change sequence lengths and pages on the device, replay: still right."""
    from common.attention import torch_ref
    from common.attention import triton_paged as tp

    q, kc, vc, batch = _attn_batch([(1, 4000, None, False), (1, 100, None, False)])
    out = tp.paged_attention(q, kc, vc, batch, 0.088)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tp.paged_attention(q, kc, vc, batch, 0.088)
    q2, _, _, batch2 = _attn_batch([(1, 130, None, False), (1, 3900, None, False)])
    q.copy_(q2)
    batch.seq_lens.copy_(batch2.seq_lens)
    batch.prefix_lens.copy_(batch2.prefix_lens)
    batch.page_table.zero_()
    batch.page_table[:, : batch2.page_table.shape[1]].copy_(batch2.page_table)
    graph.replay()
    want = torch_ref.paged_attention(q.float(), kc.float(), vc.float(), batch2, 0.088)
    assert rel(out, want) < BF16_TOL


@pytest.mark.parametrize("n", [1, 16])
def test_moe_graph_replay(n: int) -> None:
    """fused_moe reads no routing on the host: a captured graph stays right for new routing."""
    from common.ops import reference as ref
    from common.ops import triton_moe as tm

    e, h, inter = 128, 1024, 256
    w13 = torch.randn(e, 2 * inter, h, device=DEV, dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, inter, device=DEV, dtype=torch.bfloat16) / inter**0.5
    x = torch.randn(n, h, device=DEV, dtype=torch.bfloat16)
    weights, ids = ref.grouped_topk(torch.randn(n, e, device=DEV), torch.zeros(e, device=DEV), 8, 1, 1, True, 1.0)
    tm.fused_moe(x, w13, w2, weights, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.fused_moe(x, w13, w2, weights, ids)
    w_new, i_new = ref.grouped_topk(torch.randn(n, e, device=DEV), torch.zeros(e, device=DEV), 8, 1, 1, True, 1.0)
    weights.copy_(w_new)
    ids.copy_(i_new)
    graph.replay()
    assert rel(out, ref.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)) < BF16_TOL


@pytest.mark.parametrize("n", [1, 5, 1024])
def test_moe_pdl_equals_plain_launch(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With programmatic dependent launch each kernel starts before its predecessor ends and waits
    in-kernel for its results: outputs must equal the plain launch's bit for bit, eagerly and in a
    graph of chained layers (each layer's input is the previous one's output) replayed repeatedly."""
    from common.ops import pdl
    from common.ops import reference as ref
    from common.ops import triton_moe as tm

    if not pdl.supported(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs sm_90+")
    e, h, inter = 129, 4096, 1408
    w13 = torch.randn(e, 2 * inter, h, device=DEV, dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, inter, device=DEV, dtype=torch.bfloat16) / inter**0.5
    x = torch.randn(n, h, device=DEV, dtype=torch.bfloat16)
    routes = [ref.grouped_topk(torch.randn(n, e - 1, device=DEV), torch.zeros(e - 1, device=DEV), 8, 1, 1, True,
                               2.5, 1) for _ in range(3)]

    def chain() -> torch.Tensor:
        y = x
        for weights, ids in routes:
            y = tm.fused_moe(y, w13, w2, weights, ids) + x  # the add keeps the chain's scale
        return y

    monkeypatch.setattr(pdl, "ENABLED", False)
    want = chain()
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert torch.equal(chain(), want)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(20):
        out.zero_()
        graph.replay()
        assert torch.equal(out, want)


def test_graph_runner_decode_step() -> None:
    """GraphRunner pads to a bucket with dummy rows on page 0 and returns the real rows' output."""
    from common.attention import triton_paged as tp
    from common.ops import triton_kv as tk
    from common.runtime.cuda_graphs import GraphRunner

    q, kc, vc, batch = _attn_batch([(1, 700, None, False), (1, 33, None, False), (1, 2100, None, False)])

    def step(b):  # type: ignore[no-untyped-def]
        rows = torch.ones(b.num_seqs, 8, 128, device=DEV, dtype=torch.bfloat16)
        tk.store_kv(kc, vc, rows, rows, b.out_slots)
        return tp.paged_attention(q.new_ones(b.num_seqs, 96, 128) * 0.5, kc, vc, b, 0.088)

    eager = step(batch).clone()
    runner = GraphRunner(step, [1, 4, 8], max_pages_per_seq=256, page_size=16, device=DEV)
    runner.capture()
    assert runner.can_run(batch)
    got = runner.run(batch)
    # a bucket of 4 plans its own split-K count, so agreement is to bf16 rounding, not bitwise
    assert got.shape == eager.shape and rel(got, eager) < BF16_TOL
    runner.close()


def test_moe_configs_load() -> None:
    """Every shipped table parses and holds complete entries."""
    import json

    from common.ops import triton_moe as tm

    for path in tm.CONFIG_DIR.glob("*.json"):
        for m, cfg in json.loads(path.read_text()).items():
            if m.isdigit():
                assert {"BLOCK_M", "up", "down"} <= set(cfg)
                for part in ("up", "down"):
                    assert {"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"} <= set(cfg[part])
