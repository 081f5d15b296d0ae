-- The dashboard's view of the database, read at most once a second on a pool connection.
-- Cheap by construction: every count walks one of the partial indexes and stops at $1
-- (the dashboard shows "$1+"), the oldest due intent is one probe of the pending index,
-- and the rest comes from the statistics views. Never a scan of the intent table.

-- name: db_health
-- $1: count cap; $2: the schema name (a value here, to look the table up in the catalog).
SELECT
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent
                           WHERE status = 'pending' AND run_at <= now() LIMIT $1) AS d)
        AS pending_due,
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent
                           WHERE status = 'pending' AND run_at > now() LIMIT $1) AS l)
        AS pending_later,
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent
                           WHERE status = 'processing' LIMIT $1) AS p)
        AS processing,
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent
                           WHERE status = 'dead' LIMIT $1) AS x)
        AS dead,
    -- The pending index is ordered by run_at: its first entry is the longest-waiting one,
    -- and if that one is not due yet, nothing is.
    (SELECT extract(epoch FROM now() - min(run_at))::float8 FROM {{schema}}.intent
     WHERE status = 'pending') AS oldest_pending_run_at_age,
    -- Ordering keys halted by a dead head: the halted index, one probe of the blocking index
    -- each (the anti-join), capped like the counts above.
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent AS d
                           WHERE d.ordering_key IS NOT NULL AND d.status = 'dead'
                             AND NOT d.ordering_skipped
                             AND NOT EXISTS (SELECT 1 FROM {{schema}}.intent AS b
                                             WHERE b.ordering_key = d.ordering_key
                                               AND b.id < d.id
                                               AND (b.status IN ('pending', 'processing')
                                                    OR (b.status = 'dead'
                                                        AND NOT b.ordering_skipped)))
                           LIMIT $1) AS h)
        AS halted_keys,
    oldest_halted.ordering_key AS oldest_halted_key,
    extract(epoch FROM now() - oldest_halted.created_at)::float8 AS oldest_halted_age,
    pg_notification_queue_usage() AS notify_queue_usage,
    (SELECT count(*) FROM {{schema}}.idle_worker) AS idle_workers,
    t.n_live_tup AS live_tuples,
    t.n_dead_tup AS dead_tuples,
    extract(epoch FROM now() - greatest(t.last_autovacuum, t.last_vacuum))::float8
        AS last_vacuum_age,
    pg_table_size(t.relid) AS table_bytes,
    x.age AS oldest_xact_age,
    x.pid AS oldest_xact_pid,
    x.application_name AS oldest_xact_application
FROM (SELECT 1) AS one
LEFT JOIN pg_stat_user_tables AS t ON t.schemaname = $2 AND t.relname = 'intent'
-- The halting dead intent with the lowest id (the first halted of all).
LEFT JOIN LATERAL (
    SELECT d.ordering_key, d.created_at FROM {{schema}}.intent AS d
    WHERE d.ordering_key IS NOT NULL AND d.status = 'dead' AND NOT d.ordering_skipped
      AND NOT EXISTS (SELECT 1 FROM {{schema}}.intent AS b
                      WHERE b.ordering_key = d.ordering_key AND b.id < d.id
                        AND (b.status IN ('pending', 'processing')
                             OR (b.status = 'dead' AND NOT b.ordering_skipped)))
    ORDER BY d.id
    LIMIT 1
) AS oldest_halted ON true
-- The oldest transaction in this database that holds back the xmin horizon (by a snapshot or
-- a transaction id): VACUUM cannot remove rows it might still see. Vacuums themselves don't.
LEFT JOIN LATERAL (
    SELECT greatest(0, extract(epoch FROM now() - a.xact_start))::float8 AS age, a.pid, a.application_name
    FROM pg_stat_activity AS a
    WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
      AND a.pid <> pg_backend_pid()
      AND a.datname = current_database()
      AND a.backend_type <> 'autovacuum worker'
      AND a.xact_start IS NOT NULL
    ORDER BY a.xact_start
    LIMIT 1
) AS x ON true
