import torch

from common.sampling.sampler import sample_from_probs
from decode_worker.spec.tree import DraftFrontier, VerifyTree, select_tree
from decode_worker.spec.verify import (
    AcceptStats,
    accept_lengths,
    accepted_kv_moves,
    verify_greedy,
    verify_greedy_chain,
    verify_sampling,
)

V = 6


def _hand_tree(root=0, seq_len=100, batch=1) -> VerifyTree:
    """k=2, S=3, N=6 (see test_tree): nodes [root, 1, 4, 2, 3, 5], parents [-1, 0, 0, 1, 2, 3]."""
    f = DraftFrontier(torch.tensor([[0.6, 0.4]]), torch.tensor([[1, 4]]))
    f.expand(torch.tensor([[[0.5, 0.3], [0.9, 0.1]]]), torch.tensor([[[2, 0], [3, 1]]]))
    f.expand(torch.tensor([[[0.5, 0.5], [0.8, 0.1]]]), torch.tensor([[[0, 1], [5, 4]]]))
    tree = select_tree(*f.candidates(), 6, torch.tensor([root]), torch.tensor([seq_len]), validate=True)
    assert tree.tokens.tolist() == [[root, 1, 4, 2, 3, 5]]
    assert tree.parents.tolist() == [[-1, 0, 0, 1, 2, 3]]
    return VerifyTree(*(t.expand(batch, *t.shape[1:]).contiguous() for t in tree))


def _chain(tokens, seq_len=50) -> VerifyTree:
    s = len(tokens) - 1
    f = DraftFrontier(torch.tensor([[0.9]]), torch.tensor([[tokens[1]]]))
    for t in tokens[2:]:
        f.expand(torch.tensor([[[0.9]]]), torch.tensor([[[t]]]))
    return select_tree(*f.candidates(), s + 1, torch.tensor([tokens[0]]), torch.tensor([seq_len]))


# ----------------------------------------------------------------------------- greedy


def test_greedy_walk_cases():
    tree = _hand_tree(batch=4)
    target = torch.tensor([
        [1, 2, 0, 5, 0, 9],  # full depth: 1 -> 2 -> 5, bonus 9
        [4, 0, 3, 0, 7, 0],  # 4 -> 3, node 4 (token 3) is a leaf, bonus 7
        [8, 0, 0, 0, 0, 0],  # nothing accepted, bonus 8
        [1, 3, 0, 0, 0, 0],  # 1 accepted, its only child (2) rejected, bonus 3
    ])
    r = verify_greedy(tree, target, num_steps=3)
    assert r.num_accepted.tolist() == [3, 2, 0, 1]
    assert r.accept_index.tolist() == [[0, 1, 3, 5], [0, 2, 4, -1], [0, -1, -1, -1], [0, 1, -1, -1]]
    assert r.committed.tolist() == [[1, 2, 5, 9], [4, 3, 7, -1], [8, -1, -1, -1], [1, 3, -1, -1]]
    assert r.bonus.tolist() == [9, 7, 8, 3]
    assert r.committed_lists() == [[1, 2, 5, 9], [4, 3, 7], [8], [1, 3]]


def test_greedy_walk_is_capped_at_num_steps():
    tree = _hand_tree()
    r = verify_greedy(tree, torch.tensor([[1, 2, 0, 5, 0, 9]]), num_steps=2)
    assert r.num_accepted.tolist() == [2] and r.committed.tolist() == [[1, 2, 5]]


def test_greedy_chain():
    tree = _chain([7, 1, 2, 3])
    r = verify_greedy(tree, torch.tensor([[1, 2, 4, 5]]), num_steps=3)
    assert r.committed_lists() == [[1, 2, 4]]
    moves = accepted_kv_moves(r.accept_index, r.num_accepted, torch.tensor([50]))
    assert moves.src.numel() == 0 and moves.dst.numel() == 0


