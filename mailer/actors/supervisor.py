"""A one-for-one supervisor: starts children, restarts them, shuts them down in order.

Restart types (per child):

* ``permanent`` — restarted whenever it ends, even normally (long-lived services).
* ``transient`` — restarted only after a crash; a normal stop ends it (campaign actors).
* ``temporary`` — never restarted.

A child stopped through ``ref.stop()`` or by ``shutdown`` is never restarted.

Restarts wait an exponential backoff (``backoff_base * 2**n`` capped at ``backoff_max``;
it starts over once an incarnation ran ``backoff_reset_seconds``). More than
``max_restarts`` restarts (of the children counted together) within ``window_seconds`` is
an escalation: the supervisor shuts every child down and ``wait()`` raises
``SupervisorEscalation`` so the process exits non-zero and Kubernetes restarts the pod.
A child whose spec has its own ``limit`` (``ChildLimit``) is not counted there: its
restarts are counted in its own window, and past its limit that child alone is given up
(it ends for good with its last error; ``on_child_exit`` is told) while the supervisor
and every other child go on. Campaign actors have one, so any number of them crashing
together (a dependency blip) never takes the process down; the long-lived actors keep the
shared limit. The database is the checkpoint: a restart builds a fresh actor from the
child's factory.

A child ends for good when it will not be restarted; ``on_child_exit(name, error)`` is
then called (a plain callback, meant to ``tell()`` another actor) and ``ref.wait()``
returns. ``shutdown(deadline)`` first tells every dynamic child (spawned after start,
e.g. one per campaign) to stop at once -- the moment the shutdown begins, so none starts
new work while others drain -- then stops the children marked ``stop_first`` (a leader
resigns before the campaign actors drain, so a successor leads at once), waits for the
dynamic ones to drain in parallel, and stops the other static children one by one in
reverse start order, each through its Stop message; whatever still runs at the deadline is
cancelled.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

from mailer.actors.runtime import (
    Actor,
    ActorCell,
    ActorDead,
    ActorError,
    ActorFault,
    ActorRef,
    NullObserver,
    RuntimeObserver,
    notify,
)

__all__ = [
    "AlreadyRunning",
    "ChildExitCallback",
    "ChildLimit",
    "ChildSpec",
    "Restart",
    "RestartPolicy",
    "Supervisor",
    "SupervisorClosed",
    "SupervisorEscalation",
]

log = logging.getLogger("mailer.actors")

M = TypeVar("M")

ChildExitCallback = Callable[[str, BaseException | None], None]
"""``(child name, error or None)``, called once when a child ends for good."""


class AlreadyRunning(ActorError):
    """``spawn`` was given the name of a child that is still supervised."""

    code = "already_running"


class SupervisorClosed(ActorError):
    """The supervisor is shutting down or shut down; it starts nothing new."""

    code = "supervisor_closed"


class SupervisorEscalation(ActorError):
    """Children crashed more often than the restart intensity allows.

    ``__cause__`` is the last crash. The process should exit non-zero.
    """

    code = "supervisor_escalation"


class Restart(enum.StrEnum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    max_restarts: int = 5
    window_seconds: float = 60.0
    backoff_base: float = 0.05
    backoff_max: float = 5.0
    # An incarnation that lived this long was healthy: the next backoff starts over.
    backoff_reset_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_seconds <= 0:
            raise ValueError("max_restarts must be >= 0 and window_seconds > 0")
        if not 0 <= self.backoff_base <= self.backoff_max:
            raise ValueError("need 0 <= backoff_base <= backoff_max")

    def backoff(self, attempt: int) -> float:
        """Delay before restart number ``attempt`` (0-based) of a run of failures."""
        return min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt, 64))


@dataclass(frozen=True, slots=True)
class ChildLimit:
    """A child's own restart limit: more than ``max_restarts`` restarts within
    ``window_seconds`` gives that child up instead of escalating."""

    max_restarts: int
    window_seconds: float

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_seconds <= 0:
            raise ValueError("max_restarts must be >= 0 and window_seconds > 0")


@dataclass(frozen=True, slots=True)
class ChildSpec(Generic[M]):
    name: str
    factory: Callable[[], Actor[M]]  # called for every incarnation
    restart: Restart = Restart.PERMANENT
    mailbox_size: int | None = None  # None: the actor class's mailbox_size
    # None: restarts count against the supervisor's intensity (and may escalate).
    limit: ChildLimit | None = None
    # Stopped before every other child at shutdown (in reverse start order among them).
    stop_first: bool = False


@dataclass(eq=False)
class _Child:
    spec: ChildSpec[Any]
    ref: ActorRef[Any]
    started: asyncio.Event  # the first incarnation's handshake is over (ok or not)
    start_error: BaseException | None = None
    runner: asyncio.Task[None] | None = None
    restarts: int = 0
    failures: int = 0  # consecutive short-lived incarnations: drives the backoff
    # Restart times against the child's own limit (spec.limit), monotonic seconds.
    restart_times: deque[float] = field(default_factory=deque)
    given_up: bool = False


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class Supervisor:
    """Owns its children: every child runs under a watcher task this supervisor awaits.

    Use ``async with Supervisor(...) as sup`` or ``start()`` / ``wait()`` / ``shutdown()``.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec[Any]] = (),
        *,
        name: str = "supervisor",
        policy: RestartPolicy | None = None,
        observer: RuntimeObserver | None = None,
        on_child_exit: ChildExitCallback | None = None,
        shutdown_deadline: float = 10.0,
        fault: ActorFault | None = None,
    ) -> None:
        names = [spec.name for spec in children]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate child names in {names}")
        self.name = name
        self._specs = list(children)
        self._policy = policy or RestartPolicy()
        self._observer: RuntimeObserver = observer or NullObserver()
        self._on_child_exit = on_child_exit
        self._shutdown_deadline = shutdown_deadline
        self._fault = fault  # tests only: see runtime.ActorFault
        self._state = _State.NEW
        self._start_lock = asyncio.Lock()
        self._children: dict[str, _Child] = {}  # insertion order is start order
        self._runners: set[asyncio.Task[None]] = set()
        self._restart_times: deque[float] = deque()
        self._escalation: SupervisorEscalation | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    # -- public API ----------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the static children in order, each after the previous one's on_start.

        Idempotent. If a child's on_start fails, the children already started are shut
        down and that error is raised.
        """
        async with self._start_lock:
            if self._state is not _State.NEW:
                if self._state is _State.RUNNING:
                    return
                raise SupervisorClosed(self.name, "cannot start after shutdown")
            self._state = _State.RUNNING
            for spec in self._specs:
                try:
                    await self.spawn(spec)
                except BaseException:
                    log.error(
                        "static child failed to start; shutting down",
                        extra={"supervisor": self.name, "actor": spec.name},
                    )
                    await self.shutdown()
                    raise

    async def spawn(self, spec: ChildSpec[M]) -> ActorRef[M]:
        """Starts a child and returns its ref once its on_start completed.

        Raises AlreadyRunning if a child of that name is still supervised (running or
        waiting out a backoff), SupervisorClosed during/after shutdown, and whatever the
        factory or on_start raised (the child is then not supervised). A static child may
        spawn from its on_start: dynamic children go after it in the start order.
        """
        if self._state is _State.NEW:
            raise RuntimeError(f"supervisor {self.name} is not started")
        if self._state in (_State.CLOSING, _State.CLOSED):
            raise SupervisorClosed(self.name, f"cannot spawn {spec.name!r}")
        if spec.name in self._children:
            raise AlreadyRunning(spec.name, "a child of this name is supervised")
        ref: ActorRef[M] = ActorRef(spec.name, supervised=True)
        cell = self._new_cell(spec, ref)  # a factory error propagates to the caller
        child = _Child(spec=spec, ref=ref, started=asyncio.Event())
        self._children[spec.name] = child
        runner = asyncio.get_running_loop().create_task(
            self._supervise(child, cell), name=f"{self.name}/{spec.name}"
        )
        child.runner = runner
        self._runners.add(runner)
        runner.add_done_callback(self._on_runner_done)
        try:
            await child.started.wait()
        except asyncio.CancelledError:
            runner.cancel(msg="spawn cancelled")
            await asyncio.gather(runner, return_exceptions=True)
            raise
        if child.start_error is not None:
            raise child.start_error
        return ref

    def get(self, name: str) -> ActorRef[Any] | None:
        child = self._children.get(name)
        return child.ref if child is not None else None

    def children(self) -> list[ActorRef[Any]]:
        """Supervised children in start order (restarts keep their place)."""
        return [child.ref for child in self._children.values()]

    @property
    def escalated(self) -> bool:
        return self._escalation is not None

    @property
    def closing(self) -> bool:
        """Shutting down or shut down: asked to, or after giving up (escalation)."""
        return self._state in (_State.CLOSING, _State.CLOSED)

    async def wait(self) -> None:
        """Returns once shut down; raises SupervisorEscalation if that was the reason."""
        await self._closed.wait()
        if self._escalation is not None:
            raise self._escalation

    async def shutdown(self, deadline_seconds: float | None = None) -> None:
        """Stops every child within one deadline (see the module docstring). Idempotent.

        Each child gets its Stop message (queued work is finished) and is awaited; once the
        deadline has passed, the children still running are cancelled.
        """
        self.begin_shutdown(deadline_seconds)
        assert self._shutdown_task is not None
        # Shielded: a caller that gives up waiting must not abort the shutdown itself.
        await asyncio.shield(self._shutdown_task)

    def begin_shutdown(self, deadline_seconds: float | None = None) -> None:
        """Begins the shutdown without waiting for it; ``shutdown()`` waits. Idempotent.

        Before it returns, the supervisor spawns nothing more and every dynamic child
        has been told to stop, so that none of them starts new work after this call.
        """
        self._begin_shutdown(
            self._shutdown_deadline if deadline_seconds is None else deadline_seconds
        )

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # -- one watcher task per child ------------------------------------------------------

    def _new_cell(self, spec: ChildSpec[M], ref: ActorRef[M]) -> ActorCell[M]:
        cell = ActorCell(
            spec.factory(),
            ref,
            mailbox_size=spec.mailbox_size,
            observer=self._observer,
            fault=self._fault,
        )
        ref._bind(cell)
        cell.start()
        return cell

    async def _supervise(self, child: _Child, cell: ActorCell[Any]) -> None:
        error: BaseException | None = None
        try:
            error = await self._first_incarnation(child, cell)
            while child.start_error is None and self._should_restart(child, error):
                if not self._admit_restart(child, error):
                    break  # escalated, or this child given up
                delay = self._policy.backoff(child.failures)
                child.failures += 1
                log.warning(
                    "restarting child",
                    extra={
                        "supervisor": self.name,
                        "actor": child.spec.name,
                        "restarts": child.restarts + 1,
                        "backoff_seconds": delay,
                        "error_type": type(error).__name__ if error else None,
                    },
                )
                if await self._backoff_interrupted(child, delay):
                    break
                child.restarts += 1
                notify(self._observer.on_restart, child.spec.name)
                error = await self._incarnation(child)
        except asyncio.CancelledError as exc:
            error = exc  # shutdown deadline passed, or spawn() was cancelled
            raise
        finally:
            self._finalize(child, error)

    async def _first_incarnation(self, child: _Child, cell: ActorCell[Any]) -> BaseException | None:
        """The started() handshake: spawn() learns whether on_start succeeded."""
        try:
            await cell.wait_started()
        except asyncio.CancelledError:
            child.start_error = ActorDead(child.spec.name, "cancelled during start")
            await cell.kill("supervisor cancelled the start")
            raise
        except Exception as exc:
            child.start_error = exc
            return exc
        finally:
            child.started.set()
        return await self._watch(child, cell)

    async def _incarnation(self, child: _Child) -> BaseException | None:
        try:
            cell = self._new_cell(child.spec, child.ref)
        except Exception as exc:  # a failing factory counts as a crash
            log.exception("child factory failed", extra={"actor": child.spec.name})
            return exc
        return await self._watch(child, cell)

    async def _watch(self, child: _Child, cell: ActorCell[Any]) -> BaseException | None:
        began = time.monotonic()
        try:
            error = await cell.wait()
        except asyncio.CancelledError:
            log.warning(
                "cancelling child", extra={"supervisor": self.name, "actor": child.spec.name}
            )
            await cell.kill("supervisor shutdown deadline exceeded")
            raise
        if time.monotonic() - began >= self._policy.backoff_reset_seconds:
            child.failures = 0
        return error

    def _should_restart(self, child: _Child, error: BaseException | None) -> bool:
        if self._state is not _State.RUNNING or child.ref._stop_requested:
            return False
        match child.spec.restart:
            case Restart.PERMANENT:
                return True
            case Restart.TRANSIENT:
                return error is not None
            case Restart.TEMPORARY:
                return False

    def _admit_restart(self, child: _Child, error: BaseException | None) -> bool:
        """Counts a restart against the child's own limit or the shared intensity limit.

        Past its own limit the child is given up; past the shared one, the supervisor
        escalates. Either way: False, no restart.
        """
        now = time.monotonic()
        limit = child.spec.limit
        if limit is not None:
            times = child.restart_times
            while times and times[0] <= now - limit.window_seconds:
                times.popleft()
            if len(times) >= limit.max_restarts:
                child.given_up = True
                log.error(
                    "child restart limit exceeded; giving it up",
                    extra={
                        "supervisor": self.name,
                        "actor": child.spec.name,
                        "restarts": child.restarts,
                        "error_type": type(error).__name__ if error else None,
                    },
                )
                return False
            times.append(now)
            return True
        while self._restart_times and self._restart_times[0] <= now - self._policy.window_seconds:
            self._restart_times.popleft()
        if len(self._restart_times) >= self._policy.max_restarts:
            self._escalate(child, error)
            return False
        self._restart_times.append(now)
        return True

    async def _backoff_interrupted(self, child: _Child, delay: float) -> bool:
        """Sleeps ``delay``; True if the child was stopped (or shutdown began) meanwhile."""
        try:
            async with asyncio.timeout(delay):
                await child.ref._stop_event.wait()
        except TimeoutError:
            pass
        return child.ref._stop_requested or self._state is not _State.RUNNING

    def _finalize(self, child: _Child, error: BaseException | None) -> None:
        """The child ended for good: forget it, resolve its ref, tell whoever listens."""
        if self._children.get(child.spec.name) is child:
            del self._children[child.spec.name]
        if not child.started.is_set():  # cancelled before the handshake
            child.start_error = ActorDead(child.spec.name, "cancelled during start")
            child.started.set()
        child.ref._finish(error)
        if child.start_error is not None:
            return  # spawn() raised it; the caller knows
        log.info(
            "child exited",
            extra={
                "supervisor": self.name,
                "actor": child.spec.name,
                "restarts": child.restarts,
                "given_up": child.given_up,
                "error_type": type(error).__name__ if error else None,
            },
        )
        if self._on_child_exit is not None:
            notify(self._on_child_exit, child.spec.name, error)

    def _on_runner_done(self, runner: asyncio.Task[None]) -> None:
        self._runners.discard(runner)
        if not runner.cancelled() and runner.exception() is not None:
            # A bug in the watcher: never lose it silently, and do not run unsupervised.
            log.error("supervisor watcher failed", exc_info=runner.exception())
            if self._escalation is None:
                self._escalation = SupervisorEscalation(self.name, "a child watcher failed")
                self._escalation.__cause__ = runner.exception()
            self._begin_shutdown(self._shutdown_deadline)

    # -- escalation and shutdown ---------------------------------------------------------

    def _escalate(self, child: _Child, error: BaseException | None) -> None:
        policy = self._policy
        escalation = SupervisorEscalation(
            self.name,
            f"more than {policy.max_restarts} restarts in {policy.window_seconds}s "
            f"(last: {child.spec.name})",
        )
        escalation.__cause__ = error
        self._escalation = escalation
        log.error(
            "restart intensity exceeded; shutting down",
            extra={"supervisor": self.name, "actor": child.spec.name, "restarts": child.restarts},
        )
        self._begin_shutdown(self._shutdown_deadline)

    def _dynamic(self) -> list[_Child]:
        static = {spec.name for spec in self._specs}
        return [c for c in self._children.values() if c.spec.name not in static]

    def _begin_shutdown(self, deadline_seconds: float) -> None:
        if self._shutdown_task is None:
            self._state = _State.CLOSING
            # All at once, synchronously: stopped one by one, the others would go
            # on working (claiming, asking for tokens) while the first ones drain.
            for child in self._dynamic():
                child.ref._request_stop()
            self._shutdown_task = asyncio.get_running_loop().create_task(
                self._shutdown(deadline_seconds), name=f"{self.name}/shutdown"
            )

    async def _stop_child(self, child: _Child, deadline: float) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0 or child.runner is None:
            return
        child.ref._request_stop()
        await asyncio.wait({child.runner}, timeout=remaining)

    async def _shutdown(self, deadline_seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_seconds
        try:
            children = list(self._children.values())
            first = [c for c in children if c.spec.stop_first]
            for child in reversed(first):
                await self._stop_child(child, deadline)
            dynamic = [c.runner for c in self._dynamic() if c.runner is not None]
            if dynamic:  # told to stop in _begin_shutdown; they drain in parallel
                await asyncio.wait(dynamic, timeout=max(0.0, deadline - loop.time()))
            for child in reversed([c for c in children if not c.spec.stop_first]):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                child.ref._request_stop()
                assert child.runner is not None
                await asyncio.wait({child.runner}, timeout=remaining)
            late = [r for r in self._runners if not r.done()]
            if late:
                log.warning(
                    "shutdown deadline exceeded; cancelling children",
                    extra={
                        "supervisor": self.name,
                        "deadline_seconds": deadline_seconds,
                        "actors": sorted(r.get_name() for r in late),
                    },
                )
                for runner in late:
                    runner.cancel(msg="supervisor shutdown deadline exceeded")
            # Nothing outlives the supervisor: wait for every watcher, whatever happened.
            await asyncio.gather(*self._runners, return_exceptions=True)
        finally:
            self._state = _State.CLOSED
            self._closed.set()
