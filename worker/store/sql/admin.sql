-- Operator commands: status, retry-dead.


-- name: status_counts
SELECT kind, status, count(*) AS n
FROM {{schema}}.intent
GROUP BY kind, status
ORDER BY kind, status

-- name: status_table_rows
-- The planner's estimate of the intent table's rows (pg_class.reltuples, kept by ANALYZE and
-- VACUUM; -1: never analysed, then the statistics collector's live tuples). Free.
SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint
            ELSE coalesce(pg_stat_get_live_tuples(c.oid), 0) END
FROM pg_class AS c
WHERE c.oid = '{{schema}}.intent'::regclass

-- name: status_counts_unfinished
-- Exact counts by kind of what is not sent, each state over its own partial index (pending
-- free, pending held behind its key, processing, dead): work in proportion to those rows,
-- not to the table. For a big table, where counting sent rows would be a scan.
SELECT kind, 'pending' AS status, count(*) AS n FROM {{schema}}.intent
WHERE status = 'pending' AND NOT ordering_held GROUP BY kind
UNION ALL
SELECT kind, 'pending', count(*) FROM {{schema}}.intent
WHERE ordering_key IS NOT NULL AND status = 'pending' AND ordering_held GROUP BY kind
UNION ALL
SELECT kind, 'processing', count(*) FROM {{schema}}.intent
WHERE status = 'processing' GROUP BY kind
UNION ALL
SELECT kind, 'dead', count(*) FROM {{schema}}.intent
WHERE status = 'dead' GROUP BY kind

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
-- One batch of finished intents: the next $3 rows of the table by id after id $4 (a window
-- of the primary key, so a batch reads at most $3 rows whatever the table holds), of which
-- sent rows whose sent_at is over $1 seconds ago and dead rows created over $2 seconds ago
-- (NULL: keep that state) are deleted. $5: keep dead rows that hold up their ordering key
-- (a halting head, or one that will be). $6: take the retention lock first, in this statement's
-- own transaction, and do nothing without it (another deleter has it): one deleter at a
-- time across processes and hosts, with nothing held between statements (a transaction
-- pooler hands each statement another server connection; a failover loses nothing).
-- The conditions are on the deleted row itself, so a row changed meanwhile (retry-dead) is
-- judged again as it is now. first_kept: the lowest id of the window still there. young:
-- every row of the window is newer than the smaller age (ids follow created_at, but for a
-- producer transaction that spans the cutoff): the caller may stop there.
WITH lock AS MATERIALIZED (
    SELECT CASE WHEN $6::boolean THEN pg_try_advisory_xact_lock({{retention_lock}})
                ELSE true END AS got
), win AS MATERIALIZED (
    SELECT id, created_at FROM {{schema}}.intent
    WHERE id > $4::bigint AND (SELECT got FROM lock)
    ORDER BY id
    LIMIT $3
), gone AS (
    DELETE FROM {{schema}}.intent AS i
    WHERE i.id = ANY(ARRAY(SELECT id FROM win))
      AND ((i.status = 'sent' AND i.sent_at < now() - make_interval(secs => $1::float8))
           OR (i.status = 'dead' AND i.created_at < now() - make_interval(secs => $2::float8)
               AND NOT ($5::boolean AND i.ordering_key IS NOT NULL AND NOT i.ordering_skipped)))
    RETURNING i.id, i.status
)
SELECT (SELECT got FROM lock) AS got,
       (SELECT count(*) FROM gone WHERE status = 'sent') AS sent,
       (SELECT count(*) FROM gone WHERE status = 'dead') AS dead,
       (SELECT count(*) FROM win) AS examined,
       (SELECT max(id) FROM win) AS last_id,
       (SELECT min(id) FROM win WHERE id NOT IN (SELECT id FROM gone)) AS first_kept,
       (SELECT coalesce(min(created_at) >= now() - make_interval(secs => least($1::float8, $2::float8)), true)
        FROM win) AS young

-- name: retention_oldest
-- The oldest sent and dead intents kept, their age as retention counts it, for /metrics.
-- Sent: the one with the lowest id over $1 (a walk of the primary key from retention's floor,
-- below which everything is gone, to the first sent row; ids follow the order of sending). Dead: the
-- exact minimum, over the dead rows' partial index (few, or there is a bigger problem).
SELECT (SELECT extract(epoch FROM now() - sent_at)::float8 FROM {{schema}}.intent
        WHERE status = 'sent' AND id > $1::bigint ORDER BY id LIMIT 1) AS sent,
       (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM {{schema}}.intent
        WHERE status = 'dead') AS dead