def test_greedy_chain_fast_path_equals_walk():
    """verify_greedy_chain == verify_greedy on chains, for every accept count 0..S (B rows at once)."""
    s, b = 4, 64
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3, (b, s + 1), generator=g)  # a small vocab: many partial matches
    target = torch.randint(0, 3, (b, s + 1), generator=g)
    tree = select_tree(torch.full((b, s), 0.5), tokens[:, 1:], torch.arange(-1, s - 1).expand(b, s), s + 1,
                       tokens[:, 0], torch.full((b,), 10))
    want = verify_greedy(tree, target, num_steps=s)
    got = verify_greedy_chain(tree, target, num_steps=s)
    assert set(want.num_accepted.tolist()) == set(range(s + 1))
    for name, x, y in zip(want._fields, got, want):
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_sampling_with_one_hot_targets_equals_greedy():
    tree = _hand_tree(batch=4)
    target = torch.tensor([[1, 2, 0, 5, 0, 9], [4, 0, 3, 0, 7, 0], [5, 0, 0, 0, 0, 0], [1, 3, 0, 0, 0, 0]])
    probs = torch.nn.functional.one_hot(target, 10).float()
    u = torch.rand(4, 7, generator=torch.Generator().manual_seed(0))
    greedy = verify_greedy(tree, target, 3)
    sampled = verify_sampling(tree, probs, u, 3)
    assert torch.equal(greedy.committed, sampled.committed)
    assert torch.equal(greedy.accept_index, sampled.accept_index)


def test_depth_cap_samples_from_full_target():
    # S = 2 stops at depth 2 with children unvisited: they are not excluded from the bonus
    tree = _hand_tree()
    probs = torch.full((1, 6, V), 1.0 / V)
    probs[0, 0] = torch.nn.functional.one_hot(torch.tensor(1), V).float()  # accept node 1
    probs[0, 1] = torch.nn.functional.one_hot(torch.tensor(2), V).float()  # accept node 3
    probs[0, 3] = torch.nn.functional.one_hot(torch.tensor(5), V).float()  # node 5's token, certain
    r = verify_sampling(tree, probs, torch.full((1, 7), 0.5), num_steps=2)
    assert r.committed_lists() == [[1, 2, 5]]
    # with S = 3 the same child is accepted as a draft instead, and the bonus comes from node 5
    r = verify_sampling(tree, probs, torch.full((1, 7), 0.5), num_steps=3)
    assert r.committed_lists()[0][:3] == [1, 2, 5] and r.num_accepted.tolist() == [3]


def test_zero_probability_child_never_accepted():
    tree = _hand_tree()
    probs = torch.full((1, 6, V), 1.0 / V)
    probs[0, 0] = torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0, 0.0])  # both root children (1, 4) impossible
    r = verify_sampling(tree, probs, torch.zeros(1, 7), num_steps=3)  # u = 0 exactly
    assert r.num_accepted.tolist() == [0] and r.bonus.item() in (0, 3)


# ----------------------------------------------------------------------------- KV and metrics


def test_accepted_kv_moves_compact_tree_paths():
    tree = _hand_tree(batch=2)
    target = torch.tensor([[4, 0, 3, 0, 7, 0], [1, 2, 0, 5, 0, 9]])
    r = verify_greedy(tree, target, 3)  # paths [0, 2, 4] and [0, 1, 3, 5]
    m = accepted_kv_moves(r.accept_index, r.num_accepted, torch.tensor([100, 200]))
    assert list(zip(m.request.tolist(), m.src.tolist(), m.dst.tolist())) == [
        (0, 102, 101), (0, 104, 102), (1, 203, 202), (1, 205, 203)]


def test_accept_stats():
    stats = AcceptStats()
    stats.record(torch.tensor([3, 0, 1]))
    stats.record([2])
    assert stats.verifies == 4 and stats.emitted == 10
    assert stats.mean_accept_length == 2.5
    assert accept_lengths(torch.tensor([0, 3])).tolist() == [1, 4]
    stats.reset()
    assert stats.mean_accept_length == 0.0


# ----------------------------------------------------------------------------- distribution test


