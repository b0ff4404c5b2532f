"""The follower loop: a tensor-parallel rank > 0 builds its runner over its shard and then runs, in
order, every plan its leader publishes (common/runtime/step_plan.py) until a stop plan, its leader's
exit (the plan pipe closes) or its leader's death (the parent watchdog). Any error is fatal: it is
reported to the leader, which breaks the group (common/worker/ranks.py), and the process exits.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import struct
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from common.runtime.distributed import TPConfig, TPGroup, connect_store
from common.runtime.runner import RunnerSpec
from common.runtime.step_plan import StopPlan, decode

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


READY, ERROR = 1, 2  # follower -> leader reports: one byte of kind, then UTF-8 text


def joined_key(rank: int) -> str:
    """The store key a follower sets once it reached its leader's store."""
    return f"tp/joined/{rank}"


def report(pipe: Connection, kind: int, text: str = "") -> None:
    """Send the leader a report through this follower's report pipe."""
    pipe.send_bytes(struct.pack("<B", kind) + text.encode())


def follower_main(args: FollowerArgs, plans: Connection, reports: Connection) -> None:
    from common.serving.log import setup_logging

    setup_logging(args.role, rank=args.rank, level=args.log_level)
    _watch_parent()
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
        report(reports, READY)
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
                runner.follow(plan)
        runner.release_graphs()
        tp.close()
    except BaseException as e:  # noqa: BLE001 - any error ends this rank, and the group with it
        log.error("TP rank %d failed: %s", args.rank, traceback.format_exc())
        try:
            report(reports, ERROR, f"{type(e).__name__}: {e}")
        except OSError:
            pass
        os._exit(1)


def _watch_parent() -> None:
    """Exit when the leader process is gone (killed: its pipes may not close while a grandchild holds them)."""
    parent = mp.parent_process()

    def watch() -> None:
        while parent is None or parent.is_alive():
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
