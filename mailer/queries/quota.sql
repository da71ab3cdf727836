-- name: quota-get
SELECT emails_available, monthly_limit, last_synced_at, sync_error FROM quota;

-- name: quota-take
-- Takes up to $1 emails from the monthly allowance; returns how many it took.
-- RETURNING sees only the new value, and "new = 0" does not say how much was
-- there, so the old one is read in the same statement. FOR UPDATE makes that
-- read wait for a concurrent taker and then see its result (READ COMMITTED
-- re-reads a locked row), so two governors never both take the last emails.
WITH before AS (SELECT emails_available FROM quota FOR UPDATE)
UPDATE quota q
SET emails_available = q.emails_available - LEAST(q.emails_available, $1)
FROM before
RETURNING before.emails_available - q.emails_available AS taken,
          q.emails_available AS available;

-- name: quota-record-sync
-- A successful sync: the provider's number replaces ours ($2 NULL keeps the
-- monthly limit). Returns the value it replaced, to see a 0 -> n restore.
WITH before AS (SELECT emails_available FROM quota FOR UPDATE)
UPDATE quota q
SET emails_available = $1, monthly_limit = COALESCE($2, q.monthly_limit),
    last_synced_at = $3, sync_error = NULL
FROM before
RETURNING before.emails_available AS previous, q.emails_available, q.monthly_limit,
          q.last_synced_at, q.sync_error;

-- name: quota-record-sync-error
-- A failed sync keeps the last known numbers and last_synced_at (the time
-- they are from) and says why it failed.
UPDATE quota SET sync_error = $1
RETURNING emails_available, monthly_limit, last_synced_at, sync_error;

-- name: quota-sent-between
-- What the provider counted in [$1, $2): every attempt it accepted or may
-- have accepted (in_doubt), test emails included.
SELECT count(*) FROM send_log
WHERE status IN ('sent', 'in_doubt') AND created_at >= $1 AND created_at < $2;

-- name: queue-lift-reason
-- Ends every deferral of one reason now (e.g. quota_exhausted once the quota
-- is back). The reason stays until the campaign runs again: the queue shows
-- why it waited; queue-acquire clears it.
UPDATE queue_entry SET deferred_until = $2
WHERE defer_reason = $1 AND completed_at IS NULL AND deferred_until > $2
RETURNING campaign_id;
