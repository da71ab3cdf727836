-- name: campaign-insert
-- $8/$9: the SMTP account and its backup (NULL: the default; none).
INSERT INTO campaign (owner_id, name, subject, body_text, body_html, priority, status,
                      created_at, updated_at, smtp_account, backup_account)
VALUES ($1, $2, $3, $4, $5, $6, 'draft', $7, $7, $8, $9)
RETURNING id, owner_id, name, subject, body_text, body_html, priority, status,
          created_at, updated_at, finished_at, smtp_account, backup_account;

-- name: campaign-get
SELECT id, owner_id, name, subject, body_text, body_html, priority, status,
       created_at, updated_at, finished_at, smtp_account, backup_account
FROM campaign WHERE id = $1;

-- name: campaign-set-status
-- Moves a campaign from one of the expected statuses to a new one; returns
-- nothing when it was not in an expected status (a lost race is visible).
UPDATE campaign
SET status = $2, updated_at = $4,
    finished_at = CASE WHEN $2 IN ('sent', 'completed_with_errors', 'cancelled') THEN $4
                       ELSE finished_at END
WHERE id = $1 AND status = ANY($3::text[])
RETURNING status, owner_id;

-- name: campaign-lock
-- The campaign row under the same lock the API's state changes take
-- (api-campaign-lock): a pause or cancel and the engine's finish serialize,
-- so the one that commits second sees the first one's status.
SELECT status, owner_id FROM campaign WHERE id = $1 FOR NO KEY UPDATE;

-- name: campaign-set-status-from
-- campaign-set-status that also says which status it moved from.
UPDATE campaign c
SET status = $2, updated_at = $4,
    finished_at = CASE WHEN $2 IN ('sent', 'completed_with_errors', 'cancelled') THEN $4
                       ELSE c.finished_at END
FROM (SELECT id, status FROM campaign WHERE id = $1 FOR NO KEY UPDATE) old
WHERE c.id = old.id AND old.status = ANY($3::text[])
RETURNING old.status AS previous, c.owner_id, c.priority;

-- name: attachments-of-campaign
SELECT filename, content_type, content FROM attachment WHERE campaign_id = $1 ORDER BY id;

-- name: audit-insert
INSERT INTO audit_log (at, actor_id, action, campaign_id, details)
VALUES ($1, $2, $3, $4, $5);
