"""The client commands of ``mailer``: a person at a terminal drives the API.

Each module holds one family; ``register`` adds them all to the root group
(``mailer.cli``). Exit codes are in ``mailer.commands.common``.
"""

from __future__ import annotations

import click

from mailer.commands.admin import audit, events, limits, ping, quota, unsubscribe
from mailer.commands.campaigns import campaign
from mailer.commands.progress import status, watch
from mailer.commands.recipients import recipients
from mailer.commands.suppression import suppression

__all__ = ["register"]


def register(root: click.Group) -> None:
    for command in (
        campaign,
        recipients,
        status,
        watch,
        quota,
        limits,
        unsubscribe,
        suppression,
        audit,
        events,
        ping,
    ):
        root.add_command(command)
