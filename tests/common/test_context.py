from __future__ import annotations

import threading

import pytest
import torch

from common.forward.batch import ForwardBatch, SeqSpec
from common.forward.context import forward_context, get_forward_context
from common.kvcache.pool import KVPool


def _batch() -> ForwardBatch:
    return ForwardBatch.build([SeqSpec([1, 2], [0, 1], 2, [1])], page_size=4)


def _pool() -> KVPool:
    return KVPool(1, 2, 4, 1, 4, torch.float32, "cpu")


def test_scoped_and_cleared() -> None:
    batch, pool = _batch(), _pool()
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()
    with forward_context(batch, pool) as ctx:
        assert get_forward_context() is ctx and ctx.batch is batch and ctx.kv_pool is pool
    with pytest.raises(RuntimeError):
        get_forward_context()


def test_no_nesting_and_cleared_after_exception() -> None:
    batch, pool = _batch(), _pool()
    with pytest.raises(ZeroDivisionError), forward_context(batch, pool):
        with pytest.raises(RuntimeError, match="nest"), forward_context(batch, pool):
            pass
        raise ZeroDivisionError
    with forward_context(batch, pool):  # usable again: the failed scope cleaned up
        assert get_forward_context().batch is batch


def test_per_thread() -> None:
    seen: list[bool] = []
    with forward_context(_batch(), _pool()):
        t = threading.Thread(target=lambda: seen.append(_has_context()))
        t.start()
        t.join()
    assert seen == [False]


def _has_context() -> bool:
    try:
        get_forward_context()
    except RuntimeError:
        return False
    return True
