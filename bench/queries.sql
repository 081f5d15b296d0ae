-- Queries of the bench harness itself (never of the relay, which has its own in worker/sql).
-- {{schema}} is the run's schema, quoted; values are bind parameters.

-- name: seed
-- $1 intents of kind $2, committed in one statement (the drain scenario's backlog).
INSERT INTO {{schema}}.intent (kind, payload)
SELECT $2, jsonb_build_object('k', g) FROM generate_series(0, $1 - 1) AS g

-- name: seed_keyed
-- The same on $3 ordering keys, interleaved: intent g on key 'k' || (g % $3).
INSERT INTO {{schema}}.intent (kind, payload, ordering_key)
SELECT $2, jsonb_build_object('k', g), 'k' || (g % $3) FROM generate_series(0, $1 - 1) AS g

-- name: seed_email
INSERT INTO {{schema}}.intent (kind, payload)
SELECT 'email', jsonb_build_object('to', 'rcpt' || g || '@example.com',
                                   'subject', 'bench ' || g, 'text', 'Hello from the bench.')
FROM generate_series(0, $1 - 1) AS g

-- name: unfinished
-- Anything not yet recorded as delivered (drains end when this is false).
SELECT EXISTS (SELECT 1 FROM {{schema}}.intent WHERE status IN ('pending', 'processing'))

-- name: bare_claim_delete
-- The reference loop: claim a batch with SKIP LOCKED and delete it, one statement.
DELETE FROM {{schema}}.intent
WHERE id = ANY(ARRAY(
    SELECT id FROM {{schema}}.intent
    WHERE status = 'pending'
    ORDER BY run_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED))
RETURNING payload

-- name: user_triggers
-- Triggers on the intent table (the producer-cost scenario swaps them).
SELECT tgname FROM pg_trigger
WHERE tgrelid = to_regclass($1) AND NOT tgisinternal

-- name: always_notify_trigger
-- The first notify trigger (commit b86cd5d): a statement-level trigger that notifies on
-- every insert, whoever is listening or busy. Kept here as the baseline the producer-cost
-- scenario measures main's trigger against.
CREATE OR REPLACE FUNCTION {{schema}}.bench_notify_always() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({{channel}}, '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER bench_notify_always
    AFTER INSERT ON {{schema}}.intent
    FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.bench_notify_always();

-- name: backend_pids
-- Server processes serving the connections of one bench worker (found by application_name).
SELECT pid FROM pg_stat_activity WHERE application_name LIKE '%' || $1 || '%'

-- name: aux_pids
-- The server's own processes (WAL writer, checkpointer, ...): their CPU is part of the cost.
SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'

-- name: terminate_backend
-- Waits (up to 5 s) until the backend is gone: without the timeout the call returns as soon
-- as the signal is sent, and a notification committed right after could still get through.
SELECT pg_terminate_backend($1, 5000)

-- name: pgqueuer_unfinished
SELECT EXISTS (SELECT 1 FROM {{schema}}.pgqueuer)

-- name: procrastinate_unfinished
SELECT EXISTS (SELECT 1 FROM {{schema}}.procrastinate_jobs WHERE status IN ('todo', 'doing'))

-- name: seed_sent
-- $1 intents of kind $2 already delivered: the history a long-running outbox carries.
INSERT INTO {{schema}}.intent (kind, payload, status, attempts, sent_at)
SELECT $2, jsonb_build_object('k', g), 'sent', 1, now() FROM generate_series(0, $1 - 1) AS g

-- name: analyze_intent
-- What autovacuum's analyze would have done during a day-long outage.
ANALYZE {{schema}}.intent

-- name: producer_waits
-- What the server processes of the connections named $1 are doing right now (sampled).
SELECT coalesce(wait_event_type, 'CPU') AS what, count(*) AS n
FROM pg_stat_activity WHERE application_name = $1 GROUP BY 1
-- name: seed_traced
-- The seed, every intent with the same W3C trace context (the tracing scenario).
INSERT INTO {{schema}}.intent (kind, payload, trace_context)
SELECT $2, jsonb_build_object('k', g),
       '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}'::jsonb
FROM generate_series(0, $1 - 1) AS g

-- name: dead_tuples
-- The intent table's dead tuples (the statistics collector's count; the xmin scenario).
SELECT n_dead_tup FROM pg_stat_user_tables
WHERE relid = '{{schema}}.intent'::regclass
