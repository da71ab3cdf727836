-- When a claimed recipient was handed to SMTP (issue 7). A campaign actor
-- marks each small wave of its batch just before that wave's SMTP
-- transactions start, so after a kill -9 the takeover knows which `sending`
-- rows may have reached the server (handed: `in_doubt`) and which never left
-- the process (not handed: back to `pending`, sent later, exactly once).
ALTER TABLE recipient ADD COLUMN handed_at timestamptz;

-- A mark belongs to one claim: whenever a row leaves `sending` or is claimed
-- anew, its mark goes. Done by a trigger so that every statement that claims,
-- records or releases rows keeps the rule without repeating it.
CREATE FUNCTION recipient_handed_belongs_to_claim() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM 'sending'
       OR OLD.status IS DISTINCT FROM 'sending'
       OR NEW.claimed_by IS DISTINCT FROM OLD.claimed_by THEN
        NEW.handed_at := NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER recipient_handed_belongs_to_claim
BEFORE UPDATE ON recipient
FOR EACH ROW
WHEN (NEW.handed_at IS NOT NULL)
EXECUTE FUNCTION recipient_handed_belongs_to_claim();
