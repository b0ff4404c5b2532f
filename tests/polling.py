"""Waiting in async tests for a state the code under test reaches on its own (a health round, an
engine step, a handler unwinding): polled with a deadline, so a slow machine waits longer instead of
failing, and a state never reached fails naming what was awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(cond: Callable[[], bool], what: str = "the awaited state", timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.01)
