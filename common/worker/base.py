"""Pieces both worker roles share: building the runner from flags, describing the worker
(WorkerInfo, pairing info), choosing the KV backend and opening the gRPC server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from common.grammar.backend import GrammarBackend
from common.grammar.factory import make_backend
from common.grammar.vocab import GrammarVocab
from common.model.config import CacheConfig
from common.runtime.distributed import TPConfig
from common.runtime.runner import ModelRunner, RunnerSpec
from common.transport.auth import PairAuth
from common.transport.base import TransportConfig
from common.transport.handshake import PairingInfo
from common.worker.args import WorkerConfig
from common.worker.load import WorkerLoadFigures
from common.worker.ranks import Ranks, start_ranks
from protos import worker_pb2

if TYPE_CHECKING:
    import grpc

    from common.serving.grpc_server import Health

log = logging.getLogger(__name__)

def build_grammar_backend(cfg: WorkerConfig, vocab_size: int) -> GrammarBackend | None:
    """The structured-output backend of --grammar-backend over the model's tokenizer, sized to the
    lm_head (`vocab_size`); None for "none" (constrained requests are then refused)."""
    if cfg.grammar_backend == "none":
        log.info("grammar backend: none (requests with a grammar get INVALID_ARGUMENT)")
        return None
    start = time.monotonic()
    vocab = GrammarVocab.from_model_dir(cfg.model_path, vocab_size)
    backend = make_backend(cfg.grammar_backend, vocab, compile_timeout=cfg.grammar_compile_timeout)
    log.info("grammar backend: %s over %d tokens (%s vocabulary, end ids %s), ready in %.2f s, compile timeout %g s",
             backend.name, vocab.vocab_size, vocab.kind, list(vocab.end_ids), time.monotonic() - start,
             cfg.grammar_compile_timeout)
    return backend


def build_runner(cfg: WorkerConfig) -> tuple[ModelRunner, Ranks | None]:
    """This worker's runner; with --tp-size > 1 it is rank 0's and the followers run beside it
    (common/worker/ranks.py), whose handle comes second."""
    spec = RunnerSpec(cfg.model_path, cfg.dtype, cfg.page_size, cfg.num_pages, with_mtp=cfg.spec.enabled,
                      mem_fraction=cfg.mem_fraction_static, quantize=cfg.quantization, fp8_compute=cfg.fp8_compute,
                      load_format=cfg.load_format)
    if cfg.tp_size == 1:
        return spec.build(cfg.device), None
    tp = TPConfig.resolve(cfg.tp_size, cfg.device, cfg.tp_backend, cfg.tp_step_timeout, cfg.base_gpu_id,
                          custom_all_reduce=not cfg.disable_custom_all_reduce)
    tp = dataclasses.replace(tp, store=cfg.dist_init_addr)
    return start_ranks(spec, tp, role=cfg.role, kv=transport_config(cfg))


def kv_backend(cfg: WorkerConfig, runner: ModelRunner) -> str:
    if runner.device.type != "cuda":
        return "gloo"
    return "nccl" if cfg.kv_backend in ("auto", "cuda_ipc") else cfg.kv_backend


def device_uuid(runner: ModelRunner) -> str:
    if runner.device.type != "cuda":
        return ""
    from common.transport.nccl import device_uuid as uuid_of

    return uuid_of(runner.device)


def model_fingerprint(model_path: str, runner: ModelRunner) -> str:
    """Config hash plus a sample of every weight file (size, first and last 64 KiB): two
    checkpoints with the same architecture but other weights get different fingerprints. Dummy
    weights (--load-format dummy) read no file: the load format and its seed stand for them."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256(runner.config.fingerprint().encode())
    h.update(runner.numerics.encode())  # FP8 kept or dequantised, quantised on load: different activations
    if runner.load_format == "dummy":
        from common.model.loader import DUMMY_SEED

        h.update(f"load_format=dummy,seed={DUMMY_SEED}".encode())
        return h.hexdigest()[:20]
    for f in sorted(Path(model_path).glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
            fh.seek(max(0, size - (1 << 16)))
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:20]


