"""Prefill worker process: runner + engine + KV senders + gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from common.kvcache.prefix_index import PrefixCache
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving import metrics
from common.serving.cache_events import CacheEvents
from common.serving.grpc_server import make_server, serve_until_signal
from common.serving.launch_flags import HelpFormatter, accept_foreign_flags
from common.transport.base import TransferError, TransferStats
from common.worker.args import WorkerConfig, add_worker_args, worker_main
from common.worker.base import (
    build_grammar_backend,
    build_runner,
    exit_when_broken,
    load_proto,
    open_worker_server,
    transport_config,
    worker_info,
)
from common.worker.tp_kv import InfoPlan
from prefill_worker.kv_sender import SenderPool
from prefill_worker.scheduler import PrefillJob, PrefillScheduler
from prefill_worker.servicer import PrefillServicer
from prefill_worker.worker import PrefillEngine
from protos import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = "glmserve.worker.v1.PrefillWorker"


class PrefillWorkerApp:
    def __init__(self, cfg: WorkerConfig, chunk_tokens: int, layer_group: int, prefix_cache: bool = True) -> None:
        self.cfg = cfg
        self.runner, self.ranks = build_runner(cfg)
        self.config = self.runner.config
        self._info = worker_info(cfg, self.runner, self.ranks)
        info = self._info  # the KV of a page depends on the model and the KV layout besides its tokens
        namespace = f"{info.model_fingerprint}/{info.dtype}/{info.page_size}/{info.num_layers}"
        cache = PrefixCache(self.runner.allocator, cfg.page_size, enabled=prefix_cache, check_successor=cfg.spec.enabled,
                            namespace=namespace)
        self.cache_events = CacheEvents(cfg.page_size, namespace) if prefix_cache else None  # WatchCache
        if self.cache_events is not None:
            cache.subscribe(self.cache_events.listener)
        sched = PrefillScheduler(self.runner.allocator, cfg.page_size, chunk_tokens, cfg.max_queued_requests, cache)
        device = self.runner.device if self.runner.device.type == "cuda" else None
        self.senders = SenderPool(self._info, transport_config(cfg), device, self._transfer_done,
                                  on_stats=self._transfer_stats, ranks=self.ranks)
        ids = SpecialIds.from_model_dir(cfg.model_path)
        self.grammar = build_grammar_backend(cfg, self.config.vocab_size)
        self.think_end_id = ids.think_end  # the grammar's gate under reasoning_first
        self.engine = PrefillEngine(self.runner, sched, TokenSampler(ids),
                                    cfg.spec, layer_group, self.senders.fanout if self.ranks is not None else None)
        if self.ranks is not None:  # the followers pair with this worker's info
            self.ranks.mirror.publish(InfoPlan(self._info.SerializeToString()))
        self.jobs: dict[int, PrefillJob] = {}  # by transfer id
        self.draining = False

    def track(self, job: PrefillJob) -> None:
        self.jobs[job.transfer_id] = job

    def untrack(self, job: PrefillJob) -> None:
        if self.jobs.get(job.transfer_id) is job:
            del self.jobs[job.transfer_id]

    def cancel(self, job: PrefillJob, reason: str) -> None:
        self.engine.abort(job.request_id, reason, only=job)
        job.sender.abort(job.transfer_id, reason)

    def _transfer_stats(self, stats: TransferStats) -> None:
        """Sender thread, just before _transfer_done: the transfer's own first-to-last-chunk time."""
        job = self.jobs.get(stats.transfer_id)
        if job is not None:
            job.transfer_seconds = stats.seconds
        if stats.ok:
            metrics.kv_transfer_seconds().observe(stats.seconds)

    def _transfer_done(self, transfer_id: int, ok: bool, error: TransferError | None) -> None:
        job = self.jobs.get(transfer_id)
        if job is not None:
            if ok:
                metrics.kv_transfer_bytes_total().inc(job.kv_bytes)
            self.engine.transfer_done(job, None if ok else (error or TransferError("KV transfer failed")))

    def info(self) -> worker_pb2.WorkerInfo:
        return self._info

    def load(self) -> worker_pb2.WorkerLoad:
        return load_proto(self.engine.snapshot.load, self.draining)

    async def drain(self, grace: float) -> None:
        self.draining = True
        if self.cache_events is not None:  # end the WatchCache streams: the server's stop waits for open calls
            self.cache_events.close()
        deadline = time.monotonic() + grace
        while self.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.engine.stop()
        await self.senders.close()
        if self.ranks is not None:
            self.ranks.stop()

    def abort_all(self, message: str) -> None:
        """Fail every Prefill call in progress (event loop)."""
        for job in list(self.jobs.values()):
            self.cancel(job, message)


async def serve(cfg: WorkerConfig, chunk_tokens: int, layer_group: int, grace: float, prefix_cache: bool) -> None:
    app = PrefillWorkerApp(cfg, chunk_tokens, layer_group, prefix_cache)
    server = make_server()
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(app), server)
    health, bound = await open_worker_server(server, SERVICE, cfg, app.engine)
    exit_when_broken(app.ranks, health, app.abort_all)
    log.info("prefill worker %s serving on %s:%d (%d KV pages, chunk %d tokens, spec %s, prefix cache %s)",
             cfg.worker_id, cfg.host, bound, app.runner.allocator.num_total, chunk_tokens, cfg.spec,
             "on" if prefix_cache else "off")
    await serve_until_signal(server, health, on_drain=lambda: app.drain(grace), grace=grace)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmserve prefill", formatter_class=HelpFormatter, usage="%(prog)s [options]",
        description="Prefill worker: chunked prefill of each prompt (and the MTP draft layer), the first token, and "
                    "the KV cache streamed to the decode worker the gateway chose.")
    add_worker_args(p, default_port=30001)
    p.add_argument("--chunked-prefill-size", type=int, default=8192, help="token budget of one prefill forward")
    p.add_argument("--disagg-layer-group-size", type=int, default=4,
                   help="layers per KV chunk streamed while later layers compute")
    p.add_argument("--disable-radix-cache", action="store_true",
                   help="turn the prefix cache off: every prompt is computed whole (SGLang's flag name; the cache "
                        "keeps whole pages, not a radix tree)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish in-flight requests")
    accept_foreign_flags(p, "prefill")
    return p


def main(argv: list[str]) -> int:
    return worker_main(build_arg_parser(), "prefill", argv,
                       lambda cfg, ns: serve(cfg, ns.chunked_prefill_size, ns.disagg_layer_group_size,
                                             ns.shutdown_grace, not ns.disable_radix_cache),
                       lambda ns: "--chunked-prefill-size must be >= 1" if ns.chunked_prefill_size < 1 else None)
