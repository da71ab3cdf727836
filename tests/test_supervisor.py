"""The supervisor: restart types, backoff, restart intensity, ordered shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest

from mailer.actors import (
    Actor,
    ActorDead,
    AlreadyRunning,
    ChildLimit,
    ChildSpec,
    NullObserver,
    Restart,
    RestartPolicy,
    Supervisor,
    SupervisorClosed,
    SupervisorEscalation,
)

pytestmark = pytest.mark.timeout(5)

FAST = RestartPolicy(max_restarts=10, window_seconds=10, backoff_base=0.001, backoff_max=0.01)


# -- messages, actors and helpers ------------------------------------------------------


class Incr(msgspec.Struct):
    pass


class Get(msgspec.Struct):
    pass


class Crash(msgspec.Struct):
    pass


class Finish(msgspec.Struct):
    """The actor's work is done: it stops itself (a normal end)."""


class Block(msgspec.Struct):
    pass


Msg = Incr | Get | Crash | Finish | Block


class Worker(Actor[Msg]):
    def __init__(self, name: str, journal: list[str]) -> None:
        self.label = name
        self.journal = journal  # owned by the test: the order of lifecycle events
        self.count = 0
        self.stops: list[BaseException | None] = []
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def on_start(self) -> None:
        self.journal.append(f"start {self.label}")
        await asyncio.sleep(0)  # yield: a concurrent start of the next child would show here
        self.journal.append(f"started {self.label}")

    async def handle(self, msg: Msg) -> object:
        match msg:
            case Incr():
                self.count += 1
            case Crash():
                raise ValueError(f"{self.label} crashed")
            case Finish():
                self.request_stop()
            case Block():
                self.entered.set()
                await self.gate.wait()
        return self.count

    async def on_stop(self, error: BaseException | None) -> None:
        self.stops.append(error)
        self.journal.append(f"stop {self.label}")


class CrashAfterStart(Worker):
    """Passes the start handshake, then an owned task fails: every incarnation crashes."""

    async def on_start(self) -> None:
        self.spawn_task(self._fail(), name="fail")

    async def _fail(self) -> None:
        await asyncio.sleep(0)
        raise RuntimeError(f"{self.label} failed")


class Factory:
    """Builds Workers and keeps every instance, so tests can look at each incarnation."""

    def __init__(self, name: str, journal: list[str], cls: type[Worker] = Worker) -> None:
        self.name, self.journal, self.cls = name, journal, cls
        self.instances: list[Worker] = []

    def __call__(self) -> Worker:
        worker = self.cls(self.name, self.journal)
        self.instances.append(worker)
        return worker

    def spec(self, restart: Restart = Restart.PERMANENT) -> ChildSpec[Msg]:
        return ChildSpec(self.name, self, restart=restart)


