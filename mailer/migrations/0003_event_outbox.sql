-- Owner notifications that must not be lost: written in the same transaction
-- as the deferral that calls for them, published to JetStream afterwards and
-- deleted once the stream has stored them. A crash, a cancelled actor or a
-- NATS outage between the two leaves the row here for the next relay (the
-- leader's scheduler sweeps it); the stream's duplicate window, keyed by
-- msg_id, drops a repeat of a publish whose acknowledgement was lost.
CREATE TABLE event_outbox (
    id          bigserial PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('campaign', 'notify', 'unsubscribe')),
    subject     text        NOT NULL CHECK (subject <> ''),
    msg_id      text        NOT NULL CHECK (msg_id <> ''),
    payload     bytea       NOT NULL,
    campaign_id bigint,
    created_at  timestamptz NOT NULL
);
