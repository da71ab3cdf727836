-- name: queue-enqueue
-- (Re)queues a campaign: a fresh entry, or the old one reset for a restart.
INSERT INTO queue_entry (campaign_id, priority, queued_at)
VALUES ($1, $2, $3)
ON CONFLICT (campaign_id) DO UPDATE
SET priority = EXCLUDED.priority, queued_at = EXCLUDED.queued_at, completed_at = NULL,
    started_at = NULL, defer_reason = NULL, deferred_until = NULL,
    consecutive_transient_errors = 0, notified_reason = NULL
RETURNING id;

-- name: queue-runnable
-- Entries that may run now, in queue order: not finished, not waiting for a
-- later time nor for a quota top-up (quota_exhausted with no time: the sync
-- or quota.set that restores the quota lifts it), not held by a live lease of
-- another process.
SELECT q.id, q.campaign_id, q.priority, q.queued_at, q.deferred_until, q.lease_owner
FROM queue_entry q JOIN campaign c ON c.id = q.campaign_id
WHERE q.completed_at IS NULL
  AND c.status IN ('ready', 'sending')
  AND (q.deferred_until IS NULL OR q.deferred_until <= $1)
  AND NOT (q.deferred_until IS NULL AND q.defer_reason IS NOT DISTINCT FROM 'quota_exhausted')
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
    UNION ALL
    -- A helper shard's lease running out: its shard is taken over then.
    SELECT s.lease_until FROM campaign_shard s JOIN queue_entry q ON q.campaign_id = s.campaign_id
    WHERE q.completed_at IS NULL AND s.lease_until > $1
) s;

-- name: queue-acquire
-- Takes the campaign's lease when it is free or expired; lease_epoch grows on
-- every new holder and is the fencing token of every later write. Only for
-- the current leader's dispatch ($5 = its epoch, checked against the fence):
-- a deposed leader's late dispatch acquires nothing.
UPDATE queue_entry q
SET lease_owner = $2, lease_until = $3,
    lease_epoch = q.lease_epoch + 1,
    leased_at = $4,
    defer_reason = NULL, deferred_until = NULL,
    -- The shard count ($6) is decided again only while no other shard's lease
    -- is live: a live shard's recipient set must not change under it. The
    -- caller holds the entry's lock (queue-lock-entry), so this look is not
    -- older than a shard's acquire.
    shards = CASE WHEN EXISTS (SELECT 1 FROM campaign_shard s
                               WHERE s.campaign_id = q.campaign_id AND s.lease_until > $4)
                  THEN q.shards ELSE $6 END
FROM campaign c
WHERE q.campaign_id = $1 AND c.id = q.campaign_id AND q.completed_at IS NULL
  AND c.status IN ('ready', 'sending')
  AND (q.lease_owner IS NULL OR q.lease_until <= $4)
  AND (q.deferred_until IS NULL OR q.deferred_until <= $4)
  AND (q.defer_reason IS NULL
       OR q.defer_reason NOT IN ('paused', 'circuit_breaker', 'render_error'))
  AND NOT (q.deferred_until IS NULL AND q.defer_reason IS NOT DISTINCT FROM 'quota_exhausted')
  AND (SELECT epoch FROM leader_fence) = $5
RETURNING q.id, q.lease_epoch, q.consecutive_transient_errors, q.started_at, q.shards;

-- name: queue-renew
UPDATE queue_entry SET lease_until = $3
WHERE campaign_id = $1 AND lease_owner = $2 AND lease_epoch = $4
RETURNING id;

-- name: queue-release
UPDATE queue_entry SET lease_owner = NULL, lease_until = NULL
WHERE campaign_id = $1 AND lease_owner = $2 AND lease_epoch = $3;

-- name: queue-defer
-- The one way a campaign waits: the reason and until when, under our lease.
-- Returns what the owner was last notified of in this episode (reason and
-- promised time); the row stays locked, so the caller's decision to notify
-- (queue-notified) is made in the same transaction. $6: the SMTP account whose
-- limit or breaker it waits for (NULL: none named).
UPDATE queue_entry q
SET defer_reason = $4, deferred_until = $5, defer_account = $6, lease_owner = NULL,
    lease_until = NULL
FROM (SELECT id, notified_reason, notified_until FROM queue_entry
      WHERE campaign_id = $1 FOR UPDATE) old
