"""A supervised local cluster: kill -9 of a worker under load ends its streams with a clear status,
the launcher restarts it, the gateway takes it back by health, and later answers equal the reference."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from common.tools.launch import start_cluster
from protos import gateway_pb2
from tests.e2e.conftest import _dump_logs, gateway, generate, streams_on


def _stream(stub, ids, max_tokens):
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = max_tokens, 0.0, True
    return stub.Generate(req, timeout=60)


def _recovered(stub, ids, want, deadline):
    """Seconds until a request succeeds again and equals `want` (retrying while UNAVAILABLE)."""
    start = time.monotonic()
    while True:
        try:
            assert generate(stub, ids, max_tokens=len(want), temperature=0.0, ignore_eos=True).tokens == want
            return time.monotonic() - start
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), e
            assert time.monotonic() < deadline, f"not recovered: {e.code()} {e.details()}"
            time.sleep(0.2)


def gateway_counts_healthy(cluster) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{cluster.http_port}/get_server_info",
                                 headers={"Authorization": "Bearer sk-supervised"})
    with urllib.request.urlopen(req, timeout=5) as reply:
        return sum(w["healthy"] for w in json.load(reply)["workers"])


def test_killed_workers_are_restarted_and_served_again(tiny_model_dir: Path, tmp_path: Path, reference) -> None:
    # HTTP guarded by a key: readiness still waits for the gateway to count every worker healthy
    cluster = start_cluster(tiny_model_dir, prefill=1, decode=2, log_dir=tmp_path,
                            extra_gateway_args=["--api-key", "sk-supervised"])
    out, stop = io.StringIO(), threading.Event()

    def supervise() -> None:
        while not stop.is_set():
            assert cluster.supervise(out) is None
            time.sleep(0.1)

    sup = threading.Thread(target=supervise, daemon=True)
    try:
        cluster.wait_ready(90)
        assert gateway_counts_healthy(cluster) == 3  # readiness waited for the gateway to see them all
        sup.start()
        stub = gateway(cluster)
        ids = [9, 8, 7, 6]
        want = reference.greedy(ids, 5)
        # decode: 4 long streams, kill -9 the worker serving most of them
        iters = [iter(_stream(stub, [7 + i, 8, 9, 10], 900)) for i in range(4)]
        for it in iters:
            next(it)
        running = [streams_on(p) for p in cluster.decode_ports]
        victim = f"decode{running.index(max(running))}"
        os.kill(cluster.procs[victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        ended = []
        for it in iters[:]:
            try:
                for _ in it:
                    pass
            except grpc.RpcError as e:
                ended.append(e.code())
        assert ended and set(ended) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}, ended
        # the surviving decode worker serves meanwhile
        assert generate(stub, ids, max_tokens=5, temperature=0.0, ignore_eos=True).tokens == want
        cluster.wait_ready(60)  # the restarted worker is SERVING again
        decode_recovery = time.monotonic() - killed
        for _ in range(4):  # both decode workers answer (the router spreads over them)
            assert generate(stub, ids, max_tokens=5, temperature=0.0, ignore_eos=True).tokens == want
        # prefill: the only one; requests are UNAVAILABLE until it is back
        os.kill(cluster.procs["prefill0"].pid, signal.SIGKILL)
        prefill_recovery = _recovered(stub, ids, want, time.monotonic() + 60)
        log = out.getvalue()
        assert f"restarting {victim}" in log and "restarting prefill0" in log, log
        assert cluster.restarts == {victim: 1, "prefill0": 1}
        print(f"decode recovery {decode_recovery:.1f}s, prefill recovery {prefill_recovery:.1f}s, "
              f"{len(ended)} streams ended {sorted({c.name for c in ended})}")
    except Exception:
        _dump_logs(tmp_path)
        raise
    finally:
        stop.set()
        sup.join(5)
        codes = cluster.stop()
    assert set(codes) == {"gateway", "prefill0", "decode0", "decode1"}
