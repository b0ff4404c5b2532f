"""The scoped forward context: the one place per-batch metadata reaches the model.

    with forward_context(batch, kv_pool):
        hidden = model(batch.input_ids, batch.positions)

Layers that need the batch description or the KV pool (paged attention) call
`get_forward_context()`. Scopes do not nest, and the context is cleared on exit even when the
forward raises. The context is per thread, so two engines in one process cannot see each other's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.forward.batch import ForwardBatch
    from common.kvcache.pool import KVPool


@dataclass(frozen=True)
class ForwardContext:
    batch: ForwardBatch
    kv_pool: KVPool
    # called with a layer index once that layer's K/V are written (the prefill worker streams
    # finished layer groups while later layers compute)
    layer_hook: Callable[[int], None] | None = None

    def layer_done(self, layer: int) -> None:
        if self.layer_hook is not None:
            self.layer_hook(layer)


_local = threading.local()


@contextmanager
def forward_context(batch: ForwardBatch, kv_pool: KVPool,
                    layer_hook: Callable[[int], None] | None = None) -> Iterator[ForwardContext]:
    current = getattr(_local, "ctx", None)
    if current is not None:
        raise RuntimeError("forward_context does not nest: a forward is already running on this thread")
    ctx = ForwardContext(batch=batch, kv_pool=kv_pool, layer_hook=layer_hook)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = None


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("no forward context: run the model inside `with forward_context(batch, kv_pool):`")
    return ctx
