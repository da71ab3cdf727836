-- Issue 11, bulk ingest: recipient.campaign_id's foreign key checked every inserted row
-- on its own (one locking lookup of the campaign a row: 16 of the 56 s of a 1 000 000-row
-- recipients.import on the development machine). The same rules, once a statement:
--
-- * an insert locks its campaigns FOR KEY SHARE (as the key's check did: a concurrent
--   delete of the campaign waits for this transaction) and fails with the key's error
--   (23503) if one is missing;
-- * a recipient never moves to another campaign (the key allowed it; nothing does it);
-- * deleting a campaign deletes its recipients (ON DELETE CASCADE), in the same statement.
ALTER TABLE recipient DROP CONSTRAINT recipient_campaign_id_fkey;

CREATE FUNCTION recipient_campaign_exists() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
    missing bigint;
BEGIN
    SELECT array_agg(DISTINCT campaign_id) INTO ids FROM new_rows;
    PERFORM 1 FROM campaign WHERE id = ANY(ids) ORDER BY id FOR KEY SHARE;
    -- A new statement: under READ COMMITTED it sees a delete that committed meanwhile.
    SELECT n INTO missing FROM unnest(ids) n
    WHERE NOT EXISTS (SELECT 1 FROM campaign c WHERE c.id = n)
    LIMIT 1;
    IF FOUND THEN
        RAISE foreign_key_violation USING
            MESSAGE = 'insert or update on table "recipient" violates foreign key constraint'
                      ' "recipient_campaign_id_fkey"',
            DETAIL = format('Key (campaign_id)=(%s) is not present in table "campaign".',
                            missing),
            TABLE = 'recipient',
            CONSTRAINT = 'recipient_campaign_id_fkey';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER recipient_campaign_exists AFTER INSERT ON recipient
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION recipient_campaign_exists();

CREATE FUNCTION recipient_campaign_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.campaign_id IS DISTINCT FROM OLD.campaign_id THEN
        RAISE foreign_key_violation USING
            MESSAGE = 'a recipient does not move to another campaign',
            TABLE = 'recipient',
            CONSTRAINT = 'recipient_campaign_id_fkey';
    END IF;
    RETURN NEW;
END $$;

-- Fires only for an UPDATE that sets campaign_id: the send path's updates never do.
CREATE TRIGGER recipient_campaign_fixed BEFORE UPDATE OF campaign_id ON recipient
    FOR EACH ROW EXECUTE FUNCTION recipient_campaign_fixed();

CREATE FUNCTION campaign_delete_recipients() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM recipient WHERE campaign_id IN (SELECT id FROM old_rows);
    RETURN NULL;
END $$;

CREATE TRIGGER campaign_delete_recipients AFTER DELETE ON campaign
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign_delete_recipients();
