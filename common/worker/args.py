"""Command-line flags shared by the prefill and decode workers (SGLang names), and their
validation into frozen configs. Built once at the edge; nothing reads argv after this."""

from __future__ import annotations

import argparse
import socket
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

from common.model.config import SpecConfig, validate_spec_config
from common.serving.launch_flags import foreign_flags_given
from common.serving.model_files import GATEWAY_FILES, resolve_model_path
from common.transport.auth import load_secret

SPEC_ALGORITHMS = {"EAGLE": "EAGLE", "NEXTN": "EAGLE"}  # NEXTN is SGLang's alias


def add_worker_args(p: argparse.ArgumentParser, *, default_port: int) -> None:
    """The flags both workers take. Each role adds its own, then accepts the other roles' flags
    (common.serving.launch_flags.accept_foreign_flags) so one SGLang launch line can start it."""
    p.add_argument("--model-path", required=True,
                   help="HF-format model directory, or a Hugging Face repo id (resolved from the HF cache, "
                        "downloaded when the network allows)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve gRPC on")
    p.add_argument("--port", type=int, default=default_port, help="gRPC port (0: any free port)")
    p.add_argument("--advertise-host", default=None,
                   help="address peers use to reach this worker (default: --host, or the hostname)")
    p.add_argument("--worker-id", default=None, help="stable id of this worker (default: random)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 or cpu (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="compute dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel ranks (1, 2, 4, 8): one process per GPU, this one is rank 0")
    p.add_argument("--base-gpu-id", type=int, default=None,
                   help="GPU of TP rank 0; rank r uses base + r (default: the --device index, else 0)")
    p.add_argument("--tp-backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="collectives of the TP group: auto = NCCL across GPUs, gloo on the CPU or when ranks "
                        "share a GPU (NCCL refuses two ranks on one device)")
    p.add_argument("--disable-custom-all-reduce", action="store_true",
                   help="NCCL for every TP all-reduce (default: small ones on the peer-memory one-/two-shot "
                        "all-reduce where the GPUs can reach each other)")
    p.add_argument("--tp-step-timeout", type=float, default=60.0,
                   help="seconds any TP collective may wait before the worker gives up (a dead rank)")
    p.add_argument("--dist-init-addr", default=None,
                   help="host:port of the TP group's store on rank 0 (default: 127.0.0.1, a free port)")
    p.add_argument("--ep-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--quantization", default=None, choices=("fp8",),
                   help="fp8: quantise a bf16 checkpoint's linears and experts to FP8 per output channel on "
                        "load (FP8 checkpoints are served in FP8 without it)")
    p.add_argument("--fp8-compute", default="auto", choices=("auto", "dequant"),
                   help="auto: FP8 weights stay FP8 and run W8A8 on FP8 tensor cores; dequant: dequantise "
                        "them to --dtype on load (twice the memory; the numerics reference)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="auto: read the safetensors checkpoint; dummy: build from config.json alone with seeded "
                        "random weights in the checkpoint's layout (FP8 where its quantization_config says; "
                        "both workers draw the same), for benchmarks without the weights")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="the KV pool's dtype: auto (the compute --dtype) or that dtype by name; an FP8 KV "
                        "cache (fp8_e4m3, fp8_e5m2) is not offered")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--num-pages", type=int, default=0,
                   help="KV pages (0: size the pool from --mem-fraction-static)")
    p.add_argument("--max-total-tokens", type=int, default=0,
                   help="SGLang's name for the pool size: tokens of KV, rounded up to whole pages (0: from "
                        "--num-pages or --mem-fraction-static)")
    p.add_argument("--mem-fraction-static", type=float, default=0.85,
                   help="fraction of GPU memory for weights + KV pool (CUDA only)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting for admission before new ones are refused (RESOURCE_EXHAUSTED)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: off)")
    p.add_argument("--transfer-timeout", type=float, default=60.0,
                   help="seconds a KV transfer may stall before it is failed")
    p.add_argument("--kv-backend", default="auto", choices=("auto", "gloo", "nccl", "cuda_ipc"),
                   help="bulk KV channel (auto: gloo on CPU, CUDA IPC on one GPU, NCCL across GPUs)")
    p.add_argument("--enable-custom-logit-processor", action="store_true",
                   help="accept custom_logit_processor (only the GLM thinking budget is recognised)")
    p.add_argument("--speculative-algorithm", default=None, type=str.upper,
                   help="EAGLE (alias NEXTN): the checkpoint's MTP layer drafts")
    p.add_argument("--speculative-num-steps", type=int, default=None,
                   help="draft steps per verify (default with EAGLE: 3; give all three or none)")
    p.add_argument("--speculative-eagle-topk", type=int, default=None,
                   help="draft branches per step (default with EAGLE: 1)")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="draft tokens verified per step (default with EAGLE: 4)")
    p.add_argument("--speculative-draft-model-path", default=None,
                   help="draft checkpoint (default: the target's own MTP layer)")
    p.add_argument("--cluster-secret-file", default=None,
                   help="file holding the secret every worker of this deployment shares; KV pairing is "
                        "refused to a peer without it (default: $GLMSERVE_CLUSTER_SECRET; none: pairing "
                        "is unauthenticated)")
    p.add_argument("--cluster-secret", default=None,
                   help="the cluster secret itself (visible in the process list: prefer the file or the "
                        "environment variable)")
    p.add_argument("--grammar-backend", default="xgrammar", choices=("xgrammar", "llguidance", "none"),
                   help="structured-output engine (SGLang's flag); none: a request with a grammar is refused "
                        "(INVALID_ARGUMENT), never served unconstrained")
    p.add_argument("--grammar-compile-timeout", type=float, default=10.0,
                   help="seconds a request waits for its grammar to compile before it fails (INVALID_ARGUMENT "
                        "naming the grammar field); the compile finishes in the background and is cached")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True)
