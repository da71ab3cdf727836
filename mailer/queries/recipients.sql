-- name: recipients-insert
-- Bulk insert; a duplicate of an address already in the campaign (any case)
-- collapses into the existing row and is not returned.
INSERT INTO recipient (campaign_id, email, name, variables, created_at, updated_at)
SELECT $1, r.email, r.name, r.variables, $5, $5
FROM unnest($2::text[], $3::text[], $4::jsonb[]) AS r(email, name, variables)
ON CONFLICT (campaign_id, lower(email)) DO NOTHING
RETURNING id;

-- name: recipients-import-table
-- recipients.import: the validated lines of one file, COPYed here in its
-- transaction (gone at commit or rollback).
CREATE TEMPORARY TABLE import_rows (
    line       integer NOT NULL,
    email      text    NOT NULL,
    name       text,
    -- Parsed by the COPY (text format), while the next lines are read.
    variables  jsonb   NOT NULL
) ON COMMIT DROP;

-- name: recipients-insert-imported
-- As recipients-insert for the rows of import_rows, in line order: the first
-- line of an address (any case) is the one kept, as in recipients.add; one
-- already in the campaign is skipped. Returns how many rows were added.
WITH added AS (
    INSERT INTO recipient (campaign_id, email, name, variables, created_at, updated_at)
    SELECT $1, i.email, i.name, i.variables, $2, $2
    FROM import_rows i ORDER BY i.line
    ON CONFLICT (campaign_id, lower(email)) DO NOTHING
    RETURNING 1
)
SELECT count(*)::bigint FROM added;

-- name: recipients-insert-imported-unique
-- recipients-insert-imported when no two rows of import_rows share an address (the
-- reader dropped a file's repeats): no line order to keep, and no ON CONFLICT (its
-- speculative insertion costs every row): those already in the campaign are left out
-- by an anti-join. Runs under the campaign's lock, which every insert of its
-- recipients takes; the unique index still stands behind it (an error, all rolled back).
-- The count is the command's status (no RETURNING to collect).
INSERT INTO recipient (campaign_id, email, name, variables, created_at, updated_at)
SELECT $1, i.email, i.name, i.variables, $2, $2
FROM import_rows i
WHERE NOT EXISTS (SELECT 1 FROM recipient r
                  WHERE r.campaign_id = $1 AND lower(r.email) = lower(i.email));

