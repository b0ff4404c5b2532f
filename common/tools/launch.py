"""`glmserve serve` / `glmserve local`: gateway + prefill + decode workers as processes on this machine,
started from SGLang's launch line.

    glmserve serve --model-path zai-org/GLM-4.6-FP8 --tp-size 8 --tool-call-parser glm45 \\
        --reasoning-parser glm45 --speculative-algorithm EAGLE --speculative-num-steps 3 \\
        --speculative-eagle-topk 1 --speculative-num-draft-tokens 4 --mem-fraction-static 0.9 \\
        --served-model-name glm-4.6-fp8 --enable-custom-logit-processor --host 0.0.0.0 --port 30000

The OpenAI API is served on --port (SGLang's 30000), the gRPC API on --grpc-port (30010). Every
other flag goes to the roles that use it (common/serving/launch_flags.py): gateway flags to the
gateway, worker flags to both workers, --log-level and --enable-custom-logit-processor to all. A
Hugging Face repo id as --model-path is resolved once, here. Each role is its own `glmserve <role>`
process (the same entry points compose.yaml uses), so a local run exercises the real gRPC hops and
the real KV transport; a worker of --tp-size N starts its N-1 other ranks itself, and
--prefill-tp-size / --decode-tp-size give the two roles different TP sizes. Children's output is written to one file per process (--log-dir, default a
fresh directory) and, when serving, also shown with a role prefix; a child that fails to start is
reported with its own last lines. Without --demo it serves until SIGTERM/SIGINT (forwarded; the
children drain); with --demo it sends one chat request, prints the stream and shuts down.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from common.serving.launch_flags import (
    COMMON,
    DECODE,
    GATEWAY,
    NO_EFFECT,
    PREFILL,
    WORKER,
    HelpFormatter,
    split_flags,
)

NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CLUSTER_SECRET_ENV = "GLMSERVE_CLUSTER_SECRET"  # common/transport/auth.py reads it in each worker
DEFAULT_HTTP_PORT = 30000
DEFAULT_GRPC_PORT = 30010
RESTART_BACKOFF_S, RESTART_BACKOFF_MAX_S, RESTART_RESET_S = 0.5, 30.0, 60.0
TAIL_LINES = 30  # lines of a child's output kept to report a failed start
# flags the launcher sets on the children itself (ports, addresses, model)
LAUNCHER_FLAGS = {"--model-path", "--host", "--port", "--prefill", "--decode", "--http-host", "--http-port",
                  "--advertise-host", "--worker-id"}


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _ephemeral_low() -> int | None:
    """The lowest port the kernel hands out as a connection's source port (Linux), if known."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports: every socket stays bound until all are picked (ports picked one at a
    time may repeat, since a released port can be handed out again at once). Where the kernel's
    ephemeral range is known they come from below it: a port bound to 0 comes from that range, and
    any outgoing connection (another worker's channel, a KV pair's socket) may take it as its source
    port before the child that was given it binds it."""
    socks: list[socket.socket] = []
    try:
        low = _ephemeral_low()
        if low is not None and low > 12000:
            rng = random.SystemRandom()
            tries = 0
            while len(socks) < n and tries < 200 * n:
                tries += 1
                s = socket.socket()
                try:
                    s.bind((host, rng.randrange(10000, low)))
                except OSError:
                    s.close()
                    continue
                socks.append(s)
        while len(socks) < n:  # no known range, or nothing free below it
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ChildOutput:
    """Reads one child's output: into its log file, to the terminal with a role prefix (optional),
    and the last lines in memory for a failure report."""

    def __init__(self, name: str, stream: IO[bytes], log_file: Path | None, echo: bool, append: bool = False) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._stream = stream
        self._file = open(log_file, "a" if append else "w", encoding="utf-8") if log_file is not None else None  # noqa: SIM115
        self._echo = echo
        self._thread = threading.Thread(target=self._pump, name=f"output-{name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.tail.append(line.rstrip("\n"))
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
            if self._echo:
                sys.stderr.write(f"[{self.name}] {line}")
        if self._file is not None:
            self._file.close()

    def join(self, timeout: float = 2.0) -> None:
        self._thread.join(timeout)


@dataclass
class Cluster:
    """Handles to the processes of one local deployment."""

    gateway_port: int  # gRPC
    prefill_ports: list[int]
    decode_ports: list[int]
    http_port: int | None = None  # OpenAI HTTP (None: off)
    host: str = "127.0.0.1"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    outputs: dict[str, ChildOutput] = field(default_factory=dict)
    log_dir: Path | None = None  # each process's output, one file per process
    commands: dict[str, list[str]] = field(default_factory=dict)  # name -> argv, to restart it
    env: dict[str, str] = field(default_factory=dict, repr=False)
    echo: bool = False
    restarts: dict[str, int] = field(default_factory=dict)
    _restart_at: dict[str, float] = field(default_factory=dict, repr=False)
    _started: dict[str, float] = field(default_factory=dict, repr=False)  # restarted children, when

    def spawn(self, name: str, argv: list[str]) -> None:
        """Start (or restart) child `name`; its output goes on to the same log file."""
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.commands[name] = argv
        self.procs[name] = proc
        log_file = self.log_dir / f"{name}.log" if self.log_dir is not None else None
        self.outputs[name] = ChildOutput(name, proc.stdout, log_file, self.echo, append=name in self.restarts)

    def supervise(self, log: IO[str], now: float | None = None) -> str | None:
        """One supervision pass: a worker that exited is restarted on its own port after a bounded
        exponential backoff (RESTART_BACKOFF_S doubling per restart, at most RESTART_BACKOFF_MAX_S;
        the count resets once it has run RESTART_RESET_S), and the gateway takes it back when its
        health says SERVING. Returns the failure report of a dead gateway (then the cluster stops)."""
        now = time.monotonic() if now is None else now
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            if name == "gateway":
                return self.failure_report(name)
            if name not in self._restart_at:
                n = self.restarts.get(name, 0)
                delay = min(RESTART_BACKOFF_S * 2 ** n, RESTART_BACKOFF_MAX_S)
                self._restart_at[name] = now + delay
                print(f"{self.failure_report(name)}\nrestarting {name} in {delay:.1f}s (restart {n + 1})",
                      file=log, flush=True)
            elif now >= self._restart_at[name]:
                del self._restart_at[name]
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._started[name] = now
                self.spawn(name, self.commands[name])
        for name, started in list(self._started.items()):
            if now - started > RESTART_RESET_S and self.procs[name].poll() is None:
                self.restarts[name] = 0
                del self._started[name]
        return None

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def http_base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def failure_report(self, name: str) -> str:
        """The exit status and last output lines of child `name`."""
        proc = self.procs[name]
        out = self.outputs.get(name)
        if out is not None:
            out.join()
        lines = "\n".join(f"    {line}" for line in (out.tail if out is not None else ()))
        where = f" (full log: {self.log_dir / (name + '.log')})" if self.log_dir is not None else ""
        return f"{name} exited with status {proc.returncode}{where}; its last lines:\n{lines}"

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
                    dead = [n for n, p in self.procs.items() if p.poll() is not None]
                    if dead:
                        raise RuntimeError("exited during startup: "
                                           + "\n".join(self.failure_report(n) for n in dead))
                    try:
                        # readiness of the whole process: every service it serves
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=_service_of(name)), timeout=1.0)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{name} not SERVING after {timeout:.0f}s"
                                           + (f" (logs in {self.log_dir})" if self.log_dir else ""))
                    time.sleep(0.1)
        if self.http_port is not None:
            self._wait_gateway_sees_all(deadline)

    def _wait_gateway_sees_all(self, deadline: float) -> None:
        """Wait until the gateway's own health rounds count every worker healthy (its SERVING needs
        only one of each role), so that requests spread over all of them from the start."""
        import json
        import urllib.error
        import urllib.request

        flag = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the gateway's --api-key guards this endpoint too
        flag.add_argument("--api-key")
        key = flag.parse_known_args(self.commands.get("gateway", []))[0].api_key
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/get_server_info",
                                         headers={"Authorization": f"Bearer {key}"} if key else {})
        while True:
            try:
                with urllib.request.urlopen(request, timeout=2.0) as reply:
                    workers = json.load(reply)["workers"]
                down = [w["address"] for w in workers if not w["healthy"]]
            except urllib.error.HTTPError as e:
                if e.code == 401:  # a key this launcher could not read: gRPC readiness stands
                    return
                down = [f"gateway HTTP: {e}"]
            except OSError as e:
                down = [f"gateway HTTP: {e}"]
            if not down:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway does not count these workers healthy: {', '.join(down)}")
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
        for out in self.outputs.values():
            out.join()
        return codes


def _service_of(name: str) -> str:
    if name.startswith("gateway"):
        return "glmserve.v1.Gateway"
    return "glmserve.worker.v1.PrefillWorker" if name.startswith("prefill") else "glmserve.worker.v1.DecodeWorker"


def start_cluster(model_path: str | Path, *, prefill: int = 1, decode: int = 1, device: str | None = None,
                  extra_worker_args: list[str] | None = None, extra_prefill_args: list[str] | None = None,
                  extra_decode_args: list[str] | None = None, extra_gateway_args: list[str] | None = None,
                  log_dir: str | Path | None = None, env: dict[str, str] | None = None,
                  http_port: int | None = 0, grpc_port: int = 0, host: str = "127.0.0.1",
                  echo: bool = False) -> Cluster:
    """Start the processes (not waiting for readiness: call `wait_ready`). Ports 0 are picked free;
    `http_port` None turns HTTP off. Output goes to `log_dir` (one file per process) and, with
    `echo`, to this process's stderr with a role prefix."""
    given = {p for p in (grpc_port, http_port) if p}  # a given port may have just been picked free elsewhere
    picked = iter([p for p in free_ports(2 + prefill + decode + len(given)) if p not in given])
    cluster = Cluster(grpc_port or next(picked), [next(picked) for _ in range(prefill)],
                      [next(picked) for _ in range(decode)],
                      http_port=None if http_port is None else (http_port or next(picked)), host=host,
                      log_dir=Path(log_dir) if log_dir is not None else None)
    child_env = dict(os.environ, **NCCL_SAFE_ENV, **(env or {}))
    given = {a.split("=", 1)[0] for a in extra_worker_args or []}
    if not child_env.get(CLUSTER_SECRET_ENV) and not given & {"--cluster-secret", "--cluster-secret-file"}:
        child_env[CLUSTER_SECRET_ENV] = secrets.token_hex(32)  # this deployment's own; never on a command line
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    cluster.env, cluster.echo = child_env, echo
    exe = [sys.executable, "-m", "common.tools.cli"]
    worker = ["--model-path", str(model_path), *(["--device", device] if device else []),
              *(extra_worker_args or [])]

    def spawn(name: str, args: list[str]) -> None:
        cluster.spawn(name, exe + args)

    for i, port in enumerate(cluster.decode_ports):
        spawn(f"decode{i}", ["decode", *worker, "--port", str(port), "--worker-id", f"decode{i}",
                             *(extra_decode_args or [])])
    for i, port in enumerate(cluster.prefill_ports):
        spawn(f"prefill{i}", ["prefill", *worker, "--port", str(port), "--worker-id", f"prefill{i}",
                              *(extra_prefill_args or [])])
    gw = ["gateway", "--model-path", str(model_path), "--host", host, "--port", str(cluster.gateway_port),
          "--http-port", str(cluster.http_port if cluster.http_port is not None else -1),
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
    names = {a.split("=", 1)[0] for a in given}
    if "--reasoning-parser" not in names:
        args += ["--reasoning-parser", "glm45"]
    if "--tool-call-parser" not in names:
        path = Path(model_path) / "chat_template.jinja"
        config = Path(model_path) / "tokenizer_config.json"
        text = path.read_text() if path.exists() else (config.read_text() if config.exists() else "")
        glm47 = "'<tool_call>' ~ " in text or "'<tool_call>' + " in text
        args += ["--tool-call-parser", "glm47" if glm47 else "glm45"]
    return args


def route_flags(argv: Sequence[str]) -> dict[str, list[str]]:
    """The launch line's flags per role: gateway flags to the gateway, worker flags to both workers,
    prefill / decode flags to that worker, the shared ones (log level, custom processor gate, shutdown
    grace) to all; --metrics-port to the gateway only (one port per machine); --disable-radix-cache to
    the gateway (load routing) and both workers (no cache)."""
    shared = {k: v for k, v in COMMON.items() if k not in LAUNCHER_FLAGS and k != "--metrics-port"}
    gateway, rest = split_flags(argv, {**GATEWAY, "--metrics-port": True})
    common, rest = split_flags(rest, shared)
    workers, rest = split_flags(rest, WORKER)
    prefill, rest = split_flags(rest, PREFILL)
    decode, rest = split_flags(rest, DECODE)
    if rest:
        raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
    workers += [a for a in gateway if a in WORKER]  # switches of both (--disable-radix-cache) go to both
    return {"gateway": gateway + common, "worker": workers + common, "prefill": prefill, "decode": decode}


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


def build_arg_parser(prog: str, roles: dict[str, argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    """The launcher's own flags, plus every role flag (routed by route_flags) listed by role. With
    `roles` (each role's own parser; loaded for --help only, the workers' import torch) each role
    flag shows its role's help text and default."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter,
                                usage="%(prog)s [options]", allow_abbrev=False)
    p.add_argument("--model-path", default=None,
                   help="model directory or Hugging Face repo id (default: the built-in tiny random model, "
                        "which answers with random text)")
    p.add_argument("--host", default="127.0.0.1", help="address of the OpenAI HTTP and gRPC APIs")
    p.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT,
                   help="OpenAI HTTP port, where SGLang users point base_url (0: any free port)")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                   help="gRPC port of the gateway (glmserve.v1.Gateway; 0: any free port)")
    p.add_argument("--prefill", type=int, default=1, metavar="N", help="number of prefill worker processes")
    p.add_argument("--decode", type=int, default=1, metavar="N", help="number of decode worker processes")
    p.add_argument("--prefill-tp-size", type=int, default=None, metavar="N",
                   help="tensor-parallel ranks of each prefill worker (default: --tp-size)")
    p.add_argument("--decode-tp-size", type=int, default=None, metavar="N",
                   help="tensor-parallel ranks of each decode worker (default: --tp-size)")
    p.add_argument("--demo", nargs="?", const="Hello! What can you do?", default=None, metavar="TEXT",
                   help="send one chat request, print the streamed answer, then shut down")
    p.add_argument("--max-tokens", type=int, default=32, help="max tokens of the --demo request")
    p.add_argument("--log-dir", default=None,
                   help="write each process's output to DIR/<role>.log (default: a new directory under "
                        f"{tempfile.gettempdir()})")
    p.add_argument("--startup-timeout", type=float, default=1800.0,
                   help="seconds the processes may take to load the model and report ready")
    same = p.add_argument_group("SGLang flags with no effect here", "accepted so that an SGLang launch line runs "
                                "unchanged; each given is reported once and passed to no process")
    for flag, why in NO_EFFECT.items():
        same.add_argument(flag, action="store_true", help=why)
    owners = {"gateway flags": ("gateway",), "worker flags": ("prefill", "decode"), "prefill flags": ("prefill",),
              "decode flags": ("decode",), "flags of every role": ("gateway", "prefill", "decode")}
    table = (("gateway flags", GATEWAY, "the gateway"),
             ("worker flags", WORKER, "both workers"),
             ("prefill flags", PREFILL, "the prefill workers"),
             ("decode flags", DECODE, "the decode workers"),
             ("flags of every role", COMMON, "every process"))
    listed: set[str] = set()  # a flag of two roles (--disable-radix-cache) is listed once, naming both
    for title, flags, users in table:
        group = p.add_argument_group(title, f"passed to {users}" + (
            "" if roles else "; `glmserve serve --help` (or `glmserve <role> --help`) shows each one's meaning "
                             "and default"))
        for flag, takes_value in flags.items():
            if flag in LAUNCHER_FLAGS or flag in listed:
                continue
            listed.add(flag)
            who = " and ".join(u for _, f, u in table if flag in f)
            who = "the gateway" if flag == "--metrics-port" else who
            dest = "pass_" + flag.lstrip("-").replace("-", "_")
            own = _role_action(roles, owners[title], flag)
            text = f"{own.help} [{who}]" if own is not None and own.help else f"passed to {who}"
            if own is not None and own.default is not None and own.default is not False:
                text += f" (default: {own.default})"  # the role's own default, applied there
            if takes_value:
                group.add_argument(flag, metavar="VALUE", dest=dest, help=text)
            else:
                group.add_argument(flag, action="store_true", dest=dest, help=text)
    return p


def _role_action(roles: dict[str, argparse.ArgumentParser] | None, names: Sequence[str],
                 flag: str) -> argparse.Action | None:
    for name in names:
        parser = (roles or {}).get(name)
        for action in parser._actions if parser is not None else ():
            if flag in action.option_strings:
                return action
    return None


def own_flags(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """The launcher's own long flags (not the role flags it routes) -> whether each takes a value."""
    return {a.option_strings[0]: a.nargs != 0 for a in parser._actions
            if a.option_strings and not a.dest.startswith("pass_") and a.option_strings[0].startswith("--")}


def main(argv: list[str], prog: str = "glmserve local") -> int:
    roles = None
    if "-h" in argv or "--help" in argv:
        from common.tools.roles import role_parser

        roles = {name: role_parser(name) for name in ("gateway", "prefill", "decode")}
    parser = build_arg_parser(prog, roles)
    args = parser.parse_args(argv)  # every flag checked here; values are checked by the role that uses them
    _, passed = split_flags(argv, own_flags(parser))
    for flag, why in NO_EFFECT.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            print(f"{prog}: {flag} accepted, no effect here: {why}", flush=True)
    try:
        routed = route_flags(passed)
    except ValueError as e:
        parser.error(str(e))
    if any(flag.split("=", 1)[0] in ("--ssl-certfile", "--ssl-keyfile") for flag in routed["gateway"]):
        parser.error("TLS (--ssl-certfile / --ssl-keyfile) is served by `glmserve gateway`; "
                     f"{prog} waits for its gateway over plaintext")
    worker_flags = routed["worker"]
    dummy = any(a == "--load-format=dummy" or (a == "--load-format" and nxt == "dummy")
                for a, nxt in zip(worker_flags, [*worker_flags[1:], ""]))
    try:
        model, served = _model(args.model_path, configs_only=dummy)
    except ValueError as e:
        parser.error(str(e))
    gateway_args = routed["gateway"]
    if served is not None and "--served-model-name" not in gateway_args:
        gateway_args = ["--served-model-name", served, *gateway_args]
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="glmserve-logs-"))
    per_role = {role: ["--tp-size", str(n)] if n else []
                for role, n in (("prefill", args.prefill_tp_size), ("decode", args.decode_tp_size))}
    cluster = start_cluster(model, prefill=args.prefill, decode=args.decode, extra_worker_args=routed["worker"],
                            extra_prefill_args=routed["prefill"] + per_role["prefill"],
                            extra_decode_args=routed["decode"] + per_role["decode"],
                            extra_gateway_args=gateway_args, log_dir=log_dir, host=args.host,
                            http_port=args.port, grpc_port=args.grpc_port, echo=args.demo is None)
    print(f"{prog}: starting gateway, {args.prefill} prefill and {args.decode} decode workers on {model} "
          f"(logs in {log_dir})", flush=True)
    try:
        try:
            cluster.wait_ready(args.startup_timeout)
        except (RuntimeError, TimeoutError) as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 1
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print(f"{prog}: ready. OpenAI API http://{shown}:{cluster.http_port}/v1, gRPC {shown}:{cluster.gateway_port}"
              + ("" if args.model_path else " (the built-in tiny model is random: it answers with random text)"),
              flush=True)
        if args.demo is not None:
            demo_chat(cluster.gateway_address, args.demo, args.max_tokens)
            return 0
        stop = [False]

        def on_signal(*_: object) -> None:
            stop[0] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop[0]:
            fatal = cluster.supervise(sys.stderr)
            if fatal is not None:
                print(f"{prog}: {fatal}\nshutting down", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        cluster.stop()


def _model(given: str | None, configs_only: bool = False) -> tuple[Path, str | None]:
    """(local model directory, the served name a repo id implies). `configs_only` (--load-format dummy):
    a repo id fetches its configs and tokenizer files, not the weights."""
    from common.serving.model_files import GATEWAY_FILES, is_repo_id, resolve_model_path

    if given is None:
        from common.tools.generate import ensure_tiny_model

        return ensure_tiny_model(), None
    return (Path(resolve_model_path(given, files=GATEWAY_FILES if configs_only else None)),
            (given if is_repo_id(given) else None))
