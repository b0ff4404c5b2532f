import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decode_worker.spec.tree import (
    DraftFrontier,
    ancestor_mask,
    chain_tree,
    child_links,
    select_tree,
    validate_spec_config,
)


def _draft(num_steps, k, batch=3, vocab=1000, seed=0, peaky=False):
    """Run the draft bookkeeping with random 'draft model' top-k outputs; returns frontier + history."""
    g = torch.Generator().manual_seed(seed)

    def topk(shape):
        p = torch.rand(*shape, k, generator=g)
        if peaky:
            p[..., 0] = 1.0  # ties between a parent and its child
        p = p.sort(dim=-1, descending=True).values
        return p, torch.randint(0, vocab, (*shape, k), generator=g)

    p0, i0 = topk((batch,))
    f = DraftFrontier(p0, i0)
    frontiers = [f.flat.clone()]
    masks = [f.attention_mask().clone()]
    for _ in range(num_steps - 1):
        cp, ci = topk((batch, k))
        old_flat = f.flat.clone()
        parent_slot = f.expand(cp, ci)
        # parent_slot names the old-frontier slot of each new frontier node's parent
        _, _, parents = f.candidates()
        assert torch.equal(parents.gather(1, f.flat), old_flat.gather(1, parent_slot))
        frontiers.append(f.flat.clone())
        masks.append(f.attention_mask().clone())
    return f, frontiers, masks


def _ancestors_from_parent_flat(parents_flat, f):
    out = {f}
    while parents_flat[f] >= 0:
        f = parents_flat[f]
        out.add(f)
    return out


def test_validate_spec_config():
    assert validate_spec_config(3, 1, 4) == (4, None)
    n, warning = validate_spec_config(3, 1, 8)
    assert n == 4 and "adjusted from 8 to speculative_num_steps + 1 = 4" in warning
    assert validate_spec_config(3, 2, 4) == (4, None)
    assert validate_spec_config(4, 4, 8) == (8, None)
    assert validate_spec_config(2, 2, 7) == (7, None)  # 6 candidates: the maximum
    with pytest.raises(ValueError, match=r"speculative_num_draft_tokens - 1 = 7 exceeds the 6 draft candidates"):
        validate_spec_config(2, 2, 8)
    with pytest.raises(ValueError, match="speculative_num_steps must be an integer >= 1"):
        validate_spec_config(0, 1, 1)
    with pytest.raises(ValueError, match="speculative_eagle_topk must be an integer >= 1"):
        validate_spec_config(3, 0, 4)
    with pytest.raises(ValueError, match="speculative_num_draft_tokens must be an integer >= 2"):
        validate_spec_config(3, 2, 1)


