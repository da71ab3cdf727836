"""The actor runtime: ask/tell, the bounded mailbox, stop as a message, teardown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest

from mailer.actors import (
    Actor,
    ActorDead,
    AskTimeout,
    MailboxFull,
    NullObserver,
    start_actor,
)

pytestmark = pytest.mark.timeout(5)


# -- messages and actors used by the tests ---------------------------------------------


class Incr(msgspec.Struct):
    n: int = 1


class Get(msgspec.Struct):
    pass


class Fail(msgspec.Struct):
    """Raises ValueError (or TimeoutError) from handle."""

    reason: str
    timeout_error: bool = False


class Block(msgspec.Struct):
    """Waits in handle until the actor's gate opens; then raises if ``crash``."""

    crash: bool = False


class AskSelf(msgspec.Struct):
    pass


class StartTask(msgspec.Struct):
    """Starts an owned task that raises once the task gate opens."""


Msg = Incr | Get | Fail | Block | AskSelf | StartTask


class Counter(Actor[Msg]):
    mailbox_size = 8

    def __init__(self) -> None:
        self.count = 0
        self.gate = asyncio.Event()
        self.task_gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.stops: list[BaseException | None] = []
        self.events: list[str] = []

    async def handle(self, msg: Msg) -> object:
        match msg:
            case Incr(n=n):
                self.count += n
                return self.count
            case Get():
                return self.count
            case Fail(reason=reason, timeout_error=True):
                raise TimeoutError(reason)
            case Fail(reason=reason):
                raise ValueError(reason)
            case Block(crash=crash):
                self.entered.set()
                await self.gate.wait()
                if crash:
                    raise RuntimeError("crashed after the gate")
                return "released"
            case AskSelf():
                return await self.ref.ask(Get())
            case StartTask():
                self.spawn_task(self._fail_later(), name="failing")
                return "started"

    async def _fail_later(self) -> None:
        await self.task_gate.wait()
        raise RuntimeError("owned task failed")

    async def on_stop(self, error: BaseException | None) -> None:
        self.events.append("on_stop")
        self.stops.append(error)


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.full: list[str] = []
        self.crashes: list[tuple[str, BaseException]] = []
        self.started: dict[str, Callable[[], int]] = {}
        self.stopped: list[str] = []

    def on_actor_started(self, actor_name: str, mailbox_depth: Callable[[], int]) -> None:
        self.started[actor_name] = mailbox_depth

    def on_actor_stopped(self, actor_name: str) -> None:
        self.stopped.append(actor_name)

    def on_mailbox_full(self, actor_name: str) -> None:
        self.full.append(actor_name)

    def on_crash(self, actor_name: str, exc: BaseException) -> None:
        self.crashes.append((actor_name, exc))


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Every task the runtime started in a test is finished by the end of it."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    me = asyncio.current_task()
    leftover = [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]
    assert leftover == []


# -- ask / tell ------------------------------------------------------------------------


async def test_ask_returns_what_handle_returned() -> None:
    ref = await start_actor(Counter(), name="counter")
    assert ref.name == "counter"
    assert ref.alive and not ref.done
    assert await ref.ask(Incr(2), timeout=1) == 2
    ref.tell(Incr(3))
    assert await ref.ask(Get(), timeout=1) == 5
    await ref.stop()


async def test_ask_error_goes_to_requester_and_actor_lives_on() -> None:
    actor = Counter()
    ref = await start_actor(actor, name="counter")
    with pytest.raises(ValueError, match="bad input"):
        await ref.ask(Fail("bad input"), timeout=1)
    assert ref.alive
    assert await ref.ask(Incr(), timeout=1) == 1
    await ref.stop()
    assert actor.stops == [None]


async def test_ask_timeout_raises_ask_timeout_and_actor_lives_on() -> None:
    actor = Counter()
    ref = await start_actor(actor, name="slow")
    with pytest.raises(AskTimeout) as caught:
        await ref.ask(Block(), timeout=0.02)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.code == "ask_timeout"
    actor.gate.set()
    assert await ref.ask(Incr(), timeout=1) == 1
    await ref.stop()


