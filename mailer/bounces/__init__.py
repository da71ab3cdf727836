"""Asynchronous bounces and complaints: VERP addresses, the DSN/ARF parser, the
inbound SMTP receiver and the provider webhook. What they learn goes to the
suppression list (``mailer.suppression``)."""
