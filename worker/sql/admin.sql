-- Operator commands: status, retry-dead.


-- name: status_counts
SELECT kind, status, count(*) AS n
FROM {{schema}}.intent
GROUP BY kind, status
ORDER BY kind, status

-- name: status_oldest_pending
-- Age of the oldest intent that is due and still waiting: the number that says whether the
-- relay keeps up.
SELECT extract(epoch FROM now() - min(created_at))::float8
FROM {{schema}}.intent
WHERE status = 'pending' AND run_at <= now()

-- name: retry_dead
-- Dead intents back to pending with a fresh attempt budget; last_error stays for context.
UPDATE {{schema}}.intent
SET status = 'pending', attempts = 0, run_at = now()
WHERE status = 'dead'
  AND ($1::text IS NULL OR kind = $1)
  AND ($2::bigint IS NULL OR id = $2)
RETURNING id
