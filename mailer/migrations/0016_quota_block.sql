-- Issue 11: the governor takes the monthly quota in blocks instead of one
-- commit per token request. A block is a ledger row: taken from quota.emails_available
-- in the same statement, granted from in memory by one governor, closed (unused rest
-- returned) when used up, idle or old. A live block (open, not expired) is quota held by
-- a governor: a sync subtracts its unused part like a claim. An expired block is dead:
-- its holder stopped granting from it long before (see mailer.quota.QuotaBlocks) and
-- nothing of it is returned, so a crash loses at most its holder's open blocks until
-- the next sync recounts.
CREATE TABLE quota_block (
    id         bigserial PRIMARY KEY,
    -- The account whose quota row the block came from ('' the default's: 0014).
    account    text        NOT NULL DEFAULT '',
    holder     text        NOT NULL,
    size       integer     NOT NULL CHECK (size > 0),
    granted    integer     NOT NULL DEFAULT 0 CHECK (granted >= 0 AND granted <= size),
    taken_at   timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    closed_at  timestamptz
);
-- The sync's sum over live blocks reads only the open ones.
CREATE INDEX quota_block_open ON quota_block (expires_at) WHERE closed_at IS NULL;
-- Old rows are trimmed a few at a time by each take.
CREATE INDEX quota_block_taken ON quota_block (taken_at);
