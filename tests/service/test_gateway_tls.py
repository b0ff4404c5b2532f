"""TLS on the gateway's public ports: with --ssl-certfile / --ssl-keyfile both the gRPC and the HTTP
port speak only TLS (a self-signed certificate made here with the openssl CLI), and `glmserve health
--ca-file` checks readiness through it."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import aiohttp
import grpc
import pytest

from common.serving import healthcheck
from gateway.config import GatewayConfig
from protos import gateway_pb2, gateway_pb2_grpc
from tests.service.gateway_harness import Script, chat_request, chunked, gateway_with_fakes, run


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_grpc_and_http_serve_tls_only(model_dir, tok, cert):
    certfile, keyfile = cert
    ids = tok.encode("over tls") + [tok.token_id("<|endoftext|>")]

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script(chunks=chunked(ids, [2]), finish_token=ids[-1]),
                                      ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)) as h:
            out = {}
            creds = grpc.ssl_channel_credentials(certfile.read_bytes())
            async with grpc.aio.secure_channel(h.address, creds) as ch:
                msgs = [m async for m in gateway_pb2_grpc.GatewayStub(ch).Chat(
                    chat_request(thinking=gateway_pb2.Thinking(enabled=False)))]
                out["grpc"] = "".join(m.delta.content for m in msgs)
            try:
                await h.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=2)  # plaintext
            except grpc.aio.AioRpcError as e:
                out["grpc_plain"] = e.code()
            port = h.gateway.http_port
            trust = ssl.create_default_context(cafile=str(certfile))
            async with aiohttp.ClientSession() as s:
                r = await s.post(f"https://127.0.0.1:{port}/v1/completions", ssl=trust,
                                 json={"prompt": "hi", "max_tokens": 4})
                out["https"] = (r.status, (await r.json())["choices"][0]["text"])
                try:
                    await s.get(f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=2))
                except aiohttp.ClientError as e:
                    out["http_plain"] = type(e).__name__
            out["health"] = await _health(h.address, certfile)
            return out

    out = run(scenario())
    assert out["grpc"] == "over tls"
    assert out["grpc_plain"] == grpc.StatusCode.UNAVAILABLE
    assert out["https"] == (200, "over tls")
    assert "http_plain" in out  # the TLS port does not answer plaintext HTTP
    assert out["health"] == 0


async def _health(address: str, certfile: Path) -> int:
    return await asyncio.to_thread(healthcheck.main, [address, "glmserve.v1.Gateway", "--ca-file", str(certfile)])


def test_certificate_and_key_go_together(model_dir):
    with pytest.raises(ValueError, match="--ssl-certfile and --ssl-keyfile go together"):
        GatewayConfig(model_path=str(model_dir), prefill=("a:1",), decode=("b:1",), ssl_certfile="cert.pem")
