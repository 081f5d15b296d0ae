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
WHERE status = 'pending' AND NOT ordering_held AND run_at <= now()

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
-- Keys halted by a dead intent (the halted_key view): how many, how many intents wait behind
-- them, and the oldest. Index work only: the halted index, one probe of the blocking index
-- per dead row, the waiting rows of halted keys.
SELECT (SELECT count(*) FROM {{schema}}.halted_key) AS halted_keys,
       (SELECT count(*) FROM {{schema}}.intent AS w JOIN {{schema}}.halted_key AS h
            ON w.ordering_key = h.ordering_key AND w.id > h.id
        WHERE w.status = 'pending') AS held_intents,
       h.id AS oldest_id, h.ordering_key AS oldest_key, h.kind AS oldest_kind,
       h.last_error AS oldest_error,
       extract(epoch FROM now() - h.created_at)::float8 AS oldest_age
FROM (SELECT 1) AS one
-- min(id), not ORDER BY id LIMIT 1: the planner was seen to walk the whole primary key for that.
LEFT JOIN {{schema}}.intent AS h ON h.id = (SELECT min(id) FROM {{schema}}.halted_key)

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
