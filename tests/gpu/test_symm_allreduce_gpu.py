"""The peer-memory all-reduce's plumbing on one GPU: a NCCL group built without torch's default group,
registered by name, a symmetric buffer, PyTorch's one-shot kernel, inside a CUDA graph. With one rank
the sum is the input itself. The two-shot kernel exists only for two ranks or more (PyTorch refuses
one: "Not implemented for world_size=1"; `choose_path` never picks it there), so it and real sums are
the multi-GPU test's (test_allreduce_multi_gpu.py)."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from common.runtime import symm_allreduce as sar
from common.runtime.distributed import named_group, unregister_group

pytestmark = pytest.mark.gpu

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)


def test_one_rank_symmetric_all_reduce_in_a_graph() -> None:
    store = dist.HashStore()
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = datetime.timedelta(seconds=30)
    torch.cuda.set_device(0)
    nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), 0, 1, opts)
    name = "test/symm-one-rank"
    group = named_group(nccl, name, dist.PrefixStore("g", store), 0, 1, torch.device("cuda"),
                        dist.ProcessGroup.BackendType.NCCL)
    try:
        ar = sar.SymmAllReduce(group, name, torch.device("cuda:0"))
        x = torch.randn(4, 4096, device="cuda").bfloat16()
        assert torch.equal(ar.reduce(x, sar.ONE_SHOT), x)
        assert sar.choose_path(x.numel() * 2, x.numel(), 1, ar.limits) == sar.NCCL  # one rank: never a kernel
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ar.reduce(x, sar.ONE_SHOT)  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = ar.reduce(x, sar.ONE_SHOT)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, x)
    finally:
        unregister_group(name)
        nccl.abort()