WHERE q.id = old.id AND q.campaign_id = $1 AND q.lease_owner = $2 AND q.lease_epoch = $3
RETURNING q.id, old.notified_reason AS previous_reason, old.notified_until AS previous_until;

-- name: queue-started
-- The campaign's first message has gone: that, not its first dispatch, is its start.
UPDATE queue_entry SET started_at = COALESCE(started_at, $2) WHERE campaign_id = $1;

-- name: queue-reevaluate
-- Ends now every deferral a limit decided (the hour, the day, working hours,
-- the quota) so each is decided again, by the governor, against the limits in
-- force now: at start (settings may have changed with the restart) and on
-- limits.reload / quota.set. A campaign still held is deferred again — with
-- the same reason, so no new notice. SMTP waits and pauses are not limits.
UPDATE queue_entry q SET deferred_until = $1
FROM campaign c
WHERE c.id = q.campaign_id AND q.completed_at IS NULL AND c.status IN ('ready', 'sending')
  AND q.defer_reason IN ('rate_per_hour', 'daily_limit', 'outside_hours', 'quota_exhausted')
  AND (q.deferred_until IS NULL OR q.deferred_until > $1)
RETURNING q.campaign_id;

-- name: queue-notified
-- The owner was told of reason $2, with the time $3 (NULL: none could be named).
UPDATE queue_entry SET notified_reason = $2, notified_until = $3 WHERE campaign_id = $1;

-- name: queue-pause
-- The engine pauses the campaign with reason $4 (circuit_breaker, render_error):
-- only a manager's resume restarts it.
UPDATE queue_entry q
SET defer_reason = $4, deferred_until = NULL, lease_owner = NULL,
    lease_until = NULL, notified_reason = $4
FROM (SELECT id, notified_reason FROM queue_entry WHERE campaign_id = $1 FOR UPDATE) old
WHERE q.id = old.id AND q.campaign_id = $1 AND q.lease_owner = $2 AND q.lease_epoch = $3
RETURNING q.id, old.notified_reason AS previous_reason;

-- name: queue-lock-ours
-- The queue entry, locked, while owner $2 holds its lease at epoch $3: the
-- first lock of an owner's check-then-act (then the campaign row, the order
-- the API takes them in, see api.sql). Nothing when the lease is not ours.
SELECT id FROM queue_entry
WHERE campaign_id = $1 AND lease_owner = $2 AND lease_epoch = $3
FOR NO KEY UPDATE;

-- name: queue-lock-orphan
-- Reconcile's first lock: the entry, still unfinished and held by no live
-- lease, on the current leader's authority ($3 = its epoch).
SELECT id FROM queue_entry
WHERE campaign_id = $1 AND completed_at IS NULL
  AND (lease_owner IS NULL OR lease_until <= $2)
  AND (SELECT epoch FROM leader_fence) = $3
FOR NO KEY UPDATE;

-- name: queue-transient-count
-- Consecutive transient SMTP errors of the campaign (0 after any success);
-- a success also ends the episode the owner was notified of. A row that would
-- not change is not written: the common case (0 stays 0) then takes no row lock,
-- so it does not wait for the next batch's claim, which holds the entry FOR SHARE.
UPDATE queue_entry
SET consecutive_transient_errors = $4,
    notified_reason = CASE WHEN $5 THEN NULL ELSE notified_reason END
WHERE campaign_id = $1 AND lease_owner = $2 AND lease_epoch = $3
  AND (consecutive_transient_errors IS DISTINCT FROM $4
       OR ($5 AND notified_reason IS NOT NULL))
RETURNING id;

-- name: queue-complete
UPDATE queue_entry
SET completed_at = $4, lease_owner = NULL, lease_until = NULL,
    defer_reason = NULL, deferred_until = NULL
WHERE campaign_id = $1 AND lease_owner = $2 AND lease_epoch = $3
RETURNING id;

-- name: queue-get
SELECT id, campaign_id, priority, queued_at, started_at, completed_at, defer_reason,
       deferred_until, consecutive_transient_errors, defer_account, lease_owner, lease_until, lease_epoch
FROM queue_entry WHERE campaign_id = $1;

-- name: queue-active
-- Campaigns some process is running now (a live lease).
SELECT campaign_id, lease_owner FROM queue_entry
WHERE completed_at IS NULL AND lease_until > $1;