async def test_timeout_error_raised_by_handler_is_not_an_ask_timeout() -> None:
    ref = await start_actor(Counter(), name="counter")
    with pytest.raises(TimeoutError) as caught:
        await ref.ask(Fail("smtp timeout", timeout_error=True), timeout=1)
    assert not isinstance(caught.value, AskTimeout)
    await ref.stop()


async def test_asking_itself_is_refused_instead_of_deadlocking() -> None:
    ref = await start_actor(Counter(), name="narcissus")
    with pytest.raises(RuntimeError, match="deadlock"):
        await ref.ask(AskSelf(), timeout=1)
    await ref.stop()


async def test_told_message_that_raises_crashes_the_actor() -> None:
    actor, observer = Counter(), Recorder()
    ref = await start_actor(actor, name="fragile", observer=observer)
    ref.tell(Fail("boom"))
    error = await ref.wait()
    assert isinstance(error, ValueError)
    assert ref.done and not ref.alive
    assert ref.exit_error is error
    # on_stop ran after the crash, with the crash.
    assert actor.stops == [error]
    assert observer.crashes == [("fragile", error)]
    assert observer.stopped == ["fragile"]


# -- the bounded mailbox ---------------------------------------------------------------


async def test_full_mailbox_rejects_at_once_and_counts() -> None:
    actor, observer = Counter(), Recorder()
    ref = await start_actor(actor, name="busy", mailbox_size=2, observer=observer)
    ref.tell(Block())
    await actor.entered.wait()  # Block left the mailbox: two free slots
    ref.tell(Incr())
    ref.tell(Incr())
    assert ref.mailbox_depth == 2
    assert observer.started["busy"]() == 2
    with pytest.raises(MailboxFull) as caught:
        ref.tell(Incr())
    assert caught.value.retryable
    with pytest.raises(MailboxFull):
        await ref.ask(Get(), timeout=1)
    assert observer.full == ["busy", "busy"]
    assert ref.mailbox_depth == 2  # rejected messages did not grow the mailbox
    actor.gate.set()
    await ref.stop()
    assert actor.count == 2  # only the two accepted increments were handled


async def test_stop_succeeds_on_a_full_mailbox_and_drains_it_first() -> None:
    actor = Counter()
    ref = await start_actor(actor, name="busy", mailbox_size=2)
    ref.tell(Block())
    await actor.entered.wait()
    ref.tell(Incr())
    ref.tell(Incr())
    stopping = asyncio.create_task(ref.stop())
    await asyncio.sleep(0)
    assert not ref.alive  # marked: new messages are refused while it drains
    with pytest.raises(ActorDead):
        ref.tell(Incr())
    actor.gate.set()
    await stopping
    assert actor.count == 2
    assert actor.stops == [None]


async def test_a_failing_observer_does_not_break_the_sender() -> None:
    class Broken(NullObserver):
        def on_mailbox_full(self, actor_name: str) -> None:
            raise RuntimeError("metrics are down")

    actor = Counter()
    ref = await start_actor(actor, name="busy", mailbox_size=1, observer=Broken())
    ref.tell(Block())
    await actor.entered.wait()
    ref.tell(Incr())
    with pytest.raises(MailboxFull):
        ref.tell(Incr())
    actor.gate.set()
    await ref.stop()


# -- stop and teardown -----------------------------------------------------------------


async def test_stop_is_a_message_and_is_idempotent() -> None:
    actor = Counter()
    ref = await start_actor(actor, name="counter")
    for _ in range(3):
        ref.tell(Incr())
    await asyncio.gather(ref.stop(), ref.stop())
    await ref.stop()
    assert actor.count == 3  # everything queued before Stop was handled
    assert actor.stops == [None]  # on_stop ran once
    assert ref.done and not ref.alive
    assert await ref.wait() is None


