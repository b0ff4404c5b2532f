"""The worker skeleton's engine thread: typed messages dispatched to one handler per type, Stop,
the published load snapshot, and Reply (an event loop's future settled from another thread)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from common.worker.dispatch import Handlers, UnknownMessageError
from common.worker.engine import EngineThread
from common.worker.load import EngineSnapshot, WorkerLoadFigures
from common.worker.messages import Wake
from common.worker.reply import Reply


@dataclass(frozen=True)
class Ping:
    n: int


@dataclass(frozen=True)
class Pong:
    text: str


@dataclass(frozen=True)
class Stray:
    """A message no engine handles."""


class SubPing(Ping):
    pass


class Source:
    """A scheduler stand-in: counts the engine can publish."""

    def __init__(self) -> None:
        self.running = 0
        self.free = 10

    @property
    def busy(self) -> bool:
        return self.running > 0

    def load(self) -> WorkerLoadFigures:
        return WorkerLoadFigures(running=self.running, queued=0, waiting_for_kv=0, free_pages=self.free,
                                 total_pages=10)


class Echo(EngineThread[Ping | Pong]):
    def __init__(self) -> None:
        self.source = Source()
        super().__init__("echo", self.source)
        self.seen: list[object] = []
        self.turns = 0
        self.handle(Ping, self.seen.append)
        self.handle(Pong, self.seen.append)

    def run_once(self) -> None:
        self._drain_inbox(block=True)
        self.turns += 1
        self.publish()


def test_messages_reach_their_handler_in_order() -> None:
    engine = Echo()
    for msg in (Ping(1), Pong("a"), Wake(), Ping(2)):
        engine.post(msg)
    engine.run_once()
    assert engine.seen == [Ping(1), Pong("a"), Ping(2)]


def test_posting_an_unknown_message_is_a_clear_error() -> None:
    engine = Echo()
    with pytest.raises(UnknownMessageError) as err:
        engine.post(Stray())  # type: ignore[arg-type]
    assert not isinstance(err.value, AttributeError) and isinstance(err.value, TypeError)
    text = str(err.value)
    assert "Echo" in text and "Stray" in text and "Ping" in text and "Pong" in text
    assert engine.inbox.empty(), "a refused message must not reach the inbox"


def test_an_unknown_message_in_the_inbox_fails_the_drain_with_the_same_error() -> None:
    engine = Echo()
    engine.inbox.put(Stray())  # type: ignore[arg-type]  # bypassing post
    with pytest.raises(UnknownMessageError, match="Stray"):
        engine.run_once()


def test_dispatch_is_by_exact_type_and_each_type_registers_once() -> None:
    handlers = Handlers("h")
    got: list[Ping] = []
    handlers.on(Ping, got.append)
    handlers.dispatch(Ping(3))
    assert got == [Ping(3)]
    with pytest.raises(UnknownMessageError):
        handlers.dispatch(SubPing(4))  # a subclass is another message
    with pytest.raises(ValueError, match="already has a handler"):
        handlers.on(Ping, got.append)


def test_stop_ends_the_thread_after_what_was_posted_before_it() -> None:
    engine = Echo()
    engine.start()
    engine.post(Ping(1))
    engine.stop(timeout=5)
    assert not engine.thread.is_alive()
    assert engine.seen == [Ping(1)]


def test_snapshot_is_published_not_read_live() -> None:
    engine = Echo()
    first = engine.snapshot
    assert first.load.free_pages == 10 and not first.busy
    engine.source.running, engine.source.free = 2, 7
    assert engine.snapshot is first, "the snapshot changes only when the engine publishes"
    engine.post(Wake())
    engine.run_once()
    assert engine.snapshot is not first
    assert engine.snapshot.load == WorkerLoadFigures(2, 0, 0, 7, 10) and engine.snapshot.busy
    assert first.load.free_pages == 10, "a published snapshot is never mutated"


def test_stalled_needs_work_in_hand_and_no_turn_for_the_limit() -> None:
    load = WorkerLoadFigures(1, 0, 0, 5, 10)
    assert EngineSnapshot(load, busy=True, progress=100.0).stalled(30.0, now=131.0)
    assert not EngineSnapshot(load, busy=True, progress=100.0).stalled(30.0, now=129.0)
    assert not EngineSnapshot(load, busy=False, progress=0.0).stalled(30.0, now=131.0)
    engine = Echo()
    engine.source.running = 1
    engine.last_progress = time.monotonic() - 60
    engine.publish()
    assert engine.stalled(30.0) and not engine.stalled(120.0)


def test_used_pages() -> None:
    assert WorkerLoadFigures(running=0, queued=0, waiting_for_kv=0, free_pages=3, total_pages=10).used_pages == 7


def test_reply_is_settled_from_another_thread_once() -> None:
    async def main() -> tuple[int, BaseException | None]:
        ok: Reply[int] = Reply.on_running_loop()
        bad: Reply[int] = Reply.to(asyncio.get_running_loop().create_future())
        t = threading.Thread(target=lambda: (ok.set_result(5), ok.set_result(6), bad.set_exception(KeyError("x"))))
        t.start()
        t.join()
        value = await ok.future
        try:
            await bad.future
        except KeyError as e:
            return value, e
        return value, None

    value, error = asyncio.run(main())
    assert value == 5 and isinstance(error, KeyError)


def test_reply_to_a_cancelled_future_is_ignored() -> None:
    async def main() -> list[dict[str, object]]:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _, ctx: errors.append(ctx))
        reply: Reply[int] = Reply.on_running_loop()
        reply.future.cancel()  # the awaiter gave up (timed out, cancelled)
        reply.set_result(1)
        reply.set_exception(KeyError("late"))
        await asyncio.sleep(0.01)
        return errors

    assert asyncio.run(main()) == []
