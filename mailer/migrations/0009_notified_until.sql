-- One notice per episode (issue 8): besides the reason the owner was last
-- notified of, the time that notice promised. A deferral notifies again only
-- when it promises a later time, or when the reason becomes one the manager
-- must act on (quota_exhausted); NULL with a quota notice: no time was given.
ALTER TABLE queue_entry ADD COLUMN notified_until timestamptz;
