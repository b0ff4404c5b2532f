"""`glmserve health HOST:PORT [SERVICE]`: exit 0 when grpc.health.v1 says SERVING (container
health checks; torch-free)."""

from __future__ import annotations

import argparse
import sys

from common.serving.launch_flags import HelpFormatter


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="glmserve health", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("service", nargs="?", default="", help="full service name (readiness); empty = liveness")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.add_argument("--ca-file", default=None, metavar="PEM",
                   help="connect over TLS, trusting these root certificates (a gateway started with "
                        "--ssl-certfile; for a self-signed certificate, the certificate itself)")
    args = p.parse_args(argv)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        if args.ca_file is None:
            channel = grpc.insecure_channel(args.address)
        else:
            with open(args.ca_file, "rb") as f:
                channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(f.read()))
        with channel as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                         timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"{args.address}: {e.code().name}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address} {args.service or '(liveness)'}: {name}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
