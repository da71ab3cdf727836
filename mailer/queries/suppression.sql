-- name: suppression-recipient
-- The recipient a verified bounce address names, locked so that two reports
-- about it (a DSN and the webhook) settle it one after the other.
SELECT id, campaign_id, email, status FROM recipient WHERE id = $1 FOR UPDATE;

-- name: suppression-settle-recipient
-- A hard bounce or a complaint settles the recipient it is about. Only a
-- message that left: 'sent', or 'in_doubt' (the report proves the server took
-- it); a complaint also overrides 'bounced'. Returns nothing otherwise.
UPDATE recipient
SET status = $2, error = $3, updated_at = $4
WHERE id = $1
  AND (status IN ('sent', 'in_doubt') OR ($2 = 'complained' AND status = 'bounced'))
RETURNING id;

-- name: suppression-insert
-- Adds an address to the suppression list once; the first reason stays.
-- lower() in SQL like the claim query, so the two agree on every character.
INSERT INTO unsubscribe (email, source, created_at, reason, campaign_id, detail)
VALUES (lower($1), $2, $3, $4, (SELECT id FROM campaign WHERE id = $5), $6)
ON CONFLICT (email) DO NOTHING
RETURNING created_at;

-- name: suppression-soft-lock
-- Soft bounces of one address are counted one report at a time: without the
-- lock two reports could each count the other out and never reach the limit.
SELECT pg_advisory_xact_lock(hashtextextended('mailer soft bounce ' || lower($1), 0));

-- name: suppression-soft-insert
-- Records a soft bounce and returns how many the address has had since $6.
WITH ins AS (
    INSERT INTO soft_bounce (email, campaign_id, recipient_id, detail, created_at)
    VALUES (lower($1), (SELECT id FROM campaign WHERE id = $2), $3, $4, $5)
    RETURNING 1
)
SELECT 1 + (SELECT count(*) FROM soft_bounce WHERE email = lower($1) AND created_at >= $6);

-- name: suppression-get
SELECT email, reason, source, campaign_id, detail, created_at
FROM unsubscribe WHERE email = lower($1);

-- name: suppression-list
-- In address order, from after the cursor; optionally one reason only.
SELECT email, reason, source, campaign_id, detail, created_at
FROM unsubscribe
WHERE ($1::text IS NULL OR email > $1) AND ($2::text IS NULL OR reason = $2)
ORDER BY email
LIMIT $3;

-- name: suppression-delete
-- Removes an address and its soft-bounce history (a fresh start).
WITH gone AS (
    DELETE FROM unsubscribe WHERE email = lower($1) RETURNING email, reason
), soft AS (
    DELETE FROM soft_bounce WHERE email = lower($1)
)
SELECT email, reason FROM gone;

-- name: suppression-audit
INSERT INTO audit_log (at, actor_id, action, campaign_id, details)
VALUES ($1, $2, $3, (SELECT id FROM campaign WHERE id = $4), $5::jsonb);
