-- One notice per episode (issue 8): besides the reason the owner was last
-- notified of, the time that notice promised. A deferral notifies again only
-- when it promises a later time, or when the reason becomes one the manager
-- must act on (quota_exhausted); NULL with a quota notice: no time was given.
ALTER TABLE queue_entry ADD COLUMN notified_until timestamptz;

-- Limits an operator changes without a restart (issue 8): the local quota's
-- monthly allowance set by quota.set (NULL: MAILER_MONTHLY_QUOTA holds), and
-- a monthly limit that is only what the provider reports (NULL: the http
-- provider does not say).
ALTER TABLE quota ADD COLUMN monthly_override integer CHECK (monthly_override >= 0);
ALTER TABLE quota ALTER COLUMN monthly_limit DROP NOT NULL;
