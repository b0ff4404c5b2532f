"""KVPool: the paged K/V tensors of every layer (main layers, then the MTP layer at index L).

One buffer `kv[num_layers, 2, num_pages, page_size, kv_heads, head_dim]` holds everything, so
`pool.k[layer]` / `pool.v[layer]` are contiguous `[num_pages, page_size, kv_heads, head_dim]`
views, and a run of layers for a set of tokens can be moved with one gather or scatter.

Slots: logical slot i of a sequence with page list `pages` is physical flat slot
`pages[i // page_size] * page_size + i % page_size` (see common/forward/batch.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LayerRange = range | tuple[int, int]


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, 2, num_pages, page_size, kv_heads, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=self.device)  # [L,2,P,S,Hk,D]
        self.k = self.kv[:, 0]  # [L,P,S,Hk,D]; self.k[layer] is contiguous
        self.v = self.kv[:, 1]  # [L,P,S,Hk,D]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim * self.kv.element_size()

    def slots(self, pages: Sequence[int], token_start: int, n_tokens: int) -> torch.Tensor:
        """Physical flat slots [n_tokens] int64 of logical slots [token_start, token_start + n_tokens)."""
        if token_start < 0 or n_tokens < 0:
            raise ValueError(f"bad token range start={token_start} n={n_tokens}")
        end = token_start + n_tokens
        if end > len(pages) * self.page_size:
            raise ValueError(f"{len(pages)} pages of {self.page_size} cannot hold logical slot {end - 1}")
        logical = torch.arange(token_start, end, device=self.device)
        table = torch.as_tensor(list(pages), dtype=torch.int64, device=self.device)
        return table[logical // self.page_size] * self.page_size + logical % self.page_size

    def gather_tokens(
        self, layer_range: LayerRange, pages: Sequence[int], n_tokens: int, token_start: int = 0
    ) -> torch.Tensor:
        """K/V of logical slots [token_start, token_start + n_tokens): [n_layers,2,n_tokens,Hk,D] (a copy)."""
        lo, hi = self._layers(layer_range)
        return self._flat()[lo:hi, :, self.slots(pages, token_start, n_tokens)]

    def scatter_tokens(
        self, layer_range: LayerRange, pages: Sequence[int], token_start: int, data: torch.Tensor, head_start: int = 0
    ) -> None:
        """Write data [n_layers,2,n_tok,h,D] to logical slots [token_start, token_start + n_tok) of
        this pool's heads [head_start, head_start + h) (all of them by default)."""
        lo, hi = self._layers(layer_range)
        h = data.shape[3] if data.dim() == 5 else -1
        expect = (hi - lo, 2, data.shape[2], h, self.head_dim)
        if tuple(data.shape) != expect or not 0 <= head_start <= self.kv_heads - h:
            raise ValueError(f"scatter_tokens: data shape {tuple(data.shape)} at head {head_start} does not fit "
                             f"({hi - lo}, 2, n, <= {self.kv_heads} heads, {self.head_dim})")
        slots = self.slots(pages, token_start, data.shape[2])
        flat = self._flat()[lo:hi]
        if h == self.kv_heads:
            flat[:, :, slots] = data.to(device=self.device, dtype=self.dtype)
        else:
            flat[:, :, slots, head_start:head_start + h] = data.to(device=self.device, dtype=self.dtype)

    def copy_slots(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """kv[:, :, dst[i]] = kv[:, :, src[i]] for every layer (physical flat slots, int64 [n]).

        Sources are read before any destination is written, so overlapping sets are safe.
        """
        if src_slots.shape != dst_slots.shape:
            raise ValueError(f"copy_slots: {tuple(src_slots.shape)} sources vs {tuple(dst_slots.shape)} targets")
        flat = self._flat()
        flat[:, :, dst_slots.to(self.device)] = flat[:, :, src_slots.to(self.device)]

    def _flat(self) -> torch.Tensor:
        return self.kv.view(self.num_layers, 2, self.num_pages * self.page_size, self.kv_heads, self.head_dim)

    def _layers(self, layer_range: LayerRange) -> tuple[int, int]:
        if isinstance(layer_range, range):
            if layer_range.step != 1:
                raise ValueError("layer_range must be contiguous (step 1)")
            lo, hi = layer_range.start, layer_range.stop
        else:
            lo, hi = layer_range
        if not 0 <= lo <= hi <= self.num_layers:
            raise ValueError(f"layer range [{lo}, {hi}) outside the pool's {self.num_layers} layers")
        return lo, hi

    def __repr__(self) -> str:
        return (f"KVPool(layers={self.num_layers}, pages={self.num_pages}x{self.page_size}, "
                f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, device={self.device})")
