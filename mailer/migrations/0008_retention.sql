-- Retention (the leader removes old rows in small batches, mailer/retention.py).
-- A campaign whose recipients were removed keeps their counts here, so its view
-- still says how it went; NULL while the recipients are in the table.
ALTER TABLE campaign ADD COLUMN purged_counts jsonb;
-- What the batches walk: old audit rows by time, finished campaigns by age.
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX campaign_finished ON campaign (finished_at) WHERE finished_at IS NOT NULL;
-- Removing a recipient sets send_log.recipient_id to NULL (ON DELETE SET NULL):
-- without this index every removed recipient scans the whole send log.
CREATE INDEX send_log_recipient ON send_log (recipient_id) WHERE recipient_id IS NOT NULL;
