"""EAGLE draft-tree bookkeeping and verify-tree construction (pure tensor ops, no model).

Draft phase (docs/speculative.md §4.1), for B requests with branching k and S steps:
- level 0 comes from the stored draft top-k (`topk_p`, `topk_idx`): k candidates, children of the
  root (the bonus token b, already in the draft KV prefix);
- each of the S-1 draft forwards runs the k frontier nodes; each yields its own top-k children
  (k² candidates, cumulative score = parent score x child probability) and the k best become the
  next frontier.

Candidate flat index (as SGLang): level 0 -> c; level i >= 1 -> k + (i-1)k² + p*k + c (p = parent's
frontier slot, c = child rank). Here every candidate records its parent's flat index directly
(-1 = the root) instead of SGLang's parent table.

Unlike SGLang (per-branch KV columns, an approximation when k > 1) the draft forwards attend
*exactly* to their ancestors: frontier level l is forwarded with its K/V written to scratch logical
slots L + l*k + j (level-major, j = frontier slot), and `DraftFrontier.attention_mask()` is the
[k, (l+1)k] ancestor-or-self mask over those scratch slots, i.e. the `ForwardBatch` mask block of a
sequence with q = k, prefix_len = L, seq_len = L + (l+1)k. Positions are left to the caller
(`DraftFrontier.level`): SGLang's level-l forward uses RoPE position L + l + 1.

Verify tree (docs/speculative.md §4.2): the N-1 best candidates by score, in ascending flat index (so parents
precede children), below the root. Node j writes its K/V to logical slot L + j and sits at RoPE
position L + depth(j); `VerifyTree.mask[b]` is the ancestor-or-self mask, the `ForwardBatch` mask
block of a sequence with q = N, prefix_len = L, seq_len = L + N.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from common.model.config import validate_spec_config  # noqa: F401  (re-exported: SGLang's (S, k, N) rules)


class DraftFrontier:
    """Draft-phase state of B requests: frontier, recorded candidates and the exact draft mask.

    Use: `f = DraftFrontier(topk_p, topk_idx)`; then S-1 times: forward `f.tokens` with
    `f.attention_mask()` (hidden states of the previous step's parents, see `expand`), take the
    top-k of each row's draft distribution, `f.expand(child_p, child_idx)`; finally
    `select_tree(*f.candidates(), ...)`.
    """

    def __init__(self, topk_p: torch.Tensor, topk_idx: torch.Tensor) -> None:
        # topk_p: [B, k] fp32 draft probabilities of the root's children; topk_idx: [B, k] int64
        b, k = topk_p.shape
        device = topk_p.device
        self.k = k
        self.level = 0  # frontier level; forwarded next at scratch columns [level*k, (level+1)*k)
        self.scores = _nan_to_neg_inf(topk_p.float())  # [B, k] cumulative scores of the frontier
        self.tokens = topk_idx.long()  # [B, k] frontier tokens (input ids of the next draft forward)
        self.flat = torch.arange(k, device=device).expand(b, k)  # [B, k] flat candidate index
        self._mask = torch.eye(k, dtype=torch.bool, device=device).expand(b, k, k)  # [B, k, (level+1)k]
        self._scores = [self.scores]
        self._tokens = [self.tokens]
        self._parents = [torch.full((b, k), -1, dtype=torch.long, device=device)]

    def attention_mask(self) -> torch.Tensor:  # [B, k, (level+1)*k] bool
        """Frontier node j (row) sees scratch column l*k + i iff that node is j or an ancestor of j."""
        return self._mask

    def expand(self, child_p: torch.Tensor, child_idx: torch.Tensor) -> torch.Tensor:
        """Record the k² children of the frontier and move to the next level.

        child_p / child_idx: [B, k, k] top-k draft probabilities / tokens of each frontier node
        (row = frontier slot). Returns parent_slot [B, k] int64: frontier slot (of the old frontier)
        of each new frontier node's parent; gather the draft hidden states with it.
        """
        b, k = self.scores.shape
        # child score <= parent score even after rounding: keeps the selected set ancestor-closed
        sigma = self.scores[:, :, None]
        scores = torch.minimum(sigma * child_p.float(), sigma).reshape(b, k * k)
        scores = _nan_to_neg_inf(scores)
        tokens = child_idx.long().reshape(b, k * k)
        base = k + self.level * k * k
        order = scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]  # [B, k]
        parent_slot = order // k
        self._scores.append(scores)
        self._tokens.append(tokens)
        self._parents.append(self.flat.repeat_interleave(k, dim=1))
        self.scores = scores.gather(1, order)
        self.tokens = tokens.gather(1, order)
        self.flat = base + order
        ancestors = self._mask.gather(1, parent_slot[:, :, None].expand(b, k, self._mask.shape[2]))
        eye = torch.eye(k, dtype=torch.bool, device=scores.device).expand(b, k, k)
        self._mask = torch.cat([ancestors, eye], dim=2)
        self.level += 1
        return parent_slot

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores [B, M] fp32, tokens [B, M] int64, parent flat index [B, M] int64, -1 = root)."""
        return torch.cat(self._scores, 1), torch.cat(self._tokens, 1), torch.cat(self._parents, 1)


class VerifyTree(NamedTuple):
    tokens: torch.Tensor  # [B, N] int64, node 0 = root (bonus token), then the drafts
    parents: torch.Tensor  # [B, N] int64 parent node index, -1 for the root
    depth: torch.Tensor  # [B, N] int64, root 0
    positions: torch.Tensor  # [B, N] int64 RoPE positions = L + depth
    mask: torch.Tensor  # [B, N, N] bool, mask[b, i, j] = j is i or an ancestor of i
    first_child: torch.Tensor  # [B, N] int64 lowest-index child, -1 if a leaf
    next_sibling: torch.Tensor  # [B, N] int64 next higher-index node with the same parent, -1 if none
    candidate: torch.Tensor  # [B, N] int64 flat candidate index of each node, -1 for the root


def select_tree(
    scores: torch.Tensor,  # [B, M] fp32 candidate scores
    tokens: torch.Tensor,  # [B, M] int64 candidate tokens
    parents: torch.Tensor,  # [B, M] int64 parent flat index, -1 = root
    num_draft_tokens: int,  # N, root included
    root_tokens: torch.Tensor,  # [B] int64 bonus tokens
    seq_lens: torch.Tensor,  # [B] int64 L (target KV length before the verify)
    *,
    validate: bool = False,  # host sync: check that every selected node's parent was selected
) -> VerifyTree:
    """Pick the N-1 best candidates (ties: lower flat index first) and build the verify tree."""
    b, m = scores.shape
    n = num_draft_tokens
    if not 1 <= n - 1 <= m:
        raise ValueError(f"num_draft_tokens - 1 = {n - 1} must be in [1, {m}] (number of candidates)")
    device = scores.device
    clean = _nan_to_neg_inf(scores.float())
    chosen = clean.sort(dim=-1, descending=True, stable=True).indices[:, : n - 1]
    chosen = chosen.sort(dim=-1).values  # [B, N-1] ascending flat index: parents before children
    parent_flat = parents.gather(1, chosen)
    pos = torch.searchsorted(chosen, parent_flat.clamp(min=0)).clamp(max=n - 2)
    if validate:
        found = (parent_flat < 0) | (chosen.gather(1, pos) == parent_flat)
        if not bool(found.all()):
            raise ValueError("invalid draft tree: a selected candidate's parent was not selected")
    root_col = torch.full((b, 1), -1, dtype=torch.long, device=device)
    node_parent = torch.cat([root_col, torch.where(parent_flat < 0, 0, pos + 1)], dim=1)  # [B, N]
    node_tokens = torch.cat([root_tokens.long().reshape(b, 1), tokens.gather(1, chosen)], dim=1)
    mask = ancestor_mask(node_parent)
    depth = mask.sum(dim=-1) - 1
    first_child, next_sibling = child_links(node_parent)
    return VerifyTree(
        tokens=node_tokens,
        parents=node_parent,
        depth=depth,
        positions=seq_lens.long().reshape(b, 1) + depth,
        mask=mask,
        first_child=first_child,
        next_sibling=next_sibling,
        candidate=torch.cat([root_col, chosen], dim=1),
    )


def chain_tree(
    drafts: torch.Tensor,  # [B, S] int64 the chain's draft tokens, level order
    root_tokens: torch.Tensor,  # [B] int64 bonus tokens
    seq_lens: torch.Tensor,  # [B] int64 L
) -> VerifyTree:
    """`select_tree` for k = 1 (N = S + 1): with one candidate per level every candidate is selected
    and node j's parent is node j - 1, whatever the scores, so only the tokens and positions depend on
    the step. Same tensors as select_tree(scores, drafts, parents, S + 1, root_tokens, seq_lens)."""
    b, s = drafts.shape
    n, device = s + 1, drafts.device
    idx = torch.arange(n, device=device)
    parents = (idx - 1).expand(b, n)  # root -1, then j - 1
    first_child = torch.where(idx < s, idx + 1, -1).expand(b, n)
    depth = idx.expand(b, n)
    return VerifyTree(
        tokens=torch.cat([root_tokens.long().reshape(b, 1), drafts.long()], dim=1),
        parents=parents,
        depth=depth,
        positions=seq_lens.long().reshape(b, 1) + depth,
        mask=torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(b, n, n),
        first_child=first_child,
        next_sibling=torch.full((b, n), -1, dtype=torch.long, device=device),
        candidate=parents,  # candidate j - 1 is node j
    )


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:  # [B, N, N] bool
    """Ancestor-or-self closure of a parent array [B, N] (-1 = root) by pointer jumping."""
    b, n = parents.shape
    up = parents.clamp(min=0)  # the root points at itself
    mask = torch.eye(n, dtype=torch.bool, device=parents.device).expand(b, n, n).clone()
    for _ in range(max(1, math.ceil(math.log2(n)))):
        # mask covers distances [0, 2^t); add the same window starting at up^(2^t)
        mask |= mask.gather(1, up[:, :, None].expand(b, n, n))
        up = up.gather(1, up)
    return mask


def child_links(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first_child [B, N], next_sibling [B, N]) from a parent array; -1 where none."""
    n = parents.shape[1]
    idx = torch.arange(n, device=parents.device)
    is_child = parents[:, None, :] == idx[None, :, None]  # [B, parent p, node j]
    first_child = torch.where(is_child.any(-1), is_child.int().argmax(-1), -1)
    same_parent = (parents[:, :, None] == parents[:, None, :]) & (parents[:, :, None] >= 0)
    later = same_parent & (idx[None, None, :] > idx[None, :, None])  # [B, node j, node j']
    next_sibling = torch.where(later.any(-1), later.int().argmax(-1), -1)
    return first_child, next_sibling


def _nan_to_neg_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), float("-inf"), x)
