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

-- name: purge
-- One batch of finished intents older than $1 seconds (sent: since sent_at; dead: since
-- created_at), statuses $2, at most $3 rows. Walks the primary key from the oldest id, so a
-- batch stops early instead of scanning the table. Returns how many were deleted.
WITH gone AS (
    DELETE FROM {{schema}}.intent
    WHERE id = ANY(ARRAY(
        SELECT id FROM {{schema}}.intent
        WHERE status = ANY($2::text[])
          AND COALESCE(sent_at, created_at) < now() - make_interval(secs => $1)
        ORDER BY id
        LIMIT $3))
    RETURNING 1
)
SELECT count(*) FROM gone
