"""Hardening of a default local deployment, on one shared cluster of real processes: nothing listens
beyond the configured address (gRPC, HTTP, /metrics, the KV-pairing store, the gloo pair sockets),
pairing needs the cluster secret."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.tools.launch import Cluster, start_cluster
from common.transport.auth import PAIR_AUTH_KEY, PairAuth
from protos import worker_pb2, worker_pb2_grpc
from tests.e2e.conftest import _dump_logs, gateway, generate

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("hardening_logs")
    c = start_cluster(tiny_model_dir, log_dir=log_dir, extra_worker_args=["--metrics-port", "0"],
                      extra_gateway_args=["--metrics-port", "0"])
    try:
        c.wait_ready(90)
    except Exception:
        _dump_logs(log_dir)
        c.stop()
        raise
    yield c
    c.stop()


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
