"""Where KV leaves the prefill worker: one KVSender per decode worker, paired lazily.

Before the first transfer to a decode worker, its WorkerInfo is fetched and checked against ours
(so an incompatible pair is refused with a message naming the difference before any compute).
The sender thread then calls the decode worker's Pair RPC whenever it needs a (new) pair.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import grpc
import torch

from common.serving.grpc_server import client_channel_options
from common.transport.auth import PAIR_AUTH_KEY, PAIR_PROOF_KEY, AuthError
from common.transport.base import PairEndpoint, StatsHook, TransferError, TransportConfig
from common.transport.handshake import PairingError, check_compatible
from common.transport.sender import KVSender
from protos import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

DoneFn = Callable[[int, bool, "TransferError | None"], None]


class SenderPool:
    def __init__(self, info: worker_pb2.WorkerInfo, config: TransportConfig, device: torch.device | None,
                 on_done: DoneFn, on_stats: StatsHook | None = None, rpc_timeout: float = 10.0) -> None:
        self.info = info
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

    async def get(self, address: str) -> KVSender:
        """The sender for this decode worker; checks pairing compatibility on first use."""
        if address not in self._checked:
            from common.worker.base import pairing_info

            decode = await self.stub(address).GetInfo(worker_pb2.InfoRequest(), timeout=self.rpc_timeout)
            check_compatible(pairing_info(self.info), pairing_info(decode))  # PairingError names the field
            self._checked[address] = decode.worker_id
        with self._lock:
            sender = self._senders.get(address)
            if sender is None:
                sender = KVSender(lambda: self._pair(address), self.on_done, self.config, device=self.device,
                                  on_stats=self.on_stats,
                                  name=f"kv-sender-{address}")
                self._senders[address] = sender
            return sender

    def _pair(self, address: str) -> PairEndpoint:
        """Runs on the sender thread (blocking gRPC, bounded). With a cluster secret the call carries
        our proof and the decode worker must prove it back (common/transport/auth.py)."""
        auth = self.config.auth
        metadata, nonce = (), ""
        if auth is not None and auth.enabled:
            token, nonce = auth.request_token(self.info.worker_id)
            metadata = ((PAIR_AUTH_KEY, token),)
        with grpc.insecure_channel(address, options=client_channel_options()) as ch:
            try:
                resp, call = worker_pb2_grpc.DecodeWorkerStub(ch).Pair.with_call(
                    worker_pb2.PairRequest(prefill=self.info), timeout=self.rpc_timeout, metadata=metadata)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):
                    raise PairingError(e.details()) from None
                raise TransferError(f"Pair RPC to decode worker {address} failed: {e.code().name}: "
                                    f"{e.details()}") from None
        if nonce:
            proof = dict(call.trailing_metadata() or ()).get(PAIR_PROOF_KEY)
            try:
                auth.check_response(proof, nonce, resp.group_name)
            except AuthError as e:
                raise PairingError(f"decode worker {address}: {e}") from None
        return PairEndpoint(resp.store_host, resp.store_port, resp.group_name, resp.bulk_backend,
                            resp.ipc_payload)

    async def close(self) -> None:
        with self._lock:
            senders = list(self._senders.values())
            self._senders.clear()
        for s in senders:
            await asyncio.to_thread(s.close, 5.0)
        for ch in self._channels.values():
            await ch.close()
