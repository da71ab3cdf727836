"""A small Go-style actor runtime on asyncio.

An actor is one long-lived task that owns its state and reads a bounded mailbox. Others
hold an ``ActorRef`` and talk to it only by messages (msgspec Structs by convention):

* ``ref.tell(msg)`` — fire-and-forget. If ``handle`` raises, the actor crashes and the
  error goes to its owner (the supervisor).
* ``await ref.ask(msg, timeout=...)`` — request/response through a ``reply_to`` future in
  the envelope. If ``handle`` raises, the error goes back to the requester and the actor
  lives on.
* ``await ref.stop()`` — stopping is itself a message: everything queued before it is
  still handled, then the actor tears down. Idempotent.

Overflow policy: a mailbox holds at most ``mailbox_size`` messages. ``tell`` and ``ask``
on a full mailbox raise ``MailboxFull`` at once — they never block the sender and the
mailbox never grows — and the event is counted through ``RuntimeObserver.on_mailbox_full``.
The sender decides: drop, retry later, or (listmonk-style) let the database and the next
scan pick the work up again. One slot above the bound is reserved for the Stop sentinel,
so stopping never fails on a full mailbox.

The run loop has three phases: setup (``on_start``), running (``handle`` per message),
teardown (``on_stop(error)``, always called, even after a crash or cancellation). At
teardown every pending ask fails with ``ActorDead`` and every task the actor started with
``spawn_task`` is cancelled and awaited; an exception in such a task crashes the actor.

Fault injection: a cell may be given an ``ActorFault``, awaited with the actor's name and
the message before every ``handle``. What it raises crashes the actor, whether the message
was told or asked (a dependency failing mid-handle looks the same from outside). Tests
drive crashes of any actor through it; production passes none, so nothing is called.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, ParamSpec, Protocol, TypeVar

__all__ = [
    "DEFAULT_MAILBOX_SIZE",
    "Actor",
    "ActorCell",
    "ActorDead",
    "ActorError",
    "ActorFault",
    "ActorRef",
    "AskTimeout",
    "MailboxFull",
    "NullObserver",
    "RuntimeObserver",
    "start_actor",
]

log = logging.getLogger("mailer.actors")

M = TypeVar("M")
T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_MAILBOX_SIZE = 1000

ActorFault = Callable[[str, object], Awaitable[None]]
"""``(actor name, message)``, awaited before each ``handle``; raising crashes the actor."""


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class ActorError(Exception):
    """Base of the runtime's errors. ``code`` is stable; ``retryable`` classifies it once."""

    code: ClassVar[str] = "actor_error"
    retryable: ClassVar[bool] = False

    def __init__(self, actor: str, detail: str) -> None:
        super().__init__(f"{actor}: {detail}")
        self.actor = actor
        self.detail = detail


class ActorDead(ActorError):
    """The actor is stopping or gone; the message was not (and will not be) handled.

    Retryable: a supervised actor may be restarted, and the database holds the work.
    ``__cause__`` is the error the actor died of, if any.
    """

    code = "actor_dead"
    retryable = True


class MailboxFull(ActorError):
    """The mailbox held ``mailbox_size`` messages; the message was rejected, not queued."""

    code = "mailbox_full"
    retryable = True


class AskTimeout(ActorError, TimeoutError):
    """No reply within the ask's timeout. The message may still be handled later."""

    code = "ask_timeout"
    retryable = True


# ---------------------------------------------------------------------------------------
# Observer: the metrics hook (the runtime does not import prometheus)
# ---------------------------------------------------------------------------------------


class RuntimeObserver(Protocol):
    """Callbacks the runtime invokes; exceptions raised by them are logged and ignored."""

    def on_actor_started(self, actor_name: str, mailbox_depth: Callable[[], int]) -> None:
        """An incarnation finished on_start. ``mailbox_depth()`` reads its queue."""
        ...

    def on_actor_stopped(self, actor_name: str) -> None:
        """An incarnation finished teardown (stop, crash or cancellation)."""
        ...

    def on_mailbox_full(self, actor_name: str) -> None: ...

    def on_crash(self, actor_name: str, exc: BaseException) -> None: ...

    def on_restart(self, actor_name: str) -> None:
        """Called by the supervisor just before it starts a new incarnation."""
        ...