-- name: queue-depth
-- Entries waiting to run (not running, not finished, not paused).
SELECT count(*)::bigint FROM queue_entry q JOIN campaign c ON c.id = q.campaign_id
WHERE q.completed_at IS NULL AND c.status IN ('ready', 'sending')
  AND (q.lease_owner IS NULL OR q.lease_until <= $1);

-- name: queue-competing
-- Campaigns competing for the hour's tokens now: running, or ready to run
-- (a deferred one is waiting for a later time or a quota top-up, not for tokens).
SELECT count(*)::bigint FROM queue_entry q JOIN campaign c ON c.id = q.campaign_id
WHERE q.completed_at IS NULL AND c.status IN ('ready', 'sending')
  AND (q.deferred_until IS NULL OR q.deferred_until <= $1)
  AND NOT (q.deferred_until IS NULL AND q.defer_reason IS NOT DISTINCT FROM 'quota_exhausted');

-- name: queue-competitors
-- The campaigns sharing the hour [$4, $5) now, in queue order, with their
-- demand of it. Those that run or may run: the first $2 (as queue-competing
-- counts them; the scheduler runs that many at once) and the asker $3 — which
-- runs, so it is one of them unless the queue changed under it; their demand
-- is the attempts recorded this hour plus the recipients still to send
-- (pending, or claimed: a batch in flight or about to ask for its tokens).
-- And those that used part of this hour but run no more (finished, deferred,
-- paused): their demand is what they used, so the rest goes to the others.
-- Only the asker's SMTP account's ($6, the name; $7: it is the default, whose
-- campaigns name none and whose send-log rows have none): each account's hour
-- is shared by its own campaigns.
WITH top AS (
    SELECT q.campaign_id
    FROM queue_entry q JOIN campaign c ON c.id = q.campaign_id
    WHERE q.completed_at IS NULL AND c.status IN ('ready', 'sending')
      AND (q.deferred_until IS NULL OR q.deferred_until <= $1)
      AND NOT (q.deferred_until IS NULL AND q.defer_reason IS NOT DISTINCT FROM 'quota_exhausted')
    ORDER BY q.priority DESC, q.queued_at, q.id
    LIMIT $2
), runs AS (
    SELECT t.campaign_id FROM top t JOIN campaign c ON c.id = t.campaign_id
    WHERE c.smtp_account = $6 OR (c.smtp_account IS NULL AND $7)
    UNION SELECT $3::bigint
), used AS (
    SELECT l.campaign_id, count(*) AS n FROM send_log l
    WHERE NOT l.is_test AND l.campaign_id IS NOT NULL
      AND l.created_at >= $4 AND l.created_at < $5
      AND (l.account = $6 OR (l.account IS NULL AND $7))
    GROUP BY l.campaign_id
), sharing AS (
    SELECT campaign_id, true AS running FROM runs
    UNION ALL
    SELECT campaign_id, false FROM used WHERE campaign_id NOT IN (SELECT campaign_id FROM runs)
)
SELECT s.campaign_id,
       (COALESCE((SELECT n FROM used u WHERE u.campaign_id = s.campaign_id), 0)
        + CASE WHEN s.running THEN (SELECT count(*) FROM recipient r
               WHERE r.campaign_id = s.campaign_id AND r.status IN ('pending', 'sending'))
          ELSE 0 END)::bigint AS demand
FROM sharing s JOIN queue_entry q ON q.campaign_id = s.campaign_id
ORDER BY q.priority DESC, q.queued_at, q.id;

-- name: queue-processing-since
-- Entries an owner is processing now (live lease), longest-held first: the
-- stuck-campaign report. Deferred campaigns hold no lease: waiting for the
-- next hour or for quota is not being stuck.
SELECT q.campaign_id, q.leased_at, q.defer_reason
FROM queue_entry q
WHERE q.completed_at IS NULL AND q.lease_until > $1 AND q.leased_at IS NOT NULL
ORDER BY q.leased_at;

-- name: queue-unfinished-without-work
-- Anomaly: a campaign in ready/sending with no recipient left to send and no
-- live owner; nobody would ever mark it final.
SELECT q.campaign_id FROM queue_entry q JOIN campaign c ON c.id = q.campaign_id
WHERE q.completed_at IS NULL AND c.status IN ('ready', 'sending')
  AND (q.lease_owner IS NULL OR q.lease_until <= $1)
  AND NOT EXISTS (SELECT 1 FROM recipient r WHERE r.campaign_id = q.campaign_id
                  AND r.status IN ('pending', 'sending'));

