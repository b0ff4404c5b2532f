"""`python -m gateway ...` (or `glmserve gateway ...`): GatewayConfig.from_args -> serve()."""

from __future__ import annotations

import sys

from common.serving.grpc_server import run
from common.serving.log import setup_logging
from gateway.config import GatewayConfig


def main(argv: list[str] | None = None) -> int:
    config = GatewayConfig.from_args(argv)
    setup_logging("gateway", level=config.log_level)
    from gateway.server import serve

    run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