class NullObserver:
    """Does nothing; subclass it to implement only the callbacks you need."""

    def on_actor_started(self, actor_name: str, mailbox_depth: Callable[[], int]) -> None:
        pass

    def on_actor_stopped(self, actor_name: str) -> None:
        pass

    def on_mailbox_full(self, actor_name: str) -> None:
        pass

    def on_crash(self, actor_name: str, exc: BaseException) -> None:
        pass

    def on_restart(self, actor_name: str) -> None:
        pass


def notify(hook: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
    """Calls an observer hook; a failing metrics hook must never break an actor."""
    try:
        hook(*args, **kwargs)
    except Exception:
        name = getattr(hook, "__qualname__", repr(hook))
        log.exception("runtime observer hook failed", extra={"hook": name})


# ---------------------------------------------------------------------------------------
# Actor base class
# ---------------------------------------------------------------------------------------


class Actor(ABC, Generic[M]):
    """Subclass it and implement ``handle``; state lives in plain attributes.

    One instance serves one incarnation: a supervisor builds a fresh instance on every
    restart, so nothing survives a crash that was not written to the database.
    """

    mailbox_size: ClassVar[int] = DEFAULT_MAILBOX_SIZE
    _cell: ActorCell[M] | None = None

    async def on_start(self) -> None:
        """Setup. The actor receives messages only after this returns."""

    @abstractmethod
    async def handle(self, msg: M) -> object:
        """Handles one message; the return value is the reply to an ``ask``."""

    async def on_stop(self, error: BaseException | None) -> None:
        """Teardown, always called: ``error`` is None after a normal stop, else the crash
        (or ``CancelledError``). Pending asks have already failed; spawned tasks are done.
        """

    @property
    def name(self) -> str:
        return self._require_cell().name

    @property
    def ref(self) -> ActorRef[M]:
        """The handle others hold; stable across supervised restarts."""
        return self._require_cell().ref

    def spawn_task(
        self, coro: Coroutine[Any, Any, T], *, name: str | None = None
    ) -> asyncio.Task[T]:
        """Starts background work owned by this actor (a subscription, a timer).

        The task is cancelled and awaited at teardown; if it raises, the actor crashes.
        """
        return self._require_cell().spawn_task(coro, name=name)

    async def fault_point(self, message: object) -> None:
        """Runs the test fault hook (``ActorFault``) for work done outside the mailbox, as
        the mailbox runs it before ``handle``: what it raises, the caller lets crash the
        actor. Nothing happens in production (no hook is set)."""
        await self._require_cell().fault_point(message)

    def request_stop(self) -> None:
        """Stops this incarnation after the messages already queued (callable from handle).

        Unlike ``ref.stop()`` this is an ordinary end: a ``permanent`` child is restarted.
        """
        self._require_cell().request_stop()

    def _require_cell(self) -> ActorCell[M]:
        if self._cell is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._cell


# ---------------------------------------------------------------------------------------
# Envelope, mailbox and the run loop
# ---------------------------------------------------------------------------------------


class _Stop(enum.Enum):
    STOP = enum.auto()


_STOP = _Stop.STOP


@dataclass(slots=True)
class _Envelope(Generic[M]):
    message: M
    reply_to: asyncio.Future[object] | None  # None for tell


class _Phase(enum.Enum):
    NEW = "new"
    SETUP = "setup"
    RUNNING = "running"
    TEARDOWN = "teardown"
    DEAD = "dead"


class ActorCell(Generic[M]):
    """One incarnation of an actor: its mailbox, its task and the tasks it owns.

    Internal to the runtime and the supervisor; other code holds an ``ActorRef``.
    """

    def __init__(
        self,
        actor: Actor[M],
        ref: ActorRef[M],
        *,
        mailbox_size: int | None = None,
        observer: RuntimeObserver | None = None,
        fault: ActorFault | None = None,
    ) -> None:
        if actor._cell is not None:
            raise RuntimeError("an Actor instance serves a single incarnation; build a new one")
        size = actor.mailbox_size if mailbox_size is None else mailbox_size
        if size < 1:
            raise ValueError("mailbox_size must be >= 1")
        actor._cell = self
        self._actor = actor
        self.ref = ref
        self.name = ref.name
        self._observer: RuntimeObserver = observer or NullObserver()
        self._fault = fault
        self._capacity = size
        # +1: the slot reserved for the Stop sentinel (see the module docstring).
        self._mailbox: asyncio.Queue[_Envelope[M] | _Stop] = asyncio.Queue(size + 1)
        self._phase = _Phase.NEW
        self._accepting = True  # False once stop is requested or teardown began
        self._stop_queued = False
        self._current: _Envelope[M] | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._crash: BaseException | None = None  # first failure of an owned task
        self._crash_cancelled = False  # we cancelled our own task because of _crash
        self._started = asyncio.Event()
        self._start_error: BaseException | None = None
        self._done = asyncio.Event()
        self.exit_error: BaseException | None = None

    # -- state read by ActorRef ----------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def running(self) -> bool:
        """on_start completed and teardown not begun: its subscriptions are in place."""
        return self._phase is _Phase.RUNNING

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def depth(self) -> int:
        return self._mailbox.qsize() - (1 if self._stop_queued else 0)

    def in_own_task(self) -> bool:
        return self._task is not None and asyncio.current_task() is self._task

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"actor:{self.name}"
            )

    async def wait_started(self) -> None:
        """The started() handshake: returns after on_start, or raises why it failed."""
        await self._started.wait()
        if isinstance(self._start_error, asyncio.CancelledError):
            raise ActorDead(self.name, "cancelled during start") from self._start_error
        if self._start_error is not None:
            raise self._start_error

    async def wait(self) -> BaseException | None:
        """Waits for the end of teardown; returns the error the actor ended with."""
        await self._done.wait()
        return self.exit_error

    def request_stop(self) -> None:
        if self._accepting:
            self._accepting = False
            self._stop_queued = True
            self._mailbox.put_nowait(_STOP)  # uses the reserved slot: cannot be full

    async def kill(self, reason: str) -> None:
        """Cancels the task (in-flight work is lost) and waits for its teardown."""
        if self._task is not None and not self._task.done():
            self._task.cancel(msg=reason)
        await self._done.wait()

    # -- messages ------------------------------------------------------------------------

    def put(self, message: M, reply_to: asyncio.Future[object] | None) -> None:
        if not self._accepting:
            reason = "stopping" if self._phase is not _Phase.DEAD else "dead"
            raise ActorDead(self.name, reason) from self.exit_error
        if self._mailbox.qsize() >= self._capacity:
            notify(self._observer.on_mailbox_full, self.name)
            log.debug("mailbox full", extra={"actor": self.name, "capacity": self._capacity})
            raise MailboxFull(self.name, f"mailbox full ({self._capacity} messages)")
        self._mailbox.put_nowait(_Envelope(message, reply_to))

    # -- owned tasks ---------------------------------------------------------------------

    async def fault_point(self, message: object) -> None:
        if self._fault is not None:
            await self._fault(self.name, message)

    def spawn_task(self, coro: Coroutine[Any, Any, T], *, name: str | None) -> asyncio.Task[T]:
        if self._phase not in (_Phase.SETUP, _Phase.RUNNING):
            coro.close()  # never awaited: close it so Python does not warn
            raise ActorDead(self.name, f"cannot spawn a task while {self._phase.value}")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name or 'task'}")
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)
        return task

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if self._crash is None:
            self._crash = task.exception()
        # Like a trio nursery: a failed child cancels its owner, which then tears down.
        if self._phase in (_Phase.SETUP, _Phase.RUNNING) and not self._crash_cancelled:
            assert self._task is not None
            self._crash_cancelled = True
            self._task.cancel(msg=f"owned task {task.get_name()!r} crashed")

    # -- the run loop: setup, running, teardown ------------------------------------------

    async def _run(self) -> None:
        error: BaseException | None = None
        reraise = False
        try:
            self._phase = _Phase.SETUP
            await self._actor.on_start()
            self._phase = _Phase.RUNNING
            self._started.set()
            notify(self._observer.on_actor_started, self.name, lambda: self.depth)
            await self._serve()
        except asyncio.CancelledError as exc:
            error, reraise = exc, True
            # Our own cancel (an owned task crashed) is a crash, not a cancellation.
            task = asyncio.current_task()
            if self._crash_cancelled and task is not None and task.uncancel() == 0:
                error, reraise = self._crash, False
        except Exception as exc:
            error = exc
        except BaseException as exc:  # KeyboardInterrupt/SystemExit: tear down, then go on
            error, reraise = exc, True
        await self._teardown(error)
        if reraise and error is not None:
            raise error

    async def _serve(self) -> None:
        while True:
            envelope = await self._mailbox.get()
            if envelope is _STOP:
                self._stop_queued = False
                return
            self._current = envelope
            await self._dispatch(envelope)
            self._current = None

    async def _dispatch(self, envelope: _Envelope[M]) -> None:
        reply_to = envelope.reply_to
        if self._fault is not None:
            # Outside the reply path on purpose: an injected fault crashes the actor
            # even on an ask, as a failure of its dependency mid-handle would.
            await self._fault(self.name, envelope.message)
        if reply_to is None:
            await self._actor.handle(envelope.message)  # raising crashes the actor
            return
        try:
            result = await self._actor.handle(envelope.message)
        except Exception as exc:
            if not reply_to.done():  # the requester may have timed out
                reply_to.set_exception(exc)
        else:
            if not reply_to.done():
                reply_to.set_result(result)

    async def _teardown(self, error: BaseException | None) -> None:
        """Mark, drain, then clean up and record."""
        started = self._phase is _Phase.RUNNING
        self._phase = _Phase.TEARDOWN
        self._accepting = False
        try:
            self._fail_pending(error)
            error = await self._cancel_tasks(error)
            if isinstance(error, Exception):
                phase = "running" if started else "setup"
                log.error(
                    "actor crashed", exc_info=error, extra={"actor": self.name, "phase": phase}
                )
                notify(self._observer.on_crash, self.name, error)
            try:
                await self._actor.on_stop(error)
            except Exception as exc:
                log.exception("on_stop failed", extra={"actor": self.name})
                error = exc if error is None else error
        finally:
            self._phase = _Phase.DEAD
            self.exit_error = error
            if not started:
                self._start_error = error or ActorDead(self.name, "stopped during start")
            self._started.set()
            self._done.set()
            if started:
                notify(self._observer.on_actor_stopped, self.name)
            self.ref._cell_ended(self)

    def _fail_pending(self, error: BaseException | None) -> None:
        """Every queued or in-flight ask gets ActorDead instead of hanging."""
        pending: list[_Envelope[M]] = [self._current] if self._current is not None else []
        self._current = None
        dropped = 0
        while not self._mailbox.empty():
            item = self._mailbox.get_nowait()
            if item is not _STOP:
                pending.append(item)
                dropped += item.reply_to is None
        self._stop_queued = False
        for envelope in pending:
            if envelope.reply_to is not None and not envelope.reply_to.done():
                dead = ActorDead(self.name, "died before replying")
                dead.__cause__ = error
                envelope.reply_to.set_exception(dead)
        if dropped:
            log.warning(
                "dropped told messages at teardown", extra={"actor": self.name, "dropped": dropped}
            )

    async def _cancel_tasks(self, error: BaseException | None) -> BaseException | None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel(msg=f"actor {self.name} tearing down")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if error is None:
            failures = [
                r
                for r in results
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
            ]
            error = self._crash or (failures[0] if failures else None)
        return error


