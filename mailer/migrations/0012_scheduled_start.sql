-- A campaign started with send_at waits in the queue like any deferral, with
-- reason 'scheduled' until then: the scheduler's one timer wakes it.
ALTER TABLE queue_entry DROP CONSTRAINT queue_entry_defer_reason_check;
ALTER TABLE queue_entry ADD CONSTRAINT queue_entry_defer_reason_check CHECK (defer_reason IN (
    'rate_per_hour', 'daily_limit', 'quota_exhausted', 'outside_hours', 'transient_error',
    'circuit_breaker', 'paused', 'render_error', 'scheduled'));
