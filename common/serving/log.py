"""Torch-free logging setup: one format for every process, prefixed with its role and rank.

    setup_logging("decode", rank=1)   ->  "12:00:01.234 INFO  decode[1] decode_worker.worker: ..."

The level comes from the `level` argument, else $GLMSERVE_LOG_LEVEL, else INFO.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-5s {tag} %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


def setup_logging(role: str, rank: int | None = None, level: str | int | None = None) -> logging.Logger:
    """Configure the root logger once per process (calling again replaces our handler)."""
    tag = role if rank is None else f"{role}[{rank}]"
    level = level if level is not None else os.environ.get("GLMSERVE_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        names = logging.getLevelNamesMapping()
        if level.upper() not in names:
            raise ValueError(f"unknown log level {level!r} (choose from {', '.join(names)})")
        level = names[level.upper()]
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_glmserve", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._glmserve = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT.format(tag=tag), _DATEFMT))
    root.addHandler(handler)
    root.setLevel(level)
    # grpc's own loggers are chatty at DEBUG
    logging.getLogger("grpc").setLevel(max(level, logging.INFO))
    return logging.getLogger(role)
