"""TLS on the gateway's public ports (--ssl-certfile / --ssl-keyfile, SGLang's names): one PEM
certificate chain and private key serve both the gRPC API and the OpenAI HTTP API (and HTTP's
/metrics). Off by default. The --metrics-port listener and the channels to the workers stay
plaintext: keep them on a private network (docs/reliability.md §1)."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from gateway.config import GatewayConfig


def _pair(config: GatewayConfig) -> tuple[bytes, bytes] | None:
    """(certificate chain, private key) as PEM bytes; None without TLS. Unreadable files fail the start."""
    if config.ssl_certfile is None:
        return None
    return Path(config.ssl_certfile).read_bytes(), Path(config.ssl_keyfile).read_bytes()


def grpc_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    pair = _pair(config)
    if pair is None:
        return None
    cert, key = pair
    return grpc.ssl_server_credentials([(key, cert)])


def http_context(config: GatewayConfig) -> ssl.SSLContext | None:
    if config.ssl_certfile is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2+, the library's safe ciphers
    ctx.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    return ctx
