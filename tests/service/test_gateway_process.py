"""`python -m gateway` as a real process: SGLang-style flags, serving, SIGTERM -> clean exit."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path

import grpc

from protos import gateway_pb2, gateway_pb2_grpc
from tests.service.fake_workers import FakeCluster
from tests.service.gateway_harness import (
    Script,
    chat_request,
    collect,
    run,
)

REPO = Path(__file__).resolve().parents[2]


def test_cli_process_serves_and_exits_cleanly_on_sigterm(model_dir, tok):
    ids = tok.encode("from a process") + [tok.token_id("<|endoftext|>")]

    async def scenario():
        cluster = await FakeCluster.start(lambda r: Script(chunks=[ids], finish_token=ids[-1]))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--model-path", str(model_dir),
            "--served-model-name", "glm-proc", "--prefill", cluster.prefill_addrs[0],
            "--decode", cluster.decode_addrs[0], "--tool-call-parser", "glm45", "--reasoning-parser", "glm45",
            "--context-length", "2048", "--request-timeout", "30", "--metrics-port", "0",
            cwd=REPO, stderr=asyncio.subprocess.PIPE)
        try:
            port = None
            while port is None:
                line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
                assert line, "gateway exited before serving"
                m = re.search(r"gateway serving glm-proc on port (\d+)", line)
                port = int(m.group(1)) if m else None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = gateway_pb2_grpc.GatewayStub(ch)
                _, ans = await collect(stub.Chat(chat_request(thinking=gateway_pb2.Thinking(enabled=False))))
                info = await stub.GetModelInfo(gateway_pb2.GetModelInfoRequest())
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 20)
            rest = (await proc.stderr.read()).decode()
            return ans, info, rc, time.monotonic() - t0, rest
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await cluster.stop()

    ans, info, rc, stop_s, rest = run(scenario(), timeout=60)
    assert ans["content"] == "from a process"
    assert info.served_model_name == "glm-proc" and info.max_context_length == 2048
    assert rc == 0 and stop_s < 15
    assert "shutting down: readiness NOT_SERVING" in rest
