"""Fault injection for the chaos suite: an exception inside a named actor, on request.

Inert unless ``MAILER_FAULT_INJECTION=true`` (development only: production refuses the
setting). Then the process answers requests on ``<prefix>.internal.fault.crash.<instance>``
with a JSON body ``{"actor": NAME}``: ``NAME`` is a supervised child (``scheduler``,
``leader``, ``rate-governor``, ``smtp-sender``, ``runner``, ``api``, ``quota-sync``) or
``campaign`` for this process's lowest-numbered campaign actor. The reply says which
actor was hit (``{"crashed": "campaign-7"}``, or ``null`` when there was none).

The exception is raised in a task the actor owns: the runtime cancels the actor's own
task for it and tears the actor down with :class:`InjectedFault` as its error, exactly as
after an exception in ``handle``, and its supervisor restarts it by its usual policy.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mailer.actors import ActorRef, Supervisor
from mailer.bus import Bus

__all__ = ["InjectedFault", "crash", "fault_subject", "install"]

log = logging.getLogger("mailer.faults")

CAMPAIGN = "campaign"


class InjectedFault(Exception):
    """The exception the chaos suite asked for."""


class CrashRequest(msgspec.Struct, forbid_unknown_fields=True):
    actor: str


class CrashReply(msgspec.Struct):
    crashed: str | None


def fault_subject(bus: Bus, instance_id: str) -> str:
    return bus.subject("internal", "fault", "crash", instance_id)


def _target(supervisor: Supervisor, actor: str) -> ActorRef[Any] | None:
    if actor != CAMPAIGN:
        return supervisor.get(actor)
    campaigns = [r for r in supervisor.children() if r.name.startswith("campaign-") and r.alive]
    return min(campaigns, key=lambda r: int(r.name.split("-")[1]), default=None)


def crash(supervisor: Supervisor, actor: str) -> str | None:
    """Raises InjectedFault inside ``actor`` (see the module docstring); its name, or None."""
    ref = _target(supervisor, actor)
    if ref is None or not ref.alive:
        return None

    async def fail() -> None:
        raise InjectedFault(f"injected fault in {ref.name}")

    # The runtime's own crash path: an owned task that raises crashes its actor. Reached
    # through the cell because nothing outside the runtime may otherwise make an actor fail.
    ref._require_cell().spawn_task(fail(), name="injected-fault")
    log.warning("fault injected", extra={"actor": ref.name})
    return ref.name


async def install(bus: Bus, supervisor: Supervisor, instance_id: str) -> Subscription:
    """Serves crash requests for this process (call only when fault injection is on)."""

    async def on_request(msg: Msg) -> None:
        try:
            request = msgspec.json.decode(msg.data, type=CrashRequest)
            hit = crash(supervisor, request.actor)
        except Exception as exc:  # a bad request or a dead actor: say so, stay up
            log.warning("fault not injected: %r", exc)
            hit = None
        if msg.reply:
            await msg.respond(msgspec.json.encode(CrashReply(hit)))

    log.warning("fault injection is ON (development only)")
    return await bus.nc.subscribe(fault_subject(bus, instance_id), cb=on_request)
