"""The follower loop: a tensor-parallel rank > 0 builds its runner over its shard and then runs, in
order, every plan its leader publishes until a stop plan, its leader's exit (the plan pipe closes)
or its leader's death (the parent watchdog): forwards and the other runner plans
(common/runtime/step_plan.py) on its runner, the KV transport's (common/worker/tp_kv.py) on its KV
agent, whose threads also report back. Any error is fatal: it is reported to the leader, which
breaks the group (common/worker/ranks.py), and the process exits.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from common.runtime.distributed import TPConfig, TPGroup
from common.runtime.runner import RunnerSpec
from common.runtime.step_plan import WORKER_KINDS, StopPlan, decode
from common.transport.base import TransportConfig
from common.transport.pair import connect_store

log = logging.getLogger(__name__)
PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class FollowerArgs:
    """What a follower process is started with (common/worker/ranks.py spawns it)."""

    rank: int
    tp: TPConfig
    spec: RunnerSpec
    role: str
    log_level: int
    kv: TransportConfig | None = None  # the worker's KV transport (None: no transfers, e.g. generate)


READY, ERROR = 1, 2  # follower -> leader reports: one byte of kind, then the kind's payload (here UTF-8)


def joined_key(rank: int) -> str:
    """The store key a follower sets once it reached its leader's store."""
    return f"tp/joined/{rank}"


def follower_main(args: FollowerArgs, plans: Connection, reports: Connection) -> None:
    from common.serving.log import setup_logging
    from common.worker.tp_kv import Reporter, follower_kv

    setup_logging(args.role, rank=args.rank, level=args.log_level)
    _watch_parent()
    report = Reporter(reports)
    try:
        tp_cfg = args.tp
        if tp_cfg.devices[args.rank] == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_cfg.size))
        else:
            torch.cuda.set_device(torch.device(tp_cfg.devices[args.rank]))
        store = connect_store(*tp_cfg.store, tp_cfg.timeout_s)
        store.set(joined_key(args.rank), b"1")
        tp = TPGroup(tp_cfg, args.rank, store)
        runner = args.spec.build(tp_cfg.devices[args.rank], tp)
        kv = follower_kv(args.role, args.rank, tp.size, runner, args.kv, report)
        report(READY, _device_uuid(runner.device))
        log.info("TP rank %d of %d ready on %s (%d KV pages, kv heads %s)", args.rank, tp.size, runner.device,
                 runner.kv_pool.num_pages, runner.kv_heads)
        with torch.inference_mode():
            while True:
                try:
                    data = plans.recv_bytes()
                except (EOFError, OSError):
                    log.info("leader closed the plan pipe; exiting")
                    break
                plan = decode(data)
                if isinstance(plan, StopPlan):
                    break
                if plan.kind >= WORKER_KINDS and kv is not None:
                    kv.on_plan(plan)
                else:
                    runner.follow(plan)
        if kv is not None:
            kv.close()
        runner.release_graphs()
        tp.close()
    except BaseException as e:  # noqa: BLE001 - any error ends this rank, and the group with it
        log.error("TP rank %d failed: %s", args.rank, traceback.format_exc())
        try:
            report(ERROR, f"{type(e).__name__}: {e}")
        except OSError:
            pass
        os._exit(1)


def _device_uuid(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    from common.transport.nccl import device_uuid

    return device_uuid(device)


def _watch_parent() -> None:
    """Exit when the leader process is gone (killed: its pipes may not close while a grandchild holds them)."""
    parent = mp.parent_process()

    def watch() -> None:
        while parent is None or parent.is_alive():
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
