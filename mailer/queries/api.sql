-- Queries only the public API makes. Names start with "api-" so they never
-- clash with the engine's.
--
-- A state change (start, pause, resume, cancel, edit, delete) runs in one
-- transaction that first locks the campaign's queue entry and then the
-- campaign row: the same order the engine takes them in (defer, finish and
-- the circuit breaker lock the queue entry, then touch the campaign), so the
-- two never deadlock, and the engine's own status updates wait for ours.
-- FOR NO KEY UPDATE, not FOR UPDATE: it still serializes writers, but does not
-- block the KEY SHARE locks that inserting an audit or send-log row (foreign
-- keys to campaign) takes. Only a delete needs the full FOR UPDATE.

-- name: api-queue-lock
SELECT lease_owner, lease_until, completed_at FROM queue_entry
WHERE campaign_id = $1 FOR NO KEY UPDATE;

-- name: api-campaign-lock
SELECT id, owner_id, name, subject, body_text, body_html, priority, status,
       created_at, updated_at, finished_at, smtp_account, backup_account
FROM campaign WHERE id = $1 FOR NO KEY UPDATE;

-- name: api-campaign-lock-delete
SELECT id, owner_id, name, subject, body_text, body_html, priority, status,
       created_at, updated_at, finished_at, smtp_account, backup_account
FROM campaign WHERE id = $1 FOR UPDATE;

-- name: api-campaign-set-status
UPDATE campaign
SET status = $2, updated_at = $3,
    finished_at = CASE WHEN $2 IN ('sent', 'completed_with_errors', 'cancelled') THEN $3
                       ELSE finished_at END
WHERE id = $1;

-- name: api-campaign-update
UPDATE campaign
SET name = $2, subject = $3, body_text = $4, body_html = $5, priority = $6, updated_at = $7,
    smtp_account = $8, backup_account = $9
WHERE id = $1;

-- name: api-campaign-delete
DELETE FROM campaign WHERE id = $1;

-- name: api-campaign-list
-- Keyset pagination, newest first: a page never repeats or skips a row when
-- campaigns are created meanwhile (OFFSET would).
SELECT id, owner_id, name, subject, priority, status, created_at, updated_at, finished_at,
       smtp_account, backup_account
FROM campaign
WHERE ($1::text IS NULL OR owner_id = $1)
  AND (cardinality($2::text[]) = 0 OR status = ANY($2::text[]))
  AND ($3::bigint IS NULL OR id < $3)
ORDER BY id DESC
LIMIT $4;

-- name: api-counts-of-campaigns
-- As recipients-counts, for many campaigns at once.
SELECT c.id AS campaign_id, p.key AS status, p.value::bigint AS n
FROM campaign c, jsonb_each_text(c.purged_counts) p
WHERE c.id = ANY($1::bigint[]) AND c.purged_counts IS NOT NULL
UNION ALL
SELECT c.id AS campaign_id, s.status, s.n
FROM campaign c JOIN campaign_counts k ON k.campaign_id = c.id,
     LATERAL (VALUES ('pending', k.pending), ('sending', k.sending), ('sent', k.sent),
                     ('failed', k.failed), ('unsubscribed', k.unsubscribed),
                     ('in_doubt', k.in_doubt), ('bounced', k.bounced),
                     ('complained', k.complained), ('suppressed', k.suppressed)) AS s(status, n)
WHERE c.id = ANY($1::bigint[]) AND c.purged_counts IS NULL AND s.n <> 0;

-- name: api-queues-of-campaigns
SELECT campaign_id, priority, queued_at, started_at, completed_at, defer_reason,
       deferred_until, consecutive_transient_errors, defer_account
FROM queue_entry WHERE campaign_id = ANY($1::bigint[]);

-- name: api-queue-set-priority
UPDATE queue_entry SET priority = $2 WHERE campaign_id = $1 AND completed_at IS NULL;

-- name: api-queue-pause
-- A manager's pause: the one reason without an end (only a resume ends it).
UPDATE queue_entry SET defer_reason = 'paused', deferred_until = NULL
WHERE campaign_id = $1 AND completed_at IS NULL;

-- name: api-queue-resume
-- Ends any pause (a manager's or the circuit breaker's); the breaker counts
-- anew, and a new trouble after the resume is a new episode to notify.
UPDATE queue_entry
SET defer_reason = NULL, deferred_until = NULL, consecutive_transient_errors = 0,
    notified_reason = NULL
WHERE campaign_id = $1 AND completed_at IS NULL;

-- name: api-queue-cancel
UPDATE queue_entry
SET completed_at = $2, defer_reason = NULL, deferred_until = NULL
WHERE campaign_id = $1 AND completed_at IS NULL;

-- name: api-audit-insert
INSERT INTO audit_log (at, actor_id, action, campaign_id, details)
VALUES ($1, $2, $3, $4, $5);

-- name: api-audit-list
SELECT id, at, actor_id, action, campaign_id, details
FROM audit_log
WHERE campaign_id = $1 AND ($2::bigint IS NULL OR id > $2)
ORDER BY id
LIMIT $3;

