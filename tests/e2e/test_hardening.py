"""Hardening of a default local deployment, on one shared cluster of real processes: nothing listens
beyond the configured address (gRPC, HTTP, /metrics, the KV-pairing store, the gloo pair sockets),
pairing needs the cluster secret, malformed wire messages are INVALID_ARGUMENT."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from common.tools.launch import Cluster, start_cluster
from common.transport.auth import PAIR_AUTH_KEY, PairAuth
from protos import gateway_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.conftest import gateway, generate, ready_cluster

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("hardening_logs")
    with ready_cluster(tiny_model_dir, log_dir, extra_worker_args=["--metrics-port", "0"],
                       extra_gateway_args=["--metrics-port", "0"]) as c:
        yield c


def _addr(hex_addr: str) -> str:
    """/proc/net/tcp{,6} "0100007F:1F90" -> "127.0.0.1" (the address part, host byte order words)."""
    ip = hex_addr.split(":")[0]
    words = [bytes.fromhex(ip[i:i + 8])[::-1] for i in range(0, len(ip), 8)]
    raw = b"".join(words)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw)
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in raw[12:])  # IPv4-mapped
    return ":".join(raw[i:i + 2].hex() for i in range(0, 16, 2))


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == LISTEN and cols[9] in inodes:
                    out.add((_addr(cols[1]), int(cols[1].split(":")[1], 16)))
    return out


def test_nothing_listens_beyond_the_configured_address(cluster: Cluster) -> None:
    # a request first, so the KV pair (store client, gloo sockets) exists on both workers
    assert generate(gateway(cluster), [5, 6, 7], max_tokens=3, temperature=0.0, ignore_eos=True).finish == "length"
    seen = {name: listening(proc.pid) for name, proc in cluster.procs.items()}
    assert all(seen.values()), seen
    # gRPC, metrics and (decode) the pairing store at least
    assert len(seen["decode0"]) >= 3 and len(seen["gateway"]) >= 3, seen
    stray = {name: sorted(a for a in socks if a[0] != "127.0.0.1") for name, socks in seen.items()}
    assert not any(stray.values()), f"listening beyond 127.0.0.1: {stray}"


def test_pair_without_the_secret_is_unauthenticated(cluster: Cluster) -> None:
    stub = worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(f"127.0.0.1:{cluster.decode_ports[0]}"))
    intruder = worker_pb2.WorkerInfo(worker_id="intruder")
    forged = PairAuth(b"not-the-cluster-secret-0123456789").request_token("intruder")[0]
    for metadata in ((), ((PAIR_AUTH_KEY, forged),), ((PAIR_AUTH_KEY, "1.2.3"),)):
        with pytest.raises(grpc.RpcError) as err:
            stub.Pair(worker_pb2.PairRequest(prefill=intruder), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
        assert "pairing refused" in err.value.details()
    assert generate(gateway(cluster), [5, 6, 7], max_tokens=3, temperature=0.0, ignore_eos=True).finish == "length"


def test_worker_with_the_wrong_secret_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    good, bad = "a" * 32, "b" * 32
    c = start_cluster(tiny_model_dir, log_dir=tmp_path, http_port=None, extra_decode_args=["--cluster-secret", good],
                      extra_prefill_args=["--cluster-secret", bad])
    try:
        c.wait_ready(90)
        with pytest.raises(grpc.RpcError) as err:
            generate(gateway(c), [5, 6, 7], max_tokens=3, temperature=0.0)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
        assert "cluster secret" in err.value.details()
        logs = "".join(f.read_text() for f in tmp_path.glob("*.log"))
        assert good not in err.value.details() + logs and bad not in err.value.details() + logs
    finally:
        c.stop()


def _corpus(valid: bytes, text: bytes) -> dict[str, bytes]:
    """Malformed variants of a valid serialized request whose bytes contain the UTF-8 string `text`."""
    i = valid.index(text)
    bad_utf8 = valid[:i] + b"\xc3\x28" + valid[i + 2:]  # an invalid 2-byte sequence, same length
    return {"truncated": valid[:-3], "garbage": b"\xff\xff\xff\xff\xff", "bad_utf8": bad_utf8,
            "bad_length": b"\x0a\x7f" + valid[:4], "bad_wire_type": b"\x0f\x01"}


def _methods() -> list[tuple[str, str, bytes, bytes]]:
    """(process, full method, valid request bytes, a UTF-8 string inside them) per service."""
    chat = gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content="hé")])
    gen = gateway_pb2.GenerateRequest(text="hé")
    dec = worker_pb2.DecodeRequest(request_id="hé")
    pre = worker_pb2.PrefillRequest(request_id="hé")
    abort = worker_pb2.AbortRequest(request_id="hé")
    return [("gateway", "/glmserve.v1.Gateway/Chat", chat.SerializeToString(), "hé".encode()),
            ("gateway", "/glmserve.v1.Gateway/Generate", gen.SerializeToString(), "hé".encode()),
            ("decode0", "/glmserve.worker.v1.DecodeWorker/Generate", dec.SerializeToString(), "hé".encode()),
            ("decode0", "/glmserve.worker.v1.DecodeWorker/Abort", abort.SerializeToString(), "hé".encode()),
            ("prefill0", "/glmserve.worker.v1.PrefillWorker/Prefill", pre.SerializeToString(), "hé".encode()),
            ("prefill0", "/grpc.health.v1.Health/Check",
             health_pb2.HealthCheckRequest(service="hé").SerializeToString(), "hé".encode())]


def test_malformed_wire_messages_are_invalid_argument(cluster: Cluster, reference) -> None:
    ports = {"gateway": cluster.gateway_port, "decode0": cluster.decode_ports[0], "prefill0": cluster.prefill_ports[0]}
    refused = 0
    for proc, method, valid, text in _methods():
        with grpc.insecure_channel(f"127.0.0.1:{ports[proc]}") as ch:
            for kind, data in _corpus(valid, text).items():
                stream = method.endswith(("Generate", "Chat"))
                call = (ch.unary_stream if stream else ch.unary_unary)(method)
                with pytest.raises(grpc.RpcError) as err:
                    out = call(data, timeout=10)
                    if stream:
                        list(out)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, kind, err.value)
                assert "malformed request" in err.value.details(), (method, kind)
                refused += 1
    assert refused == 30
    for f in Path(cluster.log_dir).glob("*.log"):
        assert "Traceback" not in f.read_text(), f"{f.name} logged a traceback"
    ids = [5, 6, 7, 8]
    got = generate(gateway(cluster), ids, max_tokens=6, temperature=0.0, ignore_eos=True)
    assert got.tokens == reference.greedy(ids, 6)


@pytest.mark.parametrize("params", [{"type": "string"}, {"type": "object", "properties": 5},
                                    {"type": "object", "required": "city"}])
def test_tool_parameters_must_be_an_object_schema(cluster: Cluster, params: dict) -> None:
    req = gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content="hi")])
    tool = req.tools.add(type="function")
    tool.function.name = "f"
    tool.function.parameters.update(params)
    with pytest.raises(grpc.RpcError) as err:
        list(gateway(cluster).Chat(req, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools[0]" in err.value.details(), err.value
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}],
                       "tools": [{"type": "function", "function": {"name": "f", "parameters": params}}]}).encode()
    http = urllib.request.Request(cluster.http_base_url + "/chat/completions", data=body,
                                  headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as herr:
        urllib.request.urlopen(http, timeout=10)
    assert herr.value.code == 400 and "tools[0]" in herr.value.read().decode()
