"""The actor runtime of mailer: actors with bounded mailboxes, under a supervisor.

See ``runtime`` for actors, refs and the mailbox overflow policy, and ``supervisor`` for
restart types, backoff, restart intensity and graceful shutdown.
"""

from mailer.actors.runtime import (
    DEFAULT_MAILBOX_SIZE,
    Actor,
    ActorDead,
    ActorError,
    ActorFault,
    ActorRef,
    AskTimeout,
    MailboxFull,
    NullObserver,
    RuntimeObserver,
    start_actor,
)
from mailer.actors.supervisor import (
    AlreadyRunning,
    ChildExitCallback,
    ChildLimit,
    ChildSpec,
    Restart,
    RestartPolicy,
    Supervisor,
    SupervisorClosed,
    SupervisorEscalation,
)

__all__ = [
    "DEFAULT_MAILBOX_SIZE",
    "Actor",
    "ActorDead",
    "ActorError",
    "ActorFault",
    "ActorRef",
    "AlreadyRunning",
    "AskTimeout",
    "ChildExitCallback",
    "ChildLimit",
    "ChildSpec",
    "MailboxFull",
    "NullObserver",
    "Restart",
    "RestartPolicy",
    "RuntimeObserver",
    "Supervisor",
    "SupervisorClosed",
    "SupervisorEscalation",
    "start_actor",
]
