"""The messages every engine thread handles, whatever its role.

A role's own messages live next to its engine (decode_worker/messages.py, prefill_worker/messages.py);
each is a frozen dataclass with one handler on the engine (common/worker/dispatch.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wake:
    """Ends the engine's wait on an empty inbox; does nothing else."""


@dataclass(frozen=True)
class Stop:
    """Ends the engine's loop once the turn that reads it is over."""


__all__ = ["Stop", "Wake"]