async def test_messages_to_a_dead_actor_fail_at_once() -> None:
    ref = await start_actor(Counter(), name="gone")
    await ref.stop()
    with pytest.raises(ActorDead):
        ref.tell(Incr())
    with pytest.raises(ActorDead) as caught:
        await ref.ask(Get())  # no timeout: it must not wait at all
    assert caught.value.code == "actor_dead"
    assert ref.mailbox_depth == 0


async def test_pending_asks_fail_with_actor_dead_when_the_actor_crashes() -> None:
    actor = Counter()
    ref = await start_actor(actor, name="doomed")
    ref.tell(Block(crash=True))
    await actor.entered.wait()
    asks = [asyncio.create_task(ref.ask(Get())) for _ in range(2)]
    await asyncio.sleep(0)
    assert ref.mailbox_depth == 2
    actor.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*asks, return_exceptions=True), 1)
    assert [type(r) for r in results] == [ActorDead, ActorDead]
    assert all(isinstance(r, ActorDead) and isinstance(r.__cause__, RuntimeError) for r in results)
    assert isinstance(actor.stops[0], RuntimeError)


async def test_in_flight_ask_fails_with_actor_dead_when_an_owned_task_crashes() -> None:
    actor = Counter()
    ref = await start_actor(actor, name="owner")
    assert await ref.ask(StartTask(), timeout=1) == "started"
    in_flight = asyncio.create_task(ref.ask(Block()))
    await actor.entered.wait()
    actor.task_gate.set()  # the owned task raises while the handler still waits
    with pytest.raises(ActorDead):
        await asyncio.wait_for(in_flight, 1)
    error = await ref.wait()
    assert isinstance(error, RuntimeError)
    assert str(error) == "owned task failed"
    assert actor.stops == [error]


async def test_owned_tasks_are_cancelled_and_awaited_before_on_stop() -> None:
    class Ticker(Counter):
        async def on_start(self) -> None:
            self.task = self.spawn_task(self._tick(), name="tick")

        async def _tick(self) -> None:
            try:
                await asyncio.Event().wait()
            finally:
                self.events.append("tick cancelled")

    actor = Ticker()
    ref = await start_actor(actor, name="ticker")
    assert not actor.task.done()
    await ref.stop()
    assert actor.task.cancelled()
    assert actor.events == ["tick cancelled", "on_stop"]
    assert actor.stops == [None]


async def test_on_start_failure_is_raised_by_start_and_on_stop_still_runs() -> None:
    class BadStart(Counter):
        async def on_start(self) -> None:
            raise ConnectionError("database down")

    actor = BadStart()
    with pytest.raises(ConnectionError):
        await start_actor(actor, name="bad")
    assert len(actor.stops) == 1
    assert isinstance(actor.stops[0], ConnectionError)


async def test_an_actor_instance_serves_one_incarnation() -> None:
    actor = Counter()
    ref = await start_actor(actor, name="once")
    with pytest.raises(RuntimeError, match="single incarnation"):
        await start_actor(actor, name="twice")
    await ref.stop()


async def test_spawn_task_after_teardown_is_refused() -> None:
    actor = Counter()
    ref = await start_actor(actor, name="late")
    await ref.stop()
    with pytest.raises(ActorDead):
        actor.spawn_task(asyncio.sleep(0))


class SlowStart(Actor[Msg]):
    """An actor whose on_start waits for its gate (a subscription being set up)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def on_start(self) -> None:
        await self.gate.wait()

    async def handle(self, msg: Msg) -> object:
        return None


async def test_running_is_true_from_the_end_of_on_start_to_the_stop() -> None:
    actor = SlowStart()
    starting = asyncio.ensure_future(start_actor(actor, name="slow"))
    await asyncio.sleep(0.01)
    assert not starting.done()
    actor.gate.set()
    ref = await starting
    assert ref.alive and ref.running
    await ref.stop()
    assert not ref.alive and not ref.running