-- name: recipients-claim
-- Claims up to $2 pending recipients of a campaign for the claim token $3,
-- while owner $5 holds the lease at epoch $6: once another process took the
-- campaign over (a new epoch) the old owner claims nothing (fencing), so two
-- processes never send the same campaign. (An expired lease nobody took yet
-- still claims: its owner renews on, and a takeover bumps the epoch.)
-- The lease is checked at the moment the rows change, not in the statement's
-- snapshot: the queue entry is locked FOR SHARE (a takeover's UPDATE waits
-- for this claim to commit, then settles its rows), and a takeover committed
-- while this statement ran is seen by the lock's recheck of the newest row,
-- so the claim finds no lease and changes nothing. SKIP LOCKED lets two
-- claimers never see the same row; addresses on the suppression list are
-- settled here: 'unsubscribed' for an unsubscribe, 'suppressed' with the
-- reason in `error` for the rest (a bounce, a complaint, an admin's entry).
--
-- Shard $7: 0 is the home (the queue entry's lease), 1.. a helper shard (its
-- campaign_shard row's lease, locked FOR SHARE the same way). Shard k claims
-- only the recipients with id % shards = k: the shards' sets are disjoint.
WITH home AS (
    SELECT q.campaign_id, q.shards FROM queue_entry q
    WHERE $7 = 0 AND q.campaign_id = $1 AND q.lease_owner = $5 AND q.lease_epoch = $6
    FOR SHARE
),
helper AS (
    SELECT s.campaign_id FROM campaign_shard s
    WHERE $7 > 0 AND s.campaign_id = $1 AND s.shard = $7 AND s.lease_owner = $5
      AND s.lease_epoch = $6
    FOR SHARE
),
lease AS (
    SELECT campaign_id, shards FROM home
    UNION ALL
    SELECT h.campaign_id, q.shards FROM helper h JOIN queue_entry q ON q.campaign_id = h.campaign_id
),
picked AS (
    SELECT r.id,
           (SELECT u.reason FROM unsubscribe u WHERE u.email = lower(r.email)) AS supp
    FROM recipient r
    WHERE r.campaign_id = $1 AND r.status = 'pending'
      -- A paused or cancelled campaign claims nothing: its actor stops there.
      -- ('ready' until its first message has gone, then 'sending'.)
      AND EXISTS (SELECT 1 FROM campaign c WHERE c.id = $1
                  AND c.status IN ('ready', 'sending'))
      AND r.campaign_id IN (SELECT campaign_id FROM lease)
      AND r.id % (SELECT shards FROM lease) = $7
    ORDER BY r.id
    LIMIT $2
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE recipient r
SET status = CASE WHEN p.supp IS NULL THEN 'sending'
                  WHEN p.supp = 'unsubscribed' THEN 'unsubscribed'
                  ELSE 'suppressed' END,
    claimed_by = CASE WHEN p.supp IS NULL THEN $3 END,
    claimed_at = CASE WHEN p.supp IS NULL THEN $4::timestamptz END,
    error = CASE WHEN p.supp IS NULL OR p.supp = 'unsubscribed' THEN r.error
                 ELSE 'suppressed: ' || p.supp END,
    updated_at = $4
FROM picked p
WHERE r.id = p.id
RETURNING r.id, r.email, r.name, r.variables, r.status;

-- name: recipients-release
-- Gives claimed recipients that were never handed to SMTP back to the queue.
UPDATE recipient
SET status = 'pending', claimed_by = NULL, claimed_at = NULL, updated_at = $3
WHERE id = ANY($1::bigint[]) AND status = 'sending' AND claimed_by = $2;

-- name: recipients-record-and-hand
-- A wave's record: recipients-record, the send log's placeholders dropped and
-- the attempts' rows written, in ONE statement (one round trip, atomic without
-- a transaction block). $9..$12: each outcome's address, provider answer, raw
-- error and time; $13 the campaign. Send-log rows only for the rows the update
-- changed, in the outcomes' order (wave order); the attempt that used up a
-- recipient's transient attempts is logged as the failure it caused. In the
-- same statement, the next wave's hand (as recipients-hand, $14 its ids -- empty
-- for a plain record -- and $15/$16 the lease's owner and epoch): the pipelined
-- loop never hands a wave before the previous one is recorded. $17: the SMTP
-- account that sent the wave ('' the default: NULL in the log), the same batch's
-- account the next wave goes through (recipient.handed_account). $18: the
-- lease's shard (0 the home: the queue entry's lease; else campaign_shard's). Rows: each
-- recorded row (handed false), then each row marked handed (handed true).
WITH o AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::boolean[],
                         $9::text[], $10::text[], $11::text[], $12::float8[])
        WITH ORDINALITY AS o(id, status, message_id, error, attempted, email, answer,
                             raw_error, took_ms, ord)
),
upd AS (
    UPDATE recipient r
    SET status = CASE WHEN o.status <> 'transient' THEN o.status
                      WHEN o.attempted AND r.transient_attempts + 1 >= $8 THEN 'failed'
                      ELSE 'pending' END,
        transient_attempts = r.transient_attempts
            + CASE WHEN o.status = 'transient' AND o.attempted THEN 1 ELSE 0 END,
        claimed_by = NULL,
        claimed_at = NULL,
        sent_at = CASE WHEN o.status = 'sent' THEN $7::timestamptz ELSE r.sent_at END,
        smtp_message_id = CASE WHEN o.status = 'transient' THEN r.smtp_message_id
                               ELSE COALESCE(o.message_id, r.smtp_message_id) END,
        error = CASE WHEN o.status <> 'transient' THEN o.error
                     WHEN o.attempted AND r.transient_attempts + 1 >= $8
                         THEN 'gave up after ' || (r.transient_attempts + 1)
                              || ' transient answers; last: ' || COALESCE(o.error, 'unknown')
                     ELSE NULL END,
        updated_at = $7
    FROM o
    WHERE r.id = o.id
      AND ((r.status = 'sending' AND r.claimed_by = $6)
           OR (r.status = 'in_doubt' AND o.status IN ('sent', 'failed')))
    RETURNING r.id, r.status, r.error
),
dropped AS (
    DELETE FROM send_log
    WHERE recipient_id IN (SELECT id FROM upd) AND status = 'in_doubt' AND took_ms IS NULL
      AND NOT is_test
),
logged AS (
    INSERT INTO send_log (campaign_id, recipient_id, email, is_test, status, smtp_message_id,
                          provider_answer, error, took_ms, created_at, account)
    SELECT $13, o.id, o.email, false,
           CASE WHEN o.status = 'transient' AND u.status = 'failed' THEN 'failed'
                ELSE o.status END,
           o.message_id, o.answer,
           CASE WHEN o.status = 'transient' AND u.status = 'failed' THEN u.error
                ELSE o.raw_error END,
           o.took_ms, $7, NULLIF($17::text, '')
    FROM o JOIN upd u ON u.id = o.id
    ORDER BY o.ord
),
handed AS (
    UPDATE recipient r
    SET handed_at = $7, handed_account = NULLIF($17::text, ''), updated_at = $7
    WHERE r.id = ANY($14::bigint[]) AND r.status = 'sending' AND r.claimed_by = $6
      AND (($18 = 0 AND EXISTS (SELECT 1 FROM queue_entry q
                                WHERE q.campaign_id = r.campaign_id AND q.lease_owner = $15
                                  AND q.lease_epoch = $16))
           OR ($18 > 0 AND EXISTS (SELECT 1 FROM campaign_shard s
                                   WHERE s.campaign_id = r.campaign_id AND s.shard = $18
                                     AND s.lease_owner = $15 AND s.lease_epoch = $16)))
    RETURNING r.id
)
SELECT id, status, error, false AS handed FROM upd
UNION ALL
SELECT id, NULL, NULL, true FROM handed;

