-- Several SMTP accounts (issue 12). A campaign names its account and,
-- optionally, a backup used while its own account's breaker is open; NULL: the
-- default account (whichever MAILER_SMTP_DEFAULT_ACCOUNT names then). Names
-- are checked against the configuration by the API, not here: accounts live in
-- the environment.
ALTER TABLE campaign ADD COLUMN smtp_account text;
ALTER TABLE campaign ADD COLUMN backup_account text;

-- Which account's limit or breaker a campaign waits for (NULL: none is named,
-- or the default's): what the manager's view says.
ALTER TABLE queue_entry ADD COLUMN defer_account text;

-- The account an attempt went through (NULL: the default account, and every
-- row written before accounts existed): a local quota counts its own month, a
-- rebuilt hour counter its own hour.
ALTER TABLE send_log ADD COLUMN account text;

-- One quota row per account: '' is the default account's (the row the single
-- account had); another account's row is created when the service starts.
ALTER TABLE quota ADD COLUMN account text NOT NULL DEFAULT '';
ALTER TABLE quota DROP CONSTRAINT quota_pkey;
ALTER TABLE quota DROP COLUMN id;
ALTER TABLE quota ADD PRIMARY KEY (account);
