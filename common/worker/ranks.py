"""A tensor-parallel worker's ranks: the leader starts its followers, watches them, stops them.

`start_ranks(spec, tp)` runs in the worker process, which becomes rank 0 (the leader: gRPC server,
scheduler, allocator, sampling). It hosts the group's TCPStore, spawns ranks 1..t-1
(multiprocessing spawn: fresh interpreters, each initialising its own device), builds its side of
the groups and its runner, and waits until every follower reports its runner built (every rank has
loaded only its shard; the KV pool has the same pages everywhere). From then on the leader's runner
publishes every forward to the followers (common/runtime/step_plan.py), which run it in step
(common/worker/follower.py).

Failure (docs/architecture.md §3): a watcher thread waits on the followers' process sentinels and
report pipes. A follower that exits or reports an error, or a forward that failed half-way on the
leader, breaks the group: `on_failure` callbacks run once with a reason naming the rank (the
worker marks itself NOT_SERVING and exits — a TP group with a dead rank cannot run collectives, and
there is no partial recovery). Followers exit on their own when the leader goes (their plan pipe
closes; a watchdog also polls the parent process).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from common.runtime.distributed import TPConfig, TPGroup, require_multicast_off
from common.runtime.runner import ModelRunner, RunnerSpec
from common.runtime.step_plan import Mirror, StopPlan, encode
from common.transport.base import TransportConfig
from common.transport.pair import host_store
from common.worker.follower import ERROR, READY, FollowerArgs, follower_main, joined_key

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # after the leader's own runner is built (every follower has loaded by then)
DEATH_REPORT_S = 2.0  # how long a failed step waits for the watcher to name a dead follower


class Ranks:
    """The leader's handle on its followers (built by `start_ranks`)."""

    def __init__(self, tp: TPGroup, procs: list[Any], plans: list[Connection], reports: list[Connection]) -> None:
        self.tp, self.procs, self.plans, self.reports = tp, procs, plans, reports
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[str], None]] = []
        self.failure: str | None = None  # why the group broke, once it has
        self._failed = threading.Event()
        self._stopping = False
        self._handlers: dict[int, Callable[[int, bytes], None]] = {}
        self.device_uuids: list[str] = []  # followers' GPUs, rank order (from their READY reports)
        self.mirror = Mirror(tp, plans, self.fail)
        self._woken, self._wake = mp.Pipe(duplex=False)  # ends the watcher's wait at stop()
        self._watcher = threading.Thread(target=self._watch, name="tp-watch", daemon=True)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` once when the group breaks (at once if it already has)."""
        with self._lock:
            self._callbacks.append(callback)
            reason = self.failure
        if reason is not None:
            callback(reason)

    def on_report(self, kind: int, handler: Callable[[int, bytes], None]) -> None:
        """Call handler(rank, payload) for every report of `kind` (on the watcher thread); before the
        followers can send any (at start-up)."""
        self._handlers[kind] = handler

    def fail(self, reason: str) -> str:
        """Break the group with `reason` (once: a later call returns the first reason). A step that
        failed because a follower died says so: when a follower's process has ended, the watcher's
        report of it (which names the rank and its exit code) is waited for briefly and wins."""
        if self.failure is None and any(wait([p.sentinel], 0) for p in self.procs):
            self._failed.wait(DEATH_REPORT_S)
        return self._break(reason)

    def _break(self, reason: str) -> str:
        with self._lock:
            if self.failure is not None or self._stopping:
                return self.failure or reason
            self.failure = reason
            self._failed.set()
            callbacks = list(self._callbacks)
        log.error("tensor-parallel group broken: %s", reason)
        for cb in callbacks:
            try:
                cb(reason)
            except Exception:  # every callback gets its turn
                log.exception("TP failure callback failed")
        return reason

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Every follower reported its runner built; RuntimeError naming the rank otherwise."""
        for rank, pipe in enumerate(self.reports, start=1):
            proc = self.procs[rank - 1]
            if not wait([pipe, proc.sentinel], timeout_s) or not pipe.poll():
                raise RuntimeError(f"TP rank {rank} did not come up within {timeout_s:.0f} s "
                                   f"(exit code {proc.exitcode})")
            kind, text = _parse(pipe.recv_bytes())
            if kind != READY:
                raise RuntimeError(f"TP rank {rank} failed to start: {text}")
            self.device_uuids.append(text)
        self._watcher.start()

    def _watch(self) -> None:
        waiting = {p.sentinel: r for r, p in enumerate(self.procs, start=1)}
        waiting.update({pipe: r for r, pipe in enumerate(self.reports, start=1)})
        while waiting:
            ready_list = wait([*waiting, self._woken])
            if self._stopping:
                return
            for ready in ready_list:
                rank = waiting[ready]
                if isinstance(ready, int):  # a sentinel: the process ended
                    proc = self.procs[rank - 1]
                    proc.join(1.0)  # reap it: its exit code
                    self._break(f"TP rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
                    waiting.pop(ready)
                    continue
                try:
                    data = ready.recv_bytes()
                except (EOFError, OSError):
                    waiting.pop(ready)
                    continue
                kind, payload = data[0], data[1:]
                if kind == ERROR:
                    self._break(f"TP rank {rank} failed: {payload.decode(errors='replace')}")
                elif kind in self._handlers:
                    try:
                        self._handlers[kind](rank, payload)
                    except Exception:  # a handler's bug must not end the watch
                        log.exception("TP report handler failed")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Tell the followers to exit, wait for them (bounded), end the stragglers."""
        with self._lock:
            self._stopping = True
        self._wake.send_bytes(b"")
        if self._watcher.is_alive():
            self._watcher.join()  # only one thread may reap the followers
        stop = encode(StopPlan())
        for pipe in self.plans:
            try:
                pipe.send_bytes(stop)
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout_s)
            if p.is_alive():
                log.warning("TP follower pid %d did not stop; killing it", p.pid)
                p.kill()
                p.join(2.0)
        self.tp.close()


def _wait_joined(store: Any, procs: list[Any], timeout_s: float) -> None:
    """Every follower reached the store (`joined_key`), or RuntimeError naming the one that died first
    (instead of the leader's group construction waiting out its whole timeout)."""
    deadline = time.monotonic() + timeout_s
    for rank, proc in enumerate(procs, start=1):
        while not store.check([joined_key(rank)]):
            if not proc.is_alive():
                proc.join(1.0)
                raise RuntimeError(f"TP rank {rank} (pid {proc.pid}) exited with code {proc.exitcode} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"TP rank {rank} did not reach the group's store within {timeout_s:.0f} s")
            time.sleep(0.05)


def _parse(data: bytes) -> tuple[int, str]:
    return data[0], data[1:].decode(errors="replace")


def start_ranks(spec: RunnerSpec, tp: TPConfig, role: str = "worker",
                kv: TransportConfig | None = None) -> tuple[ModelRunner, Ranks]:
    """Spawn the followers, build rank 0's groups and runner, wait for the followers' runners. `kv`:
    the worker's KV transport (the followers move their own heads, common/worker/tp_kv.py)."""
    if tp.backend == "nccl" or tp.devices[0].startswith("cuda"):
        require_multicast_off()  # before spawning: the children inherit the environment
    if tp.devices[0] == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.size))  # the ranks share the cores
    store = host_store(tp.store[0], tp.store[1], tp.timeout_s)
    tp = TPConfig(tp.size, tp.devices, tp.backend, tp.timeout_s, (tp.store[0], store.port))
    ctx = mp.get_context("spawn")
    procs, plans, reports = [], [], []
    for rank in range(1, tp.size):
        plan_r, plan_w = ctx.Pipe(duplex=False)
        rep_r, rep_w = ctx.Pipe(duplex=False)
        args = FollowerArgs(rank, tp, spec, role, logging.getLogger().getEffectiveLevel(), kv)
        proc = ctx.Process(target=follower_main, args=(args, plan_r, rep_w), name=f"{role}-tp{rank}", daemon=True)
        proc.start()
        plan_r.close()
        rep_w.close()
        procs.append(proc)
        plans.append(plan_w)
        reports.append(rep_r)
    try:
        _wait_joined(store, procs, tp.timeout_s)
        group = TPGroup(tp, 0, store)
        ranks = Ranks(group, procs, plans, reports)
        runner = spec.build(tp.devices[0], group)
        runner.mirror = ranks.mirror
        ranks.wait_ready()
    except BaseException:
        for p in procs:
            p.kill()
        raise
    log.info("TP %d: ranks 1..%d up (pids %s), %s collectives on %s, model %s", tp.size, tp.size - 1,
             [p.pid for p in procs], tp.backend, ", ".join(tp.devices), Path(spec.model_dir).name)
    return runner, ranks