def test_chain():
    s, L = 3, torch.tensor([10, 20])
    f = DraftFrontier(torch.tensor([[0.9], [0.2]]), torch.tensor([[5], [6]]))
    assert f.attention_mask().tolist() == [[[True]], [[True]]]
    for level, tok in enumerate(([[[7]], [[8]]], [[[9]], [[1]]]), start=1):
        f.expand(torch.tensor([[[0.5]], [[0.1]]]), torch.tensor(tok))
        assert f.attention_mask().shape == (2, 1, level + 1) and f.attention_mask().all()
    tree = select_tree(*f.candidates(), s + 1, torch.tensor([3, 4]), L, validate=True)
    assert tree.tokens.tolist() == [[3, 5, 7, 9], [4, 6, 8, 1]]
    assert tree.parents.tolist() == [[-1, 0, 1, 2]] * 2
    assert tree.depth.tolist() == [[0, 1, 2, 3]] * 2
    assert tree.positions.tolist() == [[10, 11, 12, 13], [20, 21, 22, 23]]
    assert torch.equal(tree.mask[0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert tree.first_child.tolist() == [[1, 2, 3, -1]] * 2
    assert tree.next_sibling.tolist() == [[-1] * 4] * 2


def test_hand_tree_3_2_6():
    """k=2, S=3: scores worked out by hand (see docs/speculative.md §4.1)."""
    f = DraftFrontier(torch.tensor([[0.6, 0.4]]), torch.tensor([[10, 11]]))
    parent_slot = f.expand(torch.tensor([[[0.5, 0.3], [0.9, 0.1]]]), torch.tensor([[[20, 21], [22, 23]]]))
    # children scores .30 .18 .36 .04 -> frontier [22 (.36, parent slot 1), 20 (.30, parent slot 0)]
    assert parent_slot.tolist() == [[1, 0]]
    assert f.tokens.tolist() == [[22, 20]] and f.flat.tolist() == [[4, 2]]
    assert torch.allclose(f.scores, torch.tensor([[0.36, 0.30]]))
    # scratch columns: level 0 = [10, 11], level 1 = [22, 20]
    assert f.attention_mask().tolist() == [[[False, True, True, False], [True, False, False, True]]]
    f.expand(torch.tensor([[[0.5, 0.5], [0.8, 0.1]]]), torch.tensor([[[30, 31], [32, 33]]]))
    scores, tokens, parents = f.candidates()
    assert torch.allclose(scores, torch.tensor([[0.6, 0.4, 0.30, 0.18, 0.36, 0.04, 0.18, 0.18, 0.24, 0.03]]))
    assert parents.tolist() == [[-1, -1, 0, 0, 1, 1, 4, 4, 2, 2]]
    tree = select_tree(scores, tokens, parents, 6, torch.tensor([7]), torch.tensor([100]), validate=True)
    assert tree.tokens.tolist() == [[7, 10, 11, 20, 22, 32]]
    assert tree.candidate.tolist() == [[-1, 0, 1, 2, 4, 8]]
    assert tree.parents.tolist() == [[-1, 0, 0, 1, 2, 3]]
    assert tree.depth.tolist() == [[0, 1, 1, 2, 2, 3]]
    assert tree.positions.tolist() == [[100, 101, 101, 102, 102, 103]]
    assert tree.first_child.tolist() == [[1, 3, 4, 5, -1, -1]]
    assert tree.next_sibling.tolist() == [[-1, 2, -1, -1, -1, -1]]
    assert tree.mask[0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ]
    small = select_tree(scores, tokens, parents, 4, torch.tensor([7]), torch.tensor([100]), validate=True)
    assert small.tokens.tolist() == [[7, 10, 11, 22]] and small.parents.tolist() == [[-1, 0, 0, 2]]


@pytest.mark.parametrize("s,k,n", [(3, 2, 4), (4, 4, 8), (3, 2, 7), (2, 3, 12), (5, 2, 10)])
@pytest.mark.parametrize("peaky", [False, True])
def test_random_trees_invariants(s, k, n, peaky):
    batch = 4
    f, frontiers, masks = _draft(s, k, batch=batch, seed=s * 10 + k, peaky=peaky)
    scores, tokens, parents = f.candidates()
    assert scores.shape == (batch, k + (s - 1) * k * k)
    L = torch.tensor([5, 17, 0, 1000])
    root = torch.tensor([1, 2, 3, 4])
    tree = select_tree(scores, tokens, parents, n, root, L, validate=True)
    for b in range(batch):
        par = tree.parents[b].tolist()
        cand = tree.candidate[b].tolist()
        assert par[0] == -1 and all(0 <= par[j] < j for j in range(1, n))  # parents first
        # the selection is the N-1 best scores
        chosen = set(cand[1:])
        worst_chosen = min(scores[b, c].item() for c in chosen)
        assert all(scores[b, c].item() <= worst_chosen for c in range(scores.shape[1]) if c not in chosen)
        # node parents agree with candidate parents
        pf = parents[b].tolist()
        for j in range(1, n):
            assert (pf[cand[j]] == -1 and par[j] == 0) or cand[par[j]] == pf[cand[j]]
        assert tree.tokens[b, 0].item() == root[b].item()
        assert tree.tokens[b, 1:].tolist() == [tokens[b, c].item() for c in cand[1:]]
        # mask = ancestor-or-self closure; depth = number of proper ancestors; positions
        for j in range(n):
            anc, a = {j}, j
            while par[a] >= 0:
                a = par[a]
                anc.add(a)
            assert set(tree.mask[b, j].nonzero().flatten().tolist()) == anc
            assert tree.depth[b, j].item() == len(anc) - 1 <= s
            assert tree.positions[b, j].item() == L[b].item() + len(anc) - 1
        # first child / next sibling
        for j in range(n):
            kids = [c for c in range(n) if par[c] == j]
            assert tree.first_child[b, j].item() == (kids[0] if kids else -1)
            sibs = [c for c in range(j + 1, n) if j > 0 and par[c] == par[j]]
            assert tree.next_sibling[b, j].item() == (sibs[0] if sibs else -1)
        # draft-phase masks: frontier node at level l sees exactly its ancestors among forwarded nodes
        for level, (flat, mask) in enumerate(zip(frontiers, masks)):
            assert mask.shape == (batch, k, (level + 1) * k)
            columns = torch.cat(frontiers[: level + 1], dim=1)[b].tolist()
            for j in range(k):
                anc = _ancestors_from_parent_flat(pf, flat[b, j].item())
                assert [c in anc for c in columns] == mask[b, j].tolist()


def test_select_tree_rejects_bad_inputs():
    with pytest.raises(ValueError, match="must be in"):
        select_tree(torch.rand(1, 3), torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), -1), 5,
                    torch.zeros(1), torch.zeros(1))
    # a child scoring above its (unselected) parent: caught by validate
    scores = torch.tensor([[0.1, 0.9, 0.05]])
    parents = torch.tensor([[-1, 0, 0]])  # flat 1 is a child of flat 0
    with pytest.raises(ValueError, match="invalid draft tree"):
        select_tree(scores, torch.zeros(1, 3, dtype=torch.long), parents, 2, torch.zeros(1), torch.zeros(1),
                    validate=True)