class WorkerConfig:
    role: str
    model_path: str
    host: str
    port: int
    advertise_host: str
    worker_id: str
    device: str
    dtype: str
    tp_size: int
    base_gpu_id: int | None
    tp_backend: str
    tp_step_timeout: float
    disable_custom_all_reduce: bool
    dist_init_addr: tuple[str, int]
    quantization: str | None
    fp8_compute: str
    load_format: str
    page_size: int
    num_pages: int
    mem_fraction_static: float
    max_queued_requests: int
    metrics_port: int
    transfer_timeout: float
    kv_backend: str
    enable_custom_logit_processor: bool
    spec: SpecConfig
    draft_model_path: str | None
    cluster_secret: bytes | None = field(default=None, repr=False)
    grammar_backend: str = "xgrammar"  # xgrammar | llguidance | none (common/grammar)
    grammar_compile_timeout: float = 10.0

    @property
    def address(self) -> str:
        return f"{self.advertise_host}:{self.port}"


def parse_spec(ns: argparse.Namespace) -> tuple[SpecConfig, list[str]]:
    """SGLang's EAGLE rules; returns the config and warnings. Raises ValueError naming the flag."""
    warnings: list[str] = []
    given = [ns.speculative_num_steps, ns.speculative_eagle_topk, ns.speculative_num_draft_tokens]
    if ns.speculative_algorithm is None:
        if any(v is not None for v in given):
            raise ValueError("--speculative-num-steps/--speculative-eagle-topk/--speculative-num-draft-tokens "
                             "need --speculative-algorithm EAGLE")
        return SpecConfig(algorithm=None), warnings
    algo = SPEC_ALGORITHMS.get(ns.speculative_algorithm)
    if algo is None:
        raise ValueError(f"--speculative-algorithm {ns.speculative_algorithm!r} is not supported "
                         f"(choose EAGLE or NEXTN)")
    if all(v is None for v in given):
        steps, topk, draft = 3, 1, 4  # SGLang's and Z.ai's recommended GLM setting
    elif any(v is None for v in given):
        raise ValueError("give all three of --speculative-num-steps, --speculative-eagle-topk and "
                         "--speculative-num-draft-tokens, or none of them (default 3/1/4)")
    else:
        steps, topk, draft = given
    draft, warning = validate_spec_config(steps, topk, draft)  # ValueError names the setting
    if warning:
        warnings.append(warning)
    return SpecConfig(algorithm=algo, num_steps=steps, eagle_topk=topk, num_draft_tokens=draft), warnings


