"""The MTP / NextN draft layer: vs a direct transcription of docs/model.md §3.2 on the raw checkpoint
tensors, vs transformers' MtpModel, and its own paged KV (draft extend, then chained draft steps)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common.forward.batch import ForwardBatch, SeqSpec
from common.model.config import ModelConfig
from common.runtime.runner import ModelRunner
from common.tools.tiny_model import make_tiny_model

PAGE = 4


# ------------------------------------------------------- docs/model.md §2 / §3.2, written out directly
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, pos: torch.Tensor, rot: int, theta: float) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, rot, 2).float() / rot)
    ang = pos.float()[:, None] * inv[None]  # [n, rot/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., : rot // 2], x[..., rot // 2 : rot]
    return torch.cat((a * cos - b * sin, b * cos + a * sin, x[..., rot:]), -1)


def _ffn(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ g.T) * (x @ u.T) @ d.T


def _moe_layer(w: dict[str, torch.Tensor], p: str, c: ModelConfig, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One always-MoE decoder layer, causal attention over the whole sequence x [n,H]."""
    n, d, eps = x.shape[0], c.head_dim, c.rms_norm_eps
    h = _rms(x, w[p + "input_layernorm.weight"], eps)
    q = (h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(n, -1, d)
    k = (h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(n, -1, d)
    v = (h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(n, -1, d)
    q = _rope(_rms(q, w[p + "self_attn.q_norm.weight"], eps), pos, c.rotary_dim, c.rope_theta)
    k = _rope(_rms(k, w[p + "self_attn.k_norm.weight"], eps), pos, c.rotary_dim, c.rope_theta)
    rep = c.num_attention_heads // c.num_key_value_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, -1)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
    sig = (h @ w[p + "mlp.gate.weight"].T).sigmoid()  # [n,E]
    choice = sig + w[p + "mlp.gate.e_score_correction_bias"]
    out = torch.zeros_like(h)
    per = c.n_routed_experts // c.n_group
    for t in range(n):
        groups = choice[t].view(c.n_group, per).topk(2).values.sum(-1).topk(c.topk_group).indices.tolist()
        allowed = torch.full_like(choice[t], float("-inf"))
        for g in groups:
            allowed[g * per : (g + 1) * per] = choice[t, g * per : (g + 1) * per]
        top = allowed.topk(c.num_experts_per_tok).indices.tolist()
        weights = sig[t, top] / (sig[t, top].sum() + 1e-20) * c.routed_scaling_factor
        for e, wt in zip(top, weights):
            ep = f"{p}mlp.experts.{e}."
            out[t] += wt * _ffn(h[t], w[ep + "gate_proj.weight"], w[ep + "up_proj.weight"], w[ep + "down_proj.weight"])
    sp = p + "mlp.shared_experts."
    out = out + _ffn(h, w[sp + "gate_proj.weight"], w[sp + "up_proj.weight"], w[sp + "down_proj.weight"])
    return x + out


def mtp_direct(w: dict[str, torch.Tensor], c: ModelConfig, next_ids: list[int], hidden: torch.Tensor,
               pos: torch.Tensor, embed_first: bool = True) -> torch.Tensor:
    p = f"model.layers.{c.num_hidden_layers}."
    e = _rms(w["model.embed_tokens.weight"][next_ids], w[p + "enorm.weight"], c.rms_norm_eps)
    h = _rms(hidden, w[p + "hnorm.weight"], c.rms_norm_eps)
    z = torch.cat((e, h) if embed_first else (h, e), -1) @ w[p + "eh_proj.weight"].T
    return _rms(_moe_layer(w, p, c, z, pos), w[p + "shared_head.norm.weight"], c.rms_norm_eps)


# ------------------------------------------------------------------ our side
def _prefill_and_draft(r: ModelRunner, ids: list[int], split: int | None = None):
    """Target prefill of ids, then the draft extend over (ids[1:] + [greedy next], hidden).

    Returns (hidden, next_ids, draft hidden_out, draft logits, pages, KV pool snapshot taken
    between the target and the draft forwards)."""
    n = len(ids)
    pages = r.allocator.alloc(-(-(n + 4) // PAGE))
    assert pages is not None
    logits, hidden = r.forward(ForwardBatch.build([SeqSpec(ids, list(range(n)), n, pages)], PAGE))
    next_ids = ids[1:] + [int(logits[-1].argmax())]
    snapshot = r.kv_pool.kv.clone()
    cuts = [0, n] if split is None else [0, split, n]
    outs, draft_logits = [], []
    for a, b in itertools.pairwise(cuts):
        spec = SeqSpec(next_ids[a:b], list(range(a, b)), b, pages, logit_rows=list(range(b - a)))
        lg, out = r.draft_forward(ForwardBatch.build([spec], PAGE), hidden[a:b])
        outs.append(out)
        draft_logits.append(lg)
    return hidden, next_ids, torch.cat(outs), torch.cat(draft_logits), pages, snapshot


@pytest.fixture(scope="module")
def mtp_runner(tiny_model_dir: Path) -> ModelRunner:
    return ModelRunner(tiny_model_dir, "cpu", torch.float32, page_size=PAGE, num_pages=64, with_mtp=True)


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_mtp_matches_spec_math(mtp_runner: ModelRunner, tiny_model_dir: Path) -> None:
    r, c = mtp_runner, mtp_runner.config
    w = load_file(str(tiny_model_dir / "model.safetensors"))
    ids = _ids(12, 0, c.vocab_size)
    hidden, next_ids, out, logits, *_ = _prefill_and_draft(r, ids)
    pos = torch.arange(len(ids))
    want = mtp_direct(w, c, next_ids, hidden, pos)
    assert (out - want).abs().max() <= 1e-4
    assert (logits - want @ w["lm_head.weight"].T).abs().max() <= 1e-4
    # the comparison can tell the concat order apart
    swapped = mtp_direct(w, c, next_ids, hidden, pos, embed_first=False)
    assert (swapped - want).abs().max() > 1e-2
    # RoPE only sees relative positions: transformers' convention (slot i at position i+1) agrees
    assert (mtp_direct(w, c, next_ids, hidden, pos + 1) - want).abs().max() <= 1e-4


def test_draft_has_its_own_kv_and_chains(mtp_runner: ModelRunner, tiny_model_dir: Path) -> None:
    r, c = mtp_runner, mtp_runner.config
    L = c.num_hidden_layers
    w = load_file(str(tiny_model_dir / "model.safetensors"))
    ids = _ids(10, 1, c.vocab_size)
    whole = _prefill_and_draft(r, ids)
    hidden, next_ids, out, _, pages, before_draft = _prefill_and_draft(r, ids, split=6)  # chunked draft extend
    assert (out - whole[2]).abs().max() <= 1e-5
    # the draft wrote its own pool layer L at the sequence's slots and left the target's layers alone
    assert torch.equal(r.kv_pool.kv[:L], before_draft[:L])
    n = len(ids)
    slots = r.kv_pool.slots(pages, 0, n)
    assert before_draft[L].flatten(1, 2)[:, slots].eq(0).all()  # fresh pages
    assert r.kv_pool.kv[L].flatten(1, 2)[:, slots].ne(0).any(dim=-1).all()  # every K/V row written
    # one chained draft step: the draft's own output feeds the next slot, attending over the draft KV
    drafted = int(r.model.compute_logits(out[-1:]).argmax())
    spec = SeqSpec([drafted], [n], n + 1, pages)
    _, step = r.draft_forward(ForwardBatch.build([spec], PAGE), out[-1:])
    want = mtp_direct(w, c, next_ids + [drafted], torch.cat((hidden, out[-1:])), torch.arange(n + 1))
    assert (step[0] - want[-1]).abs().max() <= 1e-4


def test_runner_without_mtp_refuses_draft(tiny_model_dir: Path) -> None:
    r = ModelRunner(tiny_model_dir, "cpu", torch.float32, page_size=PAGE, num_pages=8)
    assert r.kv_pool.num_layers == r.config.num_hidden_layers
    batch = ForwardBatch.build([SeqSpec([1], [0], 1, [1])], PAGE)
    with pytest.raises(RuntimeError, match="with_mtp"):
        r.draft_forward(batch, torch.zeros(1, r.config.hidden_size))


def test_mtp_matches_transformers_mtp_model(tmp_path: Path) -> None:
    """transformers finds MTP weights only at layer 46 or 92, hence a 46-layer (narrow) model."""
    from transformers import Glm4MoeForCausalLM as HFGlm4Moe
    from transformers.modeling_layers import MtpModel

    d = make_tiny_model(tmp_path / "tiny46", num_layers=46, hidden_size=32, intermediate_size=48,
                        moe_intermediate_size=16, head_dim=16, num_attention_heads=2, num_key_value_heads=1)
    main = HFGlm4Moe.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                     experts_implementation="eager").eval()
    hf_mtp = MtpModel.from_pretrained(main).eval()
    r = ModelRunner(d, "cpu", torch.float32, page_size=PAGE, num_pages=16, with_mtp=True)
    ids = _ids(11, 2, r.config.vocab_size)
    hidden, next_ids, out, logits, *_ = _prefill_and_draft(r, ids)
    with torch.no_grad():
        hf_out = main(torch.tensor([ids]), output_hidden_states=True)
        hf_hidden = hf_out.hidden_states[-1][0]  # post final norm (docs/model.md §3.2)
        want = hf_mtp.forward_layer(0, hf_hidden[None], torch.arange(1, len(ids) + 1)[None], None,
                                    input_ids=torch.tensor([next_ids]))[0]
        want_logits = hf_mtp._project_to_logits(want)
    assert (hidden - hf_hidden).abs().max() <= 1e-4
    assert int(hf_out.logits[0, -1].argmax()) == next_ids[-1]
    assert (out - want).abs().max() <= 1e-4
    assert (logits - want_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("k", [1, 2])
def test_draft_topk_is_the_softmax_top_k(k: int) -> None:
    """k = 1 takes max and one sum instead of the softmax and a top-k: the same token and probability
    (to fp32 rounding) as softmax().topk, ties to the lowest id like the target's greedy argmax."""
    from common.runtime.draft import draft_topk

    logits = torch.randn(5, 1000) * 4
    logits[3, [7, 600]] = logits[3].max() + 1  # a tie for the top
    p, idx = draft_topk(logits, k)
    want_p, want_idx = torch.softmax(logits, -1).topk(k, dim=-1)
    assert p.shape == idx.shape == (5, k) and p.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.allclose(p, want_p, rtol=1e-6, atol=0)
    assert torch.equal(idx[:, 0][[0, 1, 2, 4]], want_idx[:, 0][[0, 1, 2, 4]])
    if k == 1:
        assert idx[3, 0] == 7 and torch.equal(idx[:, 0], logits.argmax(-1))