def _target(prefix: tuple[int, ...]) -> torch.Tensor:
    """A fixed random 'target model': next-token distribution for each prefix."""
    seed = 1 + sum((t + 1) * 7 ** i for i, t in enumerate(prefix)) * 31 + len(prefix)
    g = torch.Generator().manual_seed(seed)
    w = -torch.log(torch.rand(V, generator=g))  # Dirichlet(1) weights
    return w / w.sum()


def _node_probs(tree: VerifyTree) -> torch.Tensor:
    tokens, parents = tree.tokens[0].tolist(), tree.parents[0].tolist()
    out = []
    for j in range(len(tokens)):
        path, a = [], j
        while parents[a] >= 0:
            path.append(tokens[a])
            a = parents[a]
        out.append(_target(tuple(reversed(path))))
    return torch.stack(out)  # [N, V]


def _emitted_prefix(result, trials, g, length):
    """First `length` emitted tokens; tokens past the verify come from the target (the next steps)."""
    committed = result.committed
    out = torch.zeros(trials, length, dtype=torch.long)
    have = result.num_accepted + 1
    for i in range(length):
        from_verify = committed[:, i] if i < committed.shape[1] else torch.zeros(trials, dtype=torch.long)
        probs = torch.stack([_target(tuple(p)) for p in out[:, :i].tolist()]) if i else None
        fresh = sample_from_probs(probs, torch.rand(trials, generator=g)) if i else None
        out[:, i] = from_verify if i == 0 else torch.where(i < have, from_verify, fresh)
    return out


def _exact_joint(length):
    joint = {}

    def rec(prefix, p):
        if len(prefix) == length:
            joint[prefix] = p
            return
        for t, q in enumerate(_target(prefix).tolist()):
            rec(prefix + (t,), p * q)

    rec((), 1.0)
    return joint


def _tv(samples, length):
    exact = _exact_joint(length)
    keys = torch.zeros(samples.shape[0], dtype=torch.long)
    for i in range(length):
        keys = keys * V + samples[:, i]
    counts = torch.bincount(keys, minlength=V ** length).double() / samples.shape[0]
    tv = 0.0
    for prefix, p in exact.items():
        key = 0
        for t in prefix:
            key = key * V + t
        tv += abs(counts[key].item() - p)
    return tv / 2


TRIALS = 20000
TV_2 = 0.03  # sampling noise for 36 cells at 20k trials is ~0.015


def _run(sampler, length, trials=TRIALS, seed=0):
    tree = _hand_tree(batch=trials)
    probs = _node_probs(tree)[None].expand(trials, -1, -1).contiguous()
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(trials, tree.tokens.shape[1] + 1, generator=g)
    result = sampler(tree, probs, u)
    return _emitted_prefix(result, trials, g, length)


def test_tree_sampling_is_lossless():
    samples = _run(lambda t, p, u: verify_sampling(t, p, u, 3), 2)
    assert _tv(samples, 2) < TV_2
    samples3 = _run(lambda t, p, u: verify_sampling(t, p, u, 3), 3, trials=60000, seed=1)
    assert _tv(samples3, 3) < 0.05  # 216 cells at 60k trials: noise ~0.03


def test_wrong_samplers_fail_the_same_threshold():
    # always accepting: every uniform 0 (a child with Q > 0 is then always accepted)
    always = _run(lambda t, p, u: verify_sampling(t, p, torch.cat([torch.zeros_like(u[:, :-1]), u[:, -1:]], 1), 3), 2)
    assert _tv(always, 2) > 2 * TV_2

    # forgetting to exclude the rejected children from the bonus distribution
    def no_exclusion(tree, probs, u):
        r = verify_sampling(tree, probs, u, 3)
        rows = torch.arange(probs.shape[0])
        last = r.accept_index[rows, r.num_accepted]
        bonus = sample_from_probs(probs[rows, last], u[:, -1])
        committed = r.committed.clone()
        committed[rows, r.num_accepted] = bonus
        return r._replace(committed=committed, bonus=bonus)

    assert _tv(_run(no_exclusion, 2), 2) > 2 * TV_2
