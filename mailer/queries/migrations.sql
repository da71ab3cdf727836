-- Migrations (mailer/db.py: migrate). The statements of mailer/migrations/*.sql
-- themselves are run as they are; these are the bookkeeping around them.

-- name: migration-lock
-- Serializes migrate() across pods: a session-level advisory lock on a constant
-- key ($1, db.MIGRATION_LOCK_KEY), waited for, held until migration-unlock.
SELECT pg_advisory_lock($1);

-- name: migration-unlock
SELECT pg_advisory_unlock($1);

-- name: migration-create-table
-- The record of applied migrations; created by the first migrate() itself.
CREATE TABLE IF NOT EXISTS schema_migration (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now());

-- name: migration-versions
SELECT version FROM schema_migration;

-- name: migration-record
-- In the same transaction as the migration it records.
INSERT INTO schema_migration (version, name) VALUES ($1, $2);
