"""The public NATS API, by domain: what each request does once it is decoded.

``mailer.actors.api.ApiActor`` owns the NATS micro service and the plumbing
(strict decoding, who is asking, one error shape); the modules here hold the
operations, each ``async (ctx, caller, request) -> reply``, and ``routes``
names their subjects. Every refusal is an ``mailer.errors.ApiError``.
"""

from mailer.api.context import ApiContext, Caller, EventSink, TestMailer, TestTokens
from mailer.api.routes import Route, routes

__all__ = ["ApiContext", "Caller", "EventSink", "Route", "TestMailer", "TestTokens", "routes"]
