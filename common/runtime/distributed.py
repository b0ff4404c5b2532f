"""Tensor parallelism of one worker: rank info, its process groups and the collectives.

A worker of TP size t is t processes: rank 0 (the leader, the worker process itself) and followers
1..t-1 (common/worker/ranks.py starts them). Their groups are built straight from a TCPStore the
leader hosts, without torch's global default group:
- `cpu`: gloo, for control (agreeing on the KV pool size, barriers);
- `device`: the model's collectives. NCCL between GPUs; gloo on CPU, and also when several ranks
  share one GPU (NCCL refuses two ranks on one device: the tensors then go through host copies,
  which CUDA graphs cannot capture, so graphs stay off).
Every collective waits at most `timeout_s` (the groups' own timeout), so a dead peer turns into an
error, never a hang.

What the model relies on (common/model/layers.py TPComm): `all_reduce` gives every rank the same bits
(the peer-memory one-/two-shot all-reduce of common/runtime/symm_allreduce.py serves the small
messages between GPUs that can reach each other, NCCL the rest; both add the same values in the same
order on every rank; NCCL's ring and tree results are identical on all ranks; the gloo path all-gathers the partials and
every rank adds them in rank order in fp32), so routing and every replicated op agree across ranks
without further checks; `gather_to_leader` concatenates the last dim in rank order on rank 0 (NCCL:
an all-gather, which a CUDA graph can capture; gloo: a gather).
NVLink multicast stays off: every process of a GPU group runs with MULTICAST_OFF_ENV.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as _c10d

from common.runtime.symm_allreduce import NCCL, SymmAllReduce, try_create

log = logging.getLogger(__name__)

MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
BACKENDS = ("auto", "nccl", "gloo")
TP_SIZES = (1, 2, 4, 8)


def require_multicast_off() -> None:
    """Set the multicast-off variables in this process (children inherit them); refuse a caller that
    set one of them to another value."""
    for key, value in MULTICAST_OFF_ENV.items():
        if os.environ.setdefault(key, value) != value:
            raise RuntimeError(f"{key}={os.environ[key]}: tensor parallelism needs {key}={value} (NVLink multicast "
                               "must stay off on these machines)")


@dataclass(frozen=True)
class TPConfig:
    """How one worker's ranks are laid out. `devices[r]` is rank r's torch device; `backend` the
    device group's ("nccl" or "gloo", resolved); `store` the leader's TCPStore (host, port)."""

    size: int
    devices: tuple[str, ...]
    backend: str
    timeout_s: float
    store: tuple[str, int] = ("127.0.0.1", 0)
    custom_all_reduce: bool = True  # peer-memory one-/two-shot all-reduce where the GPUs allow it

    @classmethod
    def resolve(cls, size: int, device: str, backend: str = "auto", timeout_s: float = 60.0,
                base_gpu_id: int | None = None, custom_all_reduce: bool = True) -> TPConfig:
        """Rank r on GPU base + r (SGLang's --base-gpu-id; default: the index in `device`, else 0), or
        every rank on the CPU. Ranks share the last GPUs when there are fewer than `size` (gloo then).
        ValueError naming the flag for what cannot run."""
        if size not in TP_SIZES:
            raise ValueError(f"--tp-size {size}: choose one of {TP_SIZES}")
        if backend not in BACKENDS:
            raise ValueError(f"--tp-backend {backend!r}: choose one of {BACKENDS}")
        dev = torch.device(device)
        if dev.type == "cpu":
            if backend == "nccl":
                raise ValueError("--tp-backend nccl needs CUDA devices (the ranks run on the CPU)")
            return cls(size, ("cpu",) * size, "gloo", timeout_s)
        base = base_gpu_id if base_gpu_id is not None else (dev.index or 0)
        count = torch.cuda.device_count()
        if base >= count:
            raise ValueError(f"--base-gpu-id {base}: this machine has {count} GPU(s)")
        devices = tuple(f"cuda:{min(base + r, count - 1)}" for r in range(size))
        shared = len(set(devices)) < size
        if backend == "nccl" and shared:
            raise ValueError(f"--tp-backend nccl: {size} ranks from GPU {base} need {size} GPUs, {count - base} "
                             "available (NCCL refuses two ranks on one GPU; --tp-backend gloo runs them)")
        resolved = "gloo" if shared or backend == "gloo" else "nccl"
        return cls(size, devices, resolved, timeout_s, custom_all_reduce=custom_all_reduce)


class TPGroup:
    """One rank's view of its worker's TP group: rank info and the collectives (layers.TPComm)."""

    def __init__(self, cfg: TPConfig, rank: int, store: Any, name: str = "tp") -> None:
        """Build rank `rank`'s side of both groups from `store` (keys under `name`); blocks until every
        rank has joined (the store's timeout)."""
        self.cfg, self.rank, self.size = cfg, rank, cfg.size
        self.device = torch.device(cfg.devices[rank])
        self.backend = cfg.backend
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        self.cpu = _gloo(dist.PrefixStore(f"{name}/cpu", store), rank, self.size, timeout, cfg.store[0])
        self.on_host = cfg.backend == "gloo"  # device collectives through gloo (host copies off the CPU)
        if self.on_host:
            self.dev = _gloo(dist.PrefixStore(f"{name}/dev", store), rank, self.size, timeout, cfg.store[0])
        else:
            require_multicast_off()
            torch.cuda.set_device(self.device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.dev = dist.ProcessGroupNCCL(dist.PrefixStore(f"{name}/nccl", store), rank, self.size, opts)
        self.custom: SymmAllReduce | None = None
        self._group_name = ""
        if not self.on_host and cfg.custom_all_reduce and self.size > 1:
            self._group_name = f"glmserve/{name}/{cfg.store[1]}"
            group = named_group(self.dev, self._group_name, dist.PrefixStore(f"{name}/symm", store), rank, self.size,
                                torch.device("cuda"), dist.ProcessGroup.BackendType.NCCL)
            self.custom = try_create(group, self._group_name, self.device)
        self._store = store  # the groups keep their own references; this one keeps the leader's server alive

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph may capture this group's collectives (NCCL, not host copies)."""
        return not self.on_host

    # ------------------------------------------------------------------ model collectives (TPComm)
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if not self.on_host:
            if self.custom is not None and self.custom.path(x) != NCCL:
                return self.custom(x)
            self.dev.allreduce([x]).wait()
            return x
        parts = self._all_gather_host(x)
        total = parts[0].float()
        for p in parts[1:]:
            total += p.float()
        return total.to(dtype=x.dtype, device=x.device)

    def gather_to_leader(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if not self.on_host:  # an all-gather: graph-capturable where a rooted gather is not
            x = x.contiguous()
            out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            self.dev._allgather_base(out, x).wait()
            return torch.cat(out.unbind(0), dim=-1)
        host = x.detach().to("cpu").contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        outs = [[torch.empty_like(host) for _ in range(self.size)]] if self.is_leader else []
        self.dev.gather(outs, [host], opts).wait()
        return torch.cat(outs[0], dim=-1).to(x.device) if self.is_leader else x

    # ------------------------------------------------------------------ leader -> followers
    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """x from rank 0 into x on every rank (in place; returns x)."""
        if self.size == 1:
            return x
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if not self.on_host or x.device.type == "cpu":
            self.dev.broadcast([x], opts).wait()
            return x
        host = x.to("cpu")
        self.dev.broadcast([host], opts).wait()
        x.copy_(host)
        return x

    # ------------------------------------------------------------------ control (gloo, host ints)
    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (e.g. the KV pages every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.cpu.allreduce([t], opts).wait()
        return int(t.item())

    def barrier(self) -> None:
        self.cpu.allreduce([torch.zeros(1)]).wait()

    def _all_gather_host(self, x: torch.Tensor) -> list[torch.Tensor]:
        host = x.detach().to("cpu").contiguous()
        outs = [torch.empty_like(host) for _ in range(self.size)]
        self.dev.allgather([outs], [host]).wait()
        return outs

    def close(self) -> None:
        """Drop the groups (after the CUDA graphs that captured them)."""
        self.custom = None
        if self._group_name:
            unregister_group(self._group_name)
        for pg in (self.dev, self.cpu):
            try:
                pg.abort() if hasattr(pg, "abort") else None
            except Exception as e:  # noqa: BLE001 - teardown must not raise
                log.debug("TP group teardown: %s", e)


def named_group(backend: Any, name: str, store: Any, rank: int, size: int, device: torch.device,
                kind: Any) -> dist.ProcessGroup:
    """A ProcessGroup around `backend` registered under `name`, so ops that find their group by name
    (PyTorch's symmetric-memory all-reduces) can use a group built without torch's default group."""
    group = dist.ProcessGroup(store, rank, size)
    group._set_default_backend(kind)
    group._register_backend(device, kind, backend)
    group._set_group_name(name)
    _c10d._register_process_group(name, group)
    return group


def unregister_group(name: str) -> None:
    try:
        _c10d._unregister_process_group(name)
    except Exception as e:  # noqa: BLE001 - teardown must not raise
        log.debug("unregister %s: %s", name, e)


def _gloo(store: Any, rank: int, size: int, timeout: datetime.timedelta, host: str) -> Any:
    """A gloo group whose sockets listen on `host` (the store's address), not the host name's interface."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, size, opts)
