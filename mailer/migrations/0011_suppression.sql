-- The unsubscribe list becomes the suppression list: every address no campaign
-- may mail, with why (reason), how it was learnt (source: the link, the API,
-- a DSN, an ARF report, the provider's webhook) and which campaign caused it.
-- Existing rows are unsubscribes.
ALTER TABLE unsubscribe
    ADD COLUMN reason text NOT NULL DEFAULT 'unsubscribed' CHECK (reason IN (
        'unsubscribed', 'hard_bounce', 'complaint', 'soft_bounce', 'manual')),
    ADD COLUMN campaign_id bigint REFERENCES campaign (id) ON DELETE SET NULL,
    ADD COLUMN detail text;

-- A bounce or complaint settles the recipient it is about; a later campaign
-- settles a suppressed address (other than unsubscribed) as 'suppressed', its
-- reason in `error`.
ALTER TABLE recipient DROP CONSTRAINT recipient_status_check;
ALTER TABLE recipient ADD CONSTRAINT recipient_status_check CHECK (status IN (
    'pending', 'sending', 'sent', 'failed', 'unsubscribed', 'in_doubt',
    'bounced', 'complained', 'suppressed'));

-- Soft bounces (4.x.x DSNs, "delayed"), counted per address over a window:
-- MAILER_SOFT_BOUNCE_LIMIT of them within MAILER_SOFT_BOUNCE_WINDOW_DAYS
-- suppress the address.
CREATE TABLE soft_bounce (
    id            bigserial PRIMARY KEY,
    email         text        NOT NULL CHECK (email = lower(email)),
    campaign_id   bigint      REFERENCES campaign (id) ON DELETE SET NULL,
    recipient_id  bigint      REFERENCES recipient (id) ON DELETE SET NULL,
    detail        text,
    created_at    timestamptz NOT NULL
);
CREATE INDEX soft_bounce_email ON soft_bounce (email, created_at);

-- Suppression events go through the outbox like unsubscribes.
ALTER TABLE event_outbox DROP CONSTRAINT event_outbox_kind_check;
ALTER TABLE event_outbox ADD CONSTRAINT event_outbox_kind_check
    CHECK (kind IN ('campaign', 'notify', 'unsubscribe', 'suppression'));
