-- name: retry-failed
-- Failed recipients of campaign $1 back to pending, as a new attempt: those
-- that failed after their transient attempts ran out (the record writes their
-- error as 'gave up after N transient answers; ...'), and with $2 the
-- permanent failures too. Never a suppressed address (the claim would settle
-- it anyway; here it is not even counted as requeued).
UPDATE recipient r
SET status = 'pending', error = NULL, transient_attempts = 0, updated_at = $3
WHERE r.campaign_id = $1 AND r.status = 'failed'
  AND ($2 OR r.error LIKE 'gave up after %')
  AND NOT EXISTS (SELECT 1 FROM unsubscribe u WHERE u.email = lower(r.email))
RETURNING r.id;

-- name: retry-resolve-in-doubt
-- An operator settles in-doubt recipients of campaign $1: 'sent' (the provider
-- has the message), 'failed' (it never left; $4 is the error), or 'retry'
-- (back to pending: sent again, which may duplicate). Only rows in doubt.
UPDATE recipient
SET status = CASE $3 WHEN 'sent' THEN 'sent' WHEN 'failed' THEN 'failed' ELSE 'pending' END,
    sent_at = CASE WHEN $3 = 'sent' THEN COALESCE(sent_at, updated_at) ELSE sent_at END,
    error = CASE WHEN $3 = 'failed' THEN $4 ELSE NULL END,
    transient_attempts = CASE WHEN $3 = 'retry' THEN 0 ELSE transient_attempts END,
    updated_at = $5
WHERE campaign_id = $1 AND status = 'in_doubt' AND id = ANY($2::bigint[])
RETURNING id;

-- name: retry-reopen-campaign
-- A finished campaign with recipients pending again: back to 'ready', its
-- queue entry unfinished (keeping its place), so the leader dispatches it.
WITH c AS (
    UPDATE campaign SET status = 'ready', finished_at = NULL, updated_at = $2
    WHERE id = $1 AND status IN ('sent', 'completed_with_errors')
    RETURNING id
), q AS (
    UPDATE queue_entry
    SET completed_at = NULL, defer_reason = NULL, deferred_until = NULL,
        consecutive_transient_errors = 0, notified_reason = NULL
    WHERE campaign_id = $1 AND completed_at IS NOT NULL AND EXISTS (SELECT 1 FROM c)
)
SELECT count(*) FROM c;

-- name: retry-refinish-campaign
-- A finished campaign whose doubts were settled: its final status follows its
-- recipients (the same rule as the engine's finish). Returns the new status.
UPDATE campaign
SET status = CASE WHEN EXISTS (SELECT 1 FROM recipient r
                               WHERE r.campaign_id = $1 AND r.status IN ('failed', 'in_doubt'))
                  THEN 'completed_with_errors' ELSE 'sent' END,
    updated_at = $2
WHERE id = $1 AND status IN ('sent', 'completed_with_errors')
RETURNING status;
