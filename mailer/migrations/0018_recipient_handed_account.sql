-- The SMTP account a handed wave goes through (issue 12; NULL: the default account,
-- as send_log.account). Set with handed_at by the hand, so that when a takeover or
-- a reconcile turns a dead owner's handed rows 'in_doubt', their send-log rows name
-- the account that may have sent them: its local quota counts its own month, its
-- rebuilt hour counter its own hour (not the default's).
ALTER TABLE recipient ADD COLUMN handed_account text;

-- The mark's account belongs to the mark (0005): it goes with it.
CREATE OR REPLACE FUNCTION recipient_handed_belongs_to_claim() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM 'sending'
       OR OLD.status IS DISTINCT FROM 'sending'
       OR NEW.claimed_by IS DISTINCT FROM OLD.claimed_by THEN
        NEW.handed_at := NULL;
        NEW.handed_account := NULL;
    END IF;
    RETURN NEW;
END;
$$;
