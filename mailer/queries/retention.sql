-- name: retention-send-log
-- One batch of send-log rows older than $1 (oldest first, by the created_at index).
DELETE FROM send_log WHERE id IN (
    SELECT id FROM send_log WHERE created_at < $1 ORDER BY created_at LIMIT $2
);

-- name: retention-audit-log
DELETE FROM audit_log WHERE id IN (
    SELECT id FROM audit_log WHERE at < $1 ORDER BY at LIMIT $2
);

-- name: retention-finished-campaigns
-- Campaigns finished before $1 whose recipients are still in the table.
SELECT c.id FROM campaign c
WHERE c.finished_at < $1
  AND c.status IN ('sent', 'completed_with_errors', 'cancelled')
  AND EXISTS (SELECT 1 FROM recipient r WHERE r.campaign_id = c.id)
ORDER BY c.finished_at
LIMIT $2;

-- name: retention-keep-counts
-- Before the first recipient goes: the counts the view will show from now on.
-- Under the campaign row's lock, only once, only for a finished campaign.
UPDATE campaign c
SET purged_counts = COALESCE(c.purged_counts, (
    SELECT COALESCE(jsonb_object_agg(s.status, s.n), '{}'::jsonb)
    FROM (SELECT status, count(*) AS n FROM recipient
          WHERE campaign_id = c.id GROUP BY status) s))
WHERE c.id = $1 AND c.status IN ('sent', 'completed_with_errors', 'cancelled')
RETURNING c.id;

-- name: retention-recipients
DELETE FROM recipient WHERE id IN (
    SELECT id FROM recipient WHERE campaign_id = $1 LIMIT $2
);

-- name: retention-soft-bounce
-- Soft bounces older than the counting window $1 no longer count: one batch of them.
DELETE FROM soft_bounce WHERE id IN (
    SELECT id FROM soft_bounce WHERE created_at < $1 ORDER BY email, created_at LIMIT $2
);