class Recorder(NullObserver):
    """Records runtime events; ``until`` waits for a condition on them (no fixed sleeps)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.restarts: list[str] = []
        self.crashes: list[tuple[str, BaseException]] = []
        self.exits: list[tuple[str, BaseException | None]] = []
        self._changed = asyncio.Event()

    def on_actor_started(self, actor_name: str, mailbox_depth: Callable[[], int]) -> None:
        self.started.append(actor_name)
        self._changed.set()

    def on_restart(self, actor_name: str) -> None:
        self.restarts.append(actor_name)
        self._changed.set()

    def on_crash(self, actor_name: str, exc: BaseException) -> None:
        self.crashes.append((actor_name, exc))
        self._changed.set()

    def on_child_exit(self, name: str, error: BaseException | None) -> None:
        self.exits.append((name, error))
        self._changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(2):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


def supervisor(
    children: list[ChildSpec[Msg]], observer: Recorder, policy: RestartPolicy = FAST
) -> Supervisor:
    return Supervisor(
        children,
        name="test",
        policy=policy,
        observer=observer,
        on_child_exit=observer.on_child_exit,
    )


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Nothing the supervisor started outlives a test."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    me = asyncio.current_task()
    leftover = [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]
    assert leftover == []


# -- restarts --------------------------------------------------------------------------


async def test_crashed_child_is_restarted_with_fresh_state_behind_the_same_ref() -> None:
    journal: list[str] = []
    counter, observer = Factory("counter", journal), Recorder()
    sup = supervisor([counter.spec()], observer)
    await sup.start()
    try:
        ref = sup.get("counter")
        assert ref is not None
        ref.tell(Incr())
        assert await ref.ask(Incr(), timeout=1) == 2
        ref.tell(Crash())
        await observer.until(lambda: len(observer.started) == 2)
        assert await ref.ask(Get(), timeout=1) == 0  # a new instance: state is fresh
        assert sup.get("counter") is ref
        assert len(counter.instances) == 2
        assert isinstance(counter.instances[0].stops[0], ValueError)
        assert observer.restarts == ["counter"]
        assert [name for name, _ in observer.crashes] == ["counter"]
        assert observer.exits == []  # restarted, so it did not end for good
    finally:
        await sup.shutdown(1)


async def test_restart_intensity_exceeded_escalates_and_stops_all_children() -> None:
    journal: list[str] = []
    healthy = Factory("healthy", journal)
    crasher = Factory("crasher", journal, cls=CrashAfterStart)
    observer = Recorder()
    policy = RestartPolicy(max_restarts=2, window_seconds=10, backoff_base=0.001)
    sup = supervisor([healthy.spec(), crasher.spec()], observer, policy)
    await sup.start()
    healthy_ref = sup.get("healthy")
    assert healthy_ref is not None
    with pytest.raises(SupervisorEscalation) as caught:
        await asyncio.wait_for(sup.wait(), 2)
    assert sup.escalated
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert observer.restarts == ["crasher", "crasher"]  # two allowed, the third escalated
    assert len(crasher.instances) == 3
    assert healthy_ref.done
    assert healthy.instances[0].stops == [None]  # stopped gracefully, not cancelled
    assert sup.children() == []
    assert {name for name, _ in observer.exits} == {"healthy", "crasher"}
    with pytest.raises(SupervisorClosed):
        await sup.spawn(healthy.spec())


async def test_a_child_with_its_own_limit_is_given_up_alone_without_escalating() -> None:
    journal: list[str] = []
    healthy = Factory("healthy", journal)
    crashers = [Factory(f"campaign-{i}", journal, cls=CrashAfterStart) for i in range(4)]
    observer = Recorder()
    # The shared limit (2) is far below what the four crashers use together (12),
    # but theirs is counted per child: each is given up after its own 3.
    policy = RestartPolicy(max_restarts=2, window_seconds=10, backoff_base=0.001)
    sup = supervisor([healthy.spec()], observer, policy)
    await sup.start()
    for f in crashers:
        await sup.spawn(
            ChildSpec(f.name, f, restart=Restart.TRANSIENT, limit=ChildLimit(3, window_seconds=10))
        )
    await observer.until(lambda: len(observer.exits) == 4)
    assert not sup.escalated and not sup.closing
    assert all(len(f.instances) == 4 for f in crashers)  # the first and 3 restarts
    assert {name for name, _ in observer.exits} == {f.name for f in crashers}
    assert all(isinstance(error, RuntimeError) for _, error in observer.exits)
    assert [ref.name for ref in sup.children()] == ["healthy"]
    # The long-lived child still counts against the shared limit.
    healthy_ref = sup.get("healthy")
    assert healthy_ref is not None
    for i in range(3):
        healthy_ref.tell(Crash())

        def crashed_and_back(n: int = i + 1) -> bool:
            crashes = [name for name, _ in observer.crashes if name == "healthy"]
            return len(crashes) == n and (sup.escalated or healthy_ref.alive)

        await observer.until(crashed_and_back)
    with pytest.raises(SupervisorEscalation):
        await asyncio.wait_for(sup.wait(), 2)


async def test_children_marked_stop_first_stop_before_the_others() -> None:
    journal: list[str] = []
    a, leader, runner, campaign = (Factory(n, journal) for n in ("a", "leader", "runner", "c"))
    observer = Recorder()
    sup = supervisor(
        [
            a.spec(),
            ChildSpec("leader", leader, stop_first=True),
            ChildSpec("runner", runner, stop_first=True),
        ],
        observer,
    )
    await sup.start()
    await sup.spawn(campaign.spec(Restart.TRANSIENT))
    journal.clear()
    await sup.shutdown(1)
    # The campaign actor is told the moment the shutdown begins (it drains while
    # the others stop); the stop_first ones stop before the other static ones.
    assert journal == ["stop c", "stop runner", "stop leader", "stop a"]


async def test_a_fault_hook_crashes_the_actor_even_on_an_ask() -> None:
    journal: list[str] = []
    worker = Factory("w", journal)
    observer = Recorder()
    seen: list[tuple[str, object]] = []

    async def fault(name: str, message: object) -> None:
        seen.append((name, message))
        if isinstance(message, Get) and len(worker.instances) == 1:
            raise RuntimeError("injected")

    sup = Supervisor([worker.spec()], name="t", policy=FAST, observer=observer, fault=fault)
    await sup.start()
    ref = sup.get("w")
    assert ref is not None
    ref.tell(Incr())
    with pytest.raises(ActorDead):  # not the handler's error: the actor died
        await ref.ask(Get(), timeout=1)
    await observer.until(lambda: len(worker.instances) == 2 and ref.alive)
    assert await ref.ask(Get(), timeout=1) == 0  # a fresh incarnation
    assert [type(m).__name__ for _, m in seen] == ["Incr", "Get", "Get"]
    assert observer.restarts == ["w"]
    await sup.shutdown(1)


async def test_backoff_doubles_up_to_its_max() -> None:
    policy = RestartPolicy(backoff_base=0.01, backoff_max=0.05)
    assert [policy.backoff(n) for n in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]


async def test_restarts_wait_a_growing_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailer.actors")
    crasher = Factory("crasher", [], cls=CrashAfterStart)
    policy = RestartPolicy(max_restarts=3, window_seconds=10, backoff_base=0.002)
    sup = supervisor([crasher.spec()], Recorder(), policy)
    await sup.start()
    with pytest.raises(SupervisorEscalation):
        await asyncio.wait_for(sup.wait(), 2)
    delays = [
        r.__dict__["backoff_seconds"]
        for r in caplog.records
        if r.getMessage() == "restarting child"
    ]
    assert delays == [0.002, 0.004, 0.008]


async def test_backoff_starts_over_after_a_healthy_run(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailer.actors")
    crasher = Factory("crasher", [], cls=CrashAfterStart)
    policy = RestartPolicy(
        max_restarts=3, window_seconds=10, backoff_base=0.002, backoff_reset_seconds=0
    )
    sup = supervisor([crasher.spec()], Recorder(), policy)
    await sup.start()
    with pytest.raises(SupervisorEscalation):
        await asyncio.wait_for(sup.wait(), 2)
    delays = [
        r.__dict__["backoff_seconds"]
        for r in caplog.records
        if r.getMessage() == "restarting child"
    ]
    assert delays == [0.002, 0.002, 0.002]


# -- restart types ---------------------------------------------------------------------


async def test_transient_child_is_restarted_after_a_crash_but_not_after_a_normal_end() -> None:
    campaign, observer = Factory("campaign-1", []), Recorder()
    sup = supervisor([], observer)
    await sup.start()
    try:
        ref = await sup.spawn(campaign.spec(Restart.TRANSIENT))
        ref.tell(Crash())
        await observer.until(lambda: len(observer.started) == 2)
        assert observer.restarts == ["campaign-1"]
        ref.tell(Finish())
        assert await asyncio.wait_for(ref.wait(), 1) is None
        assert observer.exits == [("campaign-1", None)]
        assert len(campaign.instances) == 2
        assert sup.get("campaign-1") is None
        # The name is free again once the child ended for good.
        again = await sup.spawn(campaign.spec(Restart.TRANSIENT))
        assert again is not ref and again.alive
    finally:
        await sup.shutdown(1)


async def test_permanent_child_is_restarted_even_after_a_normal_end() -> None:
    service, observer = Factory("service", []), Recorder()
    sup = supervisor([service.spec(Restart.PERMANENT)], observer)
    await sup.start()
    try:
        ref = sup.get("service")
        assert ref is not None
        ref.tell(Finish())
        await observer.until(lambda: len(observer.started) == 2)
        assert service.instances[0].stops == [None]
        assert observer.exits == []
        assert not ref.done
    finally:
        await sup.shutdown(1)


async def test_temporary_child_is_not_restarted_after_a_crash() -> None:
    job, observer = Factory("job", []), Recorder()
    sup = supervisor([], observer)
    await sup.start()
    try:
        ref = await sup.spawn(job.spec(Restart.TEMPORARY))
        ref.tell(Crash())
        error = await asyncio.wait_for(ref.wait(), 1)
        assert isinstance(error, ValueError)
        assert observer.exits == [("job", error)]
        assert observer.restarts == []
        assert len(job.instances) == 1
    finally:
        await sup.shutdown(1)


async def test_ref_stop_ends_a_permanent_child_for_good() -> None:
    service, observer = Factory("service", []), Recorder()
    sup = supervisor([service.spec(Restart.PERMANENT)], observer)
    await sup.start()
    try:
        ref = sup.get("service")
        assert ref is not None
        await asyncio.wait_for(ref.stop(), 1)
        assert ref.done
        assert observer.exits == [("service", None)]
        assert len(service.instances) == 1
        assert sup.children() == []
    finally:
        await sup.shutdown(1)


# -- starting and spawning -------------------------------------------------------------


async def test_static_children_start_one_after_another() -> None:
    journal: list[str] = []
    specs = [Factory(name, journal).spec() for name in ("a", "b", "c")]
    async with supervisor(specs, Recorder()) as sup:
        await sup.start()  # idempotent
        assert [ref.name for ref in sup.children()] == ["a", "b", "c"]
        assert journal == [
            "start a",
            "started a",
            "start b",
            "started b",
            "start c",
            "started c",
        ]
    with pytest.raises(SupervisorClosed):
        await sup.start()


async def test_spawn_before_start_is_refused() -> None:
    sup = supervisor([], Recorder())
    with pytest.raises(RuntimeError, match="not started"):
        await sup.spawn(Factory("early", []).spec())
    await sup.shutdown(1)


async def test_spawning_a_running_name_raises_already_running() -> None:
    campaign = Factory("campaign-7", [])
    async with supervisor([], Recorder()) as sup:
        ref = await sup.spawn(campaign.spec(Restart.TRANSIENT))
        with pytest.raises(AlreadyRunning):
            await sup.spawn(campaign.spec(Restart.TRANSIENT))
        assert sup.children() == [ref]
        assert len(campaign.instances) == 1


async def test_spawn_raises_what_on_start_raised_and_does_not_supervise() -> None:
    class BadStart(Worker):
        async def on_start(self) -> None:
            raise ConnectionError("database down")

    bad, observer = Factory("bad", [], cls=BadStart), Recorder()
    async with supervisor([], observer) as sup:
        with pytest.raises(ConnectionError):
            await sup.spawn(bad.spec())
        assert sup.get("bad") is None
        assert observer.restarts == []
        assert isinstance(bad.instances[0].stops[0], ConnectionError)


async def test_failing_static_child_stops_the_ones_already_started() -> None:
    class BadStart(Worker):
        async def on_start(self) -> None:
            raise ConnectionError("database down")

    journal: list[str] = []
    first, bad = Factory("first", journal), Factory("bad", journal, cls=BadStart)
    sup = supervisor([first.spec(), bad.spec()], Recorder())
    with pytest.raises(ConnectionError):
        await sup.start()
    assert first.instances[0].stops == [None]
    assert sup.children() == []
    await asyncio.wait_for(sup.wait(), 1)  # closed, not escalated


# -- shutdown --------------------------------------------------------------------------


async def test_shutdown_stops_dynamic_children_together_then_static_in_reverse_order() -> None:
    journal: list[str] = []
    static = [Factory(name, journal) for name in ("a", "b", "c")]
    dynamic = [Factory(name, journal) for name in ("d", "e")]
    observer = Recorder()
    sup = supervisor([f.spec() for f in static], observer)
    await sup.start()
    for factory in dynamic:
        await sup.spawn(factory.spec(Restart.TRANSIENT))
    a = sup.get("a")
    assert a is not None
    for _ in range(3):
        a.tell(Incr())  # queued before the Stop message: handled before stopping
    refs = sup.children()
    journal.clear()
    await asyncio.gather(sup.shutdown(1), sup.shutdown(1))
    await sup.shutdown(1)  # idempotent
    # The dynamic children (campaigns) drain together, in no particular order.
    assert set(journal[:2]) == {"stop d", "stop e"}
    assert journal[2:] == ["stop c", "stop b", "stop a"]
    assert static[0].instances[0].count == 3
    assert all(ref.done and ref.exit_error is None for ref in refs)
    assert {name for name, _ in observer.exits[:2]} == {"d", "e"}
    assert [name for name, _ in observer.exits[2:]] == ["c", "b", "a"]
    assert observer.restarts == []
    await asyncio.wait_for(sup.wait(), 1)  # no escalation: returns normally


async def test_every_dynamic_child_is_told_to_stop_the_moment_shutdown_begins() -> None:
    # Two campaign-like children, both busy: stopped one after the other, the
    # second would go on working (claiming, asking for tokens) while the first
    # drains. Told together, neither accepts work once the shutdown began.
    journal: list[str] = []
    static = Factory("static", journal)
    dynamic = [Factory(name, journal) for name in ("d", "e")]
    sup = supervisor([static.spec()], Recorder())
    await sup.start()
    refs = [await sup.spawn(f.spec(Restart.TRANSIENT)) for f in dynamic]
    for ref in refs:
        ref.tell(Block())
    for f in dynamic:
        await f.instances[0].entered.wait()

    shutdown = asyncio.create_task(sup.shutdown(2))
    for _ in range(100):  # until the shutdown told anyone (a few loop turns)
        if not all(ref.alive for ref in refs):
            break
        await asyncio.sleep(0)
    assert [ref.alive for ref in refs] == [False, False]
    static_ref = sup.get("static")
    assert static_ref is not None and static_ref.alive
    with pytest.raises(SupervisorClosed):
        await sup.spawn(Factory("late", journal).spec(Restart.TRANSIENT))
    for f in dynamic:
        f.instances[0].gate.set()
    await shutdown
    assert set(journal[-3:-1]) == {"stop d", "stop e"} and journal[-1] == "stop static"
    with pytest.raises(SupervisorClosed):
        await sup.spawn(dynamic[0].spec())


async def test_shutdown_deadline_cancels_a_child_stuck_in_its_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mailer.actors")
    journal: list[str] = []
    stuck, calm = Factory("stuck", journal), Factory("calm", journal)
    sup = supervisor([stuck.spec(), calm.spec()], Recorder())
    await sup.start()
    stuck_ref = sup.get("stuck")
    assert stuck_ref is not None
    in_flight = asyncio.create_task(stuck_ref.ask(Block()))
    await stuck.instances[0].entered.wait()
    queued = asyncio.create_task(stuck_ref.ask(Get()))
    await asyncio.sleep(0)

    began = time.monotonic()
    await sup.shutdown(0.05)
    assert time.monotonic() - began < 0.5

    assert calm.instances[0].stops == [None]  # stopped first, gracefully
    [error] = stuck.instances[0].stops
    assert isinstance(error, asyncio.CancelledError)
    assert isinstance(stuck_ref.exit_error, asyncio.CancelledError)
    for ask in (in_flight, queued):  # pending asks failed instead of hanging
        with pytest.raises(ActorDead):
            await asyncio.wait_for(ask, 1)
    assert any(r.getMessage().startswith("shutdown deadline exceeded") for r in caplog.records)
    assert sup.children() == []


class _Signal(logging.Handler):
    """Sets an event when the supervisor logs ``message`` (it logs before a backoff)."""

    def __init__(self, message: str) -> None:
        super().__init__(logging.DEBUG)
        self.message = message
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == self.message:
            self.seen.set()


@pytest.fixture
async def restarting() -> AsyncIterator[asyncio.Event]:
    signal = _Signal("restarting child")
    logger = logging.getLogger("mailer.actors")
    logger.addHandler(signal)
    yield signal.seen
    logger.removeHandler(signal)


@pytest.mark.parametrize("how", ["shutdown", "ref.stop"])
async def test_stopping_does_not_wait_out_a_restart_backoff(
    how: str, restarting: asyncio.Event
) -> None:
    service, observer = Factory("service", []), Recorder()
    slow = RestartPolicy(max_restarts=10, window_seconds=10, backoff_base=30, backoff_max=30)
    sup = supervisor([service.spec()], observer, slow)
    await sup.start()
    ref = sup.get("service")
    assert ref is not None
    ref.tell(Crash())
    await asyncio.wait_for(restarting.wait(), 1)  # now sleeping a 30 s backoff
    with pytest.raises(ActorDead):
        ref.tell(Incr())  # between incarnations messages fail fast
    if how == "ref.stop":
        await asyncio.wait_for(ref.stop(), 1)
        assert sup.children() == []
    await asyncio.wait_for(sup.shutdown(5), 1)
    assert observer.restarts == []
    assert len(service.instances) == 1
    [(name, error)] = observer.exits
    assert name == "service" and isinstance(error, ValueError)
