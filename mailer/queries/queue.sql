-- name: queue-enqueue
-- (Re)queues a campaign: a fresh entry, or the old one reset for a restart.
INSERT INTO queue_entry (campaign_id, priority, queued_at)
VALUES ($1, $2, $3)
ON CONFLICT (campaign_id) DO UPDATE
SET priority = EXCLUDED.priority, queued_at = EXCLUDED.queued_at, completed_at = NULL,
    started_at = NULL, defer_reason = NULL, deferred_until = NULL,
    consecutive_transient_errors = 0
RETURNING id;

-- name: queue-runnable
-- Entries that may run now, in queue order: not finished, not waiting for a
-- later time, not held by a live lease of another process.
SELECT q.id, q.campaign_id, q.priority, q.queued_at, q.deferred_until, q.lease_owner
FROM queue_entry q JOIN campaign c ON c.id = q.campaign_id
WHERE q.completed_at IS NULL
  AND c.status IN ('ready', 'sending')
  AND (q.deferred_until IS NULL OR q.deferred_until <= $1)
  AND (q.lease_owner IS NULL OR q.lease_until <= $1)
ORDER BY q.priority DESC, q.queued_at, q.id
LIMIT $2;

-- name: queue-next-wakeup
-- The earliest moment a waiting entry becomes runnable: its deferral ends or
-- another process's lease runs out.
SELECT min(t) AS at FROM (
    SELECT GREATEST(q.deferred_until, q.lease_until) AS t
    FROM queue_entry q JOIN campaign c ON c.id = q.campaign_id
    WHERE q.completed_at IS NULL AND c.status IN ('ready', 'sending')
      AND (q.deferred_until > $1 OR q.lease_until > $1)
) s;

-- name: queue-acquire
-- Takes the campaign's lease when it is free or expired (or already ours);
-- lease_epoch grows on every new holder: a fencing token for later writes.
UPDATE queue_entry
SET lease_owner = $2, lease_until = $3,
    lease_epoch = lease_epoch + CASE WHEN lease_owner = $2 THEN 0 ELSE 1 END,
    started_at = COALESCE(started_at, $4),
    defer_reason = NULL, deferred_until = NULL
WHERE campaign_id = $1 AND completed_at IS NULL
  AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until <= $4)
  AND (deferred_until IS NULL OR deferred_until <= $4)
RETURNING id, lease_epoch, consecutive_transient_errors;

-- name: queue-renew
UPDATE queue_entry SET lease_until = $3
WHERE campaign_id = $1 AND lease_owner = $2 AND lease_epoch = $4
RETURNING id;

-- name: queue-release
UPDATE queue_entry SET lease_owner = NULL, lease_until = NULL
WHERE campaign_id = $1 AND lease_owner = $2 AND lease_epoch = $3;

-- name: queue-defer
-- The one way a campaign waits: the reason and until when, under our lease.
UPDATE queue_entry
SET defer_reason = $4, deferred_until = $5, lease_owner = NULL, lease_until = NULL
WHERE campaign_id = $1 AND lease_owner = $2 AND lease_epoch = $3
RETURNING id;

-- name: queue-complete
UPDATE queue_entry
SET completed_at = $4, lease_owner = NULL, lease_until = NULL,
    defer_reason = NULL, deferred_until = NULL
WHERE campaign_id = $1 AND lease_owner = $2 AND lease_epoch = $3
RETURNING id;

-- name: queue-get
SELECT id, campaign_id, priority, queued_at, started_at, completed_at, defer_reason,
       deferred_until, consecutive_transient_errors, lease_owner, lease_until, lease_epoch
FROM queue_entry WHERE campaign_id = $1;
