-- A quota sync subtracts the recipients claimed for sending right now, across
-- all campaigns; they are few at any moment, so a partial index finds them
-- without reading the whole table.
CREATE INDEX recipient_sending ON recipient (id) WHERE status = 'sending';
