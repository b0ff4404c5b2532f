"""Decode worker process: runner + engine + KV acceptor + gRPC server, in start-up order.

Readiness stays NOT_SERVING until the weights, the KV pool and the engine thread are up, turns
NOT_SERVING again while draining on SIGTERM, and also when the engine stalls with work pending.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import time

from common.kvcache.prefix_index import PrefixCache
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.cache_events import CacheEvents
from common.serving.grpc_server import make_server, serve_until_signal
from common.serving.launch_flags import HelpFormatter, accept_foreign_flags
from common.transport.base import PairEndpoint
from common.transport.handshake import check_compatible, choose_bulk_backend
from common.transport.receiver import PairAcceptor
from common.worker.args import WorkerConfig, add_worker_args, worker_main
from common.worker.base import (
    build_grammar_backend,
    build_runner,
    exit_when_broken,
    load_proto,
    open_worker_server,
    pairing_info,
    transport_config,
    worker_info,
)
from common.worker.tp_kv import PAIRED, PairPlan, read_paired
from decode_worker.commit import StopRules
from decode_worker.kv_receiver import PageSink
from decode_worker.scheduler import DecodeReq, Scheduler
from decode_worker.servicer import DecodeServicer
from decode_worker.spec.eagle import EagleStepper
from decode_worker.steps import PlainStepper
from decode_worker.worker import DecodeEngine
from protos import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = "glmserve.worker.v1.DecodeWorker"
STALL_LIMIT_S = 30.0
# an uncached prompt suffix this short is computed on the decode worker: an extend of a page or two
# costs about one decode step of the batch (both read every weight once), far less than a prefill
# round trip and a KV transfer
LOCAL_PREFILL_TOKENS = 32


class DecodeWorkerApp:
    def __init__(self, cfg: WorkerConfig, max_running: int, cuda_graph_bs: int = 0, overlap: bool = True,
                 prefix_cache: bool = True, local_prefill_tokens: int = LOCAL_PREFILL_TOKENS) -> None:
        """cuda_graph_bs > 0: capture the plain decode step's CUDA graphs up to that batch size.
        overlap: launch each plain decode step before committing the previous one (CUDA only: on CPU
        the launched step runs synchronously, so overlapping would only delay every token).
        prefix_cache: keep finished requests' prompt and output pages for reuse; local_prefill_tokens:
        compute an uncached prompt suffix up to this long here (0: never; needs the prefix cache)."""
        self.cfg = cfg
        self.runner, self.ranks = build_runner(cfg)
        self.config = self.runner.config
        self._info = info = worker_info(cfg, self.runner, self.ranks)
        # the same key chain as the prefill worker's, so both index the same pages under the same keys
        namespace = f"{info.model_fingerprint}/{info.dtype}/{info.page_size}/{info.num_layers}"
        self.cache = PrefixCache(self.runner.allocator, cfg.page_size, enabled=prefix_cache,
                                 check_successor=cfg.spec.enabled, namespace=namespace)
        self.cache_events = CacheEvents(cfg.page_size, namespace) if prefix_cache else None  # WatchCache
        if self.cache_events is not None:
            self.cache.subscribe(self.cache_events.listener)
        ids = SpecialIds.from_model_dir(cfg.model_path)
        self.grammar = build_grammar_backend(cfg, self.config.vocab_size)
        self.think_end_id = ids.think_end  # the grammar's gate under reasoning_first
        sampler = TokenSampler(ids)
        rules = StopRules(ids.eos)
        spec = cfg.spec
        if spec.enabled:
            step_slots = spec.step_slots
            stepper = EagleStepper(self.runner, sampler, rules, spec)
        else:
            step_slots, stepper = 1, PlainStepper(self.runner, sampler, rules)
        if cuda_graph_bs > 0:  # plain decode graphs, or EAGLE's verify + draft-step graphs
            self._capture_graphs(cuda_graph_bs)
        sched = Scheduler(self.runner.allocator, cfg.page_size, max_running, cfg.max_queued_requests, step_slots,
                          self.cache, local_prefill_tokens if prefix_cache else 0)
        overlap = overlap and not spec.enabled and self.runner.device.type == "cuda"
        self.engine = DecodeEngine(sched, stepper, rules, overlap=overlap)
        self.sink = PageSink(self.runner.kv_pool, self.engine, cfg.transfer_timeout, self.ranks,
                             self.config.num_key_value_heads)
        self.engine.reservations.sink = self.sink
        device = self.runner.device if self.runner.device.type == "cuda" else None
        self.acceptor = PairAcceptor(self.sink.table, transport_config(cfg), advertise_host=cfg.advertise_host,
                                     bind_host=cfg.host,
                                     device=device)
        self._follower_pairs: dict[str, concurrent.futures.Future[tuple[bytes, str]]] = {}  # pair name -> reply
        if self.ranks is not None:
            self.ranks.on_report(PAIRED, self._follower_paired)
        self.streams: set[DecodeReq] = set()  # Generate calls in progress (event loop only)
        self.draining = False

    def _capture_graphs(self, max_bs: int) -> None:
        from common.runtime.cuda_graphs import Forward

        if not self.runner.graphs_supported:
            log.info("CUDA graphs off: device %s has no graph-safe attention or TP collectives", self.runner.device)
            return
        start = time.monotonic()
        spec = self.cfg.spec
        if spec.enabled:  # EagleStepper never runs a plain decode step; its draft extend stays eager
            self.runner.capture_spec_graphs(max_bs, spec.num_steps, spec.eagle_topk, spec.num_draft_tokens)
            kind, what = Forward.VERIFY, "EAGLE verify/draft/extend"
        else:
            self.runner.capture_decode_graphs(max_bs)
            kind, what = Forward.DECODE, "decode"
        sizes = self.runner.graphs[kind].batch_sizes
        log.info("captured %s CUDA graphs for batch sizes %s in %.1f s", what, sizes, time.monotonic() - start)

    def info(self) -> worker_pb2.WorkerInfo:
        return self._info

    def load(self) -> worker_pb2.WorkerLoad:
        return load_proto(self.engine.snapshot.load, self.draining)

    def streaming(self, request_id: str) -> bool:
        """Whether a Generate call for this request is in progress here."""
        return any(req.request_id == request_id for req in self.streams)

    async def pair(self, prefill: worker_pb2.WorkerInfo, src_rank: int = 0,
                   dst_rank: int = 0) -> worker_pb2.PairResponse:
        """One stream's pair: prefill rank `src_rank` to this worker's rank `dst_rank` (a follower builds
        its own receiver, told through its plan pipe)."""
        check_compatible(pairing_info(prefill), pairing_info(self._info))
        if not 0 <= dst_rank < self.cfg.tp_size or not 0 <= src_rank < max(1, prefill.tp_size):
            raise ValueError(f"pair from prefill rank {src_rank} of {prefill.tp_size} to decode rank {dst_rank} "
                             f"of {self.cfg.tp_size}: no such rank")
        backend = choose_bulk_backend(prefill.kv_backend, _rank_uuid(prefill, src_rank), self._info.kv_backend,
                                      _rank_uuid(self._info, dst_rank))
        peer = prefill.worker_id if prefill.tp_size <= 1 else f"{prefill.worker_id}/r{src_rank}"
        if dst_rank == 0:
            ep = await asyncio.to_thread(self.acceptor.accept, peer, backend)
            payload = ep.ipc_payload
        else:
            name, payload = await self._follower_pair(dst_rank, peer, backend)
            ep = PairEndpoint(self.acceptor.advertise_host, self.acceptor.port, name, backend, payload)
        log.info("paired prefill %s rank %d with rank %d over %s (%s)", prefill.worker_id, src_rank, dst_rank,
                 backend, ep.group_name)
        return worker_pb2.PairResponse(store_host=ep.store_host, store_port=ep.store_port,
                                       group_name=ep.group_name, bulk_backend=ep.bulk_backend, ipc_payload=payload)

    async def _follower_pair(self, rank: int, peer: str, backend: str) -> tuple[str, bytes]:
        """Follower `rank` builds the receiver of a new pair with `peer`: (the pair's name, its IPC ring)."""
        name = self.acceptor.new_name(peer)
        reply: concurrent.futures.Future[tuple[bytes, str]] = concurrent.futures.Future()
        self._follower_pairs[name] = reply
        try:
            self.ranks.mirror.publish_to(rank, PairPlan(peer, name, backend, self.acceptor.advertise_host,
                                                        self.acceptor.port))
            payload, error = await asyncio.wait_for(asyncio.wrap_future(reply), self.acceptor.config.pair_timeout_s)
        finally:
            self._follower_pairs.pop(name, None)
        if error:
            raise RuntimeError(f"decode TP rank {rank} could not build pair {name}: {error}")
        return name, payload

    def _follower_paired(self, rank: int, data: bytes) -> None:  # the TP watcher thread
        name, payload, error = read_paired(data)
        reply = self._follower_pairs.get(name)
        if reply is not None and not reply.done():
            reply.set_result((payload, error))

    async def drain(self, grace: float) -> None:
        """Finish in-flight requests (bounded by `grace`), then stop the engine and the transport."""
        self.draining = True
        if self.cache_events is not None:  # end the WatchCache streams: the server's stop waits for open calls
            self.cache_events.close()
        deadline = time.monotonic() + grace
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in {req.request_id for req in self.streams}:
            self.engine.abort(rid, "UNAVAILABLE", "decode worker shut down before the request finished")
        await asyncio.sleep(0.1)
        self.engine.stop()
        self.runner.release_graphs()  # graphs go before the NCCL communicators
        self.acceptor.close()
        if self.ranks is not None:
            self.ranks.stop()

    def abort_all(self, message: str) -> None:
        """Fail every Generate call in progress with UNAVAILABLE (event loop)."""
        for rid in {req.request_id for req in self.streams}:
            self.engine.abort(rid, "UNAVAILABLE", message)


async def serve(cfg: WorkerConfig, max_running: int, grace: float, cuda_graph_bs: int = 0,
                overlap: bool = True, prefix_cache: bool = True, local_prefill_tokens: int = LOCAL_PREFILL_TOKENS) -> None:
    app = DecodeWorkerApp(cfg, max_running, cuda_graph_bs, overlap, prefix_cache, local_prefill_tokens)
    server = make_server()
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(app), server)
    health, bound = await open_worker_server(server, SERVICE, cfg, app.engine)
    exit_when_broken(app.ranks, health, app.abort_all)
    log.info("decode worker %s serving on %s:%d (%d KV pages of %d tokens, spec %s, overlap schedule %s, "
             "prefix cache %s, local prefill up to %d tokens)",
             cfg.worker_id, cfg.host, bound, app.runner.allocator.num_total, cfg.page_size, cfg.spec,
             "on" if app.engine.overlap else "off", "on" if prefix_cache else "off",
             local_prefill_tokens if prefix_cache else 0)

    async def watch_stall() -> None:
        stalled = False
        while True:
            await asyncio.sleep(1.0)
            now = app.engine.stalled(STALL_LIMIT_S)
            if now != stalled and not app.draining:
                stalled = now
                log.error("decode engine stalled with work pending") if now else log.info("engine recovered")
                await health.set_ready(not now)

    watcher = asyncio.create_task(watch_stall())
    try:
        await serve_until_signal(server, health, on_drain=lambda: app.drain(grace), grace=grace)
    finally:
        watcher.cancel()