def test_nan_scores_do_not_break_closure():
    f = DraftFrontier(torch.tensor([[0.7, float("nan")]]), torch.tensor([[1, 2]]))
    f.expand(torch.tensor([[[float("nan"), 0.5], [0.9, 0.1]]]), torch.tensor([[[3, 4], [5, 6]]]))
    tree = select_tree(*f.candidates(), 5, torch.tensor([0]), torch.tensor([0]), validate=True)
    assert all(0 <= p < j for j, p in enumerate(tree.parents[0].tolist()) if j > 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=24))
def test_ancestor_mask_and_links_on_random_parent_arrays(raw):
    parents = [-1] + [r % (j + 1) for j, r in enumerate(raw)]  # parent of node j+1 in [0, j]
    n = len(parents)
    p = torch.tensor([parents])
    mask = ancestor_mask(p)[0]
    first, _ = child_links(p)
    for j in range(n):
        anc, a = {j}, j
        while parents[a] >= 0:
            a = parents[a]
            anc.add(a)
        assert set(mask[j].nonzero().flatten().tolist()) == anc
        kids = [c for c in range(n) if parents[c] == j]
        assert first[0, j].item() == (kids[0] if kids else -1)


@pytest.mark.parametrize("s", [1, 2, 3, 5])
def test_chain_tree_equals_select_tree_for_k1(s):
    """k = 1: the fixed chain equals what select_tree builds from the draft bookkeeping, field by field."""
    f, _, _ = _draft(s, 1, batch=3, seed=s)
    scores, tokens, parents = f.candidates()
    roots, lens = torch.tensor([5, 6, 7]), torch.tensor([0, 9, 31])
    want = select_tree(scores, tokens, parents, s + 1, roots, lens, validate=True)
    got = chain_tree(tokens, roots, lens)
    for name, a, b in zip(want._fields, got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
