"""Our GLM-4 MoE (paged KV, every forward kind) vs transformers' Glm4MoeForCausalLM in fp32.

transformers runs eager attention and eager experts on the full sequence, no cache; we run the
same weights through ModelRunner with paged KV: whole prompts, chunked prefill, token-by-token
decode, batches of mixed kinds, and EAGLE-style tree verification.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Glm4MoeForCausalLM as HFGlm4Moe

from common.forward.batch import ForwardBatch, SeqSpec
from common.ops import reference
from common.runtime.runner import ModelRunner

TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> HFGlm4Moe:
    model = HFGlm4Moe.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager",
                                      experts_implementation="eager")
    return model.eval()


def hf_logits(hf: HFGlm4Moe, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [n,V]


def runner(model_dir: Path, page_size: int, num_pages: int = 256) -> ModelRunner:
    return ModelRunner(model_dir, "cpu", torch.float32, page_size=page_size, num_pages=num_pages)


class Sequence:
    """One request's token history and pages on a runner (a minimal stand-in for a scheduler)."""

    def __init__(self, r: ModelRunner) -> None:
        self.r, self.ids, self.pages = r, [], []

    def spec(self, new: list[int], all_rows: bool = True) -> SeqSpec:
        n = len(self.ids) + len(new)
        need = -(-n // self.r.page_size) - len(self.pages)
        if need > 0:
            got = self.r.allocator.alloc(need)
            assert got is not None
            self.pages += got
        spec = SeqSpec(new, list(range(len(self.ids), n)), n, list(self.pages),
                       logit_rows=list(range(len(new))) if all_rows else None)
        self.ids += new
        return spec

    def extend(self, new: list[int]) -> torch.Tensor:
        logits, _ = self.r.forward(ForwardBatch.build([self.spec(new)], self.r.page_size))
        return logits  # [len(new),V]


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_transformers_reads_every_feature(hf: HFGlm4Moe) -> None:
    c = hf.config
    assert c.use_qk_norm and c.attention_bias and c.head_dim == 32
    assert (c.n_group, c.topk_group, c.num_experts_per_tok, c.first_k_dense_replace) == (4, 2, 2, 1)
    assert c.routed_scaling_factor == 2.5
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rope_parameters["partial_rotary_factor"] == 0.5
    assert hf.model.layers[1].mlp.gate.e_score_correction_bias.abs().max() > 0


def test_prompt_logits(hf: HFGlm4Moe, tiny_model_dir: Path) -> None:
    r = runner(tiny_model_dir, 16)
    ids = prompt(24, 0, r.config.vocab_size)
    ours = Sequence(r).extend(ids)
    want = hf_logits(hf, ids)
    assert ours.dtype == torch.float32 and ours.shape == want.shape
    assert (ours - want).abs().max() <= TOL
    assert want.abs().max() > 1.0  # O(1) logits: the comparison is not vacuous


def test_chunked_prefill(hf: HFGlm4Moe, tiny_model_dir: Path) -> None:
    r = runner(tiny_model_dir, 4)
    ids = prompt(24, 1, r.config.vocab_size)
    want = hf_logits(hf, ids)
    seq, start = Sequence(r), 0
    for chunk in (5, 1, 9, 9):
        got = seq.extend(ids[start : start + chunk])
        assert (got - want[start : start + chunk]).abs().max() <= TOL, f"chunk at {start}"
        start += chunk


@pytest.mark.parametrize("page_size", [1, 16])
def test_token_by_token_decode(hf: HFGlm4Moe, tiny_model_dir: Path, page_size: int) -> None:
    r = runner(tiny_model_dir, page_size)
    ids = prompt(22, 2, r.config.vocab_size)
    want = hf_logits(hf, ids)
    seq = Sequence(r)
    got = [seq.extend(ids[:4])]
    for t in ids[4:]:
        got.append(seq.extend([t]))
    assert (torch.cat(got) - want).abs().max() <= TOL


def test_greedy_32_tokens(hf: HFGlm4Moe, tiny_model_dir: Path) -> None:
    r = runner(tiny_model_dir, 16)
    ids = prompt(12, 3, r.config.vocab_size)
    seq = Sequence(r)
    logits = seq.extend(ids)[-1]
    ours: list[int] = []
    for _ in range(32):
        ours.append(int(logits.argmax()))
        logits = seq.extend([ours[-1]])[-1]
    theirs: list[int] = []
    for _ in range(32):
        theirs.append(int(hf_logits(hf, ids + theirs)[-1].argmax()))
    assert ours == theirs
    assert len(set(ours)) > 1


def test_batch_equals_each_alone(hf: HFGlm4Moe, tiny_model_dir: Path) -> None:
    r = runner(tiny_model_dir, 4)
    vocab = r.config.vocab_size
    prompts = [prompt(n, 10 + n, vocab) for n in (3, 11, 6)]
    alone = [Sequence(r).extend(p) for p in prompts]

    # the same prompts in one batch, plus a cached-prefix extension and a decode step
    cached, decoding = Sequence(r), Sequence(r)
    long_ids = prompt(13, 20, vocab)
    cached.extend(long_ids[:8])
    decoding.extend(long_ids[:9])
    fresh = [Sequence(r) for _ in prompts]
    specs = [s.spec(p) for s, p in zip(fresh, prompts)]
    specs += [cached.spec(long_ids[8:]), decoding.spec(long_ids[9:10])]
    logits, hidden = r.forward(ForwardBatch.build(specs, r.page_size))
    assert hidden.shape == (3 + 11 + 6 + 5 + 1, r.config.hidden_size)
    rows = torch.split(logits, [3, 11, 6, 5, 1])
    for got, want in zip(rows[:3], alone):
        assert (got - want).abs().max() <= 1e-5
    for got, p in zip(rows[:3], prompts):
        assert (got - hf_logits(hf, p)).abs().max() <= TOL
    full = hf_logits(hf, long_ids)
    assert (rows[3] - full[8:13]).abs().max() <= TOL
    assert (rows[4] - full[9:10]).abs().max() <= TOL


def test_last_row_only_by_default(tiny_model_dir: Path) -> None:
    r = runner(tiny_model_dir, 4)
    ids = prompt(7, 4, r.config.vocab_size)
    seq = Sequence(r)
    logits, hidden = r.forward(ForwardBatch.build([seq.spec(ids, all_rows=False)], 4))
    assert logits.shape == (1, r.config.vocab_size) and hidden.shape == (7, r.config.hidden_size)
    assert torch.allclose(logits[0], r.model.compute_logits(hidden[-1:])[0])


# tree: node -> parent; depth gives the RoPE position offset, node index the KV slot offset
PARENTS = [-1, 0, 0, 1, 1, 2, 5]


def _ancestors(i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = PARENTS[i]
    return path[::-1]


def test_tree_verify_equals_each_path(hf: HFGlm4Moe, tiny_model_dir: Path) -> None:
    r = runner(tiny_model_dir, 4)
    vocab = r.config.vocab_size
    ids = prompt(10, 5, vocab)
    tokens = prompt(len(PARENTS), 6, vocab)
    n = len(PARENTS)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        mask[i, _ancestors(i)] = True
    depth = [len(_ancestors(i)) - 1 for i in range(n)]

    seq = Sequence(r)
    seq.extend(ids)
    total = len(ids) + n
    more = r.allocator.alloc(-(-total // 4) - len(seq.pages))
    assert more is not None
    spec = SeqSpec(tokens, [len(ids) + d for d in depth], total, seq.pages + more, mask=mask,
                   logit_rows=list(range(n)))
    tree_logits, _ = r.forward(ForwardBatch.build([spec], 4))

    leaves = [i for i in range(n) if i not in PARENTS]
    for leaf in leaves:
        path = _ancestors(leaf)
        causal = Sequence(r)
        causal.extend(ids)
        path_logits = causal.extend([tokens[i] for i in path])
        want = hf_logits(hf, ids + [tokens[i] for i in path])[len(ids):]
        for row, node in enumerate(path):
            assert (tree_logits[node] - path_logits[row]).abs().max() <= 1e-5, f"node {node}"
            assert (tree_logits[node] - want[row]).abs().max() <= TOL, f"node {node} vs transformers"


def test_routing_paths_are_exercised(tiny_model_dir: Path) -> None:
    """The tiny model's correction bias and group limit change the chosen experts for some tokens."""
    r = runner(tiny_model_dir, 4)
    gate = r.model.model.layers[1].mlp.gate
    c = r.config
    x = torch.randn(256, c.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = gate(x)
    _, ids = reference.grouped_topk(logits, gate.e_score_correction_bias, c.num_experts_per_tok, c.n_group,
                                    c.topk_group, True, c.routed_scaling_factor)
    _, no_bias = reference.grouped_topk(logits, torch.zeros_like(gate.e_score_correction_bias),
                                        c.num_experts_per_tok, c.n_group, c.topk_group, True, 1.0)
    _, no_groups = reference.grouped_topk(logits, gate.e_score_correction_bias, c.num_experts_per_tok, 1, 1,
                                          True, 1.0)
    as_sets = lambda t: [frozenset(row) for row in t.tolist()]
    assert as_sets(ids) != as_sets(no_bias)
    assert as_sets(ids) != as_sets(no_groups)


def test_bf16_within_bf16_tolerance(hf: HFGlm4Moe, tiny_model_dir: Path) -> None:
    """In bf16 our error vs transformers-fp32 stays within a small multiple of transformers-bf16's own."""
    ids = prompt(40, 7, 800)
    truth = hf_logits(hf, ids)
    hf16 = HFGlm4Moe.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="eager",
                                     experts_implementation="eager").eval()
    assert hf16.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    theirs = hf_logits(hf16, ids)
    r = ModelRunner(tiny_model_dir, "cpu", torch.bfloat16, page_size=16, num_pages=8)
    seq = Sequence(r)
    ours = torch.cat([seq.extend(ids[:32])] + [seq.extend([t]) for t in ids[32:]])
    err_hf, err_ours = (theirs - truth).abs().max(), (ours - truth).abs().max()
    assert err_hf > 0 and err_ours <= 2 * err_hf + 0.01 * truth.abs().max()
    assert (ours.argmax(-1) == truth.argmax(-1)).float().mean() >= 0.9
