"""Accepting drafts after the target verify forward (docs/speculative.md §5, §6), batched over B trees.

Both rules walk down from the root at most `num_steps` (S) levels, visiting a node's children in
sibling order (ascending node index):
- greedy (§5.1): accept the child whose token equals the target argmax at the current node;
- target-only tree sampling (§5.2, thresholds 1, lossless): with the node's own uniform u, accept
  the first child x_i with u < Q(x_1) + ... + Q(x_i); if none is accepted, the bonus is drawn from Q
  with the rejected children's tokens removed (renormalised), using the request's final uniform.
  At a leaf (nothing rejected) the bonus is drawn from Q itself. Strict `<` means a child of
  probability 0 is never accepted. If the children carry all of Q's mass but rounding rejected them
  all, the bonus is drawn from Q unrestricted (an event of probability ~1e-7).

`Q[b, j]` must be the target distribution at node j computed from that row's own history
(prompt + output + the drafts on the path to j): the caller runs `apply_processors` and
`target_probs` per row. Greedy rows inside a sampling batch have one-hot Q and behave greedily.

Results are fixed-shape [B, S+1] tensors plus `num_accepted`; entries past `num_accepted + 1` are -1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from common.sampling.sampler import sample_from_probs
from decode_worker.spec.tree import VerifyTree


class VerifyResult(NamedTuple):
    accept_index: torch.Tensor  # [B, S+1] int64 node indices of the accepted path, root first
    num_accepted: torch.Tensor  # [B] int64 a = accepted drafts (0..S)
    committed: torch.Tensor  # [B, S+1] int64 emitted tokens: the a accepted drafts, then the bonus
    bonus: torch.Tensor  # [B] int64 target token after the deepest accepted node (next root)

    def committed_lists(self) -> list[list[int]]:
        """Per request, the a+1 emitted tokens (one device-to-host copy)."""
        rows = self.committed.tolist()
        return [r[: a + 1] for r, a in zip(rows, self.num_accepted.tolist())]


def verify_greedy(
    tree: VerifyTree,
    target_ids: torch.Tensor,  # [B, N] int64 argmax of the processed target logits at each node
    num_steps: int,
) -> VerifyResult:
    parent_choice = target_ids.gather(1, tree.parents.clamp(min=0))  # target token at each node's parent
    acceptable = (tree.tokens == parent_choice) & (tree.parents >= 0)  # [B, N]
    path, cur, _ = _walk(tree, num_steps, lambda cur: acceptable)
    bonus = target_ids.gather(1, cur[:, None]).squeeze(1)
    return _result(tree, path, bonus)


def verify_greedy_chain(
    tree: VerifyTree,  # a chain (tree.chain_tree): node j's parent is j - 1
    target_ids: torch.Tensor,  # [B, N] int64 argmax of the processed target logits at each node
    num_steps: int,
) -> VerifyResult:
    """verify_greedy for a chain of N - 1 <= S drafts without the level walk: the accepted drafts are
    the longest prefix of the chain whose every token is the target's argmax at its parent."""
    n = tree.tokens.shape[1]
    if n - 1 > num_steps:
        return verify_greedy(tree, target_ids, num_steps)
    match = tree.tokens[:, 1:] == target_ids[:, :-1]  # [B, N-1] node j+1 is the target's choice at j
    num_accepted = match.long().cumprod(dim=1).sum(dim=1)  # [B]
    col = torch.arange(num_steps + 1, device=tree.tokens.device)[None, :]
    path = torch.where(col <= num_accepted[:, None], col, -1)  # [B, S+1]
    bonus = target_ids.gather(1, num_accepted[:, None]).squeeze(1)
    return _result(tree, path, bonus)


