"""Hardening of a default local deployment, on one shared cluster of real processes: nothing listens
beyond the configured address (gRPC, HTTP, /metrics, the KV-pairing store, the gloo pair sockets)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.tools.launch import Cluster, start_cluster
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