-- name: queue-complete-fenced
-- Marks an entry finished on the leader's authority (reconcile).
UPDATE queue_entry
SET completed_at = $2, lease_owner = NULL, lease_until = NULL,
    defer_reason = NULL, deferred_until = NULL
WHERE campaign_id = $1 AND completed_at IS NULL
  AND (lease_owner IS NULL OR lease_until <= $2)
  AND (SELECT epoch FROM leader_fence) = $3
RETURNING id;

-- name: fence-take
-- The winner of the leader lease takes the next epoch: one statement, so two
-- candidates never get the same number, and it only grows whatever happens
-- to the NATS KV bucket (whose revisions may start again from 1).
UPDATE leader_fence SET epoch = epoch + 1, holder = $1, since = $2
RETURNING epoch;

-- name: fence-get
SELECT epoch, holder FROM leader_fence;

-- name: campaign-status
SELECT status FROM campaign WHERE id = $1;

-- name: queue-schedule
-- A start with send_at: the fresh entry waits until then, reason 'scheduled'.
UPDATE queue_entry SET defer_reason = 'scheduled', deferred_until = $2
WHERE campaign_id = $1 AND completed_at IS NULL;

-- name: queue-lock-entry
-- The queue entry, locked: the first lock of a sharded campaign's
-- check-then-act (then a shard row, then the campaign row).
SELECT id, shards, defer_reason, deferred_until, notified_reason, notified_until
FROM queue_entry WHERE campaign_id = $1
FOR NO KEY UPDATE;

-- name: queue-defer-shared
-- A sharded campaign waits: reason $2 until $3 (account $4) on the entry, as
-- queue-defer, but without touching the home lease (each shard lets go of its
-- own lease). Run under queue-lock-entry, after the caller's lease was checked.
UPDATE queue_entry SET defer_reason = $2, deferred_until = $3, defer_account = $4
WHERE campaign_id = $1;

-- name: queue-pause-shared
-- queue-pause for a helper shard: the reason on the entry (only a manager's
-- resume restarts it), the home lease left to its holder, who sees the paused
-- campaign at its next claim and lets go.
UPDATE queue_entry SET defer_reason = $2, deferred_until = NULL, notified_reason = $2
WHERE campaign_id = $1;

-- name: queue-transient-count-shared
-- queue-transient-count under a helper shard's lease (checked by the caller
-- under queue-lock-entry): the count is the campaign's.
UPDATE queue_entry
SET consecutive_transient_errors = $2,
    notified_reason = CASE WHEN $3 THEN NULL ELSE notified_reason END
WHERE campaign_id = $1
  AND (consecutive_transient_errors IS DISTINCT FROM $2
       OR ($3 AND notified_reason IS NOT NULL));

-- name: queue-waits
-- A deferral in force on the entry (one a helper shard wrote while the home
-- ran): the home lets go too instead of holding the lease through the wait.
SELECT 1 FROM queue_entry
WHERE campaign_id = $1 AND defer_reason IS NOT NULL
  AND (deferred_until > $2
       OR (deferred_until IS NULL AND defer_reason IN ('quota_exhausted', 'paused',
                                                       'circuit_breaker', 'render_error')));