# ---------------------------------------------------------------------------------------
# ActorRef: the handle others hold
# ---------------------------------------------------------------------------------------


class ActorRef(Generic[M]):
    """Handle to an actor: send it messages, stop it, watch it end.

    A supervised ref stays the same across restarts (it follows the current incarnation);
    while the child waits out a restart backoff, messages fail with ``ActorDead``.
    """

    def __init__(self, name: str, *, supervised: bool = False) -> None:
        self._name = name
        self._supervised = supervised
        self._cell: ActorCell[M] | None = None
        self._stop_requested = False
        self._stop_event = asyncio.Event()
        self._ended = asyncio.Event()
        self._exit_error: BaseException | None = None

    def __repr__(self) -> str:
        state = "done" if self.done else "alive" if self.alive else "idle"
        return f"<ActorRef {self._name} {state} depth={self.mailbox_depth}>"

    @property
    def name(self) -> str:
        return self._name

    @property
    def alive(self) -> bool:
        """True while the current incarnation accepts messages (queued during its on_start)."""
        return self._cell is not None and self._cell.accepting

    @property
    def running(self) -> bool:
        """True while the current incarnation has started (on_start done) and not stopped."""
        return self._cell is not None and self._cell.running

    @property
    def done(self) -> bool:
        """True once the actor ended for good (a supervised one will not be restarted)."""
        return self._ended.is_set()

    @property
    def exit_error(self) -> BaseException | None:
        """What the actor ended with (None: normal stop); meaningful once ``done``."""
        return self._exit_error

    @property
    def mailbox_depth(self) -> int:
        return self._cell.depth if self._cell is not None else 0

    def tell(self, msg: M) -> None:
        """Queues ``msg`` without waiting. Raises MailboxFull or ActorDead at once."""
        self._require_cell().put(msg, None)

    # The timeout is part of the ask contract (it becomes AskTimeout), not a bare wrapper.
    async def ask(self, msg: M, *, timeout: float | None = None) -> object:
        """Sends ``msg`` and returns what ``handle`` returned (or raises what it raised).

        Raises MailboxFull / ActorDead at once, AskTimeout after ``timeout`` seconds (the
        message may still be handled later: make messages idempotent), and ActorDead if the
        actor dies before replying.
        """
        cell = self._require_cell()
        if cell.in_own_task():
            raise RuntimeError(f"{self._name} asked itself: that would deadlock")
        reply_to: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        cell.put(msg, reply_to)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await reply_to
        except TimeoutError:
            if deadline.expired():
                raise AskTimeout(self._name, f"no reply within {timeout}s") from None
            raise

    async def stop(self) -> None:
        """Stops the actor for good after the messages already queued, and waits for it.

        Idempotent. A supervisor does not restart a child stopped this way, whatever its
        restart type. Inside the actor use ``Actor.request_stop()`` (this would deadlock).
        """
        if self._cell is not None and self._cell.in_own_task():
            raise RuntimeError(f"{self._name} cannot await its own stop; use request_stop()")
        self._request_stop()
        await self._ended.wait()

    async def wait(self) -> BaseException | None:
        """Waits until the actor ended for good; returns its error (None: normal stop)."""
        await self._ended.wait()
        return self._exit_error

    # -- used by the runtime and the supervisor ------------------------------------------

    def _require_cell(self) -> ActorCell[M]:
        if self._cell is None:
            raise ActorDead(self._name, "not started")
        return self._cell

    def _bind(self, cell: ActorCell[M]) -> None:
        self._cell = cell

    def _request_stop(self) -> None:
        self._stop_requested = True
        self._stop_event.set()  # wakes a supervisor waiting out a restart backoff
        if self._cell is not None:
            self._cell.request_stop()

    def _cell_ended(self, cell: ActorCell[M]) -> None:
        if not self._supervised:
            self._finish(cell.exit_error)

    def _finish(self, error: BaseException | None) -> None:
        if not self._ended.is_set():
            self._exit_error = error
            self._ended.set()


async def start_actor(
    actor: Actor[M],
    *,
    name: str,
    mailbox_size: int | None = None,
    observer: RuntimeObserver | None = None,
) -> ActorRef[M]:
    """Starts an unsupervised actor and returns once its ``on_start`` completed.

    Raises what ``on_start`` raised (after teardown ran). The caller owns the actor and
    must ``await ref.stop()`` it; prefer ``Supervisor.spawn``, which owns it for you.
    """
    ref: ActorRef[M] = ActorRef(name)
    cell = ActorCell(actor, ref, mailbox_size=mailbox_size, observer=observer)
    ref._bind(cell)
    cell.start()
    try:
        await cell.wait_started()
    except asyncio.CancelledError:
        await cell.kill("start_actor cancelled")
        raise
    return ref