def worker_info(cfg: WorkerConfig, runner: ModelRunner, ranks: Ranks | None = None) -> worker_pb2.WorkerInfo:
    spec = cfg.spec
    uuids = [device_uuid(runner), *(ranks.device_uuids if ranks is not None else [])]
    layers = runner.config.num_hidden_layers + (1 if runner.with_mtp else 0)
    return worker_pb2.WorkerInfo(
        worker_id=cfg.worker_id, role=cfg.role, model_fingerprint=model_fingerprint(cfg.model_path, runner),
        model_name=cfg.model_path, dtype=cfg.dtype, page_size=cfg.page_size, num_layers=layers,
        tp_size=cfg.tp_size, kv_heads=runner.config.num_key_value_heads,
        spec=worker_pb2.SpecLayout(algorithm=spec.algorithm or "", num_steps=spec.num_steps if spec.enabled else 0,
                                   eagle_topk=spec.eagle_topk if spec.enabled else 0,
                                   num_draft_tokens=spec.num_draft_tokens if spec.enabled else 0,
                                   draft_kv=spec.enabled),
        device_uuid=uuids[0], host=cfg.advertise_host, kv_backend=kv_backend(cfg, runner),
        device_uuids=uuids if any(uuids) else [],
    )


def pairing_info(info: worker_pb2.WorkerInfo) -> PairingInfo:
    return PairingInfo.from_worker_info(info)


def cache_config(cfg: WorkerConfig) -> CacheConfig:
    return CacheConfig(page_size=cfg.page_size, num_pages=cfg.num_pages, dtype=cfg.dtype)


def transport_config(cfg: WorkerConfig) -> TransportConfig:
    """Bounded waits derived from --transfer-timeout (docs/disaggregation.md rule 2); the gloo
    sockets of a pair listen on the address peers reach this worker by, not on every interface."""
    op = max(1.0, min(30.0, cfg.transfer_timeout / 2))
    return TransportConfig(op_timeout_s=op, peer_timeout_s=op * 2 + 5, transfer_timeout_s=cfg.transfer_timeout,
                           bind_host=cfg.advertise_host, auth=PairAuth(cfg.cluster_secret))


def load_proto(load: WorkerLoadFigures, draining: bool) -> worker_pb2.WorkerLoad:
    """An engine's published load figures as the GetLoad reply (the same fields for both roles)."""
    return worker_pb2.WorkerLoad(running=load.running, queued=load.queued, waiting_for_kv=load.waiting_for_kv,
                                 free_pages=load.free_pages, total_pages=load.total_pages, draining=draining)


TP_BROKEN_EXIT = 3  # exit status of a worker whose tensor-parallel group broke


def exit_when_broken(ranks: Ranks | None, health: Health, abort_all: Callable[[str], None],
                     grace_s: float = 1.5) -> None:
    """When the TP group breaks (a rank died): readiness turns NOT_SERVING for good, every request in
    flight fails with `abort_all(message)` naming the rank, and the process exits TP_BROKEN_EXIT after
    `grace_s` (the gateway routes around it; a supervisor restarts it). Call on the event loop."""
    if ranks is None:
        return
    loop = asyncio.get_running_loop()

    async def shut(reason: str) -> None:
        await health.set_draining()
        abort_all(f"tensor-parallel group of this worker broke: {reason}")
        log.error("tensor-parallel group broke (%s): NOT_SERVING, exiting in %.1f s", reason, grace_s)
        await asyncio.sleep(grace_s)
        logging.shutdown()
        os._exit(TP_BROKEN_EXIT)

    ranks.on_failure(lambda reason: loop.call_soon_threadsafe(lambda: loop.create_task(shut(reason))))


class Startable(Protocol):
    def start(self) -> None: ...


async def open_worker_server(server: grpc.aio.Server, service: str, cfg: WorkerConfig,
                             engine: Startable) -> tuple[Health, int]:
    """Health and reflection for `service`, bind cfg.host:cfg.port, the metrics endpoint, start the
    engine thread and the server, then report ready. Returns (health state, bound port)."""
    from common.serving import metrics
    from common.serving.grpc_server import add_health, add_reflection

    health = await add_health(server, [service])
    add_reflection(server, [service])
    bound = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port}")
    if cfg.metrics_port:
        metrics.start_metrics_server(cfg.metrics_port, cfg.host)
    engine.start()
    await server.start()
    await health.set_ready(True)
    return health, bound
