-- A campaign that cannot be rendered (the engine refuses its message) is
-- paused with its own reason, so the manager sees why and the queue goes on.
ALTER TABLE queue_entry DROP CONSTRAINT queue_entry_defer_reason_check;
ALTER TABLE queue_entry ADD CONSTRAINT queue_entry_defer_reason_check CHECK (defer_reason IN (
    'rate_per_hour', 'daily_limit', 'quota_exhausted', 'outside_hours', 'transient_error',
    'circuit_breaker', 'paused', 'render_error'));

-- Transient SMTP answers a recipient has had: at MAILER_MAX_TRANSIENT_ATTEMPTS
-- it fails with its last answer instead of holding its campaign open forever.
ALTER TABLE recipient ADD COLUMN transient_attempts integer NOT NULL DEFAULT 0
    CHECK (transient_attempts >= 0);

-- The outbox relay takes rows (taken_until: its claim), commits, publishes
-- with no transaction open, then deletes what JetStream stored. A relay that
-- died after taking leaves its rows to the next one once the claim runs out.
ALTER TABLE event_outbox ADD COLUMN taken_until timestamptz;
