-- The domain of MISSION.md. Constraints encode the invariants so that no code
-- path, present or future, can write a state the product forbids.

CREATE TABLE campaign (
    id            bigserial PRIMARY KEY,
    owner_id      text        NOT NULL CHECK (owner_id <> ''),
    name          text        NOT NULL CHECK (name <> ''),
    subject       text        NOT NULL,
    body_text     text,
    body_html     text,
    priority      integer     NOT NULL DEFAULT 0,
    status        text        NOT NULL DEFAULT 'draft' CHECK (status IN (
                      'draft', 'ready', 'sending', 'paused', 'sent',
                      'completed_with_errors', 'cancelled')),
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    -- Header injection is refused at the API; the table refuses it too.
    CHECK (position(E'\n' IN subject) = 0 AND position(E'\r' IN subject) = 0),
    CHECK (body_text IS NOT NULL OR body_html IS NOT NULL)
);
CREATE INDEX campaign_owner_status ON campaign (owner_id, status);

CREATE TABLE attachment (
    id            bigserial PRIMARY KEY,
    campaign_id   bigint      NOT NULL REFERENCES campaign (id) ON DELETE CASCADE,
    filename      text        NOT NULL CHECK (filename <> ''),
    content_type  text        NOT NULL,
    content       bytea       NOT NULL,
    created_at    timestamptz NOT NULL
);
CREATE INDEX attachment_campaign ON attachment (campaign_id);

-- `sending` marks a recipient claimed by a campaign actor: handed to SMTP or
-- about to be. `in_doubt` is the visible state of a crash between the SMTP
-- server's acceptance and our record: never re-sent by itself, never lost.
CREATE TABLE recipient (
    id              bigserial PRIMARY KEY,
    campaign_id     bigint      NOT NULL REFERENCES campaign (id) ON DELETE CASCADE,
    email           text        NOT NULL CHECK (email <> ''),
    name            text,
    variables       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN (
                        'pending', 'sending', 'sent', 'failed', 'unsubscribed', 'in_doubt')),
    claimed_by      text,
    claimed_at      timestamptz,
    sent_at         timestamptz,
    smtp_message_id text,
    error           text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    CHECK ((status = 'sending') = (claimed_by IS NOT NULL)),
    CHECK (status <> 'failed' OR error IS NOT NULL)
);
-- Duplicates within a campaign collapse, whatever the case of the address.
CREATE UNIQUE INDEX recipient_campaign_email ON recipient (campaign_id, lower(email));
-- The claim query walks pending rows of one campaign in id order.
CREATE INDEX recipient_campaign_pending ON recipient (campaign_id, id) WHERE status = 'pending';
CREATE INDEX recipient_campaign_status ON recipient (campaign_id, status);

CREATE TABLE queue_entry (
    id                            bigserial PRIMARY KEY,
    campaign_id                   bigint      NOT NULL UNIQUE
                                      REFERENCES campaign (id) ON DELETE CASCADE,
    priority                      integer     NOT NULL DEFAULT 0,
    queued_at                     timestamptz NOT NULL,
    started_at                    timestamptz,
    completed_at                  timestamptz,
    defer_reason                  text CHECK (defer_reason IN (
                                      'rate_per_hour', 'daily_limit', 'quota_exhausted',
                                      'outside_hours', 'transient_error', 'circuit_breaker',
                                      'paused')),
    deferred_until                timestamptz,
    consecutive_transient_errors  integer     NOT NULL DEFAULT 0
                                      CHECK (consecutive_transient_errors >= 0),
    -- The process that runs the campaign now, and until when its lease holds.
    lease_owner                   text,
    lease_until                   timestamptz,
    lease_epoch                   bigint      NOT NULL DEFAULT 0,
    CHECK (deferred_until IS NULL OR defer_reason IS NOT NULL),
    CHECK ((lease_owner IS NULL) = (lease_until IS NULL))
);
-- Queue order: higher priority first, then earlier queued_at.
CREATE INDEX queue_entry_order ON queue_entry (priority DESC, queued_at, id)
    WHERE completed_at IS NULL;

CREATE TABLE send_log (
    id               bigserial PRIMARY KEY,
    campaign_id      bigint REFERENCES campaign (id) ON DELETE SET NULL,
    recipient_id     bigint REFERENCES recipient (id) ON DELETE SET NULL,
    email            text        NOT NULL,
    is_test          boolean     NOT NULL DEFAULT false,
    status           text        NOT NULL CHECK (status IN ('sent', 'failed', 'transient', 'in_doubt')),
    smtp_message_id  text,
    provider_answer  text,
    error            text,
    took_ms          double precision,
    created_at       timestamptz NOT NULL
);
CREATE INDEX send_log_campaign ON send_log (campaign_id, id);
CREATE INDEX send_log_created ON send_log (created_at);

CREATE TABLE unsubscribe (
    email       text PRIMARY KEY CHECK (email = lower(email)),
    source      text        NOT NULL,
    created_at  timestamptz NOT NULL
);

-- One row: the provider's monthly allowance.
CREATE TABLE quota (
    id                boolean PRIMARY KEY DEFAULT true CHECK (id),
    emails_available  integer NOT NULL CHECK (emails_available >= 0),
    monthly_limit     integer NOT NULL CHECK (monthly_limit >= 0),
    last_synced_at    timestamptz,
    sync_error        text
);
INSERT INTO quota (emails_available, monthly_limit) VALUES (15000, 15000);

CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL,
    actor_id     text        NOT NULL,
    action       text        NOT NULL,
    campaign_id  bigint REFERENCES campaign (id) ON DELETE SET NULL,
    details      jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_campaign ON audit_log (campaign_id, id);
