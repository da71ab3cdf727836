-- Fencing for the leader-elected scheduler: every write the scheduler makes
-- checks that its epoch (the NATS KV revision at which it won the lease) is
-- still the newest; a deposed leader that wakes up late matches nothing.
CREATE TABLE leader_fence (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch       bigint      NOT NULL,
    holder      text        NOT NULL,
    since       timestamptz NOT NULL
);
INSERT INTO leader_fence (epoch, holder, since) VALUES (0, 'nobody', 'epoch');

-- The reason the owner was last notified of, so one ongoing reason notifies
-- once; cleared when the campaign sends again (that episode is over).
ALTER TABLE queue_entry ADD COLUMN notified_reason text;

-- When the current owner took the lease: a lease held for more than
-- MAILER_STUCK_AFTER_MINUTES without letting go is a stuck campaign.
ALTER TABLE queue_entry ADD COLUMN leased_at timestamptz;
