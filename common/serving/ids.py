"""Torch-free ids.

transfer id  uint64 drawn by the gateway per dispatch attempt; the rendezvous key of one
             prefill -> decode KV hand-off. Never 0 (0 means "unset" on the wire). No worker
             changes it.
request id   the client-visible id of a request ("chatcmpl-<hex>", or the client's own).
"""

from __future__ import annotations

import secrets
import uuid

UINT64_MAX = (1 << 64) - 1


def new_transfer_id() -> int:
    """A uniformly random non-zero uint64."""
    while True:
        tid = secrets.randbits(64)
        if tid:
            return tid


def new_request_id(prefix: str = "chatcmpl-") -> str:
    return prefix + uuid.uuid4().hex


def is_valid_transfer_id(tid: int) -> bool:
    return 0 < tid <= UINT64_MAX
