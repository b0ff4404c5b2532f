"""The TP all-reduce policy and the named groups the peer-memory all-reduce finds its ranks by (CPU)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

from common.runtime import symm_allreduce as sar
from common.runtime.distributed import named_group, unregister_group

LIMITS = sar.Limits(one_shot_max=128 * 1024, buffer_bytes=4 * 1024 * 1024)


@pytest.mark.parametrize(("nbytes", "numel", "world", "want"), [
    (8 * 1024, 4096, 8, sar.ONE_SHOT),             # a B = 1 decode all-reduce at H = 4096, bf16
    (128 * 1024, 65536, 8, sar.ONE_SHOT),          # the one-shot limit itself
    (128 * 1024 + 2, 65537, 8, sar.NCCL),          # past it, and 65537 elements do not split over 8 ranks
    (512 * 1024, 262144, 8, sar.TWO_SHOT),         # B = 64 at H = 4096
    (4 * 1024 * 1024, 2 * 1024 * 1024, 4, sar.TWO_SHOT),
    (4 * 1024 * 1024 + 2, 2 * 1024 * 1024 + 1, 4, sar.NCCL),  # larger than the buffer: NCCL's ring
    (8 * 1024, 4096, 1, sar.NCCL),                 # one rank: nothing to reduce
    (0, 0, 8, sar.NCCL),
])
def test_choose_path(nbytes: int, numel: int, world: int, want: str) -> None:
    assert sar.choose_path(nbytes, numel, world, LIMITS) == want


def test_choose_path_refuses_what_the_kernels_do_not_take() -> None:
    assert sar.choose_path(8192, 4096, 2, LIMITS, contiguous=False) == sar.NCCL
    assert sar.choose_path(8192, 4096, 2, LIMITS, dtype_ok=False) == sar.NCCL


def test_no_peer_memory_on_the_cpu() -> None:
    store = dist.HashStore()
    one = dist.ProcessGroupGloo(dist.PrefixStore("one", store), 0, 1, datetime.timedelta(seconds=5))
    group = named_group(one, "test/cpu-only", dist.PrefixStore("g", store), 0, 1, torch.device("cpu"),
                        dist.ProcessGroup.BackendType.GLOO)
    try:
        assert sar.try_create(group, "test/cpu-only", torch.device("cpu")) is None
    finally:
        unregister_group("test/cpu-only")


def test_named_group_is_found_by_name_and_reduces() -> None:
    """The wrapper the symmetric-memory ops resolve by name carries the backend's collectives."""
    store = dist.HashStore()
    backend = dist.ProcessGroupGloo(dist.PrefixStore("b", store), 0, 1, datetime.timedelta(seconds=5))
    group = named_group(backend, "test/named", dist.PrefixStore("g", store), 0, 1, torch.device("cpu"),
                        dist.ProcessGroup.BackendType.GLOO)
    try:
        assert c10d._resolve_process_group("test/named") is group
        assert group.group_name == "test/named" and group.size() == 1
        x = torch.arange(6, dtype=torch.float32)
        group.allreduce([x]).wait()
        assert torch.equal(x, torch.arange(6, dtype=torch.float32))
    finally:
        unregister_group("test/named")
    with pytest.raises(Exception):  # noqa: B017 - c10d raises its own error type for an unknown name
        c10d._resolve_process_group("test/named")
