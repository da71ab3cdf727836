-- name: unsubscribe-insert
-- Records an unsubscribe once per address, with its audit row in the same
-- statement (nothing is audited when the address was already unsubscribed).
-- lower() in SQL, not in Python: the claim query compares with lower(email),
-- and the two must agree on every character (Python and PostgreSQL case
-- mappings differ for a few non-ASCII letters). The campaign of the link may
-- have been deleted since: the audit row then keeps a NULL campaign_id.
WITH ins AS (
    INSERT INTO unsubscribe (email, source, created_at)
    VALUES (lower($1), $2, $3)
    ON CONFLICT (email) DO NOTHING
    RETURNING created_at
), audit AS (
    INSERT INTO audit_log (at, actor_id, action, campaign_id, details)
    SELECT $3, 'recipient', 'unsubscribe', (SELECT id FROM campaign WHERE id = $4), $5::jsonb
    FROM ins
)
SELECT created_at FROM ins;

-- name: unsubscribe-get
SELECT email, source, created_at FROM unsubscribe WHERE email = lower($1);
