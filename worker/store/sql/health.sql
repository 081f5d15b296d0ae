-- The dashboard's view of the database, read at most once a second on a pool connection.
-- Cheap by construction: every count walks one of the partial indexes and stops at $1
-- (the dashboard shows "$1+"), the oldest due intent is one probe of the pending index,
-- and the rest comes from the statistics views. Never a scan of the intent table.

-- name: db_health
-- $1: count cap; $2: the schema name (a value here, to look the table up in the catalog).
SELECT
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent
                           WHERE status = 'pending' AND NOT ordering_held
                             AND run_at <= now() LIMIT $1) AS d)
        AS pending_due,
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent
                           WHERE status = 'pending' AND NOT ordering_held
                             AND run_at > now() LIMIT $1) AS l)
        AS pending_later,
    -- Pending rows waiting behind the head of their ordering key (not in the pending index):
    -- the blocking index has every keyed pending row, so this walks at most those.
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent
                           WHERE ordering_key IS NOT NULL AND status = 'pending'
                             AND ordering_held LIMIT $1) AS w)
        AS pending_held,
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent
                           WHERE status = 'processing' LIMIT $1) AS p)
        AS processing,
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.intent
                           WHERE status = 'dead' LIMIT $1) AS x)
        AS dead,
    -- The pending index is ordered by run_at: its first entry is the longest-waiting one,
    -- and if that one is not due yet, nothing is. (Rows held behind the head of their
    -- ordering key are not in it: they wait for their key, not for the relay.)
    (SELECT extract(epoch FROM now() - min(run_at))::float8 FROM {{schema}}.intent
     WHERE status = 'pending' AND NOT ordering_held) AS oldest_pending_run_at_age,
    -- Ordering keys halted by a dead head (the halted_key view), capped like the counts.
    (SELECT count(*) FROM (SELECT 1 FROM {{schema}}.halted_key LIMIT $1) AS h)
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
    x.name AS oldest_xact_application,
    x.kind AS horizon_kind,
    x.state AS horizon_state,
    x.xids AS horizon_xids,
    pg_indexes_size(t.relid) AS index_bytes,
    -- Which server this is (of a multi-host DSN's hosts); no address over a Unix socket.
    host(inet_server_addr()) AS server_addr,
    current_setting('port')::int AS server_port,
    NOT pg_is_in_recovery() AS server_primary
FROM (SELECT 1) AS one
LEFT JOIN pg_stat_user_tables AS t ON t.schemaname = $2 AND t.relname = 'intent'
-- The halting dead intent with the lowest id (the first halted of all); min(id), not ORDER BY
-- id LIMIT 1, which the planner was seen to answer by walking the whole primary key.
LEFT JOIN {{schema}}.intent AS oldest_halted
    ON oldest_halted.id = (SELECT min(id) FROM {{schema}}.halted_key)
-- What holds back the xmin horizon for this database, so that VACUUM cannot remove rows it
-- might still see: the holder furthest behind (by transaction ids) of an open transaction
-- or snapshot here (vacuums themselves don't count), a walsender (hot_standby_feedback), a
-- replication slot, a prepared transaction.
LEFT JOIN LATERAL (
    SELECT h.* FROM (
        SELECT 'transaction' AS kind, a.pid, a.application_name AS name, a.state,
               greatest(0, extract(epoch FROM now() - a.xact_start))::float8 AS age,
               greatest(age(a.backend_xmin), age(a.backend_xid)) AS xids
        FROM pg_stat_activity AS a
        WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
          AND a.pid <> pg_backend_pid()
          AND (a.datname = current_database() OR a.backend_type = 'walsender')
          AND a.backend_type <> 'autovacuum worker'
        UNION ALL
        SELECT 'replication slot', s.active_pid, s.slot_name,
               CASE WHEN s.active THEN 'active' ELSE 'inactive' END, NULL, age(s.xmin)
        FROM pg_replication_slots AS s WHERE s.xmin IS NOT NULL
        UNION ALL
        SELECT 'prepared transaction', NULL, p.gid, 'prepared',
               extract(epoch FROM now() - p.prepared)::float8, age(p.transaction)
        FROM pg_prepared_xacts AS p WHERE p.database = current_database()
    ) AS h
    ORDER BY h.xids DESC, h.age DESC NULLS LAST
    LIMIT 1
) AS x ON true

-- name: server
-- The server a connection landed on, as the dashboard's db_health reads it.
SELECT host(inet_server_addr()) AS server_addr,
       current_setting('port')::int AS server_port,
       NOT pg_is_in_recovery() AS server_primary
