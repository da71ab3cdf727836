-- name: health-ping
-- Readiness: PostgreSQL answers a query on a pool connection.
SELECT 1;
