-- name: outbox-insert
-- An event to publish once the transaction that calls for it has committed.
INSERT INTO event_outbox (kind, subject, msg_id, payload, campaign_id, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id;

-- name: outbox-take
-- The oldest unpublished events, locked for this relay only: SKIP LOCKED lets
-- two relays (an actor and the leader's sweep) share the work, never the rows.
SELECT id, kind, subject, msg_id, payload, campaign_id
FROM event_outbox
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: outbox-delete
DELETE FROM event_outbox WHERE id = ANY($1::bigint[]);

-- name: outbox-depth
SELECT count(*) FROM event_outbox;