def verify_sampling(
    tree: VerifyTree,
    probs: torch.Tensor,  # [B, N, V] fp32 target distribution at each node
    uniforms: torch.Tensor,  # [B, N+1] in [0, 1): one per node, then the final one
    num_steps: int,
) -> VerifyResult:
    b, n, v = probs.shape
    # Q_parent(token of j) for every non-root node j
    flat = tree.parents.clamp(min=0) * v + tree.tokens
    q_edge = probs.reshape(b, n * v).gather(1, flat)  # [B, N]

    def acceptable(cur: torch.Tensor) -> torch.Tensor:
        children = tree.parents == cur[:, None]
        mass = torch.where(children, q_edge, 0.0).cumsum(dim=1)
        return children & (uniforms.gather(1, cur[:, None]) < mass)

    path, cur, rejected = _walk(tree, num_steps, acceptable)
    q_cur = probs[torch.arange(b, device=probs.device), cur]  # [B, V]
    excluded_children = (tree.parents == cur[:, None]) & rejected[:, None]  # [B, N]
    target = torch.where(excluded_children, tree.tokens, v)  # column v is a dump column
    excluded = torch.zeros(b, v + 1, dtype=torch.bool, device=probs.device)
    excluded.scatter_(1, target, True)
    residual = q_cur.masked_fill(excluded[:, :v], 0.0)
    has_mass = residual.sum(dim=1, keepdim=True) > 0
    bonus = sample_from_probs(torch.where(has_mass, residual, q_cur), uniforms[:, n])
    return _result(tree, path, bonus)


def _walk(tree: VerifyTree, num_steps: int, acceptable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (path [B, S+1], last node [B], stopped-by-rejection [B] bool)."""
    b = tree.tokens.shape[0]
    device = tree.tokens.device
    cur = torch.zeros(b, dtype=torch.long, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    path = torch.full((b, num_steps + 1), -1, dtype=torch.long, device=device)
    path[:, 0] = 0
    for level in range(1, num_steps + 1):
        ok = acceptable(cur) & (tree.parents == cur[:, None])
        step = ok.any(dim=1) & active
        nxt = ok.int().argmax(dim=1)  # first acceptable child in sibling order
        cur = torch.where(step, nxt, cur)
        path[:, level] = torch.where(step, nxt, -1)
        active = step
    return path, cur, ~active


def _result(tree: VerifyTree, path: torch.Tensor, bonus: torch.Tensor) -> VerifyResult:
    width = path.shape[1]
    num_accepted = (path >= 0).sum(dim=1) - 1
    drafts = tree.tokens.gather(1, path.clamp(min=0))  # [B, S+1]
    col = torch.arange(width, device=path.device)[None, :]
    shifted = torch.cat([drafts[:, 1:], drafts[:, :1]], dim=1)  # committed[d] = token of path[d+1]
    committed = torch.where(col < num_accepted[:, None], shifted, -1)
    committed = torch.where(col == num_accepted[:, None], bonus[:, None], committed)
    return VerifyResult(path, num_accepted, committed, bonus)


class KVMoves(NamedTuple):
    request: torch.Tensor  # [M] int64 batch row
    src: torch.Tensor  # [M] int64 logical slot holding an accepted node's K/V (L + node index)
    dst: torch.Tensor  # [M] int64 logical slot it must occupy (L + depth on the path)


def accepted_kv_moves(
    accept_index: torch.Tensor,  # [B, S+1] from VerifyResult
    num_accepted: torch.Tensor,  # [B]
    seq_lens: torch.Tensor,  # [B] L before the verify
) -> KVMoves:
    """Copies that compact the accepted path's K/V into slots L .. L+a (docs/speculative.md §6.2).

    Node j of the verify tree wrote logical slot L + j; the path's d-th node must end at L + d.
    Chains (k = 1) always give no moves. Every src > dst and the sources are distinct, so reading
    all sources before writing (or copying in ascending dst order) is safe. Data-dependent size:
    one device sync.
    """
    width = accept_index.shape[1]
    depth = torch.arange(width, device=accept_index.device)[None, :]
    moving = (depth <= num_accepted[:, None]) & (accept_index != depth)
    req, d = moving.nonzero(as_tuple=True)
    base = seq_lens.long()[req]
    return KVMoves(req, base + accept_index[req, d], base + d)


def accept_lengths(num_accepted: torch.Tensor) -> torch.Tensor:
    """Tokens emitted per request and verify: accepted drafts + the bonus (SGLang's accept length)."""
    return num_accepted + 1


class AcceptStats:
    """Running accept-length metric: sum(a_i + 1) / number of request-verifies (docs/speculative.md §8)."""

    def __init__(self) -> None:
        self.verifies = 0
        self.emitted = 0

    def record(self, num_accepted: torch.Tensor | list[int]) -> None:
        values = num_accepted.tolist() if isinstance(num_accepted, torch.Tensor) else list(num_accepted)
        self.verifies += len(values)
        self.emitted += sum(values) + len(values)

    @property
    def mean_accept_length(self) -> float:
        return self.emitted / self.verifies if self.verifies else 0.0

    def reset(self) -> None:
        self.verifies = 0
        self.emitted = 0
