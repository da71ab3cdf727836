-- A campaign's counts by status, kept as recipients change instead of a GROUP BY
-- over its recipients on every campaign.get / status / finish check (that cost
-- grew with the campaign). Statement-level triggers on recipient keep it: every
-- path that changes a status (claim, record, release, takeover, reconcile,
-- retention, the API's add and remove, a campaign's deletion) goes through
-- them, with nothing to remember in the code. One row per campaign, so a
-- transaction that touches one campaign locks one counts row (no lock-order
-- cycle between statuses); statements over several campaigns lock theirs in
-- campaign order.
CREATE TABLE campaign_counts (
    campaign_id   bigint PRIMARY KEY REFERENCES campaign (id) ON DELETE CASCADE,
    pending       bigint NOT NULL DEFAULT 0,
    sending       bigint NOT NULL DEFAULT 0,
    sent          bigint NOT NULL DEFAULT 0,
    failed        bigint NOT NULL DEFAULT 0,
    unsubscribed  bigint NOT NULL DEFAULT 0,
    in_doubt      bigint NOT NULL DEFAULT 0,
    bounced       bigint NOT NULL DEFAULT 0,
    complained    bigint NOT NULL DEFAULT 0,
    suppressed    bigint NOT NULL DEFAULT 0
);

-- Adds the per-campaign deltas of (campaign_id, status, +1/-1) rows.
CREATE FUNCTION campaign_counts_add(deltas jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO campaign_counts AS k
        (campaign_id, pending, sending, sent, failed, unsubscribed, in_doubt, bounced,
         complained, suppressed)
    SELECT d.campaign_id,
           COALESCE(sum(d.n) FILTER (WHERE d.status = 'pending'), 0),
           COALESCE(sum(d.n) FILTER (WHERE d.status = 'sending'), 0),
           COALESCE(sum(d.n) FILTER (WHERE d.status = 'sent'), 0),
           COALESCE(sum(d.n) FILTER (WHERE d.status = 'failed'), 0),
           COALESCE(sum(d.n) FILTER (WHERE d.status = 'unsubscribed'), 0),
           COALESCE(sum(d.n) FILTER (WHERE d.status = 'in_doubt'), 0),
           COALESCE(sum(d.n) FILTER (WHERE d.status = 'bounced'), 0),
           COALESCE(sum(d.n) FILTER (WHERE d.status = 'complained'), 0),
           COALESCE(sum(d.n) FILTER (WHERE d.status = 'suppressed'), 0)
    FROM jsonb_to_recordset(deltas) AS d(campaign_id bigint, status text, n bigint)
    GROUP BY d.campaign_id
    ORDER BY d.campaign_id
    ON CONFLICT (campaign_id) DO UPDATE SET
        pending = k.pending + EXCLUDED.pending,
        sending = k.sending + EXCLUDED.sending,
        sent = k.sent + EXCLUDED.sent,
        failed = k.failed + EXCLUDED.failed,
        unsubscribed = k.unsubscribed + EXCLUDED.unsubscribed,
        in_doubt = k.in_doubt + EXCLUDED.in_doubt,
        bounced = k.bounced + EXCLUDED.bounced,
        complained = k.complained + EXCLUDED.complained,
        suppressed = k.suppressed + EXCLUDED.suppressed;
$$;

CREATE FUNCTION recipient_counts_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM campaign_counts_add(
        (SELECT jsonb_agg(x) FROM (
            SELECT campaign_id, status, count(*) AS n FROM new_rows
            GROUP BY campaign_id, status) x))
    WHERE EXISTS (SELECT 1 FROM new_rows);
    RETURN NULL;
END $$;

CREATE FUNCTION recipient_counts_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Most updates (hand, a retried record) change no status: nothing to write.
    PERFORM campaign_counts_add(
        (SELECT jsonb_agg(x) FROM (
            SELECT campaign_id, status, sum(n) AS n FROM (
                SELECT o.campaign_id, o.status, -1 AS n
                FROM old_rows o JOIN new_rows w ON w.id = o.id WHERE w.status <> o.status
                UNION ALL
                SELECT w.campaign_id, w.status, 1 AS n
                FROM old_rows o JOIN new_rows w ON w.id = o.id WHERE w.status <> o.status
            ) c GROUP BY campaign_id, status) x))
    WHERE EXISTS (SELECT 1 FROM old_rows o JOIN new_rows w ON w.id = o.id
                  WHERE w.status <> o.status);
    RETURN NULL;
END $$;

CREATE FUNCTION recipient_counts_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A campaign deleted with its recipients has lost its counts row already, or is
    -- losing it in this statement: only existing rows are decremented.
    UPDATE campaign_counts k SET
        pending = k.pending - d.pending, sending = k.sending - d.sending,
        sent = k.sent - d.sent, failed = k.failed - d.failed,
        unsubscribed = k.unsubscribed - d.unsubscribed, in_doubt = k.in_doubt - d.in_doubt,
        bounced = k.bounced - d.bounced, complained = k.complained - d.complained,
        suppressed = k.suppressed - d.suppressed
    FROM (SELECT campaign_id,
                 count(*) FILTER (WHERE status = 'pending') AS pending,
                 count(*) FILTER (WHERE status = 'sending') AS sending,
                 count(*) FILTER (WHERE status = 'sent') AS sent,
                 count(*) FILTER (WHERE status = 'failed') AS failed,
                 count(*) FILTER (WHERE status = 'unsubscribed') AS unsubscribed,
                 count(*) FILTER (WHERE status = 'in_doubt') AS in_doubt,
                 count(*) FILTER (WHERE status = 'bounced') AS bounced,
                 count(*) FILTER (WHERE status = 'complained') AS complained,
                 count(*) FILTER (WHERE status = 'suppressed') AS suppressed
          FROM old_rows GROUP BY campaign_id ORDER BY campaign_id) d
    WHERE k.campaign_id = d.campaign_id;
    RETURN NULL;
END $$;

CREATE TRIGGER recipient_counts_insert AFTER INSERT ON recipient
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION recipient_counts_on_insert();
CREATE TRIGGER recipient_counts_update AFTER UPDATE ON recipient
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION recipient_counts_on_update();
CREATE TRIGGER recipient_counts_delete AFTER DELETE ON recipient
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION recipient_counts_on_delete();

-- The counts of the campaigns that already have recipients.
INSERT INTO campaign_counts (campaign_id, pending, sending, sent, failed, unsubscribed, in_doubt,
                             bounced, complained, suppressed)
SELECT campaign_id,
       count(*) FILTER (WHERE status = 'pending'),
       count(*) FILTER (WHERE status = 'sending'),
       count(*) FILTER (WHERE status = 'sent'),
       count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status = 'unsubscribed'),
       count(*) FILTER (WHERE status = 'in_doubt'),
       count(*) FILTER (WHERE status = 'bounced'),
       count(*) FILTER (WHERE status = 'complained'),
       count(*) FILTER (WHERE status = 'suppressed')
FROM recipient GROUP BY campaign_id;