def _rank_uuid(info: worker_pb2.WorkerInfo, rank: int) -> str:
    """The GPU of TP rank `rank` of a worker ("" on CPU)."""
    return info.device_uuids[rank] if rank < len(info.device_uuids) else info.device_uuid


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmserve decode", formatter_class=HelpFormatter, usage="%(prog)s [options]",
        description="Decode worker: reserves KV pages, receives the prefilled KV, and runs continuous batching "
                    "with EAGLE speculative decoding, sampling and the logit processors.")
    add_worker_args(p, default_port=30002)
    p.add_argument("--max-running-requests", type=int, default=64, help="requests decoded together at most")
    p.add_argument("--cuda-graph-max-bs", type=int, default=64,
                   help="capture CUDA graphs of the decode step (with EAGLE: verify and draft steps) up to this "
                        "batch size "
                        "(capped by --max-running-requests; CUDA only)")
    p.add_argument("--disable-cuda-graph", action="store_true", help="run every decode step eagerly")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="commit each plain decode step's tokens before launching the next (by default, on "
                        "CUDA, the next step is launched first so host work overlaps the forward)")
    p.add_argument("--disable-radix-cache", action="store_true",
                   help="turn the decode-side prefix cache off: no prompt or output page is kept for a later "
                        "request, every prompt's KV comes from the prefill worker (SGLang's flag name)")
    p.add_argument("--decode-local-prefill-tokens", type=int, default=LOCAL_PREFILL_TOKENS,
                   help="when this worker holds a prompt's prefix and at most this many prompt tokens are "
                        "uncached, compute them here instead of receiving them from the prefill worker "
                        "(0: never)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish in-flight requests")
    accept_foreign_flags(p, "decode")
    return p


def graph_batch_size(ns: argparse.Namespace) -> int:
    """Largest decode batch to capture (0: no graphs)."""
    return 0 if ns.disable_cuda_graph else max(0, min(ns.cuda_graph_max_bs, ns.max_running_requests))


def main(argv: list[str]) -> int:
    return worker_main(build_arg_parser(), "decode", argv,
                       lambda cfg, ns: serve(cfg, ns.max_running_requests, ns.shutdown_grace,
                                             graph_batch_size(ns), not ns.disable_overlap_schedule,
                                             not ns.disable_radix_cache, ns.decode_local_prefill_tokens),
                       _check_args)


def _check_args(ns: argparse.Namespace) -> str | None:
    if ns.max_running_requests < 1:
        return "--max-running-requests must be >= 1"
    if ns.decode_local_prefill_tokens < 0:
        return "--decode-local-prefill-tokens must be >= 0"
    return None