-- name: recipients-hand
-- Marks claimed recipients as handed to SMTP, just before their SMTP
-- transactions start, while this claimer still holds them and owner $4 holds
-- the lease at epoch $5. Returns the rows marked: only those may be sent (a
-- takeover that settled a row first leaves it unmarked, and unsent). $6: the
-- SMTP account the wave goes through ('' the default: NULL), for a takeover's log.
-- $7: the lease's shard (0 the home, else a helper shard's campaign_shard row).
UPDATE recipient r
SET handed_at = $3, handed_account = NULLIF($6::text, ''), updated_at = $3
WHERE r.id = ANY($1::bigint[]) AND r.status = 'sending' AND r.claimed_by = $2
  AND (($7 = 0 AND EXISTS (SELECT 1 FROM queue_entry q
                           WHERE q.campaign_id = r.campaign_id AND q.lease_owner = $4
                             AND q.lease_epoch = $5))
       OR ($7 > 0 AND EXISTS (SELECT 1 FROM campaign_shard s
                              WHERE s.campaign_id = r.campaign_id AND s.shard = $7
                                AND s.lease_owner = $4 AND s.lease_epoch = $5)))
RETURNING r.id;

-- name: recipients-orphans-to-doubt
-- Rows of this campaign left 'sending' by an owner that is gone (crash,
-- kill -9, lost lease). Those marked handed may have been accepted by the
-- SMTP server, so they become visibly 'in_doubt' instead of being sent again;
-- the send log gets the same verdict, with the account the wave went through
-- (handed_account), so the two agree and that account's local quota counts
-- them. Those never handed did not leave the old owner's process: they go back
-- to 'pending' (a late hand of the old owner then matches nothing). Only the
-- taker's own shard's rows (id % $4 = $5; $4 the shard count): another
-- shard's claims are its live holder's.
WITH doubted AS (
    UPDATE recipient r
    SET status = 'in_doubt', claimed_by = NULL, claimed_at = NULL,
        error = 'owner died between handing to SMTP and record; delivery unknown',
        updated_at = $3
    -- old: the row as it was (the trigger clears the mark's account with the mark).
    FROM recipient old
    WHERE old.id = r.id
      AND r.campaign_id = $1 AND r.status = 'sending' AND r.claimed_by <> $2
      AND r.id % $4 = $5
      AND r.handed_at IS NOT NULL
    RETURNING r.id, r.email, r.error, old.handed_account AS account
), returned AS (
    UPDATE recipient
    SET status = 'pending', claimed_by = NULL, claimed_at = NULL, updated_at = $3
    WHERE campaign_id = $1 AND status = 'sending' AND claimed_by <> $2
      AND id % $4 = $5
      AND handed_at IS NULL
    RETURNING id
), logged AS (
    INSERT INTO send_log (campaign_id, recipient_id, email, is_test, status, error, created_at,
                          account)
    SELECT $1, d.id, d.email, false, 'in_doubt', d.error, $3, d.account FROM doubted d
    RETURNING recipient_id
)
-- How many became in doubt, and how many went back to pending (claims the dead
-- owner may have had tokens for: their quota is spent until a sync recounts it).
SELECT (SELECT count(*) FROM logged) AS doubts, (SELECT count(*) FROM returned) AS returned;

-- name: recipients-stale-claims-to-doubt
-- Reconcile: rows left 'sending' under a claim token that is not the live
-- lease's (a claim that raced a takeover, an owner gone without settling)
-- would keep the live owner from ever finishing. Like a takeover: those
-- marked handed become 'in_doubt' (they may have reached SMTP), with a
-- send-log row each (the account their wave went through); those never handed go back to 'pending' (a late hand of
-- their old owner matches nothing, so they are sent once, by the live owner).
-- Only on the current leader's authority ($2 = its epoch).
WITH stale AS (
    SELECT r.id, r.handed_at IS NOT NULL AS handed, r.handed_account
    FROM recipient r JOIN queue_entry q ON q.campaign_id = r.campaign_id
    LEFT JOIN campaign_shard s ON s.campaign_id = r.campaign_id AND s.shard = r.id % q.shards
    WHERE r.status = 'sending'
      -- The live lease of the row's own shard: the home's (shard 0) or a helper's.
      AND CASE WHEN r.id % q.shards = 0
               THEN q.lease_until > $1 AND r.claimed_by <> q.lease_owner || '#' || q.lease_epoch
               ELSE s.lease_until > $1
                    AND r.claimed_by <> s.lease_owner || '#' || s.lease_epoch || '/' || s.shard
          END
      AND (SELECT epoch FROM leader_fence) = $2
    FOR UPDATE OF r SKIP LOCKED
),
doubted AS (
    UPDATE recipient r
    SET status = 'in_doubt', claimed_by = NULL, claimed_at = NULL,
        error = 'claim outlived its lease; delivery unknown', updated_at = $1
    FROM stale s WHERE r.id = s.id AND s.handed
    RETURNING r.id, r.campaign_id, r.email, r.error, s.handed_account
),
returned AS (
    UPDATE recipient r
    SET status = 'pending', claimed_by = NULL, claimed_at = NULL, updated_at = $1
    FROM stale s WHERE r.id = s.id AND NOT s.handed
    RETURNING r.campaign_id
),
logged AS (
    INSERT INTO send_log (campaign_id, recipient_id, email, is_test, status, error, created_at,
                          account)
    SELECT d.campaign_id, d.id, d.email, false, 'in_doubt', d.error, $1, d.handed_account
    FROM doubted d
    RETURNING campaign_id
)
SELECT campaign_id, 'in_doubt' AS verdict FROM logged
UNION ALL
SELECT campaign_id, 'pending' AS verdict FROM returned;

-- name: recipients-counts
-- The counts by status (kept by recipient's triggers in campaign_counts, so
-- this reads one row whatever the campaign's size); for a campaign whose
-- recipients retention removed, the counts it kept (from the first removed row
-- on, never a mix of the two).
SELECT key AS status, value::bigint AS n
FROM campaign, jsonb_each_text(purged_counts)
WHERE id = $1 AND purged_counts IS NOT NULL
UNION ALL
SELECT s.status, s.n
FROM campaign c JOIN campaign_counts k ON k.campaign_id = c.id,
     LATERAL (VALUES ('pending', k.pending), ('sending', k.sending), ('sent', k.sent),
                     ('failed', k.failed), ('unsubscribed', k.unsubscribed),
                     ('in_doubt', k.in_doubt), ('bounced', k.bounced),
                     ('complained', k.complained), ('suppressed', k.suppressed)) AS s(status, n)
WHERE c.id = $1 AND c.purged_counts IS NULL AND s.n <> 0;
