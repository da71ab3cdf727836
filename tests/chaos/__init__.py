"""The chaos suite: several ``mailer run`` processes under seeded faults, then invariants.

In the spirit of FoundationDB's simulation tests and Jepsen's checkers: a seed decides the
whole fault schedule up front (``schedule.py``), the driver (``driver.py``) runs real OS
processes against an embedded stack with a 3-node NATS cluster and applies the schedule,
and the checker (``checks.py``) judges the outcome from the SMTP sink's record, PostgreSQL
and the JetStream events stream. ``tests/test_chaos.py`` runs a short fixed-seed round set;
``bench/chaos.py --rounds N --seed S`` the long run.
"""