-- name: api-recipients-list
SELECT id, email, name, variables, status, error, smtp_message_id, sent_at, updated_at
FROM recipient
WHERE campaign_id = $1
  AND ($2::text IS NULL OR status = $2)
  AND ($3::bigint IS NULL OR id > $3)
ORDER BY id
LIMIT $4;

-- name: api-recipients-count
-- From the counts the triggers keep (one row, not a count over the campaign).
SELECT COALESCE((SELECT pending + sending + sent + failed + unsubscribed + in_doubt
                        + bounced + complained + suppressed
                 FROM campaign_counts WHERE campaign_id = $1), 0)::bigint;

-- name: api-recipients-remove
-- Only rows not yet handed to sending: anything else is history to keep.
DELETE FROM recipient
WHERE campaign_id = $1 AND lower(email) = ANY($2::text[]) AND status = 'pending'
RETURNING lower(email) AS email;

-- name: api-recipients-status-of
SELECT lower(email) AS email, status
FROM recipient WHERE campaign_id = $1 AND lower(email) = ANY($2::text[]);

-- name: api-attachments-size
SELECT COALESCE(sum(octet_length(content)), 0)::bigint FROM attachment WHERE campaign_id = $1;

-- name: api-attachment-insert
INSERT INTO attachment (campaign_id, filename, content_type, content, created_at)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, campaign_id, filename, content_type, octet_length(content) AS size, created_at;

-- name: api-attachments-list
SELECT id, campaign_id, filename, content_type, octet_length(content) AS size, created_at
FROM attachment WHERE campaign_id = $1 ORDER BY id;

-- name: api-attachment-delete
DELETE FROM attachment WHERE id = $1 AND campaign_id = $2
RETURNING id, filename;

-- name: api-unsubscribe-add
-- An address already unsubscribed keeps its first source and time.
INSERT INTO unsubscribe (email, source, created_at) VALUES ($1, $2, $3)
ON CONFLICT (email) DO NOTHING
RETURNING email;

-- name: api-unsubscribe-get
SELECT email, source, created_at FROM unsubscribe WHERE email = $1;

-- name: api-unsubscribe-delete
DELETE FROM unsubscribe WHERE email = $1 RETURNING email;

-- name: api-unsubscribe-list
SELECT email, source, created_at
FROM unsubscribe
WHERE ($1::text IS NULL OR email > $1)
ORDER BY email
LIMIT $2;

-- name: api-quota-get
-- $1: the account's row ('' the default's).
SELECT emails_available, monthly_limit, last_synced_at, sync_error FROM quota WHERE account = $1;

-- name: api-send-log-test
-- A test email's attempt: no recipient row, is_test marks it.
INSERT INTO send_log (campaign_id, recipient_id, email, is_test, status, smtp_message_id,
                      provider_answer, error, took_ms, created_at)
VALUES ($1, NULL, $2, true, $3, $4, $5, $6, $7, $8)
RETURNING id;

-- name: api-owner-queue
-- The owner's unfinished campaigns in the order the manager reads them: the
-- one sending first, then the queue (priority, then queued_at), paused last.
SELECT c.id, c.name, c.status, q.priority, q.queued_at, q.started_at,
       q.defer_reason, q.deferred_until, q.defer_account, c.smtp_account
FROM campaign c JOIN queue_entry q ON q.campaign_id = c.id
WHERE c.owner_id = $1 AND q.completed_at IS NULL
  AND c.status IN ('ready', 'sending', 'paused')
ORDER BY CASE c.status WHEN 'sending' THEN 0 WHEN 'ready' THEN 1 ELSE 2 END,
         q.priority DESC, q.queued_at, q.id
LIMIT $2;

-- name: api-owner-queue-counts
SELECT count(*) FILTER (WHERE c.status IN ('ready', 'sending'))::bigint AS queued,
       count(*) FILTER (WHERE c.status = 'paused')::bigint AS paused
FROM campaign c JOIN queue_entry q ON q.campaign_id = c.id
WHERE c.owner_id = $1 AND q.completed_at IS NULL;

-- name: api-forecast-queue
-- The whole queue the forecast replays, in queue order (not paused, not
-- finished), with what each campaign still has to send. $2: only the campaigns
-- of this SMTP account (its name; $3: it is the default, whose campaigns may
-- name none); NULL: all of them.
SELECT q.campaign_id, c.owner_id, q.defer_reason, q.deferred_until, q.started_at,
       (SELECT count(*) FROM recipient r
        WHERE r.campaign_id = q.campaign_id AND r.status IN ('pending', 'sending'))::bigint
           AS remaining
FROM queue_entry q JOIN campaign c ON c.id = q.campaign_id
WHERE q.completed_at IS NULL AND c.status IN ('ready', 'sending')
  AND ($2::text IS NULL OR c.smtp_account = $2 OR (c.smtp_account IS NULL AND $3))
ORDER BY q.priority DESC, q.queued_at, q.id
LIMIT $1;

-- name: api-queue-unschedule
-- Takes a scheduled campaign out of the queue while it still waits for its
-- time (no process holds it); returns the time it was scheduled for.
DELETE FROM queue_entry
WHERE campaign_id = $1 AND completed_at IS NULL AND defer_reason = 'scheduled'
  AND deferred_until > $2 AND lease_owner IS NULL
RETURNING deferred_until;
