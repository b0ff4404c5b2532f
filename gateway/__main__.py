"""`python -m gateway ...` (or `glmserve gateway ...`): GatewayConfig.from_args -> serve()."""

from __future__ import annotations

import dataclasses
import logging
import sys

from common.serving.grpc_server import run
from common.serving.launch_flags import foreign_flags_given
from common.serving.log import setup_logging
from common.serving.model_files import GATEWAY_FILES, is_repo_id, resolve_model_path
from gateway.config import GatewayConfig, build_arg_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser()
    ns = parser.parse_args(argv)
    try:
        config = GatewayConfig.from_namespace(ns)
        path = resolve_model_path(config.model_path, files=GATEWAY_FILES)
    except ValueError as e:
        parser.error(str(e))  # one line and exit status 2, like any bad flag
    setup_logging("gateway", level=config.log_level)
    model_id = config.model_path if is_repo_id(config.model_path) else None
    config = dataclasses.replace(config, model_path=path, model_id=model_id)
    given = foreign_flags_given(ns)
    if given:
        logging.getLogger("gateway").info("flags of the workers, not used by the gateway: %s", " ".join(given))
    from gateway.server import serve

    run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
