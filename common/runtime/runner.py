"""ModelRunner: weights + KV pool + page allocator, and one forward per ForwardBatch.

No scheduling here: callers build the ForwardBatch (pages from `allocator`) and read back the
logits of the batch's `logit_rows` and the hidden states of every token (the MTP draft's input).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from common.batch import ForwardBatch
from common.config import ModelConfig
from common.context import forward_context
from common.kvcache.allocator import PageAllocator
from common.kvcache.pool import KVPool
from common.model import load_model


class ModelRunner:
    def __init__(
        self,
        model_dir: str | Path,
        device: torch.device | str,
        dtype: torch.dtype,
        page_size: int,
        num_pages: int,
        with_mtp: bool = False,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # compare equal to tensors' devices
        self.dtype = dtype
        self.page_size = page_size
        self.config = ModelConfig.from_hf(model_dir)
        self.model = load_model(model_dir, self.device, dtype, with_mtp)
        self.with_mtp = with_mtp
        # pool layer num_hidden_layers is the MTP layer's own KV
        num_layers = self.config.num_hidden_layers + (1 if with_mtp else 0)
        self.kv_pool = KVPool(num_layers, num_pages, page_size, self.config.num_key_value_heads,
                              self.config.head_dim, dtype, self.device)
        self.allocator = PageAllocator(num_pages)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch,
                layer_hook: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Target forward: (logits [R,V] fp32 of batch.logit_rows, hidden [T,H] post final norm).

        `layer_hook(i)` runs after layer i wrote its K/V (used to stream KV by layer group)."""
        self._check(batch)
        with forward_context(batch, self.kv_pool, layer_hook):
            hidden = self.model(batch.input_ids, batch.positions)  # [T,H]
        return self.model.compute_logits(hidden[batch.logit_rows]), hidden

    @torch.inference_mode()
    def draft_forward(self, batch: ForwardBatch, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP draft forward on (next tokens, hidden_in [T,H]): (logits [R,V] fp32, hidden_out [T,H])."""
        if self.model.mtp is None:
            raise RuntimeError("draft_forward needs a runner built with with_mtp=True")
        self._check(batch)
        if hidden_in.shape != (batch.num_tokens, self.config.hidden_size):
            raise ValueError(f"hidden_in shape {tuple(hidden_in.shape)} != ({batch.num_tokens}, "
                             f"{self.config.hidden_size})")
        with forward_context(batch, self.kv_pool):
            hidden = self.model.mtp(batch.input_ids, batch.positions, hidden_in)  # [T,H]
        return self.model.compute_logits(hidden[batch.logit_rows]), hidden

    def _check(self, batch: ForwardBatch) -> None:
        if batch.page_size != self.page_size:
            raise ValueError(f"batch page_size {batch.page_size} != runner page_size {self.page_size}")
        if batch.input_ids.device != self.device:
            raise ValueError(f"batch is on {batch.input_ids.device}, runner on {self.device}")
