"""`glmserve local`: gateway + prefill + decode workers as separate processes on this machine.

Each role is its own `glmserve <role>` process (the same entry points `compose.yaml` uses), so a
local run exercises the real gRPC hops and the real KV transport; a worker of TP size N
(`--prefill-tp-size`, `--decode-tp-size`, or `--tp-size` for both) starts its N-1 follower ranks
itself. The launcher waits for every
process to report SERVING on grpc.health.v1, then either serves until SIGTERM/SIGINT (forwarded
to the children, which drain) or, with `--demo`, sends one Chat request, prints the stream and
shuts everything down.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """Handles to the processes of one local deployment."""

    gateway_port: int
    prefill_ports: list[int]
    decode_ports: list[int]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    log_dir: Path | None = None  # each process's output, when start_cluster was given one

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        targets = {"gateway": self.gateway_port,
                   **{f"prefill{i}": p for i, p in enumerate(self.prefill_ports)},
                   **{f"decode{i}": p for i, p in enumerate(self.decode_ports)}}
        for name, port in targets.items():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                while True:
                    dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
                    if dead:
                        raise RuntimeError(f"exited during startup: {dead}")
                    try:
                        # readiness of the whole process: every service it serves
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=_service_of(name)), timeout=1.0)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{name} not SERVING after {timeout:.0f}s")
                    time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


def _service_of(name: str) -> str:
    if name.startswith("gateway"):
        return "glmserve.v1.Gateway"
    return "glmserve.worker.v1.PrefillWorker" if name.startswith("prefill") else "glmserve.worker.v1.DecodeWorker"


def start_cluster(model_path: str | Path, *, prefill: int = 1, decode: int = 1, device: str | None = None,
                  extra_worker_args: list[str] | None = None, extra_prefill_args: list[str] | None = None,
                  extra_decode_args: list[str] | None = None, extra_gateway_args: list[str] | None = None,
                  log_dir: str | Path | None = None, env: dict[str, str] | None = None) -> Cluster:
    """Start the processes (not waiting for readiness: call `wait_ready`)."""
    cluster = Cluster(free_port(), [free_port() for _ in range(prefill)], [free_port() for _ in range(decode)],
                      log_dir=Path(log_dir) if log_dir is not None else None)
    child_env = dict(os.environ, **NCCL_SAFE_ENV, **(env or {}))
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    exe = [sys.executable, "-m", "common.tools.cli"]
    worker = ["--model-path", str(model_path), *(["--device", device] if device else []),
              *(extra_worker_args or [])]

    def spawn(name: str, args: list[str]) -> None:
        out = subprocess.DEVNULL
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(log_dir) / f"{name}.log", "w")  # noqa: SIM115 (owned by the child)
        cluster.procs[name] = subprocess.Popen(exe + args, env=child_env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)

    for i, port in enumerate(cluster.decode_ports):
        spawn(f"decode{i}", ["decode", *worker, "--port", str(port), "--worker-id", f"decode{i}",
                             *(extra_decode_args or [])])
    for i, port in enumerate(cluster.prefill_ports):
        spawn(f"prefill{i}", ["prefill", *worker, "--port", str(port), "--worker-id", f"prefill{i}",
                              *(extra_prefill_args or [])])
    gw = ["gateway", "--model-path", str(model_path), "--host", "127.0.0.1", "--port", str(cluster.gateway_port),
          *default_parser_args(model_path, extra_gateway_args or [])]
    for port in cluster.prefill_ports:
        gw += ["--prefill", f"127.0.0.1:{port}"]
    for port in cluster.decode_ports:
        gw += ["--decode", f"127.0.0.1:{port}"]
    spawn("gateway", gw + list(extra_gateway_args or []))
    return cluster


def default_parser_args(model_path: str | Path, given: list[str]) -> list[str]:
    """--reasoning-parser glm45 and the tool parser matching the chat template (GLM-4.7's template
    concatenates '<tool_call>' with the call name; GLM-4.5/4.6's puts a newline after it), unless given."""
    args: list[str] = []
    if "--reasoning-parser" not in given:
        args += ["--reasoning-parser", "glm45"]
    if "--tool-call-parser" not in given:
        path = Path(model_path) / "chat_template.jinja"
        text = path.read_text() if path.exists() else (Path(model_path) / "tokenizer_config.json").read_text()
        glm47 = "'<tool_call>' ~ " in text or "'<tool_call>' + " in text
        args += ["--tool-call-parser", "glm47" if glm47 else "glm45"]
    return args


def demo_chat(address: str, text: str, max_tokens: int) -> None:
    import grpc

    from protos import gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        req = gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content=text)])
        req.sampling.max_tokens = max_tokens
        req.sampling.temperature = 0.0
        print(f"user> {text}")
        usage, section = None, None
        for resp in stub.Chat(req, timeout=120):
            for name, piece in (("reasoning", resp.delta.reasoning_content), ("content", resp.delta.content)):
                if piece:
                    if section != name:
                        print(f"\n[{name}] ", end="")
                        section = name
                    print(piece, end="", flush=True)
            for tc in resp.delta.tool_calls:
                print(f"\n[tool_call {tc.index}] {tc.name} {tc.arguments}", end="")
            if resp.HasField("finish"):
                print(f"\n[finish] {resp.finish.finish_reason}")
            if resp.HasField("usage"):
                usage = resp.usage
        if usage is not None:
            print(f"[usage]     prompt={usage.prompt_tokens} completion={usage.completion_tokens} "
                  f"reasoning={usage.reasoning_tokens}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="glmserve local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="model directory (default: the built-in tiny model)")
    p.add_argument("--prefill", type=int, default=1, help="number of prefill workers")
    p.add_argument("--decode", type=int, default=1, help="number of decode workers")
    p.add_argument("--device", default=None, help="worker device (default: cuda if present, else cpu)")
    p.add_argument("--speculative-algorithm", default=None, help="EAGLE / NEXTN for every worker")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks of every worker")
    p.add_argument("--prefill-tp-size", type=int, default=None, help="TP ranks of each prefill worker (default --tp-size)")
    p.add_argument("--decode-tp-size", type=int, default=None, help="TP ranks of each decode worker (default --tp-size)")
    p.add_argument("--demo", nargs="?", const="Hello! What can you do?", default=None, metavar="TEXT",
                   help="send one chat request, print the streamed answer, then shut down")
    p.add_argument("--max-tokens", type=int, default=32, help="max tokens of the --demo request")
    p.add_argument("--log-dir", default=None, help="write each process's log here")
    args = p.parse_args(argv)
    from common.tools.generate import ensure_tiny_model

    model = Path(args.model_path) if args.model_path else ensure_tiny_model()
    extra = ["--speculative-algorithm", args.speculative_algorithm] if args.speculative_algorithm else []
    prefill_tp = args.prefill_tp_size or args.tp_size
    decode_tp = args.decode_tp_size or args.tp_size
    cluster = start_cluster(model, prefill=args.prefill, decode=args.decode, device=args.device,
                            extra_worker_args=extra, extra_prefill_args=["--tp-size", str(prefill_tp)],
                            extra_decode_args=["--tp-size", str(decode_tp)], log_dir=args.log_dir)
    try:
        cluster.wait_ready()
        print(f"glmserve local: gateway on {cluster.gateway_address} ({args.prefill} prefill of TP {prefill_tp}, "
              f"{args.decode} decode of TP {decode_tp}), model {model}", flush=True)
        if args.demo is not None:
            demo_chat(cluster.gateway_address, args.demo, args.max_tokens)
            return 0
        stop = [False]

        def on_signal(*_: object) -> None:
            stop[0] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop[0]:
            dead = [n for n, pr in cluster.procs.items() if pr.poll() is not None]
            if dead:
                print(f"glmserve local: {', '.join(dead)} exited; shutting down", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        cluster.stop()
