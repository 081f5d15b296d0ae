-- outbox-worker schema, whole and current, with triggers/*.sql: for reading and review.
-- `outbox-worker migrate` applies worker/store/migrations/NNNN_*.sql in order (what
-- `outbox-worker schema` prints); tests/test_migrations.py checks they build exactly this.
-- {{schema}} is the configured schema (default "outbox"), quoted as an identifier.

-- What migrate applied, and when.
CREATE SCHEMA IF NOT EXISTS {{schema}};
CREATE TABLE IF NOT EXISTS {{schema}}.schema_version (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE SCHEMA IF NOT EXISTS {{schema}};

CREATE TABLE IF NOT EXISTS {{schema}}.intent (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          text        NOT NULL CHECK (kind <> ''),
    payload       jsonb       NOT NULL,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'processing', 'sent', 'dead')),
    attempts      integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- NULL: the worker's --max-attempts applies.
    max_attempts  integer     CHECK (max_attempts > 0),
    run_at        timestamptz NOT NULL DEFAULT now(),
    locked_by     text,
    locked_until  timestamptz,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    dedupe_key    text,
    -- Intents that share an ordering key are delivered one at a time, in id order (see the
    -- claim in worker/store/sql/relay.sql). NULL: unordered.
    ordering_key  text CONSTRAINT intent_ordering_key_not_empty CHECK (ordering_key <> ''),
    -- A dead intent that no longer holds up its key (discarded by an operator, or written
    -- by a worker running with --ordering-on-dead continue).
    ordering_skipped boolean NOT NULL DEFAULT false,
    -- A hint, never a rule: this pending row is known not to be its key's head, so claims
    -- need not look at it (kept out of intent_pending_free). Set by workers (hold_backlog),
    -- cleared by the release trigger when the row before it stops blocking.
    ordering_held boolean NOT NULL DEFAULT false,
    -- The producer's W3C trace context, {"traceparent": "...", "tracestate": "..."} (the
    -- latter optional); NULL: none. Checked by intent_trace_context_valid below.
    trace_context jsonb,
    -- The state machine, enforced by the database rather than trusted to every writer.
    CONSTRAINT intent_sent_at_iff_sent CHECK ((status = 'sent') = (sent_at IS NOT NULL)),
    CONSTRAINT intent_lease_iff_processing
        CHECK ((status = 'processing') = (locked_by IS NOT NULL AND locked_until IS NOT NULL)),
    CONSTRAINT intent_lease_both_or_neither CHECK ((locked_by IS NULL) = (locked_until IS NULL)),
    CONSTRAINT intent_dead_has_reason CHECK (status <> 'dead' OR last_error IS NOT NULL)
);

-- Tables created before ordering keys or trace context get the columns too.
ALTER TABLE {{schema}}.intent
    ADD COLUMN IF NOT EXISTS ordering_key text
        CONSTRAINT intent_ordering_key_not_empty CHECK (ordering_key <> ''),
    ADD COLUMN IF NOT EXISTS ordering_skipped boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS ordering_held boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS trace_context jsonb;

-- What a trace context may hold: a valid traceparent, an optional tracestate of printable
-- ASCII; nothing else (the sinks copy both into message headers as they are). NOT VALID:
-- rows older than the column are all NULL, so there is nothing to check, and checking would
-- scan a large table under the exclusive lock; new and updated rows are checked all the same.
DO $$
BEGIN
    -- Checked first: ADD CONSTRAINT takes its exclusive lock before it finds the constraint
    -- there, and a re-run of the migration must not queue producers behind a long transaction.
    IF EXISTS (SELECT FROM pg_catalog.pg_constraint
               WHERE conrelid = '{{schema}}.intent'::regclass
                 AND conname = 'intent_trace_context_valid') THEN
        RETURN;
    END IF;
    ALTER TABLE {{schema}}.intent ADD CONSTRAINT intent_trace_context_valid CHECK (
        CASE WHEN jsonb_typeof(trace_context) = 'object' THEN
            (trace_context - 'traceparent' - 'tracestate' = '{}'::jsonb
             AND jsonb_typeof(trace_context -> 'traceparent') = 'string'
             AND trace_context ->> 'traceparent' ~ '^[0-9a-e][0-9a-f]-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
             AND trace_context ->> 'traceparent' !~ '^..-0{32}-|-0{16}-'
             AND coalesce(jsonb_typeof(trace_context -> 'tracestate'), 'string') = 'string'
             AND coalesce(trace_context ->> 'tracestate', '') ~ '^[\t -~]*$'
             AND coalesce(length(trace_context ->> 'tracestate'), 0) <= 512) IS TRUE
        ELSE trace_context IS NULL END) NOT VALID;
EXCEPTION WHEN duplicate_object THEN NULL;  -- a concurrent migrator added it first
END
$$;

-- Partial indexes cover only the rows the worker scans, so claiming stays an index scan
-- however many sent rows the table holds.
CREATE INDEX IF NOT EXISTS intent_pending_free
    ON {{schema}}.intent (run_at, id) WHERE status = 'pending' AND NOT ordering_held;
DROP INDEX IF EXISTS {{schema}}.intent_pending_run_at;  -- replaced by intent_pending_free
-- The rows that hold up their key: pending, in flight, or dead and not skipped. The claim
-- probes it for a lower id of the same key.
CREATE INDEX IF NOT EXISTS intent_ordering_blocking
    ON {{schema}}.intent (ordering_key, id)
    WHERE ordering_key IS NOT NULL AND {{blocks_key}};
-- At most one intent per key in flight, enforced by the database itself.
CREATE UNIQUE INDEX IF NOT EXISTS intent_ordering_in_flight
    ON {{schema}}.intent (ordering_key) WHERE ordering_key IS NOT NULL AND status = 'processing';
-- Dead intents that halt their key (status, the dashboard).
CREATE INDEX IF NOT EXISTS intent_ordering_halted
    ON {{schema}}.intent (ordering_key, id)
    WHERE ordering_key IS NOT NULL AND status = 'dead' AND NOT ordering_skipped;
CREATE INDEX IF NOT EXISTS intent_processing_lease
    ON {{schema}}.intent (locked_until) WHERE status = 'processing';
CREATE INDEX IF NOT EXISTS intent_dead_kind
    ON {{schema}}.intent (kind) WHERE status = 'dead';
CREATE UNIQUE INDEX IF NOT EXISTS intent_dedupe_key
    ON {{schema}}.intent (dedupe_key) WHERE dedupe_key IS NOT NULL;

-- The dead intents that halt their ordering key: the lowest row of the key that still blocks
-- it is dead and not skipped. `outbox-worker status` and the dashboard read this; so can you.
CREATE OR REPLACE VIEW {{schema}}.halted_key AS
SELECT d.ordering_key, d.id, d.kind, d.last_error, d.created_at
FROM {{schema}}.intent AS d
WHERE d.ordering_key IS NOT NULL AND d.status = 'dead' AND NOT d.ordering_skipped
  AND NOT EXISTS (SELECT 1 FROM {{schema}}.intent AS b
                  WHERE b.ordering_key = d.ordering_key AND b.id < d.id
                    AND {{blocks_key(b)}});

-- One SQL call for producers in any language, inside their own transaction.
-- A second call with the same dedupe_key inserts nothing and returns the first id.
-- SECURITY DEFINER: it runs with its owner's rights, so a producer needs only EXECUTE (and
-- USAGE on the schema), never a grant on the table, and cannot set status or the lease: it
-- inserts the producer columns and nothing else. search_path is pinned (pg_catalog, then
-- pg_temp last) so no object of the caller's can stand in for a built-in.
-- The older signatures (without ordering_key, trace_context) go first: beside the new one, a
-- call that leaves out trailing arguments would be ambiguous.
DROP FUNCTION IF EXISTS {{schema}}.enqueue(text, jsonb, timestamptz, text, integer);
DROP FUNCTION IF EXISTS {{schema}}.enqueue(text, jsonb, timestamptz, text, integer, text);
CREATE OR REPLACE FUNCTION {{schema}}.enqueue(
    kind          text,
    payload       jsonb,
    run_at        timestamptz DEFAULT NULL,
    dedupe_key    text        DEFAULT NULL,
    max_attempts  integer     DEFAULT NULL,
    ordering_key  text        DEFAULT NULL,
    trace_context jsonb       DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO {{schema}}.intent AS i
        (kind, payload, run_at, dedupe_key, max_attempts, ordering_key, trace_context)
    VALUES (enqueue.kind, enqueue.payload, COALESCE(enqueue.run_at, now()),
            enqueue.dedupe_key, enqueue.max_attempts, enqueue.ordering_key, enqueue.trace_context)
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING i.id INTO new_id;
    IF new_id IS NULL THEN
        -- ON CONFLICT waited for a concurrent inserter of the same key to commit, so the
        -- row is visible to this new statement (READ COMMITTED).
        SELECT i.id INTO new_id FROM {{schema}}.intent AS i WHERE i.dedupe_key = enqueue.dedupe_key;
    END IF;
    RETURN new_id;
END;
$$;

-- Workers that are idle and waiting for a notification, keyed by the backend pid of their
-- LISTEN connection. The insert trigger notifies only when this table is not empty: under
-- load every worker is busy and will claim again anyway, so producers' commits skip
-- NOTIFY and the server-wide lock it takes at commit. UNLOGGED: nothing here needs to
-- survive a crash (rows of vanished backends are swept by the workers).
CREATE UNLOGGED TABLE IF NOT EXISTS {{schema}}.idle_worker (
    backend_pid integer PRIMARY KEY,
    worker_id   text        NOT NULL,
    since       timestamptz NOT NULL DEFAULT now()
);

-- What each object means, kept in the catalog itself (`\d+ outbox.intent` shows it) and on
-- the reference page docs/reference/sql.md, which is generated from the catalog.
COMMENT ON TABLE {{schema}}.intent IS
    'Intents: what to deliver once the transaction that wrote them commits. Insert with '
    'enqueue() or a plain INSERT of kind and payload; the workers do the rest.';
COMMENT ON COLUMN {{schema}}.intent.id IS
    'Identity; intents of one ordering key are delivered in id order.';
COMMENT ON COLUMN {{schema}}.intent.kind IS
    'Which sink or handler delivers it: email, webhook, rabbitmq, nats, sidekiq, celery, sqs, '
    'kafka, or the name of your handler.';
COMMENT ON COLUMN {{schema}}.intent.payload IS
    'What to deliver; its shape depends on the kind.';
COMMENT ON COLUMN {{schema}}.intent.status IS
    'pending, then processing while a worker holds it, then sent or dead.';
COMMENT ON COLUMN {{schema}}.intent.attempts IS
    'Deliveries started so far.';
COMMENT ON COLUMN {{schema}}.intent.max_attempts IS
    'Attempts before it is dead; NULL: the worker''s --max-attempts (default 10).';
COMMENT ON COLUMN {{schema}}.intent.run_at IS
    'Not delivered before this time; after a failed attempt, the time of the next one.';
COMMENT ON COLUMN {{schema}}.intent.locked_by IS
    'The worker that holds the lease, while processing.';
COMMENT ON COLUMN {{schema}}.intent.locked_until IS
    'When the lease ends unless renewed; then any worker may take the row back.';
COMMENT ON COLUMN {{schema}}.intent.last_error IS
    'Why the last attempt failed, or why it is dead.';
COMMENT ON COLUMN {{schema}}.intent.created_at IS
    'When it was written (the producer''s transaction time).';
COMMENT ON COLUMN {{schema}}.intent.sent_at IS
    'When its delivery was recorded; set exactly when sent.';
COMMENT ON COLUMN {{schema}}.intent.dedupe_key IS
    'Unique when set: a second enqueue with the same key inserts nothing and returns the first '
    'id.';
COMMENT ON COLUMN {{schema}}.intent.ordering_key IS
    'NULL: unordered. Else delivered after every earlier intent (lower id) of the same key, '
    'one at a time.';
COMMENT ON COLUMN {{schema}}.intent.ordering_skipped IS
    'A dead intent that no longer halts its ordering key (skip-dead, or --ordering-on-dead '
    'continue).';
COMMENT ON COLUMN {{schema}}.intent.ordering_held IS
    'The workers'' hint that this pending row waits behind its key''s head, so claims skip it; '
    'cleared when the head stops blocking.';
COMMENT ON COLUMN {{schema}}.intent.trace_context IS
    'NULL, or the producer''s W3C trace context: {"traceparent": ..., "tracestate": ...}.';
-- A table made by hand or by an older tool may lack some of these constraints: only those
-- there are commented.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT * FROM (VALUES
        ('intent_kind_check',
         'A kind is never empty.'),
        ('intent_status_check',
         'The four statuses.'),
        ('intent_attempts_check',
         'Attempts count up from 0.'),
        ('intent_max_attempts_check',
         'At least one attempt.'),
        ('intent_ordering_key_not_empty',
         'An ordering key is NULL or not empty.'),
        ('intent_sent_at_iff_sent',
         'sent_at is set exactly when the intent is sent.'),
        ('intent_lease_iff_processing',
         'A lease (locked_by and locked_until) exactly while processing.'),
        ('intent_lease_both_or_neither',
         'locked_by and locked_until are set together or not at all.'),
        ('intent_dead_has_reason',
         'A dead intent always says why, in last_error.'),
        ('intent_trace_context_valid',
         'A valid traceparent and an optional tracestate of printable ASCII (at most 512 '
         'characters), nothing else. NOT VALID: rows from before the column are not checked.')
    ) AS v (name, note) LOOP
        IF EXISTS (SELECT FROM pg_catalog.pg_constraint
                   WHERE conrelid = '{{schema}}.intent'::regclass AND conname = c.name) THEN
            EXECUTE format('COMMENT ON CONSTRAINT %I ON {{schema}}.intent IS %L', c.name, c.note);
        END IF;
    END LOOP;
END
$$;
COMMENT ON INDEX {{schema}}.intent_pending_free IS
    'The claim: pending rows not held behind their ordering key, by run_at.';
COMMENT ON INDEX {{schema}}.intent_ordering_blocking IS
    'Rows that hold up their ordering key (pending, processing, or dead and not skipped): the '
    'claim looks here for an earlier row of the same key.';
COMMENT ON INDEX {{schema}}.intent_ordering_in_flight IS
    'At most one intent of each ordering key in flight.';
COMMENT ON INDEX {{schema}}.intent_ordering_halted IS
    'Dead intents that halt their ordering key (status, the dashboard, halted_key).';
COMMENT ON INDEX {{schema}}.intent_processing_lease IS
    'Leases by expiry, for the rescue of rows whose worker went away.';
COMMENT ON INDEX {{schema}}.intent_dead_kind IS
    'Dead intents by kind (retry-dead --kind, status).';
COMMENT ON INDEX {{schema}}.intent_dedupe_key IS
    'One intent per dedupe_key.';
COMMENT ON VIEW {{schema}}.halted_key IS
    'Ordering keys halted by a dead intent, with that intent: retry-dead --key or skip-dead '
    'lets the key move on.';
COMMENT ON COLUMN {{schema}}.halted_key.ordering_key IS 'The halted key.';
COMMENT ON COLUMN {{schema}}.halted_key.id IS 'The dead intent that halts it.';
COMMENT ON COLUMN {{schema}}.halted_key.kind IS 'Its kind.';
COMMENT ON COLUMN {{schema}}.halted_key.last_error IS 'Why it is dead.';
COMMENT ON COLUMN {{schema}}.halted_key.created_at IS 'When it was written.';
COMMENT ON FUNCTION
    {{schema}}.enqueue(text, jsonb, timestamptz, text, integer, text, jsonb) IS
    'Writes an intent in the caller''s transaction and returns its id (the first one''s id '
    'when dedupe_key repeats). run_at NULL: now. Needs only EXECUTE: it runs with its owner''s '
    'rights.';
COMMENT ON TABLE {{schema}}.idle_worker IS
    'The workers waiting for a notification; producers notify only while it has a row. '
    'Unlogged: nothing here survives a crash, nor needs to.';
COMMENT ON COLUMN {{schema}}.idle_worker.backend_pid IS
    'The backend pid of the worker''s LISTEN connection (rows of vanished backends are swept).';
COMMENT ON COLUMN {{schema}}.idle_worker.worker_id IS 'The worker, as its leases name it.';
COMMENT ON COLUMN {{schema}}.idle_worker.since IS 'When it became idle.';
COMMENT ON TABLE {{schema}}.schema_version IS
    'The migrations outbox-worker migrate applied to this schema.';
COMMENT ON COLUMN {{schema}}.schema_version.version IS 'The migration''s number.';
COMMENT ON COLUMN {{schema}}.schema_version.name IS 'Its name (worker/store/migrations/NNNN_name.sql).';
COMMENT ON COLUMN {{schema}}.schema_version.applied_at IS 'When it was applied.';
