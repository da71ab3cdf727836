-- name: outbox-insert
-- An event to publish once the transaction that calls for it has committed.
INSERT INTO event_outbox (kind, subject, msg_id, payload, campaign_id, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id;

-- name: outbox-take
-- The oldest events no relay holds, taken for this relay until $2 (database
-- time, the outbox's own clock): the relay commits, publishes with no
-- transaction open and no row locked, then deletes what JetStream stored.
-- SKIP LOCKED lets two relays take at once without waiting on each other;
-- a relay that died after taking leaves its rows to the next one at $2.
UPDATE event_outbox o
SET taken_until = clock_timestamp() + make_interval(secs => $2)
FROM (SELECT id FROM event_outbox
      WHERE taken_until IS NULL OR taken_until <= clock_timestamp()
      ORDER BY id
      LIMIT $1
      FOR UPDATE SKIP LOCKED) t
WHERE o.id = t.id
RETURNING o.id, o.kind, o.subject, o.msg_id, o.payload, o.campaign_id;

-- name: outbox-untake
-- Gives taken events that were not published back to the next relay now.
UPDATE event_outbox SET taken_until = NULL WHERE id = ANY($1::bigint[]);

-- name: outbox-delete
DELETE FROM event_outbox WHERE id = ANY($1::bigint[]);

-- name: outbox-depth
SELECT count(*) FROM event_outbox;

-- name: outbox-due
-- When the relay must look again (database time, the outbox's own clock): how
-- many rows no relay holds now (left by a publish that failed), and in how many
-- seconds the earliest taken row is free again (a relay that died after taking).
SELECT count(*) FILTER (WHERE taken_until IS NULL OR taken_until <= clock_timestamp())
           AS ready,
       EXTRACT(EPOCH FROM min(taken_until) FILTER (WHERE taken_until > clock_timestamp())
                          - clock_timestamp())::float8 AS next_in
FROM event_outbox;
