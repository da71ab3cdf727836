-- Scale-out (issue 11, item 5): a large campaign's recipients are worked by
-- several processes at once. The queue entry's own lease is shard 0 (the
-- campaign's home: it alone gives the final status); shards 1..shards-1 are
-- the rows of campaign_shard. Shard k claims only the recipients with
-- id % shards = k, so the sets are disjoint; each shard's lease is fenced as
-- the home's is (taken on the leader's epoch, renewed, lease_epoch grows with
-- every holder and is part of the claim token).
ALTER TABLE queue_entry ADD COLUMN shards integer NOT NULL DEFAULT 1 CHECK (shards >= 1);

CREATE TABLE campaign_shard (
    campaign_id  bigint      NOT NULL REFERENCES campaign (id) ON DELETE CASCADE,
    shard        integer     NOT NULL CHECK (shard >= 1),
    lease_owner  text,
    lease_until  timestamptz,
    -- Never reset (the row is kept when the shard count changes): a claim
    -- token owner#epoch/shard is never given twice.
    lease_epoch  bigint      NOT NULL DEFAULT 0,
    leased_at    timestamptz,
    PRIMARY KEY (campaign_id, shard),
    CHECK ((lease_owner IS NULL) = (lease_until IS NULL))
);