-- name: shard-acquire
-- Takes helper shard $2 (1 <= $2 < shards) of a campaign whose home lease is
-- live, on the current leader's authority ($6 = its epoch), under the same
-- conditions as queue-acquire: not finished, not paused, not waiting. The
-- entry is locked first (the home's acquire, which may change the shard
-- count, waits for this and sees this lease). lease_epoch grows with every
-- holder: the claim token owner#epoch/shard is never given twice.
WITH q AS (
    SELECT q.campaign_id, q.shards, q.consecutive_transient_errors
    FROM queue_entry q
    WHERE q.campaign_id = $1 AND q.completed_at IS NULL AND $2 >= 1 AND $2 < q.shards
      AND q.lease_until > $5
      AND EXISTS (SELECT 1 FROM campaign c WHERE c.id = q.campaign_id
                  AND c.status IN ('ready', 'sending'))
      AND (q.deferred_until IS NULL OR q.deferred_until <= $5)
      AND (q.defer_reason IS NULL
           OR q.defer_reason NOT IN ('paused', 'circuit_breaker', 'render_error'))
      AND NOT (q.deferred_until IS NULL AND q.defer_reason IS NOT DISTINCT FROM 'quota_exhausted')
      AND (SELECT epoch FROM leader_fence) = $6
    FOR NO KEY UPDATE
), taken AS (
    INSERT INTO campaign_shard AS s (campaign_id, shard, lease_owner, lease_until, lease_epoch,
                                     leased_at)
    SELECT q.campaign_id, $2, $3, $4, 1, $5 FROM q
    ON CONFLICT (campaign_id, shard) DO UPDATE
    SET lease_owner = EXCLUDED.lease_owner, lease_until = EXCLUDED.lease_until,
        lease_epoch = s.lease_epoch + 1, leased_at = EXCLUDED.leased_at
    WHERE s.lease_owner IS NULL OR s.lease_until <= $5
    RETURNING s.lease_epoch
)
SELECT t.lease_epoch, q.shards, q.consecutive_transient_errors FROM taken t, q;

-- name: shard-renew
UPDATE campaign_shard SET lease_until = $5
WHERE campaign_id = $1 AND shard = $2 AND lease_owner = $3 AND lease_epoch = $4
RETURNING shard;

-- name: shard-release
UPDATE campaign_shard SET lease_owner = NULL, lease_until = NULL
WHERE campaign_id = $1 AND shard = $2 AND lease_owner = $3 AND lease_epoch = $4;

-- name: shard-lock-ours
-- Helper shard $2 under its lease (owner $3, epoch $4), locked FOR SHARE after
-- the entry (queue-lock-entry): a takeover of the shard waits for this
-- transaction. Nothing when the lease is not ours.
SELECT shard FROM campaign_shard
WHERE campaign_id = $1 AND shard = $2 AND lease_owner = $3 AND lease_epoch = $4
FOR SHARE;

-- name: shard-fence-idle
-- At the home's acquire, when no helper shard is live: every helper shard
-- lease still named (expired; its holder may be alive and slow) is given up
-- and its epoch moved on, so a late claim or hand of the old holder matches
-- nothing under the shard count decided now.
UPDATE campaign_shard SET lease_owner = NULL, lease_until = NULL, lease_epoch = lease_epoch + 1
WHERE campaign_id = $1 AND lease_owner IS NOT NULL AND lease_until <= $2;

-- name: shard-runnable
-- Helper shards the leader may dispatch: of a campaign whose home lease is
-- live and that does not wait, held by no live lease, with recipients of
-- their own set still pending or claimed (a dead holder's claims are settled
-- by the next one), in queue order.
SELECT q.campaign_id, g.k AS shard
FROM queue_entry q JOIN campaign c ON c.id = q.campaign_id
CROSS JOIN LATERAL generate_series(1, q.shards - 1) AS g(k)
LEFT JOIN campaign_shard s ON s.campaign_id = q.campaign_id AND s.shard = g.k
WHERE q.shards > 1 AND q.completed_at IS NULL AND c.status IN ('ready', 'sending')
  AND q.lease_until > $1
  AND (q.deferred_until IS NULL OR q.deferred_until <= $1)
  AND (q.defer_reason IS NULL
       OR q.defer_reason NOT IN ('paused', 'circuit_breaker', 'render_error'))
  AND NOT (q.deferred_until IS NULL AND q.defer_reason IS NOT DISTINCT FROM 'quota_exhausted')
  AND (s.lease_owner IS NULL OR s.lease_until <= $1)
  AND EXISTS (SELECT 1 FROM recipient r WHERE r.campaign_id = q.campaign_id
              AND r.status IN ('pending', 'sending') AND r.id % q.shards = g.k)
ORDER BY q.priority DESC, q.queued_at, q.id, g.k
LIMIT $2;

-- name: shard-owners
-- The live leases of every shard (home and helpers) and their holders.
SELECT campaign_id, 0 AS shard, lease_owner FROM queue_entry
WHERE completed_at IS NULL AND lease_until > $1
UNION ALL
SELECT campaign_id, shard, lease_owner FROM campaign_shard WHERE lease_until > $1;

-- name: campaign-pending
-- Recipients still pending (the counters' row: one row whatever the size).
SELECT pending FROM campaign_counts WHERE campaign_id = $1;
