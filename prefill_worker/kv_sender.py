"""Where KV leaves the prefill worker: one KVSender per decode worker, paired lazily.

Before the first transfer to a decode worker, its WorkerInfo is fetched and checked against ours
(so an incompatible pair is refused with a message naming the difference before any compute).
The sender thread then calls the decode worker's Pair RPC whenever it needs a (new) pair.

When either worker runs tensor parallelism the decode worker gets a RankStreams instead: one
KVSender per stream rank 0 feeds (handshake.transfer_plan), each given its heads of every chunk;
the followers send theirs (common/worker/tp_kv.py, told by `fanout`) and report back, and a transfer
is done when every stream of every rank is.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
import torch

from common.serving.grpc_server import client_channel_options
from common.transport.base import KVPoll, PairEndpoint, StatsHook, TransferError, TransportConfig
from common.transport.handshake import check_compatible, transfer_plan
from common.transport.sender import KVSender
from common.worker.ranks import Ranks
from common.worker.tp_kv import KV_SENT, KvAbortPlan, KvSendPlan, pair_rpc, read_sent, stream_senders
from protos import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

DoneFn = Callable[[int, bool, "TransferError | None"], None]


class SenderPool:
    def __init__(self, info: worker_pb2.WorkerInfo, config: TransportConfig, device: torch.device | None,
                 on_done: DoneFn, on_stats: StatsHook | None = None, rpc_timeout: float = 10.0,
                 ranks: Ranks | None = None) -> None:
        """ranks: this worker's TP followers (None: one device)."""
        self.info = info
        self.ranks = ranks
        self._by_tid: dict[int, RankStreams] = {}  # transfers in flight on a RankStreams
        if ranks is not None:
            ranks.on_report(KV_SENT, self._follower_sent)
        self.config = config
        self.device = device
        self.on_done = on_done
        self.on_stats = on_stats
        self.rpc_timeout = rpc_timeout
        self._lock = threading.Lock()
        self._senders: dict[str, KVSender] = {}
        self._checked: dict[str, str] = {}  # address -> decode worker id that passed the pairing check
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> worker_pb2_grpc.DecodeWorkerStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(address, options=client_channel_options())
        return worker_pb2_grpc.DecodeWorkerStub(ch)

    async def get(self, address: str) -> KVSender | RankStreams:
        """The sender for this decode worker; checks pairing compatibility on first use."""
        if address not in self._checked:
            from common.worker.base import pairing_info

            decode = await self.stub(address).GetInfo(worker_pb2.InfoRequest(), timeout=self.rpc_timeout)
            check_compatible(pairing_info(self.info), pairing_info(decode))  # PairingError names the field
            self._checked[address] = decode
        with self._lock:
            sender = self._senders.get(address)
            if sender is None:
                decode_tp = max(1, self._checked[address].tp_size)
                if self.info.tp_size == 1 and decode_tp == 1:
                    sender = KVSender(lambda: self._pair(address), self.on_done, self.config, device=self.device,
                                      on_stats=self.on_stats, name=f"kv-sender-{address}")
                else:
                    sender = RankStreams(self, address, decode_tp)
                self._senders[address] = sender
            return sender

    def _pair(self, address: str) -> PairEndpoint:
        """Runs on the sender thread (blocking gRPC, bounded)."""
        return pair_rpc(address, self.info, 0, 0, self.rpc_timeout, self.config.auth)

    def fanout(self, job: Any, seq: int, layers: tuple[int, int], tokens: tuple[int, int], is_last: bool) -> None:
        """The followers' part of a chunk rank 0 just queued (the engine thread calls it)."""
        streams = job.sender
        if self.ranks is not None and isinstance(streams, RankStreams) and streams.followers:
            self.ranks.mirror.publish(KvSendPlan(streams.address, streams.decode_tp, job.transfer_id, seq, layers,
                                                 tokens, tuple(job.pages), is_last))

    def _follower_sent(self, rank: int, payload: bytes) -> None:
        tid, error = read_sent(payload)
        streams = self._by_tid.get(tid)
        if streams is not None:
            streams.part_done(tid, error)

    async def close(self) -> None:
        with self._lock:
            senders = list(self._senders.values())
            self._senders.clear()
        for s in senders:
            await asyncio.to_thread(s.close, 5.0)
        for ch in self._channels.values():
            await ch.close()


class RankStreams:
    """Rank 0's side of one decode worker when either worker runs TP: a KVSender per stream rank 0
    feeds, each given its heads of every chunk (the aux record only to decode rank 0), and one
    completion per transfer over every stream of every prefill rank (the followers report theirs).
    The same surface as a KVSender (submit, abort, poll, close)."""

    def __init__(self, pool: SenderPool, address: str, decode_tp: int) -> None:
        self.pool, self.address, self.decode_tp = pool, address, decode_tp
        tp = max(1, pool.info.tp_size)
        plan = transfer_plan(pool.info.kv_heads, tp, decode_tp)
        self.own = [s for s in plan if s.src == 0]
        self.followers = sorted({s.src for s in plan if s.src != 0})
        self.senders = stream_senders(address, self.own, 0, tp, lambda: pool.info, self._stream_done, pool.config,
                                      pool.device, on_stats=pool.on_stats)
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}  # transfer -> streams (own and followers') not done

    def submit(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
               kv_tensor: torch.Tensor | None, is_last: bool, aux: bytes | None = None, ready_event: Any = None) -> None:
        if seq == 0:
            with self._lock:
                self._pending[transfer_id] = len(self.own) + len(self.followers)
                self.pool._by_tid[transfer_id] = self
        for s in self.own:  # rank 0 holds heads from 0
            part = None if kv_tensor is None else kv_tensor[:, :, :, s.head_lo:s.head_hi]
            self.senders[s.dst].submit(transfer_id, seq, layers, tokens, part, is_last, aux if s.dst == 0 else None,
                                       ready_event)

    def _stream_done(self, transfer_id: int, ok: bool, error: TransferError | None) -> None:
        self.part_done(transfer_id, None if ok else str(error or "KV stream failed"))

    def part_done(self, transfer_id: int, error: str | None) -> None:
        """One stream (rank 0's) or one follower (all its streams) finished the transfer."""
        with self._lock:
            left = self._pending.get(transfer_id)
            if left is None:
                return
            if error is None and left > 1:
                self._pending[transfer_id] = left - 1
                return
            del self._pending[transfer_id]
            self.pool._by_tid.pop(transfer_id, None)
        if error is not None:
            self._abort_streams(transfer_id, error)
        self.pool.on_done(transfer_id, error is None, None if error is None else TransferError(error))

    def abort(self, transfer_id: int, reason: str = "aborted by prefill") -> bool:
        with self._lock:
            known = transfer_id in self._pending
        if known:
            self.part_done(transfer_id, reason)
        return known

    def _abort_streams(self, transfer_id: int, reason: str) -> None:
        for sender in self.senders.values():
            sender.abort(transfer_id, reason)
        if self.followers and self.pool.ranks is not None:
            self.pool.ranks.mirror.publish(KvAbortPlan(self.address, transfer_id, reason))

    def poll(self, transfer_id: int) -> KVPoll | None:
        states = [s.poll(transfer_id) for s in self.senders.values()]
        return min((s for s in states if s is not None), default=None)

    @property
    def paired(self) -> bool:
        return any(s.paired for s in self.senders.values())

    def close(self, timeout_s: float | None = None) -> None:
        for sender in self.senders.values():
            sender.close(timeout_s)
