-- name: spent-tokens-hour
-- Tokens the hour [$1, $2) spent, as the send log knows them: every attempt
-- took one, whatever its outcome (sent, failed, in doubt, transient). What
-- rebuilds the account's hour counter when Redis lost it. $3: the account
-- ('' the default's; NULL in the log: the default's).
SELECT count(*)::bigint FROM send_log
WHERE status IN ('sent', 'failed', 'in_doubt', 'transient')
  AND created_at >= $1 AND created_at < $2 AND COALESCE(account, '') = $3;

-- name: spent-tokens-day
-- The same for one owner's local day [$2, $3): their campaigns' sends and
-- their test emails (logged with the campaign they tested).
SELECT count(*)::bigint FROM send_log s
JOIN campaign c ON c.id = s.campaign_id
WHERE c.owner_id = $1
  AND s.status IN ('sent', 'failed', 'in_doubt', 'transient')
  AND s.created_at >= $2 AND s.created_at < $3;
