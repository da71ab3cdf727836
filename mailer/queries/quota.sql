-- name: quota-get
-- $1: the account ('' the default's).
SELECT emails_available, monthly_limit, last_synced_at, sync_error FROM quota WHERE account = $1;

-- name: quota-ensure
-- An account's row, created at start with its monthly allowance ($2) until the
-- first sync writes the real number.
INSERT INTO quota (account, emails_available, monthly_limit) VALUES ($1, $2, $2)
ON CONFLICT (account) DO NOTHING;

-- name: quota-take
-- Takes up to $1 emails from the monthly allowance; returns how many it took.
-- RETURNING sees only the new value, and "new = 0" does not say how much was
-- there, so the old one is read in the same statement. FOR UPDATE makes that
-- read wait for a concurrent taker and then see its result (READ COMMITTED
-- re-reads a locked row), so two governors never both take the last emails.
-- $2: the account ('' the default's): each account's row is its own.
WITH before AS (SELECT account, emails_available FROM quota WHERE account = $2 FOR UPDATE)
UPDATE quota q
SET emails_available = q.emails_available - LEAST(q.emails_available, $1)
FROM before
WHERE q.account = before.account
RETURNING before.emails_available - q.emails_available AS taken,
          q.emails_available AS available;

-- name: quota-block-take
-- A governor's block: up to $1 emails taken from the allowance (as quota-take)
-- and a ledger row for them, held by $2, live for $3 seconds, in one statement.
-- Returns what was taken (0: exhausted, no row) and the block's id. Also trims
-- a few ledger rows older than a day. $4: the account ('' the default's).
WITH before AS (SELECT account, emails_available FROM quota WHERE account = $4 FOR UPDATE),
took AS (
    UPDATE quota q
    SET emails_available = q.emails_available - LEAST(q.emails_available, $1)
    FROM before
    WHERE q.account = before.account
    RETURNING before.emails_available - q.emails_available AS taken
),
block AS (
    INSERT INTO quota_block (account, holder, size, expires_at)
    SELECT $4, $2, taken, now() + make_interval(secs => $3) FROM took WHERE taken > 0
    RETURNING id
),
trimmed AS (
    DELETE FROM quota_block WHERE id IN (
        SELECT id FROM quota_block WHERE taken_at < now() - interval '1 day'
        ORDER BY taken_at LIMIT 10)
)
SELECT (SELECT taken FROM took) AS taken, (SELECT id FROM block) AS block_id;

-- name: quota-block-close
-- Closes block $1, of which $2 were granted: its unused rest goes back to the
-- allowance, only while the block is live (an expired one was already left out
-- of every later sync's count, so returning it would count it twice). Returns
-- the allowance before and what was returned; no row: expired or closed already.
-- $3: the block's account, whose row it goes back to.
WITH before AS (SELECT account, emails_available FROM quota WHERE account = $3 FOR UPDATE),
closed AS (
    UPDATE quota_block SET closed_at = now(), granted = $2
    WHERE id = $1 AND account = $3 AND closed_at IS NULL AND expires_at > now()
    RETURNING size - $2 AS unused
)
UPDATE quota q SET emails_available = q.emails_available + closed.unused
FROM closed, before
WHERE q.account = before.account
RETURNING before.emails_available AS previous, closed.unused AS returned;

-- name: quota-give-back
-- Tokens granted and never used (a stop, a pause, an unused prefetch) go back to
-- the allowance: $1 emails to account $2, granted at $3 — only when no sync ran
-- since then (last_synced_at before $3; a sync at the same instant may have come
-- after: nothing goes back, the safe side): a sync counts unused grants as
-- unspent already (it subtracts claims, live blocks and sends, not grants), so
-- giving them back after one would count them twice. Returns the allowance
-- before and what was given back; no row: a sync came first, nothing changed.
WITH before AS (SELECT account, emails_available FROM quota WHERE account = $2 FOR UPDATE)
UPDATE quota q SET emails_available = q.emails_available + $1
FROM before
WHERE q.account = before.account AND (q.last_synced_at IS NULL OR q.last_synced_at < $3)
RETURNING before.emails_available AS previous, $1::int AS returned;

-- name: quota-lock
-- Holds the quota row for a sync: no governor takes until it commits.
SELECT emails_available FROM quota WHERE account = $1 FOR UPDATE;

-- name: quota-record-sync
-- A successful sync, under quota-lock: the reading ($1) less the recipients
-- claimed for sending now (tokens granted or about to be: not yet in any
-- provider's count) and, with a period [$4, $5) ($5 NULL: open), less the sends
-- recorded in it (local: the month's; http: since the provider was asked).
-- $2: the monthly limit the provider reports (NULL: it does not say). $6: a
-- local reading — then an operator's quota.set (monthly_override) stands for
-- both the reading and the limit. $7: the account ('' the default's): its own
-- sends only (NULL in the log: the default's). The claims: those of the
-- campaigns that may send through the account — its own or naming it as their
-- backup ($8 its name, $9 whether it is the default, whose campaigns may name
-- none); $8 NULL (one account): every claim. A failing-over campaign's claims
-- count for both of its accounts: under-sending until the next sync, never over.
UPDATE quota q
SET emails_available = GREATEST(0,
        (CASE WHEN $6 AND q.monthly_override IS NOT NULL THEN q.monthly_override ELSE $1 END)
        - (SELECT count(*) FROM recipient r JOIN campaign c ON c.id = r.campaign_id
           WHERE r.status = 'sending'
             AND ($8::text IS NULL OR c.smtp_account = $8 OR c.backup_account = $8
                  OR (c.smtp_account IS NULL AND $9)))
        -- Quota held by governors in live blocks, not granted yet (as far as the
        -- ledger knows: a block's grants are written when it closes, so this
        -- errs towards under-sending by at most the live blocks until they close).
        - (SELECT COALESCE(sum(size - granted), 0) FROM quota_block
           WHERE closed_at IS NULL AND expires_at > now() AND account = $7)
        - CASE WHEN $4::timestamptz IS NULL THEN 0 ELSE (
              SELECT count(*) FROM send_log
              WHERE status IN ('sent', 'in_doubt') AND created_at >= $4
                AND ($5::timestamptz IS NULL OR created_at < $5)
                AND COALESCE(account, '') = $7
          ) END),
    monthly_limit = CASE WHEN $6 AND q.monthly_override IS NOT NULL THEN q.monthly_override
                         ELSE $2 END,
    last_synced_at = $3, sync_error = NULL
WHERE q.account = $7
RETURNING q.emails_available, q.monthly_limit, q.last_synced_at, q.sync_error;

-- name: quota-set-override
-- quota.set: the local monthly allowance from now on (under quota-lock; the
-- caller then records a local reading, which applies it).
UPDATE quota SET monthly_override = $1 WHERE account = $2;

-- name: quota-record-sync-error
-- A failed sync keeps the last known numbers and last_synced_at (the time
-- they are from) and says why it failed.
UPDATE quota SET sync_error = $1 WHERE account = $2
RETURNING emails_available, monthly_limit, last_synced_at, sync_error;

-- name: queue-lift-reason
-- Ends every deferral of one reason now (e.g. quota_exhausted once the quota
-- is back: those wait with no time at all). The reason stays until the
-- campaign runs again: the queue shows why it waited; queue-acquire clears it.
UPDATE queue_entry SET deferred_until = $2
WHERE defer_reason = $1 AND completed_at IS NULL
  AND (deferred_until IS NULL OR deferred_until > $2)
RETURNING campaign_id;

-- name: quota-share
-- A deferral for quota_exhausted reads the quota under a share lock, in its
-- own transaction: a sync that restores the quota (quota-lock, FOR UPDATE)
-- either committed before — this sees its number — or waits until the
-- deferral is committed, and its lift then finds it. No third order exists.
SELECT emails_available FROM quota WHERE account = $1 FOR SHARE;