# the names SGLang's --kv-cache-dtype takes for the compute dtypes
KV_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def build_worker_config(role: str, ns: argparse.Namespace) -> tuple[WorkerConfig, list[str]]:
    spec, warnings = parse_spec(ns)
    if ns.page_size < 1:
        raise ValueError(f"--page-size must be >= 1, got {ns.page_size}")
    num_pages = ns.num_pages
    if ns.max_total_tokens:
        if ns.max_total_tokens < 0 or ns.num_pages:
            raise ValueError(f"--max-total-tokens {ns.max_total_tokens}: give a positive token count, and not "
                             "together with --num-pages (both size the KV pool)")
        num_pages = -(-ns.max_total_tokens // ns.page_size)
    if ns.tp_size not in (1, 2, 4, 8):
        raise ValueError(f"--tp-size {ns.tp_size}: choose 1, 2, 4 or 8")
    if ns.ep_size != 1:
        raise ValueError(f"--ep-size {ns.ep_size}: expert parallelism is not supported; with --tp-size every "
                         "rank holds its slice of every expert (one all-reduce per MoE layer)")
    if ns.tp_step_timeout <= 0:
        raise ValueError(f"--tp-step-timeout must be positive, got {ns.tp_step_timeout}")
    store = ("127.0.0.1", 0)
    if ns.dist_init_addr is not None:
        host, _, port = ns.dist_init_addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--dist-init-addr {ns.dist_init_addr!r}: expected host:port")
        store = (host, int(port))
    # ValueError names the flag, where it looked, how to fetch; dummy weights need the configs alone
    model_path = resolve_model_path(ns.model_path, files=GATEWAY_FILES if ns.load_format == "dummy" else None)
    if ns.speculative_draft_model_path not in (None, ns.model_path, model_path):
        raise ValueError("--speculative-draft-model-path: only the target's own MTP layer is supported "
                         "(leave it unset or pass the target path)")
    device = ns.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = ns.dtype
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    kv_dtype = KV_DTYPE_NAMES.get(ns.kv_cache_dtype, ns.kv_cache_dtype)
    if kv_dtype not in ("auto", dtype):
        why = "an FP8 KV cache is not offered" if kv_dtype.startswith("fp8") else "the KV pool holds the compute dtype"
        raise ValueError(f"--kv-cache-dtype {ns.kv_cache_dtype}: {why}; choose auto or {dtype} (the compute dtype)")
    secret = load_secret(ns.cluster_secret, ns.cluster_secret_file)  # ValueError: too short
    if secret is None:
        warnings.append("no cluster secret (--cluster-secret-file or $GLMSERVE_CLUSTER_SECRET): KV pairing "
                        "is unauthenticated")
    if ns.grammar_compile_timeout <= 0:
        raise ValueError(f"--grammar-compile-timeout must be positive, got {ns.grammar_compile_timeout}")
    advertise = ns.advertise_host or (ns.host if ns.host not in ("0.0.0.0", "::") else socket.gethostname())
    cfg = WorkerConfig(
        role=role, model_path=model_path, host=ns.host, port=ns.port, advertise_host=advertise,
        worker_id=ns.worker_id or f"{role}-{uuid.uuid4().hex[:8]}", device=device, dtype=dtype,
        tp_size=ns.tp_size, base_gpu_id=ns.base_gpu_id, tp_backend=ns.tp_backend, tp_step_timeout=ns.tp_step_timeout,
        disable_custom_all_reduce=ns.disable_custom_all_reduce,
        dist_init_addr=store, quantization=ns.quantization, fp8_compute=ns.fp8_compute, load_format=ns.load_format,
        page_size=ns.page_size, num_pages=num_pages,
        mem_fraction_static=ns.mem_fraction_static, max_queued_requests=ns.max_queued_requests,
        metrics_port=ns.metrics_port, transfer_timeout=ns.transfer_timeout, kv_backend=ns.kv_backend,
        enable_custom_logit_processor=ns.enable_custom_logit_processor, spec=spec,
        draft_model_path=ns.speculative_draft_model_path, cluster_secret=secret,
        grammar_backend=ns.grammar_backend, grammar_compile_timeout=ns.grammar_compile_timeout,
    )
    return cfg, warnings


def worker_main(parser: argparse.ArgumentParser, role: str, argv: list[str],
                serve: Callable[[WorkerConfig, argparse.Namespace], Coroutine[object, object, None]],
                check: Callable[[argparse.Namespace], str | None] | None = None) -> int:
    """Parse flags, refuse bad ones with a message naming the flag, set up logging, serve."""
    import logging

    from common.serving.grpc_server import run
    from common.serving.log import setup_logging

    ns = parser.parse_args(argv)
    setup_logging(role, level=ns.log_level)
    try:
        cfg, warnings = build_worker_config(role, ns)
    except ValueError as e:
        parser.error(str(e))
    problem = check(ns) if check is not None else None
    if problem:
        parser.error(problem)
    for w in warnings:
        logging.getLogger(role).warning(w)
    given = foreign_flags_given(ns)
    if given:
        logging.getLogger(role).info("flags of other roles, not used by the %s worker: %s", role, " ".join(given))
    run(serve(cfg, ns))
    return 0
