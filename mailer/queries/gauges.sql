-- Read at every Prometheus scrape (mailer.gauges): each must stay cheap. Both start from the
-- unfinished queue entries (the partial index queue_entry_order) and count a campaign's
-- pending recipients on the partial index recipient_campaign_pending, so their cost grows
-- with the backlog of started campaigns, never with the history of the tables.

-- name: gauges-backlog
-- Pending recipients of started, unfinished campaigns; of those, the ones that may be sent
-- now: ready or sending, the deferral (if any) over, not paused by a manager, the breaker or
-- a message that cannot be rendered (the conditions of queue-acquire).
SELECT coalesce(sum(p.n), 0)::bigint AS pending,
       coalesce(sum(p.n) FILTER (
           WHERE c.status IN ('ready', 'sending')
             AND (q.deferred_until IS NULL OR q.deferred_until <= $1)
             AND (q.defer_reason IS NULL
                  OR q.defer_reason NOT IN ('paused', 'circuit_breaker', 'render_error'))
             -- Waiting for a quota top-up (no time: only a sync or quota.set ends it).
             AND NOT (q.deferred_until IS NULL
                      AND q.defer_reason IS NOT DISTINCT FROM 'quota_exhausted')
       ), 0)::bigint AS sendable
FROM queue_entry q
JOIN campaign c ON c.id = q.campaign_id
CROSS JOIN LATERAL (
    SELECT count(*) AS n FROM recipient r
    WHERE r.campaign_id = q.campaign_id AND r.status = 'pending'
) p
WHERE q.completed_at IS NULL AND c.status IN ('ready', 'sending', 'paused');

-- name: gauges-quota
-- Each SMTP account's quota left (account: '' the default's; one row per account).
SELECT account, emails_available FROM quota;

-- name: gauges-waiting
-- Unfinished campaigns that no process is sending now (no live lease), by why they wait:
-- a pause (the engine's: circuit_breaker, render_error; else the manager's), a deferral
-- still running (quota_exhausted: until a top-up), or nothing but a free slot ("queued").
SELECT CASE
           WHEN q.defer_reason IN ('circuit_breaker', 'render_error') THEN q.defer_reason
           WHEN c.status = 'paused' OR q.defer_reason = 'paused' THEN 'paused'
           WHEN q.deferred_until > $1 THEN q.defer_reason
           -- The quota's wait has no time: only a top-up ends it.
           WHEN q.deferred_until IS NULL AND q.defer_reason = 'quota_exhausted'
               THEN q.defer_reason
           ELSE 'queued'
       END AS reason,
       count(*)::bigint AS campaigns
FROM queue_entry q
JOIN campaign c ON c.id = q.campaign_id
WHERE q.completed_at IS NULL AND c.status IN ('ready', 'sending', 'paused')
  AND (q.lease_owner IS NULL OR q.lease_until <= $1)
GROUP BY 1;
