"""End-to-end fixtures: real gateway / prefill / decode processes over loopback (CPU, gloo)."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from common.tools.launch import Cluster, start_cluster
from protos import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = ""
    matched_token: int | None = None
    usage: gateway_pb2.Usage | None = None


def generate(stub: gateway_pb2_grpc.GatewayStub, ids: list[int], timeout: float = 60.0,
             skip_special_tokens: bool = False, prompt_cache: gateway_pb2.PromptCache | None = None,
             **sampling) -> Result:
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids), skip_special_tokens=skip_special_tokens,
                                      prompt_cache=prompt_cache)
    for k, v in sampling.items():
        if k == "logit_bias":
            for tok, b in v.items():
                req.sampling.logit_bias[tok] = b
        elif k == "stop_token_ids":
            req.sampling.stop_token_ids.extend(v)
        else:
            setattr(req.sampling, k, v)
    out = Result()
    for r in stub.Generate(req, timeout=timeout):
        out.tokens += list(r.token_ids)
        out.text += r.text
        if r.HasField("finish"):
            out.finish = r.finish.finish_reason
            if r.finish.HasField("token_id"):
                out.matched_token = r.finish.token_id
        if r.HasField("usage"):
            out.usage = r.usage
    return out


def generate_after_failover(stub: gateway_pb2_grpc.GatewayStub, ids: list[int], max_tokens: int,
                            within: float = 6.0) -> Result:
    """A greedy request retried while it gets UNAVAILABLE, for at most `within` seconds: after a worker
    died, the gateway may route to it until its next health poll."""
    deadline = time.monotonic() + within
    while True:
        try:
            return generate(stub, ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, timeout=30)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Reference:
    """The single-process oracle on the same model directory (fp32, CPU)."""

    def __init__(self, model_dir: Path) -> None:
        from common.runtime.runner import ModelRunner
        from common.sampling.token_sampler import SpecialIds, TokenSampler

        self.runner = ModelRunner(model_dir, "cpu", torch.float32, page_size=16, num_pages=512)
        self.sampler = TokenSampler(SpecialIds.from_model_dir(str(model_dir)))

    def greedy(self, ids: list[int], max_tokens: int, **kw) -> list[int]:
        from common.serving.sampling_params import SamplingParams
        from common.tools.generate import reference_generate

        kw.setdefault("ignore_eos", True)
        return reference_generate(self.runner, self.sampler, ids,
                                  SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw))


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


def worker_stub(port: int, role: str):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    return (worker_pb2_grpc.DecodeWorkerStub if role == "decode" else worker_pb2_grpc.PrefillWorkerStub)(ch)


def load_of(port: int, role: str) -> worker_pb2.WorkerLoad:
    return worker_stub(port, role).GetLoad(worker_pb2.LoadRequest(), timeout=5)


def streams_on(port: int) -> int:
    """Requests a decode worker is streaming: running, or with their KV in and first token sent but
    not yet in a step (they count as waiting_for_kv until they join the batch)."""
    load = load_of(port, "decode")
    return load.running + load.waiting_for_kv


def wait_pages_free(cluster: Cluster, expected: dict[tuple[str, int], int], timeout: float = 15.0) -> dict:
    """Poll every worker's free page count until it equals `expected` (or time out); returns last seen."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {key: load_of(key[1], key[0]).free_pages for key in expected}
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def free_pages(cluster: Cluster) -> dict[tuple[str, int], int]:
    out = {("prefill", p): load_of(p, "prefill").free_pages for p in cluster.prefill_ports}
    out.update({("decode", p): load_of(p, "decode").free_pages for p in cluster.decode_ports})
    return out


@pytest.fixture
def launch(tmp_path: Path) -> Iterator:
    """launch(model_dir, **start_cluster kwargs) -> ready Cluster; every cluster is stopped at teardown."""
    clusters: list[Cluster] = []

    def _launch(model_dir: Path, **kw) -> Cluster:
        kw.setdefault("log_dir", tmp_path / f"logs{len(clusters)}")
        c = start_cluster(model_dir, **kw)
        clusters.append(c)
        try:
            c.wait_ready(90)
        except Exception:
            _dump_logs(kw["log_dir"])
            raise
        return c

    yield _launch
    for c in clusters:
        c.stop()


@contextmanager
def ready_cluster(model_dir: Path, log_dir: Path, **kw) -> Iterator[Cluster]:
    """A started, ready cluster (its logs printed if it never gets ready), stopped on exit: the body of
    a module-scoped cluster fixture."""
    c = start_cluster(model_dir, log_dir=log_dir, **kw)
    try:
        c.wait_ready(90)
    except Exception:
        _dump_logs(log_dir)
        c.stop()
        raise
    try:
        yield c
    finally:
        c.stop()


def _dump_logs(log_dir: Path) -> None:
    for f in sorted(Path(log_dir).glob("*.log")):
        print(f"===== {f.name}\n{f.read_text()[-4000:]}")


def gateway(cluster: Cluster) -> gateway_pb2_grpc.GatewayStub:
    return gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(cluster.gateway_address))


def proc_stats(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        threads = int(next(line.split()[1] for line in f if line.startswith("Threads:")))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def supervised(cluster: Cluster) -> Iterator[io.StringIO]:
    """Run `cluster.supervise` every 0.1 s in a thread (as `glmserve local` does) while the block
    runs; yields the supervisor's log."""
    out, stop = io.StringIO(), threading.Event()

    def loop() -> None:
        while not stop.is_set():
            assert cluster.supervise(out) is None, "the gateway died"
            time.sleep(0.1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join(5)
