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
-- One with an ordering key blocks its key again, in its own place: its later intents wait.
UPDATE {{schema}}.intent
SET status = 'pending', attempts = 0, run_at = now(), ordering_skipped = false
WHERE status = 'dead'
  AND ($1::text IS NULL OR kind = $1)
  AND ($2::bigint IS NULL OR id = $2)
  AND ($3::text IS NULL OR ordering_key = $3)
RETURNING id

-- name: skip_dead
-- Let key $1 move on past the dead intent that halts it: the row stays dead with its error
-- (evidence), and the release trigger frees the next intent of the key.
UPDATE {{schema}}.intent SET ordering_skipped = true
WHERE id = (SELECT id FROM {{schema}}.intent
            WHERE ordering_key = $1 AND status = 'dead' AND NOT ordering_skipped
            ORDER BY id LIMIT 1)
RETURNING id

-- name: halted_keys
-- Keys halted by a dead intent (the lowest blocking row of its key is dead and not skipped):
-- how many, how many intents wait behind them, and the oldest. Index work only: the halted
-- index, one probe of the blocking index per dead row, the waiting rows of halted keys.
WITH halted AS (
    SELECT d.id, d.ordering_key FROM {{schema}}.intent AS d
    WHERE d.ordering_key IS NOT NULL AND d.status = 'dead' AND NOT d.ordering_skipped
      AND NOT EXISTS (SELECT 1 FROM {{schema}}.intent AS b
                      WHERE b.ordering_key = d.ordering_key AND b.id < d.id
                        AND (b.status IN ('pending', 'processing')
                             OR (b.status = 'dead' AND NOT b.ordering_skipped)))
)
SELECT (SELECT count(*) FROM halted) AS halted_keys,
       (SELECT count(*) FROM {{schema}}.intent AS w JOIN halted AS h
            ON w.ordering_key = h.ordering_key AND w.id > h.id
        WHERE w.status = 'pending') AS held_intents,
       i.id AS oldest_id, i.ordering_key AS oldest_key, i.kind AS oldest_kind,
       i.last_error AS oldest_error,
       extract(epoch FROM now() - i.created_at)::float8 AS oldest_age
FROM (SELECT 1) AS one
LEFT JOIN {{schema}}.intent AS i ON i.id = (SELECT min(id) FROM halted)

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
