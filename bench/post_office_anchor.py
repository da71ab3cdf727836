"""django-post-office sending a queue of emails: the anchor of an existing Python product.

Runs in its own throwaway virtualenv (Django, django-post-office, psycopg; not mailer's
dependencies), started by bench/suite.py::

    <venv>/bin/python bench/post_office_anchor.py DSN SMTP_PORT N

Queues N emails (the same text and HTML body as mailer's bench campaign) with
``mail.send_many``, then times ``mail.send_queued()`` called until nothing is queued (as its
``send_queued_mail`` command does), with its defaults (one process, its
thread pool, Django's SMTP backend) against the same PostgreSQL and sink. Prints one JSON
line: {"msg_per_s": ..., "sent": ...}.
"""

from __future__ import annotations

import json
import sys
import time
from urllib.parse import urlsplit


def main() -> None:
    dsn, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    u = urlsplit(dsn)
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "post_office"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": u.path.lstrip("/"),
                "USER": u.username or "postgres",
                "HOST": u.hostname,
                "PORT": u.port,
            }
        },
        EMAIL_BACKEND="post_office.EmailBackend",
        POST_OFFICE={"BACKENDS": {"default": "django.core.mail.backends.smtp.EmailBackend"}},
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=port,
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        LOGGING_CONFIG=None,
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
    )
    django.setup()
    from django.core.management import call_command
    from post_office import mail
    from post_office.models import STATUS, Email

    call_command("migrate", verbosity=0)
    for i in range(0, n, 5000):
        mail.send_many(
            [
                {
                    "sender": "CRM <crm@example.com>",
                    "recipients": [f"r{j}@example.org"],
                    "subject": "Bench",
                    "message": f"Здравствуйте, User {j}!",
                    "html_message": f"<p>Здравствуйте, User {j}!</p>",
                }
                for j in range(i, min(n, i + 5000))
            ]
        )
    began = time.perf_counter()
    # What the send_queued_mail command does: batches (BATCH_SIZE, 100) until none is queued.
    while Email.objects.filter(status=STATUS.queued).exists():
        mail.send_queued(processes=1, log_level=0)
    took = time.perf_counter() - began
    sent = Email.objects.filter(status=STATUS.sent).count()
    print(json.dumps({"msg_per_s": sent / took, "sent": sent}))


if __name__ == "__main__":
    main()
